"""Small dense linear algebra written as plain array arithmetic.

MoE parameter blocks are tiny: d × d gate covariances, (d+1) × (d+1) least-squares Gram matrices.
For them a call into LAPACK costs far more than the arithmetic, and batched LAPACK calls inside
``vmap``-ed ``while`` loops can deadlock XLA's CPU thread pool (the batched kernels wait on a pool
whose threads are all waiting too; seen with jaxlib 0.10 on 2 cores). These routines unroll the
textbook algorithms over the static matrix size instead, so they compile to fused elementwise code,
batch over any leading axes and run unchanged on a GPU.

* Cholesky–Banachiewicz: L_jj = √(A_jj − Σ_{m<j} L_jm²), L_ij = (A_ij − Σ_{m<j} L_im L_jm)/L_jj.
* Forward substitution L z = b and back substitution Lᵀ x = z, so A x = b is solved as LLᵀx = b.

A matrix that is not positive definite gives NaN (the square root of a negative number), which the
fitters report as a non-finite fit rather than a converged one.
"""

from __future__ import annotations

import jax.numpy as jnp


def cholesky(matrix: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factor of symmetric positive-definite matrices, shape (..., m, m)."""
    size = matrix.shape[-1]
    if size == 0:
        return matrix
    rows: list[list[jnp.ndarray]] = [[jnp.zeros_like(matrix[..., 0, 0])] * size for _ in range(size)]
    for j in range(size):
        diagonal = matrix[..., j, j] - sum((rows[j][m] ** 2 for m in range(j)), jnp.zeros_like(matrix[..., j, j]))
        rows[j][j] = jnp.sqrt(diagonal)
        for i in range(j + 1, size):
            off = matrix[..., i, j] - sum((rows[i][m] * rows[j][m] for m in range(j)), jnp.zeros_like(matrix[..., i, j]))
            rows[i][j] = off / rows[j][j]
    return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def solve_lower(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve L z = b for lower-triangular L (..., m, m) and b (..., m)."""
    size = factor.shape[-1]
    if size == 0:
        return rhs
    solution: list[jnp.ndarray] = []
    for i in range(size):
        partial = rhs[..., i] - sum((factor[..., i, m] * solution[m] for m in range(i)), jnp.zeros_like(rhs[..., i]))
        solution.append(partial / factor[..., i, i])
    return jnp.stack(solution, axis=-1)


def solve_upper_transposed(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve Lᵀ x = z for lower-triangular L (..., m, m) and z (..., m)."""
    size = factor.shape[-1]
    if size == 0:
        return rhs
    solution: list[jnp.ndarray | None] = [None] * size
    for i in reversed(range(size)):
        partial = rhs[..., i] - sum((factor[..., m, i] * solution[m] for m in range(i + 1, size)), jnp.zeros_like(rhs[..., i]))
        solution[i] = partial / factor[..., i, i]
    return jnp.stack(solution, axis=-1)


def solve_positive_definite(matrix: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve A x = b for symmetric positive-definite A (..., m, m) and b (..., m) via LLᵀ."""
    factor = cholesky(matrix)
    return solve_upper_transposed(factor, solve_lower(factor, rhs))
