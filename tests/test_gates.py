"""Gates π_i(x) (docs/gates.md): every preset and every registered part against the NumPy oracle.

Oracles: ``reference_log_gate_weights`` in conftest.py (a per-sample loop over score → transform →
activation/temperature → normaliser → top-K, with scipy.stats.multivariate_normal for the Gaussian
gate), and the algebraic facts that weights are probabilities, that a softmax is unchanged by a
common translation and that a top-K gate has exactly k − K exact zeros per row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_theory as mt
from conftest import (
    GATE_VARIANTS,
    SAMPLE_SIZE,
    build_family,
    random_inputs,
    random_params,
    reference_log_gate_weights,
    with_extreme_gate,
)


SHIFT_INVARIANT_IDS = [name for name, gate in GATE_VARIANTS.items() if gate.shift_invariant]
NOT_SHIFT_INVARIANT_IDS = [name for name, gate in GATE_VARIANTS.items() if not gate.shift_invariant]


def expected_zeros_per_row(gate: mt.Gate, num_experts: int) -> int:
    return 0 if gate.top_k is None else num_experts - min(gate.top_k, num_experts)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("gate_id", list(GATE_VARIANTS))
def test_log_gate_weights_match_oracle(gate_id, dim, rng):
    """log π(x) equals the plain-loop pipeline for every gate variant, with d = 1 and d = 2
    (distances in R², full Gaussian-gate covariances checked with scipy's multivariate normal)."""
    family = build_family(GATE_VARIANTS[gate_id], "gaussian", dim=dim)
    values, params = random_params(family, rng)
    x = random_inputs(rng, SAMPLE_SIZE, dim)
    log_weights = np.asarray(mt.gate_log_weights(family, params, jnp.asarray(x)))
    expected = reference_log_gate_weights(family.gate, values["gate"], x)
    np.testing.assert_allclose(log_weights, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate_id", list(GATE_VARIANTS))
def test_gate_weights_are_probabilities(gate_id, rng):
    """π_i(x) ∈ [0, 1], Σ_i π_i(x) = 1, and a top-K gate has exactly k − K exact zeros per row."""
    family = build_family(GATE_VARIANTS[gate_id], "gaussian", dim=2)
    _, params = random_params(family, rng)
    x = jnp.asarray(random_inputs(rng, SAMPLE_SIZE, 2, scale=4.0))
    weights = np.asarray(mt.gate_weights(family, params, x))
    assert np.all((weights >= 0) & (weights <= 1))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    zeros_per_row = np.sum(weights == 0.0, axis=1)
    np.testing.assert_array_equal(zeros_per_row, expected_zeros_per_row(family.gate, family.num_experts))


# Rows of β₁ (k = 4, d = 1) that make the top-K selection key tie; with x > 0 the order is
# by β₁, so each pattern puts a tie at a different place relative to the K-th largest key.
TIE_PATTERNS = {
    "top_pair": [2.0, 2.0, -1.0, -3.0],  # the two largest keys tie
    "boundary_pair": [3.0, 1.0, 1.0, -2.0],  # the 2nd and 3rd largest tie
    "all_equal": [0.5, 0.5, 0.5, 0.5],  # every key ties, for every x
}


@pytest.mark.usefixtures("without_jit")
@pytest.mark.parametrize("top_k_on", ["slope", "score"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("pattern", list(TIE_PATTERNS))
def test_top_k_ties_keep_exactly_k_minus_K_zeros(pattern, top_k, top_k_on):
    """With identical (β₀, β₁) rows the selection key ties exactly; the gate must still select
    exactly K experts (the lower index wins, as in the oracle) and the likelihood stay finite."""
    num_experts = 4
    family = build_family(mt.Gate(top_k=top_k, top_k_on=top_k_on), "gaussian", num_experts=num_experts, dim=1)
    beta1 = np.array(TIE_PATTERNS[pattern])[:, None]
    # Equal β₀ where β₁ is equal, so that selecting on the full score ties as well.
    beta0 = np.array([0.1 * np.flatnonzero(beta1[:, 0] == b)[0] for b in beta1[:, 0]])
    experts = {"a": np.ones((num_experts, 1)), "b": np.arange(num_experts, dtype=float), "nu": np.ones(num_experts)}
    values = {"gate": {"beta0": beta0, "beta1": beta1}, "expert": experts}
    params = mt.make_params(family, values)
    x, y = np.linspace(0.1, 2.0, SAMPLE_SIZE)[:, None], np.linspace(-1.0, 4.0, SAMPLE_SIZE)
    weights = np.asarray(mt.gate_weights(family, params, jnp.asarray(x)))
    np.testing.assert_array_equal(np.sum(weights == 0.0, axis=1), num_experts - top_k)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    log_weights = np.asarray(mt.gate_log_weights(family, params, jnp.asarray(x)))
    np.testing.assert_allclose(log_weights, reference_log_gate_weights(family.gate, values["gate"], x), atol=1e-12)
    x, y = jnp.asarray(x), jnp.asarray(y)
    assert np.all(np.isfinite(mt.log_likelihood(family, params, x, y, reduce="none")))
    responsibilities = np.asarray(mt.responsibilities(family, params, x, y))
    np.testing.assert_array_equal(responsibilities == 0.0, weights == 0.0)


@pytest.mark.parametrize("gate_id", SHIFT_INVARIANT_IDS)
def test_softmax_type_gates_are_translation_invariant(gate_id, rng):
    """Adding a common t₀ to every offset (and a common t₁ to every β₁ where the slope is
    translatable) leaves π(x) unchanged: exp(s_i + c)/Σ_l exp(s_l + c) = exp(s_i)/Σ_l exp(s_l)."""
    family = build_family(GATE_VARIANTS[gate_id], "gaussian", dim=2)
    _, params = random_params(family, rng)
    x = jnp.asarray(random_inputs(rng, SAMPLE_SIZE, 2))
    intercept_shift = rng.normal(scale=3.0)
    slope_shift = rng.normal(scale=3.0, size=2) if family.gate.slope_translatable else None
    translated = mt.MoEParams(
        mt.gates.translate_gate(family.gate, params.gate, intercept_shift, slope_shift), params.expert
    )
    if slope_shift is not None:
        # The translation must really have moved β₁, otherwise the check below proves nothing.
        assert not np.allclose(translated.gate["beta1"], params.gate["beta1"])
    np.testing.assert_allclose(
        mt.gate_weights(family, translated, x), mt.gate_weights(family, params, x), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("gate_id", NOT_SHIFT_INVARIANT_IDS)
def test_sigmoid_normaliser_is_not_translation_invariant(gate_id, rng):
    """σ(s_i + t)/Σ_l σ(s_l + t) depends on t (σ is not exponential), so the same translation that
    leaves a softmax gate alone must change the normalised-sigmoid gate."""
    family = build_family(GATE_VARIANTS[gate_id], "gaussian", dim=2)
    _, params = random_params(family, rng, slope_scale=0.5)
    x = jnp.asarray(random_inputs(rng, SAMPLE_SIZE, 2, scale=1.0))
    translated = mt.MoEParams(mt.gates.translate_gate(family.gate, params.gate, 2.0), params.expert)
    change = np.max(np.abs(mt.gate_weights(family, translated, x) - mt.gate_weights(family, params, x)))
    assert change > 1e-3


@pytest.mark.parametrize("gate_id", list(GATE_VARIANTS))
def test_canonicalize_keeps_weights_and_zeroes_the_reference_expert(gate_id, rng):
    """canonicalize is a translation (π unchanged) that puts the last expert's β₀ (and β₁ where
    translatable) at exactly 0, scales Gaussian-gate weights to sum 1, and is a no-op for
    sigmoid gates, which have no translation invariance."""
    family = build_family(GATE_VARIANTS[gate_id], "gaussian", dim=2)
    _, params = random_params(family, rng)
    canonical = mt.canonicalize(family, params)
    x = jnp.asarray(random_inputs(rng, SAMPLE_SIZE, 2))
    np.testing.assert_allclose(
        mt.gate_weights(family, canonical, x), mt.gate_weights(family, params, x), rtol=1e-9, atol=1e-12
    )
    for name, value in params.expert.items():
        np.testing.assert_array_equal(canonical.expert[name], value)
    gate = family.gate
    if not gate.shift_invariant:
        for name, value in params.gate.items():
            np.testing.assert_array_equal(canonical.gate[name], value)
    elif gate.score == "gaussian":
        assert float(jnp.sum(canonical.gate["weight"])) == pytest.approx(1.0, abs=1e-14)
    else:
        assert float(canonical.gate["beta0"][-1]) == 0.0
        if gate.slope_translatable:
            np.testing.assert_array_equal(canonical.gate["beta1"][-1], 0.0)
        else:
            np.testing.assert_array_equal(canonical.gate["beta1"], params.gate["beta1"])
    twice = mt.canonicalize(family, canonical)
    for name, value in canonical.gate.items():
        np.testing.assert_allclose(twice.gate[name], value, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("gate_id", list(GATE_VARIANTS))
def test_extreme_scores_stay_finite(gate_id, rng):
    """With |scores| ~ 1e5 or more, log π is −inf only at top-K zeros, never NaN or +inf, rows
    still normalise, and the values agree with the oracle (which shifts by the largest term)."""
    family = build_family(GATE_VARIANTS[gate_id], "gaussian", dim=2)
    values = with_extreme_gate(family, random_params(family, rng)[0])
    params = mt.make_params(family, values)
    x = random_inputs(rng, SAMPLE_SIZE, 2, scale=100.0)
    log_weights = np.asarray(mt.gate_log_weights(family, params, jnp.asarray(x)))
    assert not np.any(np.isnan(log_weights)) and not np.any(log_weights == np.inf)
    zeros_per_row = np.sum(np.isneginf(log_weights), axis=1)
    np.testing.assert_array_equal(zeros_per_row, expected_zeros_per_row(family.gate, family.num_experts))
    np.testing.assert_allclose(np.exp(log_weights).sum(axis=1), 1.0, atol=1e-12)
    expected = reference_log_gate_weights(family.gate, values["gate"], x)
    np.testing.assert_allclose(log_weights, expected, rtol=1e-9, atol=1e-9)


def test_laplace_score_has_finite_gradient_at_its_centre():
    """−‖x − β₁‖ is not differentiable at x = β₁; the gate must return a finite gradient there,
    the sub-gradient 0 of the norm (so ∂ log π_1/∂β₁₁ = (1 − π_1)·0 = 0), not the NaN of d√u/du at
    u = 0."""
    family = build_family("laplace_softmax", "gaussian", num_experts=2, dim=2)
    values = {
        "gate": {"beta0": [0.2, 0.0], "beta1": [[0.5, -0.5], [1.0, 1.0]]},
        "expert": {"a": [[1.0, 0.0], [0.0, 1.0]], "b": [0.0, 0.0], "nu": [1.0, 1.0]},
    }
    params = mt.make_params(family, values)
    x_at_first_centre = jnp.asarray([[0.5, -0.5]])

    def first_log_weight(params):
        return mt.gate_log_weights(family, params, x_at_first_centre)[0, 0]

    gradient = jax.jit(jax.grad(first_log_weight))(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(gradient))
    np.testing.assert_array_equal(gradient.gate["beta1"][0], 0.0)


def _numpy_soft_selection(keys: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """log σ((κ_i − m)/T) row by row, m the midpoint of the K-th and (K+1)-th largest keys."""
    out = np.empty_like(keys)
    for row, key in enumerate(keys):
        ordered = np.sort(key)[::-1]
        midpoint = 0.5 * (ordered[top_k - 1] + ordered[top_k])
        out[row] = -np.logaddexp(0.0, -(key - midpoint) / temperature)
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_soft_selection_matches_numpy_and_tends_to_the_hard_gate(top_k):
    rng = np.random.default_rng(top_k)
    params = {"beta0": jnp.asarray(rng.normal(size=4)), "beta1": jnp.asarray(rng.normal(size=(4, 2)) * 2)}
    x = jnp.asarray(rng.uniform(-1, 1, size=(50, 2)))
    keys = np.asarray(x @ params["beta1"].T)
    hard = np.asarray(mt.gates.log_gate_weights(mt.make_gate("topk_softmax", top_k=top_k), params, x))
    scores = np.asarray(params["beta0"])[None, :] + keys
    for temperature in (1.0, 0.1):
        gate = mt.make_gate("topk_softmax", top_k=top_k, selection_temperature=temperature)
        soft = np.asarray(mt.gates.log_gate_weights(gate, params, x))
        expected = scores + _numpy_soft_selection(keys, top_k, temperature)
        expected -= np.log(np.sum(np.exp(expected), axis=1, keepdims=True))
        np.testing.assert_allclose(soft, expected, rtol=1e-12, atol=1e-12)
    # The closest keys to the midpoint in this sample are ~1e-2 apart; at T = 1e-6 the soft gate is
    # the hard one to rounding, and every unselected weight is below e^{-1000}.
    gate = mt.make_gate("topk_softmax", top_k=top_k, selection_temperature=1e-6)
    soft = np.asarray(mt.gates.log_gate_weights(gate, params, x))
    selected = np.isfinite(hard)
    assert np.all(selected.sum(axis=1) == top_k)
    np.testing.assert_allclose(soft[selected], hard[selected], atol=1e-12)
    assert np.all(soft[~selected] < -1000)


def test_soft_selection_needs_a_top_k_gate_and_a_positive_temperature():
    with pytest.raises(ValueError, match="a soft selection needs a top-K gate"):
        mt.make_gate("softmax", selection_temperature=0.5)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="gate.selection_temperature: expected a number T > 0"):
            mt.make_gate("topk_softmax", selection_temperature=bad)
