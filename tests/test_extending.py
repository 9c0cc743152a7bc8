"""The README's recipe for adding a gate works end to end: one score function plus registry entries
give sampling, likelihoods and an EM fit with no further code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_theory as mt
from moe_theory.fit import EMConfig, fit_em_trace
from moe_theory.gates import BETA_FIELDS, GATES, SCORES, Gate, Score, beta0_offset
from moe_theory.init import random_init
from moe_theory.params import Field


def quadratic_slope(gate_params, z):
    return z @ gate_params["beta1"].T + jnp.sum(z**2, axis=1, keepdims=True) * gate_params["gamma"]


@pytest.fixture
def quadratic_gate():
    fields = BETA_FIELDS + (Field("gamma", ("k",), "real", "quadratic gate coefficients γ"),)
    SCORES["quadratic"] = Score(fields, quadratic_slope, beta0_offset)
    GATES["quadratic_softmax"] = Gate(score="quadratic")
    yield "quadratic_softmax"
    del SCORES["quadratic"], GATES["quadratic_softmax"]


def test_a_registered_score_samples_scores_and_fits(quadratic_gate):
    family = mt.make_family(quadratic_gate, "gaussian", 2, dim=2)
    truth = mt.make_params(
        family,
        {"gate": {"beta0": [1.0, 0.0], "beta1": [[2.0, -1.0], [0.0, 0.0]], "gamma": [-1.5, 0.0]},
         "expert": {"a": [[1.0, 0.0], [0.0, -1.0]], "b": [1.0, -1.0], "nu": [0.2, 0.3]}},
    )
    x, y, labels = mt.sample(jax.random.key(0), family, truth, 4000, mt.make_inputs("normal"))

    # Oracle: softmax of β₁ᵀx + γ‖x‖² + β₀ and Gaussian experts, written out in NumPy.
    x_np, y_np = np.asarray(x), np.asarray(y)
    scores = x_np @ np.array([[2.0, -1.0], [0.0, 0.0]]).T + (x_np**2).sum(1, keepdims=True) * np.array([-1.5, 0.0])
    scores += np.array([1.0, 0.0])
    gate = np.exp(scores - scores.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    means = x_np @ np.array([[1.0, 0.0], [0.0, -1.0]]).T + np.array([1.0, -1.0])
    variances = np.array([0.2, 0.3])
    density = gate * np.exp(-((y_np[:, None] - means) ** 2) / (2 * variances)) / np.sqrt(2 * np.pi * variances)
    truth_log_likelihood = np.log(density.sum(1)).mean()
    np.testing.assert_allclose(mt.log_likelihood(family, truth, x, y), truth_log_likelihood, rtol=1e-10)
    # Labels follow the gate.
    assert abs(np.mean(np.asarray(labels) == 0) - gate[:, 0].mean()) < 5 * np.sqrt(0.25 / 4000)

    # EM with the generic gate M-step: monotone, and at least as likely as the truth (the MLE).
    start = random_init(jax.random.key(1), family, x, y)
    result, trace = fit_em_trace(family, start, x, y, tol=1e-9, config=EMConfig(max_iter=300))
    path = np.asarray(trace)[~np.isnan(np.asarray(trace))]
    assert bool(result.converged) and np.all(np.diff(path) >= -1e-12 * np.abs(path[:-1]))
    assert float(result.log_likelihood) >= truth_log_likelihood - 1e-6
    # The softmax identifies γ only up to a common shift and the experts up to relabelling.
    gamma = np.asarray(result.params.gate["gamma"])
    np.testing.assert_allclose(abs(gamma[0] - gamma[1]), 1.5, atol=0.3)
