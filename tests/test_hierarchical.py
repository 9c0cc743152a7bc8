"""Two-level hierarchical mixtures of experts (moe_theory.hierarchical) against independent oracles.

Oracles:

* the density, the responsibilities and the mean function equal plain NumPy/SciPy loops over
  samples, groups and experts, with the gate weights written here from their formulas (softmax of
  β₁ᵀx + β₀, Laplace softmax of −‖x − β₁‖ + β₀, normalised sigmoid σ(s_i)/Σ_j σ(s_j)),
  scipy.stats.norm for Gaussian experts and the class loop of tests/conftest.py for classifiers;
* with one group (G = 1) the HMoE is the flat MoE: the same density as moe_theory.models and the
  same EM iterates as the flat generic EM (moe_theory.fit.em.GenericEM);
* EM never decreases the log-likelihood, recovers a known truth at large n (nested-Voronoi expert
  errors small, and the fitted likelihood at least the truth's, as an MLE's must be);
* hierarchical_errors equals a plain NumPy nested-Voronoi assignment (cells from the expert
  parameters only, translatable softmax slopes compared after removing their mean difference) and
  is invariant under relabelling the fitted groups and experts, for Laplace and softmax gates; the
  relabelled truth has zero errors; a Gaussian outer gate works unbatched and batched;
* perturbed_start grows only the fields with an expert axis (a per-group temperature keeps its shape);
* log_likelihood(reduce="none") gives the unweighted per-sample values whatever the weights;
* vmapped fits of zero-weight-padded replicates equal a loop of unpadded single fits;
* make_hmoe_params names the level, group and field in its errors;
* sample draws leaves with the product weights π_i π_{j|i} and responses from the chosen expert.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

import moe_theory as mt
from moe_theory import hierarchical as hm
from moe_theory import models
from moe_theory.fit.em import GenericEM
from moe_theory.fit.settings import EMConfig
from moe_theory.fit.solver import run_solver, trace_solver
from moe_theory.params import ParameterError

from conftest import reference_class_log_probs

NUM_CLASSES = 3
INPUTS = mt.make_inputs("normal")

# Score kind of each gate preset used here: "linear" (β₁ a slope) or "laplace" (β₁ a location), and its normaliser.
GATE_KINDS = {
    "softmax": ("linear", "softmax"),
    "laplace_softmax": ("laplace", "softmax"),
    "sigmoid": ("linear", "sigmoid"),
}

_run = jax.jit(run_solver, static_argnums=0)
_trace = jax.jit(trace_solver, static_argnums=0)
errors_of = jax.jit(hm.hierarchical_errors, static_argnums=(1, 4, 5))
"""hierarchical_errors compiled once per family and shape (as a study calls it, under jit); eager
dispatch of its many small operations would dominate the run time."""


# ---------------------------------------------------------------------------------------------
# The NumPy oracle.


def _log_sum_exp(terms) -> float:
    largest = max(terms)
    return largest + math.log(sum(math.exp(t - largest) for t in terms))


def loop_log_gate(preset: str, beta0: np.ndarray, beta1: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log π_i(x_t), (n, k), one sample and one expert at a time, from the gate's formula."""
    score_kind, normaliser = GATE_KINDS[preset]
    n, k = x.shape[0], beta0.shape[0]
    out = np.empty((n, k))
    for t in range(n):
        scores = []
        for i in range(k):
            if score_kind == "linear":
                slope = sum(beta1[i, l] * x[t, l] for l in range(x.shape[1]))
            else:
                slope = -math.sqrt(sum((x[t, l] - beta1[i, l]) ** 2 for l in range(x.shape[1])))
            scores.append(slope + beta0[i])
        if normaliser == "softmax":
            log_phi = scores
        else:  # log σ(s) = −log(1 + e^{−s})
            log_phi = [-math.log1p(math.exp(-s)) if s > -30 else s - math.log1p(math.exp(s)) for s in scores]
        log_total = _log_sum_exp(log_phi)
        out[t] = [value - log_total for value in log_phi]
    return out


def vector_log_gate(preset: str, beta0: np.ndarray, beta1: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The same formula with NumPy broadcasting, for the large-n sampler check."""
    score_kind, normaliser = GATE_KINDS[preset]
    if score_kind == "linear":
        slope = x @ beta1.T
    else:
        slope = -np.sqrt(np.sum((x[:, None, :] - beta1[None]) ** 2, axis=-1))
    score = slope + beta0[None]
    log_phi = score if normaliser == "softmax" else -np.logaddexp(0.0, -score)
    return log_phi - scipy.special.logsumexp(log_phi, axis=1, keepdims=True)


def loop_log_leaf_weights(outer: str, inner: str, values: dict, x: np.ndarray) -> np.ndarray:
    """log π_i(x_t) + log π_{j|i}(x_t), (n, G, J)."""
    log_outer = loop_log_gate(outer, values["outer"]["beta0"], values["outer"]["beta1"], x)
    G, J = values["inner"]["beta0"].shape
    out = np.empty((x.shape[0], G, J))
    for i in range(G):
        log_inner = loop_log_gate(inner, values["inner"]["beta0"][i], values["inner"]["beta1"][i], x)
        for t in range(x.shape[0]):
            for j in range(J):
                out[t, i, j] = log_outer[t, i] + log_inner[t, j]
    return out


def loop_expert_log_prob(expert: str, values: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log f(y_t | x_t; η_ij), (n, G, J)."""
    e = values["expert"]
    if expert == "gaussian":
        G, J = e["b"].shape
        out = np.empty((x.shape[0], G, J))
        for t in range(x.shape[0]):
            for i in range(G):
                for j in range(J):
                    mean = sum(e["a"][i, j, l] * x[t, l] for l in range(x.shape[1])) + e["b"][i, j]
                    out[t, i, j] = scipy.stats.norm.logpdf(y[t], loc=mean, scale=math.sqrt(e["nu"][i, j]))
        return out
    G, J = e["eta0"].shape[:2]
    out = np.empty((x.shape[0], G, J))
    for i in range(G):
        class_log_probs = reference_class_log_probs({"eta0": e["eta0"][i], "eta1": e["eta1"][i]}, x)  # (n, J, C)
        for t in range(x.shape[0]):
            for j in range(J):
                out[t, i, j] = class_log_probs[t, j, int(y[t])]
    return out


def loop_expert_means(expert: str, values: dict, x: np.ndarray) -> np.ndarray:
    """h_ij(x_t): (n, G, J) regression means, or (n, G, J, C) class probabilities."""
    e = values["expert"]
    if expert == "gaussian":
        G, J = e["b"].shape
        out = np.empty((x.shape[0], G, J))
        for t in range(x.shape[0]):
            for i in range(G):
                for j in range(J):
                    out[t, i, j] = sum(e["a"][i, j, l] * x[t, l] for l in range(x.shape[1])) + e["b"][i, j]
        return out
    G = e["eta0"].shape[0]
    return np.stack(
        [np.exp(reference_class_log_probs({"eta0": e["eta0"][i], "eta1": e["eta1"][i]}, x)) for i in range(G)], axis=1
    )


def loop_density(outer, inner, expert, values, x, y):
    """(log p(y_t | x_t) (n,), posteriors r_{t,ij} (n, G, J)) by loops."""
    joint = loop_log_leaf_weights(outer, inner, values, x) + loop_expert_log_prob(expert, values, x, y)
    n, G, J = joint.shape
    log_density = np.empty(n)
    posterior = np.empty_like(joint)
    for t in range(n):
        log_density[t] = _log_sum_exp([joint[t, i, j] for i in range(G) for j in range(J)])
        for i in range(G):
            for j in range(J):
                posterior[t, i, j] = math.exp(joint[t, i, j] - log_density[t])
    return log_density, posterior


# ---------------------------------------------------------------------------------------------
# Parameters and data.


def random_values(rng, G, J, d, expert="gaussian") -> dict:
    """Random HMoE parameter values (gate slopes / locations scaled so the gates are far from flat)."""
    values = {
        "outer": {"beta0": rng.normal(size=G), "beta1": 1.5 * rng.normal(size=(G, d))},
        "inner": {"beta0": rng.normal(size=(G, J)), "beta1": 1.5 * rng.normal(size=(G, J, d))},
    }
    if expert == "gaussian":
        values["expert"] = {"a": rng.normal(size=(G, J, d)), "b": rng.normal(size=(G, J)),
                            "nu": rng.uniform(0.3, 1.5, size=(G, J))}
    else:
        values["expert"] = {"eta0": rng.normal(size=(G, J, NUM_CLASSES - 1)),
                            "eta1": 1.5 * rng.normal(size=(G, J, NUM_CLASSES - 1, d))}
    return values


def family_of(outer, inner, expert="gaussian", G=2, J=2, d=2):
    num_classes = NUM_CLASSES if expert == "multinomial_logistic" else None
    return hm.make_hierarchical_family(outer, inner, expert, G, J, dim=d, num_classes=num_classes)


def gate_truth(preset: str, level: str) -> dict:
    """True gate values for G = 2 (outer) or G = 2 groups of J = 2 (inner), d = 2, by score kind:
    slopes for the linear score (reference at zero), well-separated locations for the Laplace score,
    weights, centres and covariances for the Gaussian (outer) gate; a temperature gate adds τ (one
    per group for the inner gate)."""
    if preset == "gaussian":
        return {"weight": [0.4, 0.6], "centre": [[1.0, 0.0], [-1.0, 0.5]],
                "covariance": [[[1.0, 0.3], [0.3, 0.8]], [[0.6, 0.0], [0.0, 1.2]]]}
    if preset == "temperature_softmax":
        return {**gate_truth("softmax", level), "tau": 1.5 if level == "outer" else [1.0, 2.0]}
    linear = GATE_KINDS[preset][0] == "linear"
    if level == "outer":
        return {"beta0": [0.3, 0.0], "beta1": [[2.0, -1.0], [0.0, 0.0]] if linear else [[1.0, 1.0], [-1.0, -1.0]]}
    if linear:
        return {"beta0": [[0.5, 0.0], [-0.4, 0.0]], "beta1": [[[1.5, 1.0], [0.0, 0.0]], [[-1.0, 2.0], [0.0, 0.0]]]}
    return {"beta0": [[0.5, 0.0], [-0.4, 0.0]], "beta1": [[[1.5, 0.0], [-1.0, 0.5]], [[0.0, 1.5], [0.5, -1.5]]]}


EXPERT_TRUTH = {
    "gaussian": {
        "a": [[[1.0, -1.0], [-2.0, 0.5]], [[0.5, 2.0], [-1.0, -1.5]]],
        "b": [[1.0, -1.0], [2.0, -2.0]],
        "nu": [[0.1, 0.2], [0.15, 0.1]],
    },
    "multinomial_logistic": {  # C = 3 classes: η₀ (G, J, C − 1), η₁ (G, J, C − 1, d)
        "eta0": [[[1.0, -1.0], [-1.0, 1.0]], [[0.0, 2.0], [2.0, 0.0]]],
        "eta1": [[[[2.0, 0.0], [0.0, -2.0]], [[-2.0, 1.0], [1.0, 2.0]]],
                 [[[0.0, 2.0], [-2.0, 0.0]], [[1.0, -2.0], [2.0, 1.0]]]],
    },
}


def truth_of(outer, inner, expert="gaussian"):
    family = family_of(outer, inner, expert)
    values = {"outer": gate_truth(outer, "outer"), "inner": gate_truth(inner, "inner"), "expert": EXPERT_TRUTH[expert]}
    return family, hm.make_hmoe_params(family, values)


def as_numpy(params: hm.HMoEParams) -> dict:
    return {level: {name: np.asarray(value) for name, value in getattr(params, level).items()}
            for level in ("outer", "inner", "expert")}


def assert_params_close(actual, expected, **tolerance):
    for level in ("outer", "inner", "expert"):
        for name, value in getattr(expected, level).items():
            np.testing.assert_allclose(getattr(actual, level)[name], value, err_msg=f"{level}.{name}", **tolerance)


# ---------------------------------------------------------------------------------------------
# 1, 3. Density, responsibilities and mean function against the loops.

GATE_PAIRS = [
    ("softmax", "softmax"),
    ("softmax", "laplace_softmax"),
    ("laplace_softmax", "softmax"),
    ("laplace_softmax", "laplace_softmax"),
    ("sigmoid", "laplace_softmax"),
    ("softmax", "sigmoid"),
]


@pytest.mark.parametrize("outer,inner", GATE_PAIRS)
def test_log_likelihood_responsibilities_and_mean_equal_loops(outer, inner, rng):
    family = family_of(outer, inner, G=2, J=3)
    values = random_values(rng, 2, 3, 2)
    params = hm.make_hmoe_params(family, values)
    x = rng.uniform(-2.0, 2.0, size=(20, 2))
    y = rng.normal(scale=2.0, size=20)
    log_density, posterior = loop_density(outer, inner, "gaussian", values, x, y)

    np.testing.assert_allclose(hm.log_likelihood(family, params, x, y, reduce="none"), log_density, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hm.log_likelihood(family, params, x, y, reduce="mean"), log_density.mean(), rtol=1e-10)
    np.testing.assert_allclose(hm.log_likelihood(family, params, x, y, reduce="sum"), log_density.sum(), rtol=1e-10)
    weights = rng.uniform(0.0, 2.0, size=20)
    np.testing.assert_allclose(
        hm.log_likelihood(family, params, x, y, weights=weights), np.sum(weights * log_density) / np.sum(weights), rtol=1e-10
    )

    responsibilities = np.asarray(hm.responsibilities(family, params, x, y))
    assert responsibilities.shape == (20, 2, 3)
    np.testing.assert_allclose(responsibilities.sum(axis=(1, 2)), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(responsibilities, posterior, rtol=1e-9, atol=1e-12)

    leaf_weights = np.exp(loop_log_leaf_weights(outer, inner, values, x))
    np.testing.assert_allclose(leaf_weights.sum(axis=(1, 2)), 1.0, atol=1e-12)  # the oracle's own sanity
    expected_mean = np.sum(leaf_weights * loop_expert_means("gaussian", values, x), axis=(1, 2))
    np.testing.assert_allclose(hm.mean_function(family, params, x), expected_mean, rtol=1e-10, atol=1e-10)


def test_multinomial_expert_log_likelihood_equals_loop(rng):
    family = family_of("softmax", "laplace_softmax", "multinomial_logistic", G=2, J=3)
    values = random_values(rng, 2, 3, 2, expert="multinomial_logistic")
    params = hm.make_hmoe_params(family, values)
    x = rng.uniform(-2.0, 2.0, size=(20, 2))
    y = rng.integers(0, NUM_CLASSES, size=20)
    log_density, posterior = loop_density("softmax", "laplace_softmax", "multinomial_logistic", values, x, y)

    np.testing.assert_allclose(hm.log_likelihood(family, params, x, y, reduce="none"), log_density, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hm.log_likelihood(family, params, x, y, reduce="mean"), log_density.mean(), rtol=1e-10)
    responsibilities = np.asarray(hm.responsibilities(family, params, x, y))
    np.testing.assert_allclose(responsibilities.sum(axis=(1, 2)), 1.0, atol=1e-12)
    np.testing.assert_allclose(responsibilities, posterior, rtol=1e-9, atol=1e-12)
    # Class probabilities of the mixture: Σ_ij π_i π_{j|i} P_ij(c | x), rows summing to 1.
    leaf_weights = np.exp(loop_log_leaf_weights("softmax", "laplace_softmax", values, x))
    expected = np.einsum("nij,nijc->nc", leaf_weights, loop_expert_means("multinomial_logistic", values, x))
    np.testing.assert_allclose(hm.mean_function(family, params, x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("outer,inner", [("softmax", "softmax"), ("laplace_softmax", "laplace_softmax")])
def test_canonical_form_keeps_the_density_and_zeroes_the_references(outer, inner, rng):
    """Softmax-type gates: the last group and every group's last expert get β₀ = 0 (and β₁ = 0 for
    the linear score); the density does not change."""
    family = family_of(outer, inner, G=2, J=3)
    params = hm.make_hmoe_params(family, random_values(rng, 2, 3, 2))
    canonical = hm.canonicalize(family, params)
    x = rng.uniform(-2.0, 2.0, size=(20, 2))
    y = rng.normal(size=20)
    np.testing.assert_allclose(
        hm.log_likelihood(family, canonical, x, y, reduce="none"), hm.log_likelihood(family, params, x, y, reduce="none"),
        rtol=1e-12, atol=1e-12,
    )
    assert float(canonical.outer["beta0"][-1]) == 0.0
    np.testing.assert_array_equal(canonical.inner["beta0"][:, -1], 0.0)
    linear = GATE_KINDS[outer][0] == "linear"
    if linear:
        np.testing.assert_array_equal(canonical.outer["beta1"][-1], 0.0)
        np.testing.assert_array_equal(canonical.inner["beta1"][:, -1], 0.0)
    else:  # locations are not translatable
        np.testing.assert_array_equal(canonical.outer["beta1"], params.outer["beta1"])
        np.testing.assert_array_equal(canonical.inner["beta1"], params.inner["beta1"])


# ---------------------------------------------------------------------------------------------
# 2. One group is the flat MoE.


@pytest.mark.parametrize("outer,inner", [("softmax", "softmax"), ("laplace_softmax", "laplace_softmax")])
def test_one_group_is_the_flat_moe(outer, inner, rng):
    J, d = 3, 2
    family = family_of(outer, inner, G=1, J=J, d=d)
    flat_family = mt.make_family(inner, "gaussian", J, d)
    values = random_values(rng, 1, J, d)
    params = hm.make_hmoe_params(family, values)
    flat_values = {"gate": {name: value[0] for name, value in values["inner"].items()},
                   "expert": {name: value[0] for name, value in values["expert"].items()}}
    flat = mt.make_params(flat_family, flat_values)

    # The density.
    x = rng.uniform(-2.0, 2.0, size=(20, d))
    y = rng.normal(scale=2.0, size=20)
    np.testing.assert_allclose(
        hm.log_likelihood(family, params, x, y, reduce="none"),
        models.log_likelihood(flat_family, flat, x, y, reduce="none"), rtol=1e-12, atol=1e-12,
    )

    # EM iterates: data from the model, a start away from it, five iterations each (tol = 0, so none stops early).
    x, y, _ = hm.sample(jax.random.key(4), family, params, 400, INPUTS)
    start_values = random_values(np.random.default_rng(11), 1, J, d)
    start_values["inner"] = {name: value + 0.3 * np.random.default_rng(12).normal(size=value.shape)
                             for name, value in values["inner"].items()}
    start = hm.make_hmoe_params(family, start_values)
    flat_start = mt.make_params(flat_family, {"gate": {k: v[0] for k, v in start_values["inner"].items()},
                                              "expert": {k: v[0] for k, v in start_values["expert"].items()}})
    config = EMConfig(max_iter=5, fast_path=False)
    ours = _run(hm.HierarchicalEM(family, config), start, x, y, None, 0.0)
    reference = _run(GenericEM(flat_family, config), flat_start, x, y, None, 0.0)
    # Both results are in canonical form (the flat one: reference expert at 0; ours: the same per group).
    assert int(ours.n_iter) == int(reference.n_iter) == 5
    for name, value in reference.params.gate.items():
        np.testing.assert_allclose(ours.params.inner[name][0], value, rtol=1e-10, atol=1e-10, err_msg=name)
    for name, value in reference.params.expert.items():
        np.testing.assert_allclose(ours.params.expert[name][0], value, rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(ours.log_likelihood, reference.log_likelihood, rtol=1e-12)
    # The (single) outer gate has nothing to fit: π_1 = 1 throughout.
    np.testing.assert_array_equal(ours.params.outer["beta0"], 0.0)
    # And the start really moved (a vacuous comparison would pass too).
    assert np.max(np.abs(np.asarray(ours.params.expert["b"]) - start_values["expert"]["b"])) > 1e-2


@pytest.mark.parametrize("G", [1, 2])
def test_log_likelihood_reduce_none_ignores_the_weights(G, rng):
    """reduce="none" returns the real per-row log-density even for a zero-weight row (whose inputs
    the weighted reductions replace by zeros), as moe_theory.models.log_likelihood does; for G = 1
    it equals the flat MoE's values row by row."""
    J, d = 3, 2
    family = family_of("softmax", "laplace_softmax", G=G, J=J, d=d)
    values = random_values(rng, G, J, d)
    params = hm.make_hmoe_params(family, values)
    x = rng.uniform(-2.0, 2.0, size=(20, d))
    y = rng.normal(scale=2.0, size=20)
    weights = rng.uniform(0.5, 2.0, size=20)
    weights[[3, 11]] = 0.0
    log_density, _ = loop_density("softmax", "laplace_softmax", "gaussian", values, x, y)
    ours = np.asarray(hm.log_likelihood(family, params, x, y, weights=weights, reduce="none"))
    np.testing.assert_allclose(ours, log_density, rtol=1e-10, atol=1e-10)
    at_zero, _ = loop_density("softmax", "laplace_softmax", "gaussian", values, np.zeros((1, d)), np.zeros(1))
    assert np.all(np.abs(ours[[3, 11]] - at_zero[0]) > 1e-3)  # not the value at the zeroed-out row
    if G == 1:
        flat_family = mt.make_family("laplace_softmax", "gaussian", J, d)
        flat = mt.make_params(flat_family, {"gate": {k: v[0] for k, v in values["inner"].items()},
                                            "expert": {k: v[0] for k, v in values["expert"].items()}})
        np.testing.assert_allclose(
            ours, models.log_likelihood(flat_family, flat, x, y, weights=weights, reduce="none"), rtol=1e-12, atol=1e-12
        )


# ---------------------------------------------------------------------------------------------
# 4. Monotone EM; 5. recovery. Both use the same n = 20 000 sample and the same traced solver, so
# that each family's EM is compiled once (trace_solver's result equals run_solver's).

LARGE_N = 20_000
MAX_ITER = 60


@functools.lru_cache(maxsize=None)
def large_sample(outer: str, inner: str):
    family, truth = truth_of(outer, inner)
    x, y, _ = hm.sample(jax.random.key(0), family, truth, LARGE_N, INPUTS)
    return family, truth, x, y


@pytest.mark.parametrize(
    "outer,inner,extra",
    [("softmax", "softmax", 0), ("laplace_softmax", "laplace_softmax", 0), ("softmax", "laplace_softmax", 0),
     pytest.param("softmax", "softmax", 1, marks=pytest.mark.slow, id="softmax-softmax-overspecified")],
)
def test_em_never_decreases_the_log_likelihood(outer, inner, extra):
    family, truth, x, y = large_sample(outer, inner)
    fitted_family = hm.grown_family(family, extra)
    start = hm.perturbed_start(jax.random.key(8), family, truth, 0.5, extra_experts=extra)
    result, path = _trace(hm.HierarchicalEM(fitted_family, EMConfig(max_iter=MAX_ITER)), start, x, y, None, 0.0)
    path = np.asarray(path)
    path = path[np.isfinite(path)]
    assert path.size >= 10
    # The path starts at the start's log-likelihood (computed independently of the solver).
    np.testing.assert_allclose(path[0], hm.log_likelihood(fitted_family, start, x, y), rtol=1e-12)
    steps = np.diff(np.append(path, float(result.log_likelihood)))
    assert np.all(steps >= -1e-12 * np.abs(path).max()), steps.min()
    assert path[-1] - path[0] > 1e-2  # the fit did move uphill
    assert bool(result.finite)


@pytest.mark.parametrize("outer,inner", [("softmax", "softmax"), ("laplace_softmax", "laplace_softmax")])
def test_em_recovers_a_known_truth(outer, inner):
    """n = 20 000, G = J = 2, d = 2, from a near-truth start.

    Exactly specified and identifiable (distinct experts, separated gates), so every parameter
    converges at n^{-1/2} ≈ 0.007 times a constant; EM stops (relative change 1e-10) after 15–19
    iterations. Measured over four data/start seeds of this set-up: expert errors 0.003–0.021,
    expert blocks (a, b, ν) ≤ 0.021, the gates' blocks (inner β₁, outer) ≤ 0.15 for the linear
    score but up to 0.38 for the Laplace locations, which this design estimates less precisely.
    Bounds: expert errors < 0.05, expert blocks < 0.1, gate blocks < 0.6. A misassigned expert or
    group would be off by ≥ 1 (the true experts and gate parameters are at least that far apart).
    """
    family, truth, x, y = large_sample(outer, inner)
    start = hm.perturbed_start(jax.random.key(1), family, truth, 0.1)
    result, _ = _trace(hm.HierarchicalEM(family, EMConfig(max_iter=MAX_ITER)), start, x, y, None, 1e-10)
    assert bool(result.converged) and bool(result.finite)
    errors = errors_of(jax.random.key(2), family, result.params, truth, INPUTS)
    np.testing.assert_array_equal(errors.cell_size, [1, 1, 1, 1])
    np.testing.assert_array_equal(errors.group_of, [0, 1])
    np.testing.assert_array_equal(errors.leaf_of, [0, 1, 2, 3])
    assert np.all(np.asarray(errors.expert_error) < 0.05), errors.expert_error
    for name, value in errors.block_error.items():
        assert np.all(np.asarray(value) < (0.6 if name == "beta1" else 0.1)), (name, value)
    assert np.all(np.asarray(errors.outer_error) < 0.6), errors.outer_error
    # The MLE beats the truth on its own data.
    assert float(result.log_likelihood) >= float(hm.log_likelihood(family, truth, x, y)) - 1e-9
    np.testing.assert_allclose(result.log_likelihood, hm.log_likelihood(family, result.params, x, y), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# 6. Nested Voronoi cells against NumPy.


# Which gate parameters the errors compare, from the gates' formulas: the blocks other than the
# per-item offset (β₀, or the Gaussian gate's weight) and the temperature τ, and whether the slope
# β₁ is translatable (linear score, softmax normaliser, no activation: adding a common t to every
# β₁ leaves the gate unchanged).
ERROR_GATES = {
    "softmax": (("beta1",), True),
    "temperature_softmax": (("beta1",), True),
    "laplace_softmax": (("beta1",), False),
    "sigmoid": (("beta1",), False),
    "gaussian": (("centre", "covariance"), False),
}


def numpy_canonical_blocks(preset: str, gate: dict) -> dict:
    """The compared blocks of one gate level (k items), in canonical form, each as k flat vectors:
    a translatable slope with the last item's β₁ at zero; locations, centres and covariances as
    they are (the canonical form moves only offsets and weights, which are not compared)."""
    names, translatable = ERROR_GATES[preset]
    blocks = {}
    for name in names:
        value = np.asarray(gate[name], dtype=np.float64)
        if translatable and name == "beta1":
            value = value - value[-1]
        blocks[name] = [np.ravel(value[item]) for item in range(value.shape[0])]
    return blocks


def numpy_expert_vector(experts: dict, i: int, l: int) -> np.ndarray:
    """All parameters of expert (i, l), concatenated in sorted field-name order."""
    return np.concatenate([np.ravel(experts[name][i][l]) for name in sorted(experts)])


def numpy_expert_means(expert: str, experts: dict, i: int, l: int, x: np.ndarray) -> np.ndarray:
    """E[y | x_t] of expert (i, l): a·x_t + b, (n,), or its class probabilities, (n, C)."""
    if expert == "gaussian":
        return np.array([sum(experts["a"][i][l][c] * x[t, c] for c in range(x.shape[1])) + experts["b"][i][l]
                         for t in range(x.shape[0])])
    one = {"eta0": experts["eta0"][i][l][None], "eta1": experts["eta1"][i][l][None]}
    return np.exp(reference_class_log_probs(one, x)[:, 0])


def numpy_nested_voronoi(outer, inner, expert, fitted: dict, truth: dict, x: np.ndarray) -> dict:
    """The nested Voronoi cells and errors of the module docstring, by loops.

    Cells from the expert parameters alone: fitted group i → the true group g minimising
    Σ_l min_m ‖η̂_il − η*_gm‖², fitted expert (i, l) → the nearest true expert m of g. Per block,
    ‖θ̂ − θ*‖ of each fitted item against its cell's true item, where a translatable gate slope's
    differences first lose their mean over the level's items (the J experts of a fitted group; the
    G groups); the outer distance is the norm over all outer blocks. Errors are worst over each cell.
    """
    fitted_experts, true_experts = fitted["expert"], truth["expert"]
    some = sorted(fitted_experts)[0]
    G, J = fitted_experts[some].shape[:2]
    G_true, J_true = true_experts[some].shape[:2]

    def squared_gap(i, l, g, m):
        return float(np.sum((numpy_expert_vector(fitted_experts, i, l) - numpy_expert_vector(true_experts, g, m)) ** 2))

    group_of = np.zeros(G, int)
    leaf_of = np.zeros(G * J, int)
    for i in range(G):
        totals = [sum(min(squared_gap(i, l, g, m) for m in range(J_true)) for l in range(J)) for g in range(G_true)]
        group_of[i] = int(np.argmin(totals))
        for l in range(J):
            leaf_of[i * J + l] = group_of[i] * J_true + int(np.argmin([squared_gap(i, l, group_of[i], m)
                                                                        for m in range(J_true)]))

    block_gap = {}
    for name in sorted(fitted_experts):
        block_gap[name] = np.array([
            np.linalg.norm(np.ravel(fitted_experts[name][i][l])
                           - np.ravel(true_experts[name][leaf_of[i * J + l] // J_true][leaf_of[i * J + l] % J_true]))
            for i in range(G) for l in range(J)
        ])

    inner_names, inner_translatable = ERROR_GATES[inner]
    fitted_inner = [numpy_canonical_blocks(inner, {k: v[i] for k, v in fitted["inner"].items()}) for i in range(G)]
    true_inner = [numpy_canonical_blocks(inner, {k: v[g] for k, v in truth["inner"].items()}) for g in range(G_true)]
    for name in inner_names:
        gap = np.zeros(G * J)
        for i in range(G):
            differences = [fitted_inner[i][name][l] - true_inner[group_of[i]][name][leaf_of[i * J + l] % J_true]
                           for l in range(J)]
            if inner_translatable and name == "beta1":
                shift = sum(differences) / J
                differences = [difference - shift for difference in differences]
            for l in range(J):
                gap[i * J + l] = np.linalg.norm(differences[l])
        block_gap[name] = gap

    outer_names, outer_translatable = ERROR_GATES[outer]
    fitted_outer = numpy_canonical_blocks(outer, fitted["outer"])
    true_outer = numpy_canonical_blocks(outer, truth["outer"])
    outer_squared = np.zeros(G)
    for name in outer_names:
        differences = [fitted_outer[name][i] - true_outer[name][group_of[i]] for i in range(G)]
        if outer_translatable and name == "beta1":
            shift = sum(differences) / G
            differences = [difference - shift for difference in differences]
        for i in range(G):
            outer_squared[i] += float(np.sum(differences[i] ** 2))

    distance = np.zeros(G * J)
    for i in range(G):
        for l in range(J):
            g, m = divmod(int(leaf_of[i * J + l]), J_true)
            fitted_mean = numpy_expert_means(expert, fitted_experts, i, l, x)
            gap = np.abs(fitted_mean - numpy_expert_means(expert, true_experts, g, m, x))
            if gap.ndim == 2:  # class probabilities: total variation
                gap = 0.5 * gap.sum(axis=1)
            distance[i * J + l] = gap.mean()

    def worst(values, owner, cells):
        return np.array([max(values[owner == c]) if np.any(owner == c) else np.nan for c in range(cells)])

    return {
        "group_of": group_of,
        "leaf_of": leaf_of,
        "cell_size": np.array([np.sum(leaf_of == c) for c in range(G_true * J_true)]),
        "expert_error": worst(distance, leaf_of, G_true * J_true),
        "block_error": {b: worst(v, leaf_of, G_true * J_true) for b, v in block_gap.items()},
        "outer_error": worst(np.sqrt(outer_squared), group_of, G_true),
    }


def assert_errors_equal(errors: hm.HierarchicalErrors, expected: dict):
    np.testing.assert_array_equal(errors.group_of, expected["group_of"])
    np.testing.assert_array_equal(errors.leaf_of, expected["leaf_of"])
    np.testing.assert_array_equal(errors.cell_size, expected["cell_size"])
    np.testing.assert_allclose(errors.expert_error, expected["expert_error"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(errors.outer_error, expected["outer_error"], rtol=1e-12, atol=1e-14)
    assert set(errors.block_error) == set(expected["block_error"])
    for name, value in expected["block_error"].items():
        np.testing.assert_allclose(errors.block_error[name], value, rtol=1e-12, atol=1e-14, err_msg=name)


def over_specified_fit(outer, inner, expert="gaussian", collapse: bool = False):
    """A hand-made fitted set of G = 2 groups of J = 3 (J* = 2): the truth grown by one copy of each
    group's last expert and perturbed (a Gaussian outer gate's covariances, which perturbed_start
    leaves alone, are scaled by hand). With ``collapse`` fitted group 1's experts are replaced by
    group 0's, scaled by 1.05, so both fitted groups sit in true group 0 and true group 1's cells
    are empty."""
    family, truth = truth_of(outer, inner, expert)
    fitted = hm.perturbed_start(jax.random.key(3), family, truth, 0.3, extra_experts=1)
    if outer == "gaussian":
        covariance = fitted.outer["covariance"] * jnp.array([1.3, 0.8])[:, None, None]
        fitted = fitted._replace(outer={**fitted.outer, "covariance": covariance})
    if collapse:
        fitted = fitted._replace(expert={name: value.at[1].set(1.05 * value[0])
                                         for name, value in fitted.expert.items()})
    return family, truth, fitted


ORACLE_CASES = [
    pytest.param("softmax", "softmax", "gaussian", False, id="softmax-softmax-spread"),
    pytest.param("softmax", "softmax", "gaussian", True, id="softmax-softmax-collapsed"),
    pytest.param("laplace_softmax", "laplace_softmax", "gaussian", False, id="laplace-laplace-spread"),
    pytest.param("laplace_softmax", "laplace_softmax", "gaussian", True, id="laplace-laplace-collapsed"),
    pytest.param("gaussian", "temperature_softmax", "gaussian", False, id="gaussian-temperature-spread"),
    pytest.param("sigmoid", "softmax", "multinomial_logistic", False, id="sigmoid-softmax-multinomial-spread"),
]


@pytest.mark.parametrize("outer,inner,expert,collapse", ORACLE_CASES)
def test_hierarchical_errors_equal_numpy_nested_voronoi(outer, inner, expert, collapse):
    family, truth, fitted = over_specified_fit(outer, inner, expert, collapse)
    key, num_inputs = jax.random.key(9), 300
    x = np.asarray(INPUTS.draw(key, num_inputs, 2, jnp.float64, None))
    errors = errors_of(key, family, fitted, truth, INPUTS, num_inputs)
    expected = numpy_nested_voronoi(outer, inner, expert, as_numpy(fitted), as_numpy(truth), x)
    assert_errors_equal(errors, expected)
    # Every expert field and every compared inner-gate field has its block; offsets and τ have none.
    assert set(expected["block_error"]) == set(EXPERT_TRUTH[expert]) | set(ERROR_GATES[inner][0])
    if collapse:
        # Both fitted groups in true group 0: true group 1's cells are empty (NaN errors).
        assert np.array_equal(expected["group_of"], [0, 0])
        assert np.isnan(expected["expert_error"][2:]).all() and np.isnan(expected["outer_error"][1])
        assert np.array_equal(expected["cell_size"], [2, 4, 0, 0])
    else:
        # The copies of each group's last true expert share its cell.
        assert np.array_equal(expected["group_of"], [0, 1])
        assert np.array_equal(expected["cell_size"], [1, 2, 1, 2])
    # Nothing is vacuously zero: every block and the outer gate are off the truth somewhere.
    for name, value in expected["block_error"].items():
        assert np.nanmax(value) > 1e-2, name
    assert np.nanmax(expected["outer_error"]) > 1e-2 and np.nanmin(expected["expert_error"]) > 1e-3
    # Batched fitted parameters: the same errors replicate by replicate.
    batched = jax.tree_util.tree_map(lambda v: jnp.stack([v, v]), fitted)
    batch_errors = errors_of(key, family, batched, truth, INPUTS, num_inputs)
    np.testing.assert_allclose(batch_errors.expert_error[1], errors.expert_error, rtol=1e-12)
    np.testing.assert_allclose(batch_errors.outer_error[1], errors.outer_error, rtol=1e-12)
    np.testing.assert_array_equal(batch_errors.leaf_of[0], errors.leaf_of)


def test_translated_slope_gaps_ignore_a_common_shift_of_the_fitted_slopes():
    """Adding a common t₁ to every fitted inner β₁ of one group, or to every outer β₁, is the same
    softmax gate: the errors do not change. Adding t₁ to one expert's β₁ only is a different gate,
    and the error moves by the oracle's amount."""
    family, truth, fitted = over_specified_fit("softmax", "softmax")
    key = jax.random.key(9)
    before = errors_of(key, family, fitted, truth, INPUTS, 300)
    shifted = fitted._replace(
        outer={**fitted.outer, "beta1": fitted.outer["beta1"] + jnp.array([0.7, -1.1])},
        inner={**fitted.inner, "beta1": fitted.inner["beta1"].at[1].add(jnp.array([-2.0, 0.4]))},
    )
    after = errors_of(key, family, shifted, truth, INPUTS, 300)
    np.testing.assert_allclose(after.outer_error, before.outer_error, rtol=1e-12)
    for name in before.block_error:
        np.testing.assert_allclose(after.block_error[name], before.block_error[name], rtol=1e-12, atol=1e-14)
    moved = fitted._replace(inner={**fitted.inner, "beta1": fitted.inner["beta1"].at[1, 0].add(jnp.array([-2.0, 0.4]))})
    errors = errors_of(key, family, moved, truth, INPUTS, 300)
    x = np.asarray(INPUTS.draw(key, 300, 2, jnp.float64, None))
    expected = numpy_nested_voronoi("softmax", "softmax", "gaussian", as_numpy(moved), as_numpy(truth), x)
    assert_errors_equal(errors, expected)
    assert not np.allclose(expected["block_error"]["beta1"][2:], np.asarray(before.block_error["beta1"])[2:])


def permuted(params: hm.HMoEParams, group_order, expert_order) -> hm.HMoEParams:
    group_order, expert_order = np.asarray(group_order), np.asarray(expert_order)
    return hm.HMoEParams(
        {name: value[group_order] for name, value in params.outer.items()},
        {name: value[group_order][:, expert_order] if value.ndim > 1 else value[group_order]
         for name, value in params.inner.items()},
        {name: value[group_order][:, expert_order] for name, value in params.expert.items()},
    )


@pytest.mark.parametrize("outer,inner", [("laplace_softmax", "laplace_softmax"), ("softmax", "softmax")])
def test_hierarchical_errors_are_invariant_under_relabelling_fitted_groups_and_experts(outer, inner):
    """Relabelling groups and experts permutes group_of / leaf_of accordingly and leaves every error
    unchanged, for locations and for translatable softmax slopes (whose canonical form depends on
    which group or expert comes last)."""
    family, truth, fitted = over_specified_fit(outer, inner)
    group_order, expert_order = [1, 0], [2, 0, 1]
    relabelled = permuted(fitted, group_order, expert_order)
    x = jax.random.normal(jax.random.key(5), (30, 2))
    y = jax.random.normal(jax.random.key(6), (30,))
    fitted_family = hm.grown_family(family, 1)
    np.testing.assert_allclose(  # the same density
        hm.log_likelihood(fitted_family, relabelled, x, y, reduce="none"),
        hm.log_likelihood(fitted_family, fitted, x, y, reduce="none"), rtol=1e-12,
    )
    before = errors_of(jax.random.key(9), family, fitted, truth, INPUTS, 300)
    after = errors_of(jax.random.key(9), family, relabelled, truth, INPUTS, 300)
    np.testing.assert_array_equal(after.cell_size, before.cell_size)
    np.testing.assert_allclose(after.expert_error, before.expert_error, rtol=1e-12)
    np.testing.assert_allclose(after.outer_error, before.outer_error, rtol=1e-12)
    for name in before.block_error:
        np.testing.assert_allclose(after.block_error[name], before.block_error[name], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(after.group_of, np.asarray(before.group_of)[group_order])
    J = 3
    expected_leaf = [int(before.leaf_of[group_order[i] * J + expert_order[l]]) for i in range(2) for l in range(J)]
    np.testing.assert_array_equal(after.leaf_of, expected_leaf)


@pytest.mark.parametrize("group_order,expert_order", [([1, 0], [0, 1]), ([0, 1], [1, 0]), ([1, 0], [1, 0])],
                         ids=["groups", "experts", "both"])
def test_relabelled_truth_has_zero_errors_under_softmax_gates(group_order, expert_order):
    """The truth with its groups and/or experts relabelled is the same model: every cell holds one
    expert, the relabelled one, and every error is zero, although the canonical form pins a
    different group / expert to β₁ = 0."""
    family, truth = truth_of("softmax", "softmax")
    relabelled = permuted(truth, group_order, expert_order)
    canonical = hm.canonicalize(family, relabelled)
    assert not np.allclose(canonical.outer["beta1"], truth.outer["beta1"]) or not np.allclose(
        canonical.inner["beta1"], truth.inner["beta1"])  # the slopes really are translated
    errors = errors_of(jax.random.key(9), family, relabelled, truth, INPUTS, 300)
    np.testing.assert_array_equal(errors.cell_size, [1, 1, 1, 1])
    np.testing.assert_array_equal(errors.group_of, group_order)
    np.testing.assert_array_equal(errors.leaf_of, [2 * g + m for g in group_order for m in expert_order])
    np.testing.assert_allclose(errors.expert_error, 0.0, atol=1e-12)
    np.testing.assert_allclose(errors.outer_error, 0.0, atol=1e-12)
    assert set(errors.block_error) == {"beta1", "a", "b", "nu"}
    for name, value in errors.block_error.items():
        np.testing.assert_allclose(value, 0.0, atol=1e-12, err_msg=name)


def test_hierarchical_errors_gaussian_outer_gate():
    """The batch rank is read from the outer gate's first field, (G,) weights for the Gaussian gate:
    unbatched and batched fits give per-replicate shapes and zero errors at the truth."""
    family, truth = truth_of("gaussian", "softmax")
    errors = errors_of(jax.random.key(0), family, truth, truth, INPUTS, 100)
    shapes = {"expert_error": (4,), "outer_error": (2,), "cell_size": (4,), "group_of": (2,), "leaf_of": (4,)}
    for batch in [(), (3,), (2, 3)]:
        fitted = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, batch + v.shape), truth)
        errors = errors_of(jax.random.key(0), family, fitted, truth, INPUTS, 100)
        for name, shape in shapes.items():
            assert getattr(errors, name).shape == batch + shape, (batch, name)
        assert set(errors.block_error) == {"beta1", "a", "b", "nu"}
        for name, value in errors.block_error.items():
            assert value.shape == batch + (4,), (batch, name)
            np.testing.assert_allclose(value, 0.0, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(errors.cell_size, np.broadcast_to([1, 1, 1, 1], batch + (4,)))
        np.testing.assert_array_equal(errors.leaf_of, np.broadcast_to([0, 1, 2, 3], batch + (4,)))
        np.testing.assert_allclose(errors.expert_error, 0.0, atol=1e-12)
        np.testing.assert_allclose(errors.outer_error, 0.0, atol=1e-12)


def test_perturbed_start_grows_an_inner_gate_with_temperature():
    """extra_experts grows every field with an expert axis by copies of the group's last expert; the
    per-group temperature τ, (G,), keeps its shape and is perturbed multiplicatively."""
    family, truth = truth_of("softmax", "temperature_softmax")
    scale = 0.1
    start = hm.perturbed_start(jax.random.key(0), family, truth, scale, extra_experts=2)
    assert start.inner["tau"].shape == (2,) and start.inner["beta0"].shape == (2, 4)
    assert start.inner["beta1"].shape == (2, 4, 2) and start.expert["a"].shape == (2, 4, 2)
    assert start.outer["beta1"].shape == (2, 2)
    tau = np.asarray(start.inner["tau"])
    assert np.all(tau > 0) and np.all(np.abs(np.log(tau / np.asarray(truth.inner["tau"]))) < 5 * scale)
    assert not np.allclose(tau, truth.inner["tau"])
    for extra in (2, 3):  # the copies of the last true expert, each perturbed
        np.testing.assert_allclose(start.expert["b"][:, extra], truth.expert["b"][:, -1], atol=5 * scale)
        np.testing.assert_allclose(start.inner["beta1"][:, extra], truth.inner["beta1"][:, -1], atol=5 * scale)
    # The grown start is a valid parameter set of the grown family, with a finite density.
    grown = hm.grown_family(family, 2)
    validated = hm.make_hmoe_params(grown, as_numpy(start))
    x = jax.random.normal(jax.random.key(1), (20, 2))
    y = jax.random.normal(jax.random.key(2), (20,))
    assert np.all(np.isfinite(np.asarray(hm.log_likelihood(grown, validated, x, y, reduce="none"))))


# ---------------------------------------------------------------------------------------------
# 7. vmap and padding against a loop of unpadded fits.


def test_vmapped_padded_fits_equal_a_loop_of_unpadded_fits():
    """Three replicates, each 300 data rows plus 37 rows of weight 0 holding NaN, ±inf and 1e300,
    fitted under one vmap, against single unpadded fits (weights None) in a Python loop: the same
    iterations, stopping points and results, so neither vmap nor the padding changes a fit."""
    family, truth = truth_of("softmax", "laplace_softmax")
    solver = hm.HierarchicalEM(family, EMConfig(max_iter=40))
    keys = jax.random.split(jax.random.key(21), 3)
    data = [hm.sample(key, family, truth, 300, INPUTS) for key in keys]
    starts = [hm.perturbed_start(jax.random.fold_in(key, 1), family, truth, 0.4) for key in keys]
    tol = 1e-5  # the replicates stop at different iterations (17, 40 = max_iter, 32), which vmap must respect
    loop = [_run(solver, start, x, y, None, tol) for start, (x, y, _) in zip(starts, data)]
    assert len({int(single.n_iter) for single in loop}) == 3

    garbage_x = jnp.concatenate([jnp.full((12, 2), jnp.nan), jnp.full((12, 2), jnp.inf), jnp.full((13, 2), 1e300)])
    garbage_y = jnp.concatenate([jnp.full(12, jnp.nan), jnp.full(12, -jnp.inf), jnp.full(13, 1e300)])
    xs = jnp.stack([jnp.concatenate([x, garbage_x]) for x, _, _ in data])
    ys = jnp.stack([jnp.concatenate([y, garbage_y]) for _, y, _ in data])
    weights = jnp.concatenate([jnp.ones(300), jnp.zeros(37)])
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *starts)
    batched = jax.jit(jax.vmap(lambda p, x, y: run_solver(solver, p, x, y, weights, tol)))(stacked, xs, ys)
    assert np.all(np.asarray(batched.finite))
    for r, single in enumerate(loop):
        assert int(batched.n_iter[r]) == int(single.n_iter)
        assert bool(batched.converged[r]) == bool(single.converged)
        np.testing.assert_allclose(batched.log_likelihood[r], single.log_likelihood, rtol=1e-12)
        assert_params_close(jax.tree_util.tree_map(lambda v: v[r], batched.params), single.params, rtol=1e-10, atol=1e-12)
    # The padded log-likelihood itself.
    x, y, _ = data[0]
    np.testing.assert_allclose(
        hm.log_likelihood(family, truth, xs[0], ys[0], weights), hm.log_likelihood(family, truth, x, y), rtol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# 8. Validation messages.


def _valid_values(G=2, J=3, d=2):
    return random_values(np.random.default_rng(0), G, J, d)


def _with(values, level, name, value):
    out = {lvl: dict(fields) for lvl, fields in values.items()}
    out[level][name] = value
    return out


def test_make_hmoe_params_errors_name_level_group_and_field():
    family = family_of("softmax", "laplace_softmax", G=2, J=3)
    values = _valid_values()
    hm.make_hmoe_params(family, values)  # valid as given

    # A value error in group 1 names group 1.
    beta1 = values["inner"]["beta1"].copy()
    beta1[1, 2, 0] = np.nan
    with pytest.raises(ParameterError, match=r"inner\[1\]\.beta1\[2, 0\]: expected finite"):
        hm.make_hmoe_params(family, _with(values, "inner", "beta1", beta1))
    nu = values["expert"]["nu"].copy()
    nu[1, 0] = -0.1
    with pytest.raises(ParameterError, match=r"expert\[1\]\.nu\[0\] = -0\.1: expected > 0"):
        hm.make_hmoe_params(family, _with(values, "expert", "nu", nu))
    # A wrong per-group shape (the same in every group, so group 0 is reported) names the field and the shapes.
    with pytest.raises(ParameterError, match=r"inner\[0\]\.beta1: expected shape \(3, 2\).*got \(3, 3\)"):
        hm.make_hmoe_params(family, _with(values, "inner", "beta1", np.zeros((2, 3, 3))))
    # A wrong number of groups.
    with pytest.raises(ParameterError, match=r"expert\.a: expected a leading axis of G = 2 groups, got shape \(3, 3, 2\)"):
        hm.make_hmoe_params(family, _with(values, "expert", "a", np.zeros((3, 3, 2))))
    # The outer level uses k = G.
    with pytest.raises(ParameterError, match=r"outer\.beta1: expected shape \(2, 2\)"):
        hm.make_hmoe_params(family, _with(values, "outer", "beta1", np.zeros((3, 2))))
    # Missing and unknown keys.
    no_inner = r"params: expected exactly the keys \['expert', 'inner', 'outer'\], got \['expert', 'outer'\]"
    with pytest.raises(ParameterError, match=no_inner):
        hm.make_hmoe_params(family, {"outer": values["outer"], "expert": values["expert"]})
    missing = {level: dict(fields) for level, fields in values.items()}
    del missing["inner"]["beta0"]
    with pytest.raises(ParameterError, match=r"inner\[0\]: missing parameter\(s\) \['beta0'\]"):
        hm.make_hmoe_params(family, missing)
    with pytest.raises(ParameterError, match=r"expert\[0\]: unknown parameter\(s\) \['sigma'\]"):
        hm.make_hmoe_params(family, _with(values, "expert", "sigma", np.ones((2, 3))))
    with pytest.raises(ParameterError, match=r"inner\.beta0: expected a numeric array"):
        hm.make_hmoe_params(family, _with(values, "inner", "beta0", [[0.0, 1.0, 2.0], [0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# 9. The sampler.


def test_sample_draws_leaves_with_the_product_weights_and_responses_from_the_leaf():
    outer, inner, G, J, d, n = "softmax", "laplace_softmax", 2, 3, 2, 100_000
    family = family_of(outer, inner, G=G, J=J, d=d)
    values = random_values(np.random.default_rng(5), G, J, d)
    params = hm.make_hmoe_params(family, values)
    x, y, labels = hm.sample(jax.random.key(13), family, params, n, INPUTS)
    x, y, labels = np.asarray(x), np.asarray(y), np.asarray(labels)
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < G * J

    # P(label = i·J + j | x) = π_i(x) π_{j|i}(x): frequencies against the average over the drawn x.
    log_outer = vector_log_gate(outer, values["outer"]["beta0"], values["outer"]["beta1"], x)
    log_inner = np.stack([vector_log_gate(inner, values["inner"]["beta0"][i], values["inner"]["beta1"][i], x)
                          for i in range(G)], axis=1)
    weights = np.exp(log_outer[:, :, None] + log_inner).reshape(n, G * J)
    frequency = np.bincount(labels, minlength=G * J) / n
    # Given x the labels are independent: Var(frequency_l) = Σ_t p_tl (1 − p_tl) / n².
    standard_error = np.sqrt(np.sum(weights * (1 - weights), axis=0)) / n
    assert np.all(np.abs(frequency - weights.mean(axis=0)) < 4 * standard_error), (frequency, weights.mean(axis=0))
    assert weights.mean(axis=0).min() > 0.02  # every leaf is drawn often enough for the check to mean something

    # y | leaf (i, j) ~ N(a_ijᵀx + b_ij, ν_ij): standardised residuals are N(0, 1) leaf by leaf.
    a = values["expert"]["a"].reshape(G * J, d)
    b = values["expert"]["b"].reshape(G * J)
    nu = values["expert"]["nu"].reshape(G * J)
    z = (y - np.sum(a[labels] * x, axis=1) - b[labels]) / np.sqrt(nu[labels])
    for leaf in range(G * J):
        chosen = z[labels == leaf]
        assert abs(chosen.mean()) < 4 / np.sqrt(chosen.size), leaf
        assert abs(chosen.var() - 1.0) < 4 * np.sqrt(2 / chosen.size), leaf
