"""Cholesky factorisation and triangular solves for symmetric positive-definite systems, by size.

**Mathematics.** A symmetric positive-definite (SPD) matrix A ∈ ℝ^{m×m} factors uniquely as A = LLᵀ
with L lower triangular and L_jj > 0 (the Cholesky–Banachiewicz recurrences):

    L_jj = √(A_jj − Σ_{q<j} L_jq²),    L_ij = (A_ij − Σ_{q<j} L_iq L_jq) / L_jj   (i > j).

Only the lower triangle of A is read. A x = b is then solved as LLᵀx = b: forward substitution
L z = b, z_i = (b_i − Σ_{q<i} L_iq z_q)/L_ii, then back substitution Lᵀ x = z,
x_i = (z_i − Σ_{q>i} L_qi x_q)/L_ii. A is SPD exactly when every pivot A_jj − Σ_{q<j} L_jq² is
positive; a matrix that is not SPD has a negative pivot, whose square root is NaN (an exactly zero
pivot gives ±inf or NaN), and a NaN entry of A gives NaN: so **a matrix that is not positive definite
has NaN entries in its factor**, and in the solutions. The fitters rely on this: a Newton step tries a factorisation and falls back to a
larger shift when ``isfinite`` fails on the factor (:mod:`moe_theory.fit.newton`), the Gaussian gate's
M-step keeps the old covariance of a component whose new one does not factor (:mod:`moe_theory.fit.em`).
All functions batch over leading axes (broadcast between matrix and right-hand side) and are
``jit``/``vmap``/``grad`` clean.

**Size rule.** The matrix size m is static, and the implementation is chosen by it:

* m ≤ :data:`UNROLL_MAX_SIZE` (6): the formulas above unrolled element by element in Python, so XLA
  sees O(m³) scalar operations that it fuses with the surrounding code. For the small blocks of a
  mixture of experts (d × d gate covariances, (d+1) × (d+1) least-squares Gram matrices, the gate
  Hessian of a softmax gate with k = 3, d = 1) this is the fastest code to run, about 2.5× faster
  than the loop kernels below and 2–9× faster than a LAPACK call per matrix.
* m > :data:`UNROLL_MAX_SIZE`: the same formulas with one ``lax.fori_loop`` step per column (per
  row for the solves), each step O(m²) vectorised work. The unrolled program grows as m³ operations
  and XLA's compile time faster than that: under ``vmap``, seconds per call site at m = 12, tens of
  seconds at m = 15–30 and minutes at m = 60, which made the EM fit of a sigmoid gate with k = 6,
  d = 4 (Newton Hessian 30 × 30) compile for 84 s. The loop kernels compile in constant time
  (one loop body, ~0.3 s), and their run time, a few µs per solve at these sizes, is small against
  the Hessian they factor. The Newton Hessians of every gate with k·(d+1) > 6 coordinates and of
  multinomial-logistic or nonlinear experts are of that size.

The threshold 6 is where the two costs cross on a 2-core CPU: for m = 2…12 under ``vmap``, the
unrolled kernels compile slower than the loop kernels from m ≈ 4 on, growing as m³, while they run
faster at every m; up to 6 their compile cost stays below about half a second per call site, above it
the run-time saving (under 1.5 µs per solve) no longer pays for seconds of compilation.
``python benchmarks/bench_compile.py --crossover`` prints the figures. Rounding differs between the
implementations only by summation order (the loop kernels add in a different order), at the level
of machine precision times the condition number.

**Why not LAPACK.** :func:`jax.numpy.linalg.cholesky` and :func:`jax.lax.linalg.triangular_solve`
(LAPACK ``potrf``/``trsm`` on a CPU) compile as fast and run about 2× faster than the loop kernels at
m = 8–12, but with jaxlib 0.10.2 on 2 cores a batched LAPACK call inside a ``vmap``-ed ``while``
loop deadlocks XLA's CPU thread pool: the batched kernel splits its batch over the intra-op pool and
waits for the pieces, and with two such calls running at once (the Newton step's two trial
factorisations are independent) both pool threads wait and nothing runs them. A vmapped EM fit with
a sigmoid gate, k = 6, d = 4, hung this way inside ``lapack_dpotrf_ffi``. The LAPACK route is kept
for comparison, selected by :func:`kernels` (``large="lapack"``); with it, a failed pivot is
reported through LAPACK's ``info`` output and JAX returns NaN in the whole lower triangle, which
keeps the NaN rule. ``python benchmarks/bench_compile.py --deadlock`` runs the vmapped fits that
exposed it.

:func:`kernels` changes the threshold and the large-matrix kernels for code traced inside it
(``with linalg.kernels(unroll_max_size=10**9): ...`` forces the unrolled kernels at every size).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

UNROLL_MAX_SIZE: int = 6
"""Largest static matrix size m that uses the unrolled kernels (see the module docstring). Read when a
function is traced, so change it only through :func:`kernels`."""

LARGE_KERNEL: str = "loop"
"""Kernels above :data:`UNROLL_MAX_SIZE`: ``"loop"`` (default; ``fori_loop`` over columns) or
``"lapack"`` (XLA's LAPACK custom calls; they can deadlock, see the module docstring)."""


@contextlib.contextmanager
def kernels(unroll_max_size: int | None = None, large: str | None = None) -> Iterator[None]:
    """Choose the kernels for code traced inside this block: unrolled for m ≤ ``unroll_max_size``,
    ``large`` (``"loop"`` or ``"lapack"``) above; None keeps the current choice.

    JAX caches traced functions without looking at this module's state, so the caches are cleared
    on entry and exit (the next call of any jitted function retraces and recompiles). Meant for
    benchmarks and tests, e.g. ``kernels(unroll_max_size=10**9)`` forces the unrolled kernels at
    every size, as this module did before the size rule.
    """
    global UNROLL_MAX_SIZE, LARGE_KERNEL
    if large not in (None, "loop", "lapack"):
        raise ValueError(f"large: expected 'loop' or 'lapack', got {large!r}")
    previous = UNROLL_MAX_SIZE, LARGE_KERNEL
    jax.clear_caches()
    UNROLL_MAX_SIZE = previous[0] if unroll_max_size is None else unroll_max_size
    LARGE_KERNEL = large or previous[1]
    try:
        yield
    finally:
        UNROLL_MAX_SIZE, LARGE_KERNEL = previous
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


# --- loop kernels -------------------------------------------------------------------------------
# The same formulas with one ``fori_loop`` step per column (row), each step O(m²) vectorised work:
# the compiled program has one loop body whatever m is. Selections by a one-hot mask rather than by
# dynamic indexing keep every step elementwise (no gathers or scatters). Entries not yet computed
# are zero, so the sums Σ_{q<j} need no further masking.


def _cholesky_loop(matrix: jnp.ndarray) -> jnp.ndarray:
    size = matrix.shape[-1]
    index = jnp.arange(size)
    lower = jnp.tril(matrix)

    def column(j, factor):
        onehot = (index == j).astype(matrix.dtype)
        row_j = jnp.sum(factor * onehot[:, None], axis=-2)  # L_jq, zero for q ≥ j
        residual = jnp.sum(lower * onehot, axis=-1) - jnp.sum(factor * row_j[..., None, :], axis=-1)
        pivot = jnp.sqrt(jnp.sum(residual * onehot, axis=-1, keepdims=True))  # L_jj (NaN if not SPD)
        new = jnp.where(index > j, residual / pivot, jnp.where(index == j, pivot, 0.0))
        return factor + new[..., :, None] * onehot

    return jax.lax.fori_loop(0, size, column, jnp.zeros_like(matrix))


def _solve_lower_loop(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    size = factor.shape[-1]
    index = jnp.arange(size)
    shape = jnp.broadcast_shapes(factor.shape[:-2], rhs.shape[:-1]) + (size,)

    def row(i, solution):
        onehot = (index == i).astype(factor.dtype)
        row_i = jnp.sum(factor * onehot[:, None], axis=-2)  # L_iq
        partial = jnp.sum(rhs * onehot, axis=-1) - jnp.sum(row_i * solution, axis=-1)
        return solution + (partial / jnp.sum(row_i * onehot, axis=-1))[..., None] * onehot

    return jax.lax.fori_loop(0, size, row, jnp.zeros(shape, jnp.result_type(factor, rhs)))


def _solve_upper_transposed_loop(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    size = factor.shape[-1]
    index = jnp.arange(size)
    shape = jnp.broadcast_shapes(factor.shape[:-2], rhs.shape[:-1]) + (size,)

    def row(step, solution):
        onehot = (index == size - 1 - step).astype(factor.dtype)
        column_i = jnp.sum(factor * onehot, axis=-1)  # L_qi
        partial = jnp.sum(rhs * onehot, axis=-1) - jnp.sum(column_i * solution, axis=-1)
        return solution + (partial / jnp.sum(column_i * onehot, axis=-1))[..., None] * onehot

    return jax.lax.fori_loop(0, size, row, jnp.zeros(shape, jnp.result_type(factor, rhs)))


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
    if LARGE_KERNEL == "loop":
        return _cholesky_loop(matrix)
    return jnp.linalg.cholesky(matrix, symmetrize_input=False)


def solve_lower(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve L z = b for lower-triangular L (..., m, m) and b (..., m); batch axes broadcast."""
    size = factor.shape[-1]
    if size == 0:
        return rhs
    if _unrolled(size):
        return _solve_lower_unrolled(factor, rhs)
    if LARGE_KERNEL == "loop":
        return _solve_lower_loop(factor, rhs)
    return _triangular_solve(factor, rhs, transpose=False)


def solve_upper_transposed(factor: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve Lᵀ x = z for lower-triangular L (..., m, m) and z (..., m); batch axes broadcast."""
    size = factor.shape[-1]
    if size == 0:
        return rhs
    if _unrolled(size):
        return _solve_upper_transposed_unrolled(factor, rhs)
    if LARGE_KERNEL == "loop":
        return _solve_upper_transposed_loop(factor, rhs)
    return _triangular_solve(factor, rhs, transpose=True)


def solve_positive_definite(matrix: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """Solve A x = b for symmetric positive-definite A (..., m, m) and b (..., m) via LLᵀ.

    A matrix that is not positive definite gives NaN in x.
    """
    factor = cholesky(matrix)
    return solve_upper_transposed(factor, solve_lower(factor, rhs))
