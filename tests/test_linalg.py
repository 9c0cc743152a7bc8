"""The unrolled small-matrix routines against NumPy's LAPACK-backed ones."""

import jax
import numpy as np
import pytest

import moe_theory  # noqa: F401  (turns on float64)
from moe_theory import linalg


@pytest.mark.parametrize("size", [0, 1, 2, 3, 6])
def test_cholesky_and_solves_match_numpy_over_batches(size):
    rng = np.random.default_rng(size)
    base = rng.normal(size=(5, 3, size, size))
    matrix = base @ np.swapaxes(base, -1, -2) + size * np.eye(size)
    rhs = rng.normal(size=(5, 3, size))
    factor = np.asarray(linalg.cholesky(matrix))
    np.testing.assert_allclose(factor, np.linalg.cholesky(matrix) if size else factor, atol=1e-12)
    expected = np.linalg.solve(matrix, rhs[..., None])[..., 0] if size else rhs
    np.testing.assert_allclose(linalg.solve_positive_definite(matrix, rhs), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.einsum("...ij,...j->...i", factor, np.asarray(linalg.solve_lower(factor, rhs))), rhs, atol=1e-12
    )


def test_indefinite_matrix_gives_nan_and_vmap_equals_loop():
    assert np.isnan(np.asarray(linalg.cholesky(np.array([[1.0, 2.0], [2.0, 1.0]])))).any()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 3, 3))
    matrices = base @ np.swapaxes(base, -1, -2) + np.eye(3)
    batched = jax.vmap(linalg.cholesky)(matrices)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], linalg.cholesky(matrices[i]))
