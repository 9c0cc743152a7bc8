"""Samplers (moe_theory.sampling) agree with their own densities, and input distributions are right.

Oracles: with n = 200 000 draws, conditional on the drawn inputs,
* each expert label count is a sum of independent Bernoulli(π_i(x_j)), so its frequency must be
  within Z_BOUND standard errors √(Σ_j π_ji(1 − π_ji))/n of the average gate probability;
* for Gaussian-noise experts, (y − h_z(x))/√ν_z is N(0, 1) within each expert, and the PIT values
  u_j = Σ_i π_i(x_j) Φ((y_j − h_i(x_j))/√ν_i) are Uniform(0, 1) (scipy.stats.kstest);
* for multinomial experts, class counts per expert match Σ_j P_i(c | x_j) and the marginal class
  counts pass scipy.stats.chisquare against Σ_j p(c | x_j);
* input distributions match scipy.stats (KS tests), closed-form moments, or np.linspace exactly.
Regression means and class probabilities come from NumPy formulas (conftest.py), the gate
probabilities from the package's gate, which test_gates.py checks against the loop oracle.
Fixed keys make every statistical check deterministic; the bounds are loose enough (5 standard
errors, p > 1e-4) that a correct sampler passes for essentially any key.

Most large-sample checks run the sampler op by op (``without_jit``): compiling one program per
family would cost more than drawing the 200 000 samples. The compiled sampler is exercised by the
one-dimensional input checks and the key tests at the end (same key → same data, ``vmap`` over
keys = loop).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

import moe_theory as mt
from conftest import (
    EXPERT_SPECS,
    GATE_PRESETS,
    NUM_CLASSES,
    NUM_EXPERTS,
    REGRESSION_EXPERT_IDS,
    build_family,
    random_params,
    reference_expert_means,
)
from moe_theory.sampling import GaussianMixtureInputs, GridInputs, NormalInputs, UniformInputs

LARGE_SAMPLE = 200_000
Z_BOUND = 5.0
MIN_P_VALUE = 1e-4
BOX = UniformInputs(low=-2.0, high=2.0)


def draw(family, params, sample_size, inputs, seed=0):
    x, y, labels = mt.sample(jax.random.PRNGKey(seed), family, params, sample_size, inputs)
    return np.asarray(x), np.asarray(y), np.asarray(labels)


def default_inputs(family):
    """The Gaussian gate's own input mixture ([8]'s generative model), a box otherwise."""
    return GaussianMixtureInputs(from_gate=True) if family.gate.score == "gaussian" else BOX


def assert_label_frequencies_match(gate_weights, labels):
    """|freq_i − mean_j π_ji| ≤ Z_BOUND · √(Σ_j π_ji(1 − π_ji)) / n for every expert i."""
    sample_size, num_experts = gate_weights.shape
    frequencies = np.bincount(labels, minlength=num_experts) / sample_size
    expected = gate_weights.mean(axis=0)
    standard_error = np.sqrt(np.sum(gate_weights * (1.0 - gate_weights), axis=0)) / sample_size
    # An expert with π ∈ {0, 1} everywhere has standard error 0 and must match up to round-off.
    assert np.all(np.abs(frequencies - expected) <= Z_BOUND * standard_error + 1e-12), (frequencies, expected)


def probability_integral_transform(gate_weights, means, variances, y):
    """u_j = Σ_i π_i(x_j) Φ((y_j − h_i(x_j))/√ν_i): the model's conditional CDF at y_j."""
    return np.sum(gate_weights * scipy.stats.norm.cdf((y[:, None] - means) / np.sqrt(variances)), axis=1)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id", GATE_PRESETS)
def test_labels_and_responses_follow_each_gate(gate_id, rng):
    """For every gate preset: label frequencies match the average gate probabilities, no label
    falls on a zero (top-K) weight, and the PIT of y under the model density is Uniform(0, 1)."""
    family = build_family(gate_id, "gaussian", dim=2)
    values, params = random_params(family, rng)
    x, y, labels = draw(family, params, LARGE_SAMPLE, default_inputs(family))
    gate_weights = np.asarray(mt.gate_weights(family, params, jnp.asarray(x)))
    assert_label_frequencies_match(gate_weights, labels)
    assert np.all(gate_weights[np.arange(LARGE_SAMPLE), labels] > 0.0)
    means = reference_expert_means(family.expert, values["expert"], x)
    pit = probability_integral_transform(gate_weights, means, values["expert"]["nu"], y)
    assert scipy.stats.kstest(pit, "uniform").pvalue > MIN_P_VALUE


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("expert_id", REGRESSION_EXPERT_IDS)
def test_regression_responses_given_the_expert(expert_id, rng):
    """Within each expert i, (y − h_i(x))/√ν_i has mean 0 and variance 1 (ν is a variance, not a
    standard deviation), and the PIT of y under the mixture is Uniform(0, 1)."""
    family = build_family("softmax", EXPERT_SPECS[expert_id], dim=2)
    values, params = random_params(family, rng)
    x, y, labels = draw(family, params, LARGE_SAMPLE, BOX)
    means = reference_expert_means(family.expert, values["expert"], x)
    variances = values["expert"]["nu"]
    standardised = (y - means[np.arange(LARGE_SAMPLE), labels]) / np.sqrt(variances[labels])
    for expert in range(family.num_experts):
        residual = standardised[labels == expert]
        count = residual.size
        if count < 100:
            continue  # too few draws for a moment check; the PIT test below still covers this expert
        assert abs(residual.mean()) <= Z_BOUND / np.sqrt(count)
        assert abs(residual.var() - 1.0) <= Z_BOUND * np.sqrt(2.0 / count)
    gate_weights = np.asarray(mt.gate_weights(family, params, jnp.asarray(x)))
    pit = probability_integral_transform(gate_weights, means, variances, y)
    assert scipy.stats.kstest(pit, "uniform").pvalue > MIN_P_VALUE


def reference_class_probabilities(expert_values, x):
    """P_i(c | x_j), (n, k, C), vectorised: softmax of (η₀ + η₁x, 0) over classes."""
    free = np.einsum("nd,kcd->nkc", x, expert_values["eta1"]) + expert_values["eta0"][None]
    logits = np.concatenate([free, np.zeros(free.shape[:2] + (1,))], axis=-1)
    return scipy.special.softmax(logits, axis=-1)


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("gate_id", ["softmax", "sigmoid"])
def test_multinomial_classes_follow_the_model(gate_id, rng):
    """Counts of (expert i, class c) match Σ_{j: z_j = i} P_i(c | x_j) within Z_BOUND standard
    errors, and marginal class counts pass a chi-square test against Σ_j Σ_i π_i(x_j) P_i(c|x_j)."""
    family = build_family(gate_id, "multinomial_logistic", dim=2)
    values, params = random_params(family, rng)
    x, y, labels = draw(family, params, LARGE_SAMPLE, BOX)
    assert y.dtype == np.int32 and set(np.unique(y)) <= set(range(NUM_CLASSES))
    probabilities = reference_class_probabilities(values["expert"], x)
    chosen = probabilities[np.arange(LARGE_SAMPLE), labels]  # (n, C): the drawn expert's classes
    for expert in range(family.num_experts):
        in_expert = labels == expert
        observed = np.bincount(y[in_expert], minlength=NUM_CLASSES)
        expected = chosen[in_expert].sum(axis=0)
        standard_error = np.sqrt(np.sum(chosen[in_expert] * (1.0 - chosen[in_expert]), axis=0))
        assert np.all(np.abs(observed - expected) <= Z_BOUND * standard_error)
    gate_weights = np.asarray(mt.gate_weights(family, params, jnp.asarray(x)))
    marginal = np.einsum("nk,nkc->c", gate_weights, probabilities)
    observed = np.bincount(y, minlength=NUM_CLASSES)
    # Rescaled so both totals are n exactly; scipy refuses counts and expectations that disagree.
    assert scipy.stats.chisquare(observed, marginal * LARGE_SAMPLE / marginal.sum()).pvalue > MIN_P_VALUE


# ----------------------------------------------------------------------------------------------
# Input distributions.

INPUT_SAMPLE = LARGE_SAMPLE  # the same shape as above, so op-by-op kernels are reused


def draw_inputs(inputs, dim, seed=1):
    """x from ``inputs`` through the full sampler of a softmax-gated Gaussian family."""
    family = build_family("softmax", "gaussian", dim=dim)
    _, params = random_params(family, np.random.default_rng(seed))
    return draw(family, params, INPUT_SAMPLE, inputs, seed)[0]


@pytest.mark.usefixtures("without_jit")
def test_uniform_inputs_fill_the_box():
    """Per-coordinate bounds: every draw lies in [low, high], and each coordinate passes a KS
    test against scipy.stats.uniform(low, high − low)."""
    low, high = np.array([-1.0, 2.0]), np.array([3.0, 2.5])
    x = draw_inputs(mt.make_inputs({"name": "uniform", "low": list(low), "high": list(high)}), dim=2)
    assert np.all(x >= low) and np.all(x <= high)
    for coordinate in range(2):
        uniform = scipy.stats.uniform(loc=low[coordinate], scale=high[coordinate] - low[coordinate])
        assert scipy.stats.kstest(x[:, coordinate], uniform.cdf).pvalue > MIN_P_VALUE


@pytest.mark.usefixtures("without_jit")
def test_normal_inputs_have_the_given_moments():
    """Each coordinate is N(mean, std²) (KS test) and the coordinates are uncorrelated."""
    mean, std = np.array([1.0, -2.0]), np.array([0.5, 3.0])
    x = draw_inputs(NormalInputs(mean=tuple(mean), std=tuple(std)), dim=2)
    for coordinate in range(2):
        normal = scipy.stats.norm(mean[coordinate], std[coordinate])
        assert scipy.stats.kstest(x[:, coordinate], normal.cdf).pvalue > MIN_P_VALUE
    assert abs(np.corrcoef(x.T)[0, 1]) <= Z_BOUND / np.sqrt(INPUT_SAMPLE)


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-3.0, 2.0)])
def test_grid_inputs_are_exactly_linspace(low, high):
    """The grid of paper [1]'s code is np.linspace(low, high, n): value for value on [0, 1], and
    to the last bit of round-off elsewhere (jnp.linspace rounds some interior points the other
    way from NumPy, a 1-ulp difference of no statistical consequence)."""
    family = build_family("softmax", "gaussian", dim=1)
    _, params = random_params(family, np.random.default_rng(3))
    sample_size = 1001
    x, _, _ = draw(family, params, sample_size, GridInputs(low=low, high=high))
    expected = np.linspace(low, high, sample_size)
    if (low, high) == (0.0, 1.0):
        np.testing.assert_array_equal(x[:, 0], expected)
    else:
        np.testing.assert_allclose(x[:, 0], expected, rtol=0, atol=2 * np.spacing(max(abs(low), abs(high))))


def test_grid_inputs_refuse_more_than_one_dimension():
    """linspace is one-dimensional; asking for a d = 2 grid is an error, not a silent broadcast."""
    family = build_family("softmax", "gaussian", dim=2)
    _, params = random_params(family, np.random.default_rng(4))
    with pytest.raises(ValueError, match="grid input distribution needs d = 1"):
        mt.sample(jax.random.PRNGKey(0), family, params, 10, GridInputs())


def test_explicit_gaussian_mixture_inputs_in_one_dimension():
    """x ~ 0.3 N(−1, 0.25) + 0.7 N(2, 1) (covariances, not standard deviations): KS test against
    the mixture CDF Σ_i p_i Φ((x − m_i)/√S_i)."""
    weights, means, variances = np.array([0.3, 0.7]), np.array([-1.0, 2.0]), np.array([0.25, 1.0])
    inputs = mt.make_inputs(
        {"name": "gaussian_mixture", "weights": list(weights), "means": list(means), "covariances": list(variances)}
    )
    x = draw_inputs(inputs, dim=1)

    def mixture_cdf(points):
        return np.sum(weights * scipy.stats.norm.cdf((points[:, None] - means) / np.sqrt(variances)), axis=1)

    assert scipy.stats.kstest(x[:, 0], mixture_cdf).pvalue > MIN_P_VALUE


def assert_mean_and_covariance(x, mean, covariance):
    """Sample mean and covariance within Z_BOUND standard errors estimated from the draws."""
    count = x.shape[0]
    centred = x - x.mean(axis=0)
    assert np.all(np.abs(x.mean(axis=0) - mean) <= Z_BOUND * x.std(axis=0) / np.sqrt(count))
    products = centred[:, :, None] * centred[:, None, :]
    standard_error = products.std(axis=0) / np.sqrt(count)
    assert np.all(np.abs(products.mean(axis=0) - covariance) <= Z_BOUND * standard_error)


@pytest.mark.usefixtures("without_jit")
def test_explicit_gaussian_mixture_inputs_in_two_dimensions():
    """Mean Σ p_i m_i and covariance Σ p_i (S_i + m_i m_iᵀ) − μμᵀ of a two-component mixture
    with full covariance matrices."""
    weights = np.array([0.4, 0.6])
    means = np.array([[0.0, 1.0], [2.0, -1.0]])
    covariances = np.array([[[1.0, 0.5], [0.5, 2.0]], [[0.3, -0.1], [-0.1, 0.2]]])
    spec = {"weights": weights.tolist(), "means": means.tolist(), "covariances": covariances.tolist()}
    x = draw_inputs(mt.make_inputs({"name": "gaussian_mixture", **spec}), dim=2)
    mean = weights @ means
    second_moment = np.einsum("i,ijk->jk", weights, covariances + means[:, :, None] * means[:, None, :])
    assert_mean_and_covariance(x, mean, second_moment - np.outer(mean, mean))


@pytest.mark.usefixtures("without_jit")
def test_gaussian_mixture_from_the_gate_is_papers_generative_model():
    """With from_gate=True, drawing x from the Gaussian gate's mixture and z from the gate is
    z ~ Cat(w/Σw), x | z ~ N(c_z, Γ_z) ([8]): label frequencies are w/Σw (binomial standard
    errors) and x within each label has mean c_z and covariance Γ_z."""
    family = build_family("gaussian", "gaussian", dim=2)
    values = random_params(family, np.random.default_rng(5))[0]
    values["gate"]["weight"] = np.array([0.5, 1.0, 1.5])  # unnormalised on purpose
    params = mt.make_params(family, values)
    x, _, labels = draw(family, params, INPUT_SAMPLE, GaussianMixtureInputs(from_gate=True))
    proportions = values["gate"]["weight"] / values["gate"]["weight"].sum()
    frequencies = np.bincount(labels, minlength=NUM_EXPERTS) / INPUT_SAMPLE
    standard_error = np.sqrt(proportions * (1 - proportions) / INPUT_SAMPLE)
    assert np.all(np.abs(frequencies - proportions) <= Z_BOUND * standard_error)
    for expert in range(NUM_EXPERTS):
        centre, covariance = values["gate"]["centre"][expert], values["gate"]["covariance"][expert]
        assert_mean_and_covariance(x[labels == expert], centre, covariance)


def test_input_distributions_refuse_bad_options():
    """Clear errors for unknown names/options and inconsistent Gaussian-mixture specifications."""
    with pytest.raises(ValueError, match="unknown input distribution 'cauchy'"):
        mt.make_inputs("cauchy")
    with pytest.raises(ValueError, match="unknown option"):
        mt.make_inputs({"name": "uniform", "width": 2.0})
    mixture = {"name": "gaussian_mixture", "means": [0.0, 1.0], "covariances": [1.0, 1.0]}
    with pytest.raises(ValueError, match="summing to 1"):
        mt.make_inputs({**mixture, "weights": [0.5, 0.6]})
    with pytest.raises(ValueError, match="not both"):
        mt.make_inputs({**mixture, "weights": [0.5, 0.5], "from_gate": True})
    with pytest.raises(ValueError, match="needs weights, means and covariances"):
        mt.make_inputs({"name": "gaussian_mixture", "weights": [1.0]})
    family = build_family("softmax", "gaussian", dim=1)
    _, params = random_params(family, np.random.default_rng(6))
    with pytest.raises(ValueError, match="from_gate=True needs the Gaussian gate"):
        mt.sample(jax.random.PRNGKey(0), family, params, 10, GaussianMixtureInputs(from_gate=True))


def test_input_records_from_config_lists_are_hashable_and_equal():
    """make_inputs turns config lists into tuples, so equal specs give equal, hashable records
    (a static jit argument that does not trigger recompilation)."""
    identity = [[1.0, 0.0], [0.0, 1.0]]
    spec = {"name": "gaussian_mixture", "weights": [0.5, 0.5], "means": [[0.0, 1.0], [1.0, 0.0]]}
    spec["covariances"] = [identity, identity]
    first, second = mt.make_inputs(spec), mt.make_inputs(dict(spec))
    assert first == second and hash(first) == hash(second)


# ----------------------------------------------------------------------------------------------
# Keys: reproducibility, independence and vmap.

SMALL_SAMPLE = 64

# Each expert kind once, with three kinds of input distribution (compiling is the cost here).
KEY_CASES = {
    "softmax-gaussian-uniform": ("softmax", "gaussian", 2, BOX),
    "gaussian_gate-nonlinear-from_gate": ("gaussian", "nonlinear-tanh", 2, GaussianMixtureInputs(from_gate=True)),
    # K = 2: with K = 1 on a fixed grid the label is a deterministic function of x.
    "top2-multinomial-grid": ({"name": "topk_softmax", "top_k": 2}, "multinomial_logistic", 1, GridInputs()),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_same_key_same_data_different_key_different_data(case, rng):
    """The same key gives bit-identical (x, y, labels); a different key changes x (except on the
    deterministic grid), y and the labels."""
    gate_id, expert_id, dim, inputs = KEY_CASES[case]
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=dim)
    _, params = random_params(family, rng)
    first = draw(family, params, SMALL_SAMPLE, inputs, seed=11)
    again = draw(family, params, SMALL_SAMPLE, inputs, seed=11)
    other = draw(family, params, SMALL_SAMPLE, inputs, seed=12)
    for array, repeat in zip(first, again):
        np.testing.assert_array_equal(array, repeat)
        assert array.dtype == repeat.dtype
    x, y, labels = first
    if isinstance(inputs, GridInputs):
        np.testing.assert_array_equal(x, other[0])
    else:
        assert not np.array_equal(x, other[0])
    assert not np.array_equal(y, other[1])
    assert not np.array_equal(labels, other[2])


# The plain softmax/uniform case adds nothing under vmap that these two do not exercise.
@pytest.mark.parametrize("case", ["gaussian_gate-nonlinear-from_gate", "top2-multinomial-grid"])
def test_vmap_over_keys_equals_loop(case, rng):
    """``jax.vmap`` of ``sample`` over a batch of keys gives exactly the datasets of a loop."""
    gate_id, expert_id, dim, inputs = KEY_CASES[case]
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=dim)
    _, params = random_params(family, rng)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    batched = jax.vmap(lambda key: mt.sample(key, family, params, SMALL_SAMPLE, inputs))(keys)
    looped = [mt.sample(key, family, params, SMALL_SAMPLE, inputs) for key in keys]
    for position, batched_array in enumerate(batched):
        np.testing.assert_array_equal(batched_array, np.stack([np.asarray(draws[position]) for draws in looped]))
