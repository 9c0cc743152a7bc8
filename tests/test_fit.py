"""Estimators against independent oracles: scikit-learn's Gaussian mixture and logistic regression,
EM against direct maximum likelihood, monotone EM traces, recovery of a known truth, vmap against a
loop, padding, compile counts and the flags of broken fits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture

import moe_theory as mt
from moe_theory.fit import EMConfig, fit, fit_batch, fit_em, fit_em_trace, fit_mle
from moe_theory.init import NearTruthNoise, default_assignment, near_truth_init, random_init

PAPER1_TRUTH = {
    "gate": "softmax",
    "expert": "gaussian",
    "params": {
        "gate": {"beta0": [-8.0, 0.0], "beta1": [25.0, 0.0]},
        "expert": {"a": [-20.0, 20.0], "b": [15.0, -5.0], "nu": [0.09, 0.16]},
    },
}


@pytest.fixture(scope="module")
def paper1():
    family, truth = mt.model_from_dict(PAPER1_TRUTH)
    x, y, _ = mt.sample(jax.random.key(0), family, truth, 2000, mt.make_inputs("grid"))
    return family, truth, x, y


def _plain_mixture_start(means, variances):
    family = mt.make_family("softmax", "gaussian", len(means), dim=0)
    k = len(means)
    params = mt.make_params(
        family,
        {
            "gate": {"beta0": np.zeros(k), "beta1": np.zeros((k, 0))},
            "expert": {"a": np.zeros((k, 0)), "b": means, "nu": variances},
        },
    )
    return family, params


def test_constant_gate_em_iterations_equal_sklearn_gaussian_mixture():
    """With no inputs (d = 0) the model is a 1-D Gaussian mixture: EM iterates must equal sklearn's.

    The gate's Newton loop runs all 50 steps (no inner tolerance), so each M-step is exact to
    rounding, as in sklearn; the differences of a 1e-12 inner tolerance add up over 40 iterations.
    """
    truth_family, truth = _plain_mixture_start([-2.0, 0.0, 3.0], [0.5, 1.0, 0.3])
    truth = truth._replace(gate={**truth.gate, "beta0": jnp.array([0.5, -0.2, 0.0])})
    _, y, _ = mt.sample(jax.random.key(1), truth_family, truth, 3000, mt.make_inputs("uniform"))
    family, start = _plain_mixture_start([-1.0, 0.5, 2.0], [1.0, 1.0, 1.0])
    x = jnp.zeros((y.shape[0], 0))
    for iterations in (1, 7, 40):
        ours = fit_em(family, start, x, y, tol=-1.0, config=EMConfig(max_iter=iterations, gate_steps=50, inner_tol=0.0))
        reference = GaussianMixture(
            3, tol=0.0, max_iter=iterations, reg_covar=0.0, weights_init=[1 / 3] * 3,
            means_init=[[-1.0], [0.5], [2.0]], precisions_init=np.ones((3, 1, 1)),
        ).fit(np.asarray(y)[:, None])
        weights = np.exp(np.asarray(ours.params.gate["beta0"]))
        np.testing.assert_allclose(weights / weights.sum(), reference.weights_, rtol=1e-9)
        np.testing.assert_allclose(ours.params.expert["b"], reference.means_.ravel(), rtol=1e-9)
        np.testing.assert_allclose(ours.params.expert["nu"], reference.covariances_.ravel(), rtol=1e-9)
        np.testing.assert_allclose(ours.log_likelihood, reference.score(np.asarray(y)[:, None]), rtol=1e-11)
        assert int(ours.n_iter) == iterations and not bool(ours.converged)


def test_em_and_direct_mle_agree(paper1):
    family, truth, x, y = paper1
    start = near_truth_init(jax.random.key(3), family, family, truth, x.shape[0])
    em = fit_em(family, start, x, y, tol=1e-12)
    mle = fit_mle(family, start, x, y, tol=1e-13)
    assert bool(em.converged) and bool(mle.converged)
    np.testing.assert_allclose(em.log_likelihood, mle.log_likelihood, rtol=1e-8)
    for group in ("gate", "expert"):
        for name, value in getattr(em.params, group).items():
            np.testing.assert_allclose(value, getattr(mle.params, group)[name], rtol=1e-4, atol=1e-4)


TRACE_FAMILIES = [
    ("softmax", "gaussian", None),
    ("sigmoid", "gaussian", None),
    ("euclidean_softmax", "gaussian", None),
    ("gaussian", "gaussian", None),
    ({"name": "topk_softmax", "top_k": 2}, "gaussian", None),
    ("temperature_softmax", "gaussian", None),
    ("softmax", "multinomial_logistic", 3),
    ("softmax", {"name": "nonlinear", "activation": "tanh"}, None),
]


@pytest.mark.parametrize("gate, expert, classes", TRACE_FAMILIES, ids=lambda v: str(v))
def test_log_likelihood_trace_never_decreases(paper1, gate, expert, classes):
    """EM is monotone: the gate and non-closed-form expert steps are accepted only if they do not decrease Q."""
    family = mt.make_family(gate, expert, 3, 1, classes)
    _, _, x, y = paper1
    if classes:
        y = jnp.clip(jnp.floor((y - y.min()) / (y.max() - y.min() + 1e-9) * classes), 0, classes - 1).astype(jnp.int32)
    start = random_init(jax.random.key(4), family, x, y)
    result, trace = fit_em_trace(family, start, x, y, tol=1e-9, config=EMConfig(max_iter=150))
    trace = np.asarray(trace)
    path = trace[~np.isnan(trace)]
    assert len(path) == int(result.n_iter) and len(path) > 3
    assert np.all(np.diff(path) >= -1e-12 * np.abs(path[:-1])), np.diff(path).min()
    assert float(result.log_likelihood) >= path[-1] - 1e-12
    # The trace variant stops where the while-loop fitter stops.
    plain = fit_em(family, start, x, y, tol=1e-9, config=EMConfig(max_iter=150))
    assert int(plain.n_iter) == int(result.n_iter)
    np.testing.assert_allclose(plain.log_likelihood, result.log_likelihood, rtol=1e-12)


def _truth_for(gate_name):
    gate = mt.make_gate(gate_name)
    if gate.score == "gaussian":
        gate_params = {"weight": [0.4, 0.6], "centre": [[-1.0], [1.0]], "covariance": [[[0.8]], [[0.8]]]}
    elif gate.score in ("euclidean", "laplace"):
        gate_params = {"beta0": [0.3, 0.0], "beta1": [[-1.0], [1.0]]}
    else:
        gate_params = {"beta0": [0.5, 0.0], "beta1": [[3.0], [0.0]]}
    if gate.temperature:
        gate_params["tau"] = 1.0
    return {"gate": gate_name, "expert": "gaussian",
            "params": {"gate": gate_params, "expert": {"a": [-2.0, 2.0], "b": [1.0, -1.0], "nu": [0.1, 0.2]}}}


def _relabelling_error(family, fitted, truth):
    """Largest relative parameter error over the best relabelling of the experts (k = 2)."""
    best = np.inf
    for order in ([0, 1], [1, 0]):
        error = 0.0
        for name in ("a", "b", "nu"):
            f, t = np.asarray(fitted.expert[name])[order], np.asarray(truth.expert[name])
            error = max(error, np.max(np.abs(f - t) / (np.abs(t) + 0.5)))
        best = min(best, error)
    return best


@pytest.mark.parametrize("gate_name", [g for g in mt.GATES if g != "topk_softmax"])
def test_exact_fit_recovers_truth_at_large_n(gate_name):
    """An exact fit (k = k*) from random starts recovers the expert parameters up to relabelling."""
    family, truth = mt.model_from_dict(_truth_for(gate_name))
    inputs = mt.make_inputs({"name": "gaussian_mixture", "from_gate": True} if family.gate.score == "gaussian" else "normal")
    x, y, _ = mt.sample(jax.random.key(5), family, truth, 6_000, inputs)
    result = fit(family, x, y, key=jax.random.key(6), n_init=3, tol=1e-8)
    assert bool(result.converged) and bool(result.finite)
    assert _relabelling_error(family, result.params, truth) < 0.05
    truth_loglik = mt.log_likelihood(family, truth, x, y)
    assert float(result.log_likelihood) >= float(truth_loglik) - 1e-9


def test_vmap_over_replicates_equals_loop(paper1):
    family, truth, _, _ = paper1
    fitted = mt.make_family("softmax", "gaussian", 3, 1)
    keys = jax.random.split(jax.random.key(7), 4)
    xs, ys, _ = jax.vmap(lambda k: mt.sample(k, family, truth, 500, mt.make_inputs("grid")))(keys)
    starts = jax.vmap(lambda k: near_truth_init(k, fitted, family, truth, 500))(keys)
    batched = jax.vmap(lambda p, x, y: fit_em(fitted, p, x, y))(starts, xs, ys)
    for r in range(4):
        single = fit_em(fitted, jax.tree_util.tree_map(lambda a: a[r], starts), xs[r], ys[r])
        np.testing.assert_allclose(batched.log_likelihood[r], single.log_likelihood, rtol=1e-12)
        assert int(batched.n_iter[r]) == int(single.n_iter)
        np.testing.assert_allclose(batched.params.gate["beta1"][r], single.params.gate["beta1"], rtol=1e-9, atol=1e-12)
    # fit_batch over chunks of 3 (the last chunk is ragged) with one start each equals the same fits.
    chunked = fit_batch(fitted, jax.tree_util.tree_map(lambda a: a[:, None], starts), xs, ys, batch_size=3)
    np.testing.assert_allclose(chunked.log_likelihood, batched.log_likelihood, rtol=1e-12)


def test_padded_dataset_gives_the_same_fit(paper1):
    family, truth, x, y = paper1
    fitted = mt.make_family("softmax", "gaussian", 3, 1)
    start = near_truth_init(jax.random.key(8), fitted, family, truth, x.shape[0])
    plain = fit_em(fitted, start, x, y)
    pad = 700
    x_padded = jnp.concatenate([x, jnp.full((pad, 1), jnp.nan)])
    y_padded = jnp.concatenate([y, jnp.full((pad,), 1e300)])
    weights = jnp.concatenate([jnp.ones(x.shape[0]), jnp.zeros(pad)])
    padded = fit_em(fitted, start, x_padded, y_padded, weights)
    assert int(padded.n_iter) == int(plain.n_iter) and bool(padded.converged)
    np.testing.assert_allclose(padded.log_likelihood, plain.log_likelihood, rtol=1e-12)
    for name, value in plain.params.expert.items():
        np.testing.assert_allclose(padded.params.expert[name], value, rtol=1e-10)


def test_fixed_shape_compiles_once(paper1):
    family, truth, x, y = paper1
    fitted = mt.make_family("softmax", "gaussian", 2, 1)
    traces = []

    @jax.jit
    def counted(start, x, y, tol):
        traces.append(1)  # runs only while tracing
        return fit_em(fitted, start, x, y, None, tol)

    for seed, tol in ((0, 1e-6), (1, 1e-8), (2, 1e-5)):
        start = near_truth_init(jax.random.key(seed), fitted, family, truth, x.shape[0])
        counted(start, x, y, tol)
    assert len(traces) == 1
    # An equal family built anew hits the same cache: families compare by value.
    assert mt.make_family("softmax", "gaussian", 2, 1) == fitted and hash(mt.make_family("softmax", "gaussian", 2, 1)) == hash(fitted)


def test_broken_fits_are_flagged_not_converged(paper1):
    family, truth, x, y = paper1
    negative_variance = truth._replace(expert={**truth.expert, "nu": jnp.array([-0.09, 0.16])})
    result = fit_em(family, negative_variance, x, y)
    assert not bool(result.finite) and not bool(result.converged)

    nan_data = y.at[17].set(jnp.nan)
    result = fit_em(family, truth, x, nan_data)
    assert not bool(result.finite) and not bool(result.converged)

    result = fit_mle(family, truth, x, nan_data)
    assert not bool(result.finite) and not bool(result.converged)


def test_best_of_several_starts_is_kept(paper1):
    family, truth, x, y = paper1
    fitted = mt.make_family("softmax", "gaussian", 2, 1)
    keys = jax.random.split(jax.random.key(9), 4)
    starts = jax.vmap(lambda k: random_init(k, fitted, x, y))(keys)
    single = [fit_em(fitted, jax.tree_util.tree_map(lambda a: a[s], starts), x, y) for s in range(4)]
    best = fit(fitted, x, y, init=starts)
    assert float(best.log_likelihood) == max(float(r.log_likelihood) for r in single if bool(r.finite))


def test_near_truth_init_follows_the_papers_protocol():
    true_family, truth = mt.model_from_dict(PAPER1_TRUTH)
    fitted = mt.make_family("softmax", "gaussian", 4, 1)
    assert default_assignment(4, 2) == (0, 1, 0, 1)
    assert default_assignment(3, 2) == (0, 1, 1)
    with pytest.raises(ValueError, match="smaller than the true"):
        default_assignment(1, 2)
    noiseless = near_truth_init(jax.random.key(0), fitted, true_family, truth, 100, NearTruthNoise(0, 0, 0, 0, 0, 0))
    np.testing.assert_allclose(noiseless.expert["b"], [15.0, -5.0, 15.0, -5.0])
    np.testing.assert_allclose(noiseless.gate["beta0"][-1], 0.0)
    # Noise scales follow c·n^{-α}: the spread of the perturbation shrinks as predicted between n = 1e2 and 1e6.
    keys = jax.random.split(jax.random.key(1), 4000)
    spreads = []
    for n in (100, 1_000_000):
        draws = jax.vmap(lambda k: near_truth_init(k, fitted, true_family, truth, n))(keys)
        spreads.append(float(jnp.std(draws.expert["b"][:, 0])))
        assert bool(jnp.all(draws.expert["nu"] >= jnp.array([0.09, 0.16, 0.09, 0.16])))
    np.testing.assert_allclose(spreads[1] / spreads[0], (1e6 / 1e2) ** -0.083, rtol=0.08)


def test_fit_validates_its_inputs(paper1):
    family, _, x, y = paper1
    with pytest.raises(ValueError, match="PRNG key"):
        fit(family, x, y)
    with pytest.raises(ValueError, match="expected x of shape"):
        fit(family, x[:, [0, 0]], y, key=jax.random.key(0))
    with pytest.raises(ValueError, match="method"):
        fit(family, x, y, key=jax.random.key(0), method="newton")


def test_inner_newton_tolerance_stops_early_at_the_same_optimum():
    """A loose tolerance stops the inner Newton loop after one step; a tight one reaches the optimum."""
    from moe_theory.fit.newton import newton_ascent

    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(400, 3)))
    labels = jnp.asarray(rng.random(400) < 1 / (1 + np.exp(-(features @ np.array([1.0, -2.0, 0.5])))), float)

    def logistic_log_likelihood(u):
        logits = features @ u["w"]
        value = jnp.mean(labels * logits - jnp.logaddexp(0.0, logits))
        return value, logits

    start, free = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    one_step, _, _ = newton_ascent(logistic_log_likelihood, start, free, 1)
    stopped_at_once, _, _ = newton_ascent(logistic_log_likelihood, start, free, 300, tolerance=1e300)
    np.testing.assert_array_equal(stopped_at_once["w"], one_step["w"])

    full, full_value, _ = newton_ascent(logistic_log_likelihood, start, free, 300, tolerance=0.0)
    early, early_value, early_logits = newton_ascent(logistic_log_likelihood, start, free, 300, tolerance=1e-10)
    np.testing.assert_allclose(early["w"], full["w"], rtol=1e-6)
    assert float(early_value) >= float(full_value) - 1e-12
    np.testing.assert_allclose(early_logits, features @ early["w"], rtol=1e-12)
    # The oracle: scikit-learn's unpenalised logistic regression on the same data.
    reference = LogisticRegression(penalty=None, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(features, labels)
    np.testing.assert_allclose(full["w"], reference.coef_[0], rtol=1e-5)


def _joint_em_reference(x, y, weight, centre, variance, a, b, nu, iterations):
    """Plain NumPy/scipy EM on the joint likelihood Σ_i w_i N(x | c_i, Γ_i) N(y | a_i x + b_i, ν_i), d = 1."""
    from scipy.stats import norm

    path = []
    for _ in range(iterations):
        joint = weight * norm.pdf(x[:, None], centre, np.sqrt(variance)) * norm.pdf(y[:, None], a * x[:, None] + b, np.sqrt(nu))
        path.append(np.mean(np.log(joint.sum(axis=1))))
        r = joint / joint.sum(axis=1, keepdims=True)
        mass = r.sum(axis=0)
        weight = mass / len(x)
        centre = (r * x[:, None]).sum(axis=0) / mass
        variance = (r * (x[:, None] - centre) ** 2).sum(axis=0) / mass
        for i in range(len(weight)):
            design = np.column_stack([x, np.ones_like(x)])
            a[i], b[i] = np.linalg.solve(design.T @ (r[:, i, None] * design), design.T @ (r[:, i] * y))
        nu = (r * (y[:, None] - a * x[:, None] - b) ** 2).sum(axis=0) / mass
    return weight, centre, variance, a, b, nu, path


def test_joint_likelihood_em_equals_a_numpy_reference():
    """Gaussian-gate joint-likelihood EM [8]: iterates equal a plain NumPy EM, and ℓ is the joint log-density."""
    spec = {"gate": "gaussian", "expert": "gaussian", "params": {
        "gate": {"weight": [0.3, 0.4, 0.3], "centre": [[-0.1], [0.1], [0.5]], "covariance": [[[0.04]], [[0.02]], [[0.01]]]},
        "expert": {"a": [[0.4], [-0.7], [0.0]], "b": [0.34, -0.33, 0.2], "nu": [0.009, 0.026, 0.0175]}}}
    family, truth = mt.model_from_dict(spec)
    x, y, _ = mt.sample(jax.random.key(2), family, truth, 2000, mt.make_inputs({"name": "gaussian_mixture", "from_gate": True}))
    start = truth._replace(
        gate={"weight": jnp.array([0.2, 0.5, 0.3]), "centre": jnp.array([[-0.2], [0.2], [0.4]]),
              "covariance": jnp.array([[[0.05]], [[0.05]], [[0.05]]])},
        expert={"a": jnp.array([[0.0], [0.0], [0.1]]), "b": jnp.array([0.3, -0.2, 0.1]), "nu": jnp.array([0.02, 0.02, 0.02])},
    )
    config = EMConfig(likelihood="joint")
    for iterations in (1, 5, 30):
        ours = fit_em(family, start, x, y, tol=-1.0, config=EMConfig(max_iter=iterations, likelihood="joint"))
        weight, centre, variance, a, b, nu, _ = _joint_em_reference(
            np.asarray(x[:, 0]), np.asarray(y), np.array([0.2, 0.5, 0.3]), np.array([-0.2, 0.2, 0.4]),
            np.full(3, 0.05), np.array([0.0, 0.0, 0.1]), np.array([0.3, -0.2, 0.1]), np.full(3, 0.02), iterations,
        )
        np.testing.assert_allclose(ours.params.gate["weight"], weight, rtol=1e-9)
        np.testing.assert_allclose(ours.params.gate["centre"][:, 0], centre, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ours.params.gate["covariance"][:, 0, 0], variance, rtol=1e-9)
        np.testing.assert_allclose(ours.params.expert["a"][:, 0], a, rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(ours.params.expert["b"], b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ours.params.expert["nu"], nu, rtol=1e-9)
    # ℓ reported after the final E-step is the joint log-density of the returned parameters.
    *_, path = _joint_em_reference(
        np.asarray(x[:, 0]), np.asarray(y), np.asarray(ours.params.gate["weight"]), np.asarray(ours.params.gate["centre"][:, 0]),
        np.asarray(ours.params.gate["covariance"][:, 0, 0]), np.asarray(ours.params.expert["a"][:, 0]).copy(),
        np.asarray(ours.params.expert["b"]).copy(), np.asarray(ours.params.expert["nu"]), 1,
    )
    np.testing.assert_allclose(ours.log_likelihood, path[0], rtol=1e-12)
    # The joint trace never decreases, and a long fit recovers the truth (centres and covariances included).
    _, trace = fit_em_trace(family, start, x, y, tol=-1.0, config=EMConfig(max_iter=200, likelihood="joint"))
    trace = np.asarray(trace)
    assert np.all(np.diff(trace[np.isfinite(trace)]) >= -1e-12)
    x_big, y_big, _ = mt.sample(jax.random.key(3), family, truth, 40_000, mt.make_inputs({"name": "gaussian_mixture", "from_gate": True}))
    fitted = fit_em(family, truth, x_big, y_big, tol=1e-10, config=EMConfig(max_iter=2000, likelihood="joint"))
    assert bool(fitted.converged)
    for group in ("gate", "expert"):
        for name, value in getattr(truth, group).items():
            np.testing.assert_allclose(getattr(fitted.params, group)[name], value, atol=0.05 * float(np.max(np.abs(value))) + 2e-3)
    with pytest.raises(ValueError, match="plain Gaussian gate"):
        fit_em(mt.make_family("softmax", "gaussian", 2, 1), mt.make_params(mt.make_family("softmax", "gaussian", 2, 1), {
            "gate": {"beta0": [0.0, 0.0], "beta1": [[1.0], [0.0]]}, "expert": {"a": [[1.0], [0.0]], "b": [0.0, 1.0], "nu": [1.0, 1.0]}}),
            x, y, config=config)
    with pytest.raises(ValueError, match="likelihood"):
        EMConfig(likelihood="marginal")


def test_fit_in_float32_reaches_the_float64_estimate(paper1):
    """``fit(..., dtype="float32")`` runs in single precision and lands on the float64 MLE to f32 accuracy."""
    family, truth, x, y = paper1
    start = near_truth_init(jax.random.key(3), family, family, truth, x.shape[0])
    double = fit(family, x, y, init=start, tol=1e-10)
    single = fit(family, x, y, init=start, tol=1e-5, dtype="float32")
    assert single.log_likelihood.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(single.params))
    assert bool(single.finite)
    np.testing.assert_allclose(single.log_likelihood, double.log_likelihood, rtol=1e-4)
    np.testing.assert_allclose(single.params.expert["a"], double.params.expert["a"], rtol=2e-2, atol=2e-2)
    random_single = fit(family, x, y, key=jax.random.key(4), n_init=2, tol=1e-5, dtype=np.float32)
    assert random_single.log_likelihood.dtype == jnp.float32
    with pytest.raises(ValueError, match="floating dtype"):
        fit(family, x, y, init=start, dtype="int32")


def test_mle_never_returns_a_point_below_its_start():
    """L-BFGS on a top-K gate (discontinuous ℓ) may end lower than it began: the start comes back, not converged."""
    family, truth = mt.model_from_dict({"gate": {"name": "topk_softmax", "top_k": 2}, "expert": "gaussian", "params": {
        "gate": {"beta0": [0.3, -0.2, 0.0], "beta1": [[2.0, 0.5], [-1.0, 2.0], [0.0, 0.0]]},
        "expert": {"a": [[1.0, 0.0], [0.0, -1.0], [0.5, 0.5]], "b": [1.0, -1.0, 0.0], "nu": [0.1, 0.2, 0.15]}}})
    x, y, _ = mt.sample(jax.random.key(7), family, truth, 4000, mt.make_inputs({"name": "uniform", "low": -1.0, "high": 1.0}))
    start_log_likelihood = float(mt.log_likelihood(family, truth, x, y))
    result = fit_mle(family, truth, x, y, tol=1e-12, max_iter=300)
    assert float(result.log_likelihood) >= start_log_likelihood
    np.testing.assert_allclose(result.log_likelihood, mt.log_likelihood(family, result.params, x, y), rtol=1e-12)
    # On these data L-BFGS's last iterate is below the start (-0.872 against -0.855), so the guard acts.
    assert float(result.log_likelihood) == start_log_likelihood and not bool(result.converged)


def test_selection_schedule_moves_a_top_k_boundary_that_hard_em_cannot():
    """A top-1 gate in d = 2 switches experts on the line (β1_0 − β1_1)ᵀx = 0. Started with that line
    rotated by 90°, hard EM keeps it (deselecting an expert where it holds responsibility makes
    Q = −∞, docs/estimators.md); the dense-to-sparse continuation rotates it onto the truth's and
    reaches at least the truth's likelihood, and it is never below the hard fit from the same start."""
    family = mt.make_family(mt.make_gate("topk_softmax", top_k=1), "gaussian", 2, 2)
    truth = mt.make_params(family, {
        "gate": {"beta0": [0.0, 0.0], "beta1": [[2.0, 0.0], [0.0, 0.0]]},
        "expert": {"a": [[3.0, 0.0], [-3.0, 0.0]], "b": [1.0, -1.0], "nu": [0.05, 0.05]},
    })
    x, y, _ = mt.sample(jax.random.key(0), family, truth, 600, mt.make_inputs({"name": "uniform", "low": -1.0, "high": 1.0}))
    start = truth._replace(gate={"beta0": truth.gate["beta0"], "beta1": jnp.asarray([[0.0, 2.0], [0.0, 0.0]])})
    direct = fit(family, x, y, init=start, tol=1e-8, config=EMConfig(max_iter=500))
    schedule = (1.0, 0.3, 0.1, 0.03)
    annealed = fit(family, x, y, init=start, tol=1e-8, config=EMConfig(max_iter=500, selection_schedule=schedule))
    truth_value = float(mt.log_likelihood(family, truth, x, y))
    assert bool(direct.finite) and bool(annealed.converged)
    assert float(direct.log_likelihood) < truth_value - 0.1  # stuck with the rotated boundary
    assert float(annealed.log_likelihood) >= truth_value
    normal = np.asarray(annealed.params.gate["beta1"][0] - annealed.params.gate["beta1"][1])
    assert abs(np.arctan2(normal[1], normal[0])) < 0.1  # the truth's normal is (1, 0)
    # Every stage, soft or hard, runs at least the two iterations the stopping rule needs.
    assert int(annealed.n_iter) >= int(direct.n_iter) + 2 * (len(schedule) + 1)


@pytest.mark.slow  # about three minutes: three datasets, eight fits each, of a k = 4 top-K model at n = 4000
def test_selection_schedule_recovers_a_covering_top_k_truth_at_large_n():
    """Paper 2's covering over-specified fit (k = 4 atoms, K̄ = 3 active, for a top-2-of-3 truth in
    d = 2): from the papers' near-truth start, plain EM keeps the start's selection pattern and stays
    at Hellinger ≈ 0.13 from the truth on every dataset; the dense-to-sparse continuation approaches
    the truth on most (the paper2_topk_overfit_annealed study: median 0.042 at n = 1925, falling at
    about n^{-1/2}), and is never below plain EM's likelihood."""
    truth_family = mt.Family(mt.make_gate("topk_softmax", top_k=2), mt.make_expert("gaussian"), 3, 2)
    truth = mt.make_params(truth_family, {
        "gate": {"beta0": [0.5, -0.5, 0.0], "beta1": [[-1.5, 2.5], [-3.0, 0.0], [0.0, 0.0]]},
        "expert": {"a": [[1.0, 0.5], [-1.0, 1.0], [0.5, -1.0]], "b": [5.0, 0.0, -5.0], "nu": [0.09, 0.16, 0.12]},
    })
    family = mt.Family(mt.make_gate("topk_softmax", top_k=3), mt.make_expert("gaussian"), 4, 2)
    inputs = mt.make_inputs({"name": "uniform", "low": -1.0, "high": 1.0})
    schedule = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003)

    def hellinger(result):
        return float(mt.losses.density_distances(jax.random.key(2), truth_family, result.params, truth, inputs,
                                                 num_inputs=400, fitted_family=family).hellinger)

    annealed_distances = []
    for seed in range(3):
        x, y, _ = mt.sample(jax.random.key(seed), truth_family, truth, 4000, inputs)
        start = near_truth_init(jax.random.key(10 + seed), family, truth_family, truth, 4000)
        direct = fit(family, x, y, init=start, tol=1e-6)
        annealed = fit(family, x, y, init=start, tol=1e-6, config=EMConfig(selection_schedule=schedule))
        assert bool(annealed.finite) and float(annealed.log_likelihood) >= float(direct.log_likelihood)
        assert hellinger(direct) > 0.1
        annealed_distances.append(hellinger(annealed))
    assert np.median(annealed_distances) < 0.05, annealed_distances
