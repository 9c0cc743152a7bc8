"""Families and likelihoods (docs/estimators.md): p(y|x) = Σ_i π_i(x) f(y|x; η_i) for every gate × expert.

Oracles: the plain-loop mixture density and responsibilities of conftest.py (built on the loop
gate pipeline and scipy.stats.norm / the class-softmax loop), a scipy.stats.norm mixture and
plain Gaussian regression for the reduction checks, Python loops for ``vmap``, and the real rows
alone (or harmless padding) for the zero-weight padding checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

import moe_theory as mt
from conftest import (
    BASIC_EXPERT_IDS,
    EXPERT_SPECS,
    GATE_PRESETS,
    NUM_EXPERTS,
    SAMPLE_SIZE,
    build_family,
    random_inputs,
    random_params,
    random_responses,
    reference_class_log_probs,
    reference_expert_means,
    reference_log_density,
    reference_log_gate_weights,
    reference_responsibilities,
    with_extreme_gate,
)

# One gate per registered score and normaliser, plus top-K and activation + temperature: enough
# for the vmap check, whose subject is not the gate and where every preset would only add
# compile time.
REPRESENTATIVE_GATES = [
    "softmax",
    "topk_softmax",
    "activation_temperature_softmax",
    "euclidean_sigmoid",
    "laplace_softmax",
    "gaussian",
]


def gate_expert_cases():
    """Every gate preset × {Gaussian, multinomial, nonlinear-relu}, plus the nonlinear expert with
    every activation under the softmax gate, each at d = 1 and d = 2."""
    pairs = [(gate, expert) for gate in GATE_PRESETS for expert in BASIC_EXPERT_IDS]
    pairs += [("softmax", expert) for expert in EXPERT_SPECS if expert not in BASIC_EXPERT_IDS]
    return [
        pytest.param(gate, expert, dim, id=f"{gate}-{expert}-d{dim}") for gate, expert in pairs for dim in (1, 2)
    ]


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id, expert_id, dim", gate_expert_cases())
def test_log_density_matches_oracle(gate_id, expert_id, dim, rng):
    """log p(y_j | x_j) (``reduce="none"``) equals log Σ_i π_i f_i computed by the loop oracle."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=dim)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    y = random_responses(family, rng, SAMPLE_SIZE)
    per_sample = mt.log_likelihood(family, params, jnp.asarray(x), jnp.asarray(y), reduce="none")
    expected = reference_log_density(family, values, x, y)
    np.testing.assert_allclose(per_sample, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id, expert_id, dim", gate_expert_cases())
def test_responsibilities_match_loop_and_sum_to_one(gate_id, expert_id, dim, rng):
    """r_ji = π_i f_i / Σ_l π_l f_l equals the loop, rows sum to 1, top-K zeros stay exact zeros."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=dim)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    y = random_responses(family, rng, SAMPLE_SIZE)
    responsibilities = np.asarray(mt.responsibilities(family, params, jnp.asarray(x), jnp.asarray(y)))
    expected = reference_responsibilities(family, values, x, y)
    np.testing.assert_allclose(responsibilities, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(responsibilities.sum(axis=1), 1.0, atol=1e-12)
    gate_is_zero = np.isneginf(reference_log_gate_weights(family.gate, values["gate"], x))
    np.testing.assert_array_equal(responsibilities == 0.0, gate_is_zero)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id", GATE_PRESETS)
def test_weighted_mean_and_sum_match_oracle(gate_id, rng):
    """``reduce="sum"`` is Σ_j w_j ℓ_j and ``reduce="mean"`` is Σ_j w_j ℓ_j / Σ_j w_j (and the plain
    average without weights), with ℓ_j from the loop oracle."""
    family = build_family(gate_id, "gaussian", dim=2)
    values, params = random_params(family, rng)
    x, y = random_inputs(rng, SAMPLE_SIZE, 2), random_responses(family, rng, SAMPLE_SIZE)
    weights = rng.uniform(0.1, 2.0, SAMPLE_SIZE)
    weighted_sum = np.sum(weights * reference_log_density(family, values, x, y))
    data, weights_array = (family, params, jnp.asarray(x), jnp.asarray(y)), jnp.asarray(weights)
    assert float(mt.log_likelihood(*data, weights_array, reduce="sum")) == pytest.approx(weighted_sum, rel=1e-11)
    assert float(mt.log_likelihood(*data, weights_array)) == pytest.approx(weighted_sum / np.sum(weights), rel=1e-11)
    expected_average = np.mean(reference_log_density(family, values, x, y))
    assert float(mt.log_likelihood(*data)) == pytest.approx(expected_average, rel=1e-11)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id", ["softmax", "temperature_softmax"])
@pytest.mark.parametrize("dim", [1, 2])
def test_constant_gate_with_intercept_experts_is_a_plain_gaussian_mixture(gate_id, dim, rng):
    """β₁ = 0 and a = 0 turn the MoE into the 1-D mixture Σ_i softmax(β₀)_i N(y; b_i, ν_i) for
    every x: compared with a mixture of scipy.stats.norm densities."""
    family = build_family(gate_id, "gaussian", dim=dim)
    values = random_params(family, rng)[0]
    values["gate"]["beta1"] = np.zeros_like(values["gate"]["beta1"])
    values["expert"]["a"] = np.zeros_like(values["expert"]["a"])
    params = mt.make_params(family, values)
    x, y = random_inputs(rng, SAMPLE_SIZE, dim), rng.normal(scale=2.0, size=SAMPLE_SIZE)
    mixture_weights = scipy.special.softmax(values["gate"]["beta0"])
    expected = np.log(
        sum(
            weight * scipy.stats.norm.pdf(y, loc=b, scale=np.sqrt(nu))
            for weight, b, nu in zip(mixture_weights, values["expert"]["b"], values["expert"]["nu"])
        )
    )
    per_sample = mt.log_likelihood(family, params, jnp.asarray(x), jnp.asarray(y), reduce="none")
    np.testing.assert_allclose(per_sample, expected, rtol=1e-11)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("expert_id", ["gaussian", "nonlinear-tanh"])
def test_single_expert_is_plain_regression(expert_id, rng):
    """With k = 1 every gate weight is 1 and log p(y|x) is the regression density
    scipy.stats.norm.logpdf(y, h(x), √ν)."""
    family = build_family("softmax", EXPERT_SPECS[expert_id], num_experts=1, dim=2)
    values, params = random_params(family, rng)
    x, y = random_inputs(rng, SAMPLE_SIZE, 2), rng.normal(size=SAMPLE_SIZE)
    mean = reference_expert_means(family.expert, values["expert"], x)[:, 0]
    expected = scipy.stats.norm.logpdf(y, loc=mean, scale=np.sqrt(values["expert"]["nu"][0]))
    per_sample = mt.log_likelihood(family, params, jnp.asarray(x), jnp.asarray(y), reduce="none")
    np.testing.assert_allclose(per_sample, expected, rtol=1e-12)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize(
    "gate_id, expert_id", [(gate, "gaussian") for gate in GATE_PRESETS] + [("softmax", "multinomial_logistic")]
)
def test_mean_function_matches_loop(gate_id, expert_id, rng):
    """E[y|x] = Σ_i π_i(x) h_i(x) for regression, Σ_i π_i(x) P(·|x, i) for classes (oracle loop)."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=2)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, 2)
    gate_weights = np.exp(reference_log_gate_weights(family.gate, values["gate"], x))
    if family.expert.is_classifier:
        class_probabilities = np.exp(reference_class_log_probs(values["expert"], x))
        expected = np.einsum("nk,nkc->nc", gate_weights, class_probabilities)
    else:
        expected = np.sum(gate_weights * reference_expert_means(family.expert, values["expert"], x), axis=1)
    np.testing.assert_allclose(mt.mean_function(family, params, jnp.asarray(x)), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate_id", REPRESENTATIVE_GATES)
def test_vmap_over_parameter_batches_equals_loop(gate_id, rng):
    """Compiled path: ``jax.vmap`` of the jitted log-likelihood over a stacked batch of parameters
    equals a Python loop of single calls (run op by op, so that only the vmapped program is
    compiled), and each of those equals the loop oracle's average."""
    family = build_family(gate_id, "gaussian", dim=2)
    batch = [random_params(family, rng) for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[params for _, params in batch])
    x, y = random_inputs(rng, SAMPLE_SIZE, 2), random_responses(family, rng, SAMPLE_SIZE)

    def average_log_likelihood(params):
        return mt.log_likelihood(family, params, jnp.asarray(x), jnp.asarray(y))

    batched = jax.vmap(average_log_likelihood)(stacked)
    with jax.disable_jit():
        looped = np.array([float(average_log_likelihood(params)) for _, params in batch])
    np.testing.assert_allclose(batched, looped, rtol=1e-13)
    expected = [np.mean(reference_log_density(family, values, x, y)) for values, _ in batch]
    np.testing.assert_allclose(looped, expected, rtol=1e-10)


NUM_PADDED = 4


def padded_data(family, x, y, weights, garbage: bool):
    """Replace the last NUM_PADDED rows by zero-weight padding: ``garbage`` puts NaN/±inf inputs
    and NaN/±inf (regression) or out-of-range (classifier) responses there, the worst a padding
    scheme could leave behind; otherwise they are harmless copies of real rows."""
    x, y, weights = x.copy(), y.copy(), weights.copy()
    weights[-NUM_PADDED:] = 0.0
    if not garbage:
        x[-NUM_PADDED:], y[-NUM_PADDED:] = x[:NUM_PADDED], y[:NUM_PADDED]
        return x, y, weights
    x[-NUM_PADDED:] = np.array([np.nan, np.inf, -np.inf, 0.5])[:, None]
    y[-NUM_PADDED:] = [-3, 99, 1, 10**6] if family.expert.is_classifier else [0.0, np.nan, np.inf, -np.inf]
    return x, y, weights


# Padded rows are neutralised before any gate or expert code runs, so a few gates suffice: the
# plain softmax, top-K (NaN in the selection key), the Gaussian gate (a Cholesky solve on x),
# the sigmoid normaliser, and each expert kind (out-of-range class labels, NaN responses).
PADDING_CASES = [
    ("softmax", "gaussian"),
    ("topk_softmax", "gaussian"),
    ("gaussian", "gaussian"),
    ("softmax", "multinomial_logistic"),
    ("sigmoid", "nonlinear-gelu"),
]


def check_padding_is_inert(family, params, values, x, y, weights, value_and_grad):
    """Garbage padding gives the weighted mean and sum of the oracle on the real rows, and the
    same finite gradient as harmless padding (checked for the mean; the sum's gradient is the
    same times the constant Σ w_j)."""
    real = slice(0, SAMPLE_SIZE - NUM_PADDED)
    weighted_sum = np.sum(weights[real] * reference_log_density(family, values, x[real], y[real]))
    garbage, harmless = padded_data(family, x, y, weights, True), padded_data(family, x, y, weights, False)
    garbage_sum = mt.log_likelihood(family, params, *map(jnp.asarray, garbage), reduce="sum")
    assert float(garbage_sum) == pytest.approx(weighted_sum, rel=1e-11)
    garbage_mean, garbage_gradient = value_and_grad(params, *garbage)
    harmless_mean, harmless_gradient = value_and_grad(params, *harmless)
    for mean in (garbage_mean, harmless_mean):
        assert float(mean) == pytest.approx(weighted_sum / np.sum(weights[real]), rel=1e-11)
    garbage_leaves, harmless_leaves = map(jax.tree_util.tree_leaves, (garbage_gradient, harmless_gradient))
    for garbage_leaf, harmless_leaf in zip(garbage_leaves, harmless_leaves):
        assert np.all(np.isfinite(garbage_leaf))
        np.testing.assert_allclose(garbage_leaf, harmless_leaf, rtol=1e-12, atol=1e-14)


def likelihood_value_and_grad(family):
    """(params, x, y, weights) ↦ (weighted mean log-likelihood, its gradient in params)."""

    def objective(params, x, y, weights):
        return mt.log_likelihood(family, params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights))

    return jax.value_and_grad(objective)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id, expert_id", PADDING_CASES)
def test_zero_weight_padding_changes_nothing(gate_id, expert_id, rng):
    """Rows of weight 0, even with NaN/inf x or y, change neither the weighted mean nor the
    weighted sum (oracle: the loop on the real rows alone) nor their gradients with respect to
    any parameter (oracle: padding with harmless copies), and everything stays finite."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=2)
    values, params = random_params(family, rng)
    x, y = random_inputs(rng, SAMPLE_SIZE, 2), random_responses(family, rng, SAMPLE_SIZE)
    weights = rng.uniform(0.1, 2.0, SAMPLE_SIZE)
    check_padding_is_inert(family, params, values, x, y, weights, likelihood_value_and_grad(family))


def test_zero_weight_padding_changes_nothing_when_compiled(rng):
    """The same check through ``jax.jit(jax.value_and_grad(...))``, the way fitters call it."""
    family = build_family("softmax", "gaussian", dim=2)
    values, params = random_params(family, rng)
    x, y = random_inputs(rng, SAMPLE_SIZE, 2), random_responses(family, rng, SAMPLE_SIZE)
    weights = rng.uniform(0.1, 2.0, SAMPLE_SIZE)
    compiled = jax.jit(likelihood_value_and_grad(family))
    check_padding_is_inert(family, params, values, x, y, weights, compiled)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id", GATE_PRESETS)
def test_extreme_inputs_keep_likelihood_and_gradient_finite(gate_id, rng):
    """β₁ ~ 1e3 (or Gaussian-gate centres ~ 1e3 with tight covariances), x ~ 1e2 and ν = 1e-12
    with y exactly at the first expert's mean: the log-likelihood, the responsibilities and the
    gradient must stay finite, and log p must still match the loop oracle."""
    family = build_family(gate_id, "gaussian", dim=2)
    values = with_extreme_gate(family, random_params(family, rng)[0])
    values["expert"]["nu"] = np.full(NUM_EXPERTS, 1e-12)
    params = mt.make_params(family, values)
    x = random_inputs(rng, SAMPLE_SIZE, 2, scale=100.0)
    y = reference_expert_means(family.expert, values["expert"], x)[:, 0]
    data = (jnp.asarray(x), jnp.asarray(y))
    per_sample = np.asarray(mt.log_likelihood(family, params, *data, reduce="none"))
    assert np.all(np.isfinite(per_sample))
    np.testing.assert_allclose(per_sample, reference_log_density(family, values, x, y), rtol=1e-9)
    responsibilities = np.asarray(mt.responsibilities(family, params, *data))
    assert np.all(np.isfinite(responsibilities))
    np.testing.assert_allclose(responsibilities.sum(axis=1), 1.0, atol=1e-12)
    gradient = jax.grad(lambda p: mt.log_likelihood(family, p, *data))(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(gradient))


def test_unknown_reduction_is_refused(rng):
    """An unknown ``reduce`` is an error naming the allowed values, not a silent default."""
    family = build_family("softmax", "gaussian", num_experts=2, dim=1)
    _, params = random_params(family, rng)
    with pytest.raises(ValueError, match="reduce: expected 'mean', 'sum' or 'none'"):
        mt.log_likelihood(family, params, jnp.zeros((3, 1)), jnp.zeros(3), reduce="median")
