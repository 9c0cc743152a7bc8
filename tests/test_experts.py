"""Experts f(y | x; η_i) (docs/experts.md) against scipy.stats and explicit loops.

Oracles: scipy.stats.norm.logpdf for the Gaussian-linear and nonlinear experts (ν is a variance, so
the scale is √ν), an explicit per-class softmax loop for the multinomial-logistic expert
(conftest.py), and NumPy weighted least squares (np.linalg.lstsq on √w-scaled rows) for the
closed-form Gaussian M-step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import moe_theory as mt
from conftest import (
    EXPERT_SPECS,
    NUM_CLASSES,
    NUM_EXPERTS,
    SAMPLE_SIZE,
    REGRESSION_EXPERT_IDS,
    build_family,
    random_inputs,
    random_params,
    random_responses,
    reference_class_log_probs,
    reference_expert_log_prob,
    reference_expert_means,
)



@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("expert_id", list(EXPERT_SPECS))
def test_expert_log_prob_matches_oracle(expert_id, dim, rng):
    """log f(y_j | x_j; η_i) for every registered expert (every activation of the nonlinear one)
    equals scipy.stats.norm.logpdf(y, mean, √ν) or the class-softmax loop."""
    family = build_family("softmax", EXPERT_SPECS[expert_id], dim=dim)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    y = random_responses(family, rng, SAMPLE_SIZE)
    log_prob = np.asarray(mt.expert_log_prob(family, params, jnp.asarray(x), jnp.asarray(y)))
    expected = reference_expert_log_prob(family.expert, values["expert"], x, y)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("expert_id", REGRESSION_EXPERT_IDS)
def test_regression_mean_matches_oracle(expert_id, dim, rng):
    """h_i(x) = a_iᵀx + b_i (Gaussian linear) or act(η_{1i}ᵀx + η_{0i}) (nonlinear), by a loop."""
    family = build_family("softmax", EXPERT_SPECS[expert_id], dim=dim)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    np.testing.assert_allclose(
        family.expert.mean(params.expert, jnp.asarray(x)),
        reference_expert_means(family.expert, values["expert"], x),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("dim", [1, 2])
def test_nonlinear_identity_expert_is_the_gaussian_linear_expert(dim, rng):
    """act = identity makes act(η₁ᵀx + η₀) = aᵀx + b with a = η₁, b = η₀: same means, same
    log-densities and, with the same key and labels, the same draws."""
    nonlinear = mt.make_expert({"name": "nonlinear", "activation": "identity"})
    linear = mt.make_expert("gaussian")
    eta0, eta1 = rng.normal(size=NUM_EXPERTS), rng.normal(size=(NUM_EXPERTS, dim))
    nu = rng.uniform(0.2, 1.0, NUM_EXPERTS)
    nonlinear_params = {"eta0": jnp.asarray(eta0), "eta1": jnp.asarray(eta1), "nu": jnp.asarray(nu)}
    linear_params = {"a": jnp.asarray(eta1), "b": jnp.asarray(eta0), "nu": jnp.asarray(nu)}
    x = jnp.asarray(random_inputs(rng, SAMPLE_SIZE, dim))
    y = jnp.asarray(rng.normal(size=SAMPLE_SIZE))
    labels = jnp.asarray(rng.integers(0, NUM_EXPERTS, SAMPLE_SIZE), dtype=jnp.int32)
    key = jax.random.PRNGKey(7)
    pairs = [
        (nonlinear.mean(nonlinear_params, x), linear.mean(linear_params, x)),
        (nonlinear.log_prob(nonlinear_params, x, y), linear.log_prob(linear_params, x, y)),
        (nonlinear.sample(key, nonlinear_params, x, labels), linear.sample(key, linear_params, x, labels)),
    ]
    for from_nonlinear, from_linear in pairs:
        np.testing.assert_allclose(from_nonlinear, from_linear, rtol=1e-14)


@pytest.mark.parametrize("dim", [1, 2])
def test_multinomial_class_probabilities(dim, rng):
    """Class probabilities sum to 1 over the C classes, the last class logit is exactly 0, and
    log P(y = c | x, i) equals the explicit softmax loop."""
    family = build_family("softmax", "multinomial_logistic", dim=dim)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    logits = np.asarray(family.expert.logits(params.expert, jnp.asarray(x)))
    assert logits.shape == (SAMPLE_SIZE, NUM_EXPERTS, NUM_CLASSES)
    np.testing.assert_array_equal(logits[..., -1], 0.0)
    probabilities = np.asarray(family.expert.mean(params.expert, jnp.asarray(x)))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-13)
    np.testing.assert_allclose(
        family.expert.class_log_probs(params.expert, jnp.asarray(x)),
        reference_class_log_probs(values["expert"], x),
        rtol=1e-12,
        atol=1e-13,
    )


def test_multinomial_extreme_logits_stay_finite(rng):
    """Logits of order 1e5 (η ~ 1e3, x ~ 1e2) must not overflow: log-probabilities stay finite
    (≤ 0) and agree with the loop, which subtracts the largest logit before exponentiating."""
    expert = mt.make_expert("multinomial_logistic")
    expert_values = {
        "eta0": 1e3 * rng.normal(size=(NUM_EXPERTS, NUM_CLASSES - 1)),
        "eta1": 1e3 * rng.normal(size=(NUM_EXPERTS, NUM_CLASSES - 1, 2)),
    }
    x = random_inputs(rng, SAMPLE_SIZE, 2, scale=100.0)
    as_jax = {name: jnp.asarray(value) for name, value in expert_values.items()}
    log_probs = np.asarray(expert.class_log_probs(as_jax, jnp.asarray(x)))
    assert np.all(np.isfinite(log_probs)) and np.all(log_probs <= 0.0)
    np.testing.assert_allclose(log_probs, reference_class_log_probs(expert_values, x), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("expert_id", REGRESSION_EXPERT_IDS)
def test_tiny_variance_at_the_mean_is_finite(expert_id, rng):
    """With ν = 1e-12 and y exactly at an expert's mean, log f = −½ log(2π·1e-12) ≈ 12.9 (scipy's
    norm.logpdf with scale 1e-6); the other experts' very negative log-densities stay finite."""
    family = build_family("softmax", EXPERT_SPECS[expert_id], dim=2)
    values = random_params(family, rng)[0]
    values["expert"]["nu"] = np.full(NUM_EXPERTS, 1e-12)
    params = mt.make_params(family, values)
    x = random_inputs(rng, SAMPLE_SIZE, 2)
    y_at_first_mean = reference_expert_means(family.expert, values["expert"], x)[:, 0]
    log_prob = np.asarray(mt.expert_log_prob(family, params, jnp.asarray(x), jnp.asarray(y_at_first_mean)))
    assert np.all(np.isfinite(log_prob))
    np.testing.assert_allclose(log_prob[:, 0], scipy.stats.norm.logpdf(0.0, scale=1e-6), rtol=1e-12)
    np.testing.assert_allclose(
        log_prob, reference_expert_log_prob(family.expert, values["expert"], x, y_at_first_mean), rtol=1e-6
    )


@pytest.mark.parametrize("dim", [1, 2])
def test_gaussian_weighted_mstep_matches_weighted_least_squares(dim, rng):
    """The closed-form M-step equals, per expert i, np.linalg.lstsq of √ω_i·[x 1] on √ω_i·y, and
    ν_i = Σ_j ω_ji (y_j − a_iᵀx_j − b_i)² / Σ_j ω_ji; a variance floor above that value wins."""
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    y = x @ rng.normal(size=dim) + rng.normal(scale=0.5, size=SAMPLE_SIZE)
    weights = rng.uniform(0.0, 1.0, size=(SAMPLE_SIZE, NUM_EXPERTS))
    # One compiled program serves both calls below: the variance floor is traced, not static.
    mstep = jax.jit(mt.make_expert("gaussian").weighted_mstep)
    estimate = mstep(jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights))
    design = np.hstack([x, np.ones((SAMPLE_SIZE, 1))])
    for i in range(NUM_EXPERTS):
        root = np.sqrt(weights[:, i])
        coefficients = np.linalg.lstsq(root[:, None] * design, root * y, rcond=None)[0]
        residual = y - design @ coefficients
        np.testing.assert_allclose(estimate["a"][i], coefficients[:-1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(estimate["b"][i], coefficients[-1], rtol=1e-9, atol=1e-12)
        variance = np.sum(weights[:, i] * residual**2) / np.sum(weights[:, i])
        np.testing.assert_allclose(estimate["nu"][i], variance, rtol=1e-9)
    floored = mstep(jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights), variance_floor=10.0)
    np.testing.assert_array_equal(floored["nu"], 10.0)
