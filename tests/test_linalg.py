"""The small-matrix routines against NumPy/SciPy, on both sides of the size threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import moe_theory  # noqa: F401  (turns on float64)
from moe_theory import linalg

SIZES = list(range(1, 13)) + [15, 30, 60]


def spd_batch(rng, batch, size):
    base = rng.normal(size=batch + (size, size))
    return base @ np.swapaxes(base, -1, -2) / size + np.eye(size)


@jax.jit
def everything(matrix, rhs):
    """Every public function, batched over the leading axis and under vmap, in one compiled program."""
    factor = linalg.cholesky(matrix)
    outputs = (
        factor,
        linalg.solve_lower(factor, rhs),
        linalg.solve_upper_transposed(factor, rhs),
        linalg.solve_positive_definite(matrix, rhs),
    )
    mapped = jax.vmap(
        lambda a, b: (
            linalg.cholesky(a),
            linalg.solve_lower(linalg.cholesky(a), b),
            linalg.solve_upper_transposed(linalg.cholesky(a), b),
            linalg.solve_positive_definite(a, b),
        )
    )(matrix, rhs)
    return outputs, mapped


@pytest.mark.parametrize("size", SIZES)
def test_every_function_matches_numpy_and_scipy_batched_and_under_vmap(size):
    rng = np.random.default_rng(size)
    matrix = spd_batch(rng, (4,), size)
    rhs = rng.normal(size=(4, size))
    (factor, lower, upper, solution), mapped = everything(matrix, rhs)
    expected_factor = np.linalg.cholesky(matrix)
    np.testing.assert_allclose(factor, expected_factor, rtol=1e-12, atol=1e-12)
    for i in range(4):
        np.testing.assert_allclose(
            lower[i], scipy.linalg.solve_triangular(expected_factor[i], rhs[i], lower=True), rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(
            upper[i],
            scipy.linalg.solve_triangular(expected_factor[i], rhs[i], lower=True, trans="T"),
            rtol=1e-10,
            atol=1e-12,
        )
    np.testing.assert_allclose(solution, np.linalg.solve(matrix, rhs[..., None])[..., 0], rtol=1e-9, atol=1e-12)
    # vmap equals the batched call (and so a loop over the batch), to rounding.
    for got, want in zip(mapped, (factor, lower, upper, solution)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("size", [0, 3, 6, 7, 12])
def test_batch_axes_broadcast_and_jit_equals_eager(size):
    rng = np.random.default_rng(100 + size)
    matrix = spd_batch(rng, (1, 3), size)  # one factor per component, broadcast over 5 samples
    rhs = rng.normal(size=(5, 3, size))
    factor = linalg.cholesky(matrix)
    solved = linalg.solve_lower(factor, rhs)
    assert solved.shape == (5, 3, size)
    expected = np.linalg.solve(np.broadcast_to(np.asarray(factor), (5, 3, size, size)), rhs[..., None])[..., 0]
    np.testing.assert_allclose(solved, expected, rtol=1e-10, atol=1e-12)
    jitted = jax.jit(linalg.solve_positive_definite)(matrix, rhs)
    np.testing.assert_allclose(jitted, linalg.solve_positive_definite(matrix, rhs), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("size", [2, 6, 7, 15])
def test_a_matrix_that_is_not_positive_definite_gives_nan(size):
    indefinite = np.eye(size)
    indefinite[-1, -1] = -1.0  # the last pivot is negative
    nan_entry = np.eye(size)
    nan_entry[0, 0] = np.nan
    for matrix in (indefinite, nan_entry, -np.eye(size)):
        factor = jax.jit(linalg.cholesky)(matrix)
        assert not np.all(np.isfinite(factor)), matrix
        assert np.isnan(linalg.solve_positive_definite(matrix, np.ones(size))).any()
    # Within a batch only the failing matrix is affected (the callers test per matrix).
    batch = jax.vmap(linalg.cholesky)(np.stack([np.eye(size), indefinite]))
    assert np.all(np.isfinite(batch[0])) and not np.all(np.isfinite(batch[1]))


@pytest.mark.parametrize("size", [10, 30])
def test_large_sizes_call_no_lapack_and_the_lapack_route_agrees(size):
    rng = np.random.default_rng(size)
    matrix = spd_batch(rng, (2,), size)
    rhs = rng.normal(size=(2, size))
    text = jax.jit(linalg.solve_positive_definite).lower(matrix, rhs).as_text()
    assert "lapack" not in text  # batched LAPACK calls can deadlock XLA's CPU pool (module docstring)
    with linalg.kernels(large="lapack"):
        assert "lapack" in jax.jit(linalg.solve_positive_definite).lower(matrix, rhs).as_text()
        np.testing.assert_allclose(
            linalg.solve_positive_definite(matrix, rhs), np.linalg.solve(matrix, rhs[..., None])[..., 0], rtol=1e-10
        )
        assert np.isnan(linalg.cholesky(-np.eye(size))).any()
    assert linalg.LARGE_KERNEL == "loop" and linalg.UNROLL_MAX_SIZE == 6


@pytest.mark.parametrize("size", [4, 10])
def test_gradients_through_both_kernels(size):
    rng = np.random.default_rng(size)
    matrix = spd_batch(rng, (), size)
    rhs = rng.normal(size=size)
    gradient = jax.grad(lambda b: jnp.sum(linalg.solve_positive_definite(matrix, b)))(rhs)
    np.testing.assert_allclose(gradient, np.linalg.solve(matrix, np.ones(size)), rtol=1e-10)
    # d/dA of 1ᵀA⁻¹b is −A⁻ᵀ1 (A⁻¹b)ᵀ; the kernels read the lower triangle, so compare that part.
    grad_matrix = jax.grad(lambda a: jnp.sum(linalg.solve_positive_definite(a, rhs)))(matrix)
    x, w = np.linalg.solve(matrix, rhs), np.linalg.solve(matrix, np.ones(size))
    full = -np.outer(w, x)
    expected = np.tril(full + full.T) - np.diag(np.diag(full))
    np.testing.assert_allclose(grad_matrix, expected, rtol=1e-8, atol=1e-10)


def test_kernels_can_force_the_unrolled_kernels_at_every_size():
    matrix = spd_batch(np.random.default_rng(0), (), 8)
    with linalg.kernels(unroll_max_size=10**9):
        assert linalg.UNROLL_MAX_SIZE == 10**9
        unrolled = jax.jit(linalg.cholesky)(matrix)
        assert "while" not in jax.jit(linalg.cholesky).lower(matrix).as_text()
    assert linalg.UNROLL_MAX_SIZE == 6
    np.testing.assert_allclose(unrolled, np.linalg.cholesky(matrix), rtol=1e-12, atol=1e-13)
