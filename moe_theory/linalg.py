"""Cholesky factorisation and triangular solves for symmetric positive-definite systems, by size.

**Mathematics.** A symmetric positive-definite (SPD) matrix A ∈ ℝ^{m×m} factors uniquely as A = LLᵀ
with L lower triangular and L_jj > 0 (Cholesky–Banachiewicz, row by row):

    L_jj = √(A_jj − Σ_{q<j} L_jq²),    L_ij = (A_ij − Σ_{q<j} L_iq L_jq) / L_jj   (i > j).

Only the lower triangle of A is read. A x = b is then solved as LLᵀx = b: forward substitution
L z = b, z_i = (b_i − Σ_{q<i} L_iq z_q)/L_ii, then back substitution Lᵀ x = z,
x_i = (z_i − Σ_{q>i} L_qi x_q)/L_ii. A is SPD exactly when every pivot A_jj − Σ_{q<j} L_jq² is
positive; a matrix that is not SPD (or has a NaN entry) therefore has **NaN entries in its factor**, and
so in the solutions. The fitters rely on this: a Newton step tries a factorisation and falls back to a
larger shift when ``isfinite`` fails on the factor (:mod:`moe_theory.fit.newton`), the Gaussian gate's
M-step keeps the old covariance of a component whose new one does not factor (:mod:`moe_theory.fit.em`).
All functions batch over leading axes (broadcast between matrix and right-hand side) and are
``jit``/``vmap``/``grad`` clean.

**Size rule.** The matrix size m is static, and the implementation is chosen by it:

* m ≤ :data:`UNROLL_MAX_SIZE`: the formulas above unrolled element by element in Python, so XLA sees
  O(m³) scalar operations that it fuses with the surrounding code into one elementwise kernel. For
  the small blocks of a mixture of experts (d × d gate covariances, (d+1) × (d+1) least-squares
  Gram matrices, the Newton Hessian of a softmax gate with k = 3, d = 1) this avoids a LAPACK call
  per matrix, whose fixed cost exceeds the arithmetic, and it runs unchanged on any backend.
* m > :data:`UNROLL_MAX_SIZE`: :func:`jax.numpy.linalg.cholesky` and
  :func:`jax.lax.linalg.triangular_solve` (LAPACK ``potrf``/``trsm`` on a CPU, cuSOLVER/cuBLAS on a
  GPU). The unrolled program grows as m³ operations, and XLA's compile time grows faster than that
  (tens of seconds at m = 15–30 under ``vmap``, minutes at m = 60, where LAPACK compiles in about a
  second); the unrolled code also stops being faster to *run* a little above the threshold. The
  Newton Hessians of sigmoid, top-K or Laplace gates and of multinomial-logistic or nonlinear
  experts (k·(d+1) and more) are of that size. LAPACK's factorisation reports a failed pivot
  through its ``info`` output, and JAX then returns NaN in the whole lower triangle, which keeps the
  NaN rule above.

The threshold is the crossover measured on a 2-core CPU for m = 2…12 under ``vmap`` (compile time
and run time of :func:`solve_positive_definite`); ``python benchmarks/bench_compile.py --crossover``
prints the figures. Rounding differs between the two implementations (different summation orders),
at the level of machine precision times the condition number.

**Thread pool.** An earlier version of this module used only the unrolled kernels, because batched
LAPACK calls inside ``vmap``-ed ``while`` loops were once seen to deadlock XLA's CPU thread pool
on 2 cores (jaxlib 0.10). Sizes above the threshold now call LAPACK inside such loops again.

To compare the two implementations, :func:`unrolled_up_to` changes the threshold for the code traced
inside it (``with linalg.unrolled_up_to(10**9): ...`` forces the unrolled kernels at every size).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

UNROLL_MAX_SIZE: int = 6
"""Largest static matrix size m that uses the unrolled kernels; larger ones use LAPACK (see the module
docstring). Read when a function is traced, so change it only through :func:`unrolled_up_to`."""


@contextlib.contextmanager
def unrolled_up_to(size: int) -> Iterator[None]:
    """Use the unrolled kernels for m ≤ ``size`` in code traced inside this block.

    JAX caches traced functions without looking at this module's state, so the caches are cleared
    on entry and exit (the next call of any jitted function retraces and recompiles). Meant for
    benchmarks and tests, e.g. ``unrolled_up_to(10**9)`` to force the unrolled kernels everywhere.
    """
    global UNROLL_MAX_SIZE
    previous = UNROLL_MAX_SIZE
    jax.clear_caches()
    UNROLL_MAX_SIZE = size
    try:
        yield
    finally:
        UNROLL_MAX_SIZE = previous
        jax.clear_caches()


def _unrolled(size: int) -> bool:
    return size <= UNROLL_MAX_SIZE


# --- unrolled kernels ---------------------------------------------------------------------------


def _cholesky_unrolled(matrix: jnp.ndarray) -> jnp.ndarray:
    size = matrix.shape[-1]
    rows: list[list[jnp.ndarray]] = [[jnp.zeros_like(matrix[..., 0, 0])] * size for _ in range(size)]
    for j in range(size):
        diagonal = matrix[..., j, j] - sum((rows[j][q] ** 2 for q in range(j)), jnp.zeros_like(matrix[..., j, j]))
        rows[j][j] = jnp.sqrt(diagonal)
        for i in range(j + 1, size):
            off = matrix[..., i, j] - sum((rows[i][q] * rows[j][q] for q in range(j)), jnp.zeros_like(matrix[..., i, j]))
            rows[i][j] = off / rows[j][j]
    return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def _solve_lower_unrolled(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    size = factor.shape[-1]
    solution: list[jnp.ndarray] = []
    for i in range(size):
        partial = rhs[..., i] - sum((factor[..., i, q] * solution[q] for q in range(i)), jnp.zeros_like(rhs[..., i]))
        solution.append(partial / factor[..., i, i])
    return jnp.stack(solution, axis=-1)


def _solve_upper_transposed_unrolled(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    size = factor.shape[-1]
    solution: list[jnp.ndarray | None] = [None] * size
    for i in reversed(range(size)):
        partial = rhs[..., i] - sum(
            (factor[..., q, i] * solution[q] for q in range(i + 1, size)), jnp.zeros_like(rhs[..., i])
        )
        solution[i] = partial / factor[..., i, i]
    return jnp.stack(solution, axis=-1)


# --- LAPACK kernels -----------------------------------------------------------------------------


def _triangular_solve(factor: jnp.ndarray, rhs: jnp.ndarray, transpose: bool) -> jnp.ndarray:
    """L z = b (or Lᵀ z = b) with the batch axes of L and b broadcast against each other.

    Batch axes along which L is broadcast (size 1 against a larger size in b, e.g. one factor per
    gate component against n samples) become right-hand-side columns of a single solve instead of
    copies of L.
    """
    size = factor.shape[-1]
    batch = np.broadcast_shapes(factor.shape[:-2], rhs.shape[:-1])
    factor = factor.reshape((1,) * (len(batch) - factor.ndim + 2) + factor.shape)
    rhs = jnp.broadcast_to(rhs, batch + (size,))
    folded = [axis for axis in range(len(batch)) if factor.shape[axis] == 1 and batch[axis] != 1]
    kept = [axis for axis in range(len(batch)) if axis not in folded]
    kept_shape = tuple(batch[axis] for axis in kept)
    folded_shape = tuple(batch[axis] for axis in folded)
    columns = jnp.transpose(rhs, kept + [len(batch)] + folded).reshape(kept_shape + (size, math.prod(folded_shape)))
    factor = jnp.broadcast_to(factor.reshape(tuple(factor.shape[axis] for axis in kept) + (size, size)), kept_shape + (size, size))
    solved = jax.lax.linalg.triangular_solve(factor, columns, left_side=True, lower=True, transpose_a=transpose)
    solved = solved.reshape(kept_shape + (size,) + folded_shape)
    return jnp.transpose(solved, np.argsort(kept + [len(batch)] + folded).tolist())


# --- public functions ---------------------------------------------------------------------------


def cholesky(matrix: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factor L of symmetric positive-definite matrices, shape (..., m, m).

    Reads the lower triangle only; the strict upper triangle of L is zero. A matrix that is not
    positive definite gives NaN entries in L (see the module docstring).
    """
    size = matrix.shape[-1]
    if size == 0:
        return matrix
    if _unrolled(size):
        return _cholesky_unrolled(matrix)
    return jnp.linalg.cholesky(matrix, symmetrize_input=False)


def solve_lower(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve L z = b for lower-triangular L (..., m, m) and b (..., m); batch axes broadcast."""
    size = factor.shape[-1]
    if size == 0:
        return rhs
    if _unrolled(size):
        return _solve_lower_unrolled(factor, rhs)
    return _triangular_solve(factor, rhs, transpose=False)


def solve_upper_transposed(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve Lᵀ x = z for lower-triangular L (..., m, m) and z (..., m); batch axes broadcast."""
    size = factor.shape[-1]
    if size == 0:
        return rhs
    if _unrolled(size):
        return _solve_upper_transposed_unrolled(factor, rhs)
    return _triangular_solve(factor, rhs, transpose=True)


def solve_positive_definite(matrix: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve A x = b for symmetric positive-definite A (..., m, m) and b (..., m) via LLᵀ.

    A matrix that is not positive definite gives NaN in x.
    """
    factor = cholesky(matrix)
    return solve_upper_transposed(factor, solve_lower(factor, rhs))
