"""Regression MoE fitted by least squares (moe_theory.regression): the mean function against plain
NumPy loops, the sampler's noise, Levenberg–Marquardt against scipy.optimize.least_squares, recovery
of a known truth, vmap against a loop, padding, the box, and the errors against a NumPy oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

from moe_theory import regression as R
from moe_theory.fit.least_squares import LeastSquaresConfig, LevenbergMarquardt, at_bound
from moe_theory.fit.solver import run_solver
from moe_theory.params import MoEParams, ParameterError

ACTIVATION = {
    "linear": lambda u: u,
    "relu": lambda u: max(u, 0.0),
    "gelu": lambda u: 0.5 * u * (1.0 + math.erf(u / math.sqrt(2.0))),
    "sigmoid": lambda u: 1.0 / (1.0 + math.exp(-u)),
    "tanh": math.tanh,
}


def _truth(gate="softmax", expert="sigmoid", dim=1, k=2):
    family = R.make_regression_family(gate, expert, k, dim)
    rng = np.random.default_rng(0)
    values = {"gate": {"beta0": rng.normal(size=k).tolist(), "beta1": rng.normal(scale=3.0, size=(k, dim)).tolist()},
              "expert": {"eta0": rng.normal(size=k).tolist()}}
    if expert != "constant":
        values["expert"]["eta1"] = rng.normal(scale=3.0, size=(k, dim)).tolist()
    return family, R.make_regression_params(family, values)


def _numpy_mean(family, params, x):
    """f_G(x) row by row with Python floats: the oracle for the vectorised mean."""
    beta0, beta1 = np.asarray(params.gate["beta0"]), np.asarray(params.gate["beta1"])
    eta0 = np.asarray(params.expert["eta0"])
    eta1 = np.asarray(params.expert.get("eta1", np.zeros((len(eta0), x.shape[1]))))
    label = family.expert.label
    out = []
    for row in np.asarray(x):
        scores = [float(beta1[i] @ row + beta0[i]) for i in range(len(beta0))]
        if family.gate_type == "softmax":
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            weights = [w / sum(weights) for w in weights]
        else:
            weights = [1.0 / (1.0 + math.exp(-s)) for s in scores]
        total = 0.0
        for i, w in enumerate(weights):
            inner = float(eta1[i] @ row + eta0[i])
            if label == "constant":
                h = float(eta0[i])
            elif label.startswith("polynomial"):
                h = inner ** family.expert.degree
            else:
                h = ACTIVATION[label](inner)
            total += w * h
        out.append(total)
    return np.asarray(out)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("expert", ["linear", "relu", "gelu", "sigmoid", "tanh", {"name": "polynomial", "degree": 3}, "constant"])
def test_mean_function_equals_a_numpy_loop(gate, expert):
    family, params = _truth(gate, expert, dim=2, k=3)
    x = jax.random.normal(jax.random.key(1), (40, 2))
    np.testing.assert_allclose(np.asarray(R.mean_function(family, params, x)), _numpy_mean(family, params, x),
                               rtol=1e-12, atol=1e-12)


def test_sigmoid_weights_are_not_normalised_and_softmax_weights_are():
    x = jnp.linspace(0, 1, 7)[:, None]
    sigmoid_family, params = _truth("sigmoid", "linear")
    softmax_family = R.make_regression_family("softmax", "linear", 2, 1)
    np.testing.assert_allclose(np.asarray(R.gate_weights(softmax_family, params, x)).sum(1), 1.0, rtol=1e-14)
    sums = np.asarray(R.gate_weights(sigmoid_family, params, x)).sum(1)
    assert np.ptp(sums) > 1e-3  # the sum moves with x: no normalisation


def test_sampler_adds_gaussian_noise_of_the_given_scale():
    family, params = _truth("sigmoid", "relu")
    x, y = R.sample(jax.random.key(3), family, params, 40000, 0.3)
    residual = np.asarray(y - R.mean_function(family, params, x))
    assert np.all((np.asarray(x) >= 0) & (np.asarray(x) <= 1))
    assert abs(residual.mean()) < 4 * 0.3 / math.sqrt(40000)
    assert abs(residual.std() - 0.3) < 0.005


def test_softmax_split_start_without_noise_leaves_the_function_unchanged():
    family, truth = _truth("softmax", "tanh")
    start = R.split_start(jax.random.key(0), family, truth, extra=2, scale=0.0)
    x = jax.random.uniform(jax.random.key(1), (50, 1))
    np.testing.assert_allclose(np.asarray(R.mean_function(family.with_experts(4), start, x)),
                               np.asarray(R.mean_function(family, truth, x)), rtol=1e-12)


DESIGNED = {  # well-separated truths on x ~ U[0, 1]: the gate switches inside the interval
    "softmax": {"beta0": [-5.0, 0.0], "beta1": [[10.0], [0.0]]},
    "sigmoid": {"beta0": [-5.0, 4.0], "beta1": [[10.0], [-12.0]]},  # w₁ + w₂ falls to ~0.57 near x = 0.42
}
EXPERTS = {
    "sigmoid": {"eta0": [-9.0, 3.0], "eta1": [[12.0], [-12.0]]},
    # Kinks at x = 0.9 and 0.1, inside each expert's own gate region (otherwise a ReLU or GELU expert
    # is linear wherever its gate is open), and each expert far from 0 where its gate switches
    # (otherwise the gate slope there multiplies nothing; under softmax, far from the other expert).
    "relu": {"eta0": [3.6, -0.2], "eta1": [[-4.0], [2.0]]},
    "gelu": {"eta0": [3.6, -0.2], "eta1": [[-4.0], [2.0]]},
    "tanh": {"eta0": [-2.0, 1.0], "eta1": [[4.0], [-3.0]]},
    "linear": {"eta0": [-1.0, 1.0], "eta1": [[3.0], [-2.0]]},
}


def _fit_problem(gate, expert, n, seed=0):
    family = R.make_regression_family(gate, expert, 2, 1)
    truth = R.make_regression_params(family, {"gate": DESIGNED[gate], "expert": EXPERTS[expert]})
    x, y = R.sample(jax.random.key(seed), family, truth, n, 0.1)
    start = R.split_start(jax.random.key(seed + 1), family, truth, 0, 0.1)
    return family, truth, x, y, start


@pytest.mark.parametrize("gate,expert,parameter_tolerance", [
    # Either method stops where rounding hides further decrease of S; along the flattest direction of
    # these fits that leaves the two ~1e-7 apart in the parameters (both gradients are ≤ 1e-8 there)
    # and ~1e-9 apart in the fitted values.
    ("softmax", "sigmoid", 1e-8), ("softmax", "linear", 1e-6), ("sigmoid", "gelu", 1e-6), ("sigmoid", "tanh", 1e-6),
])
def test_same_optimum_as_scipy_from_the_same_start(gate, expert, parameter_tolerance):
    family, _, x, y, start = _fit_problem(gate, expert, 1000)
    ours = run_solver(LevenbergMarquardt(R.RegressionMean(family), LeastSquaresConfig(max_iter=500)), start, x, y, None, 0.0)
    flat, unravel = ravel_pytree(start)

    def residuals(theta):
        return np.asarray(y - R.mean_function(family, unravel(jnp.asarray(theta)), x))

    def jacobian(theta):
        return -np.asarray(jax.jacfwd(lambda t: R.mean_function(family, unravel(t), x))(jnp.asarray(theta)))

    reference = scipy.optimize.least_squares(residuals, np.asarray(flat), jac=jacobian, method="lm",
                                             xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert bool(ours.converged) and bool(ours.finite)
    if gate == "softmax":  # translation-invariant: compare the canonical forms
        ours_flat = ravel_pytree(R.canonical(family, ours.params))[0]
        reference_flat = ravel_pytree(R.canonical(family, unravel(jnp.asarray(reference.x))))[0]
    else:
        ours_flat, reference_flat = ravel_pytree(ours.params)[0], jnp.asarray(reference.x)
    np.testing.assert_allclose(np.asarray(ours_flat), np.asarray(reference_flat), rtol=parameter_tolerance,
                               atol=parameter_tolerance)
    np.testing.assert_allclose(-float(ours.log_likelihood), 2 * reference.cost / 1000, rtol=1e-12)
    ours_raw = np.asarray(ravel_pytree(ours.params)[0])
    gradient = jacobian(ours_raw).T @ residuals(ours_raw)
    assert np.max(np.abs(gradient)) < 1e-8  # stationary to rounding
    # The same fitted function on the data, the quantity least squares identifies.
    np.testing.assert_allclose(np.asarray(R.mean_function(family, ours.params, x)),
                               np.asarray(R.mean_function(family, unravel(jnp.asarray(reference.x)), x)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("gate,expert", [("softmax", "linear"), ("sigmoid", "gelu"), ("sigmoid", "relu"), ("softmax", "relu")])
def test_recovers_the_truth_at_large_n(gate, expert):
    family, truth, x, y, start = _fit_problem(gate, expert, 100000, seed=5)
    fit = run_solver(LevenbergMarquardt(R.RegressionMean(family)), start, x, y, None, 1e-12)
    errors = R.regression_errors(jax.random.key(7), family, fit.params, family, truth)
    assert bool(fit.converged)
    assert np.all(np.asarray(errors.expert_error) < 0.02)
    assert float(errors.function_error) < 1e-3
    true_blocks = {**truth.gate, **truth.expert}
    for name in ("beta1", "eta0", "eta1"):  # within 10% of the block's largest true magnitude
        assert np.all(np.asarray(errors.block_error[name]) < 0.1 * np.abs(np.asarray(true_blocks[name])).max()), name


def test_vmap_equals_loop_and_padding_equals_no_padding():
    family, _, x, y, start = _fit_problem("sigmoid", "gelu", 300)
    solver = LevenbergMarquardt(R.RegressionMean(family), LeastSquaresConfig(max_iter=60))
    starts = jax.tree_util.tree_map(lambda a: jnp.stack([a, a + 0.05, a - 0.05]), start)
    padded_x = jnp.concatenate([x, jnp.full((40, 1), jnp.nan)])
    padded_y = jnp.concatenate([y, jnp.full((40,), jnp.inf)])
    weights = jnp.concatenate([jnp.ones(300), jnp.zeros(40)])
    batched = jax.jit(jax.vmap(lambda p: run_solver(solver, p, padded_x, padded_y, weights, 1e-12)))(starts)
    fit = jax.jit(lambda p: run_solver(solver, p, x, y, None, 1e-12))
    for i in range(3):
        one = fit(jax.tree_util.tree_map(lambda a: a[i], starts))
        np.testing.assert_allclose(np.asarray(ravel_pytree(one.params)[0]),
                                   np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], batched.params))[0]),
                                   rtol=0, atol=1e-10)
        assert int(one.n_iter) == int(batched.n_iter[i])


def test_the_box_holds_and_an_interior_optimum_is_unchanged():
    family, _, x, y, start = _fit_problem("softmax", "sigmoid", 400)
    free = run_solver(LevenbergMarquardt(R.RegressionMean(family)), start, x, y, None, 1e-12)
    largest = float(jnp.max(jnp.abs(ravel_pytree(free.params)[0])))
    roomy = run_solver(LevenbergMarquardt(R.RegressionMean(family), LeastSquaresConfig(bound=largest + 1.0)),
                       start, x, y, None, 1e-12)
    np.testing.assert_allclose(np.asarray(ravel_pytree(roomy.params)[0]), np.asarray(ravel_pytree(free.params)[0]), atol=1e-8)
    assert not bool(at_bound(roomy.params, largest + 1.0))
    tight_bound = 0.5 * largest
    tight = run_solver(LevenbergMarquardt(R.RegressionMean(family), LeastSquaresConfig(bound=tight_bound)),
                       start, x, y, None, 1e-12)
    assert float(jnp.max(jnp.abs(ravel_pytree(tight.params)[0]))) <= tight_bound
    assert bool(at_bound(tight.params, tight_bound)) and bool(tight.converged)
    assert float(tight.log_likelihood) <= float(free.log_likelihood)  # the box can only cost fit
    with pytest.raises(ValueError, match="bound"):
        LeastSquaresConfig(bound=-1.0)


def test_errors_equal_a_numpy_oracle_for_a_relabelled_perturbed_fit():
    family, truth = _truth("sigmoid", "tanh", k=2)
    # Fitted: the truth's experts in reverse order, plus a third near expert 0, slightly perturbed.
    order = np.array([1, 0, 0])
    fitted = jax.tree_util.tree_map(lambda a: a[order] + 0.01 * np.arange(1, 4).reshape((3,) + (1,) * (a.ndim - 1)), truth)
    fitted_family = family.with_experts(3)
    key = jax.random.key(11)
    errors = R.regression_errors(key, fitted_family, fitted, family, truth, num_inputs=2000)
    x = np.asarray(jax.random.uniform(key, (2000, 1)))  # the same draws as UniformInputs
    eta0, eta1 = np.asarray(fitted.expert["eta0"]), np.asarray(fitted.expert["eta1"])
    true0, true1 = np.asarray(truth.expert["eta0"]), np.asarray(truth.expert["eta1"])
    distance = [np.mean([abs(math.tanh(eta1[i] @ row + eta0[i]) - math.tanh(true1[j] @ row + true0[j])) for row in x])
                for i, j in enumerate(order)]
    np.testing.assert_allclose(np.asarray(errors.expert_error), [max(distance[1], distance[2]), distance[0]], rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(errors.cell_size), [2, 1])
    beta0, beta1 = np.asarray(fitted.gate["beta0"]), np.asarray(fitted.gate["beta1"])
    use = [np.mean([1 / (1 + math.exp(-(beta1[i] @ row + beta0[i]))) for row in x]) for i in range(3)]
    np.testing.assert_allclose(np.asarray(errors.used_expert_error),
                               [(use[1] * distance[1] + use[2] * distance[2]) / (use[1] + use[2]), distance[0]], rtol=1e-10)
    # The worst parameter error over a cell is the largest block distance of its atoms.
    gap = np.abs(np.asarray(fitted.expert["eta0"]) - true0[order])
    np.testing.assert_allclose(np.asarray(errors.block_error["eta0"]), [max(gap[1], gap[2]), gap[0]], rtol=1e-12)
    # Across gates, the cells come from the expert parameters alone and gate errors are NaN.
    cross = R.regression_errors(key, R.RegressionFamily("softmax", family.expert, 3, 1), fitted, family, truth, num_inputs=2000)
    np.testing.assert_allclose(np.asarray(cross.expert_error), np.asarray(errors.expert_error), rtol=1e-12)
    assert np.all(np.isnan(np.asarray(cross.block_error["beta1"]))) and math.isnan(float(cross.loss))


def test_exponent_tables_follow_the_papers():
    assert R.exponent_table(R.make_regression_family("softmax", "sigmoid", 3), True).name == "strongly_identifiable"
    assert R.exponent_table(R.make_regression_family("sigmoid", "relu", 3), True).name == "strongly_identifiable"
    assert R.exponent_table(R.make_regression_family("softmax", "linear", 3), True).name == "unknown_multi_atom"
    assert R.exponent_table(R.make_regression_family("softmax", "linear", 2), False).name == "first_order"
    assert "slower than any polynomial" in R.expectation(R.make_regression_family("softmax", "linear", 2),
                                                        R.make_regression_family("softmax", "linear", 3))
    assert "misspecified" in R.expectation(R.make_regression_family("sigmoid", "relu", 2),
                                           R.make_regression_family("softmax", "relu", 2))


def test_bad_families_and_parameters_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="gate"):
        R.make_regression_family("cosine", "relu", 2)
    with pytest.raises(ValueError, match="unknown regression expert"):
        R.make_regression_family("softmax", "swish", 2)
    with pytest.raises(ValueError, match="degree"):
        R.make_regression_family("softmax", {"name": "polynomial", "degree": 0}, 2)
    family = R.make_regression_family("softmax", "relu", 2)
    with pytest.raises(ParameterError, match="expert.eta1"):
        R.make_regression_params(family, {"gate": {"beta0": [0.0, 0.0], "beta1": [[1.0], [0.0]]},
                                          "expert": {"eta0": [0.0, 1.0], "eta1": [[1.0, 2.0]]}})
    assert isinstance(R.make_regression_params(
        family, {"gate": {"beta0": [0.0, 0.0], "beta1": [[1.0], [0.0]]}, "expert": {"eta0": [0.0, 1.0], "eta1": [[1.0], [2.0]]}}),
        MoEParams)


def test_cross_gate_cells_use_the_expert_parameters_alone():
    """A fitted atom whose expert matches true expert 0 but whose gate slope is far from both true
    slopes: with the same gate the Voronoi cell follows the gate slope; across gates it follows the
    expert (the NumPy argmin), and the errors are those of that assignment."""
    family, truth = _truth("softmax", "tanh", k=2)
    fitted = jax.tree_util.tree_map(lambda a: jnp.asarray(a), truth)
    fitted = MoEParams({"beta0": fitted.gate["beta0"], "beta1": jnp.asarray([[60.0], [0.0]])},
                       {"eta0": truth.expert["eta0"][::-1] + 0.02, "eta1": truth.expert["eta1"][::-1] - 0.03})
    key = jax.random.key(4)
    sigmoid_fit = R.RegressionFamily("sigmoid", family.expert, 2, 1)
    cross = R.regression_errors(key, sigmoid_fit, fitted, family, truth, num_inputs=1000)
    eta0, eta1 = np.asarray(fitted.expert["eta0"]), np.asarray(fitted.expert["eta1"])
    true0, true1 = np.asarray(truth.expert["eta0"]), np.asarray(truth.expert["eta1"])
    gaps = np.abs(eta0[:, None] - true0[None]) + np.abs(eta1[:, 0][:, None] - true1[:, 0][None])
    assignment = gaps.argmin(1)
    np.testing.assert_array_equal(assignment, [1, 0])  # the experts were reversed
    x = np.asarray(jax.random.uniform(key, (1000, 1)))
    distance = [np.mean(np.abs(np.tanh(eta1[i] * x[:, 0] + eta0[i]) - np.tanh(true1[j] * x[:, 0] + true0[j])))
                for i, j in enumerate(assignment)]
    np.testing.assert_allclose(np.asarray(cross.expert_error), [distance[1], distance[0]], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(cross.block_error["eta0"]), [0.02, 0.02], rtol=1e-8)
    assert np.all(np.isnan(np.asarray(cross.mass_error))) and np.all(np.isnan(np.asarray(cross.block_error["beta1"])))
    # Used expert error under the fitted (sigmoid) weights: each cell holds one atom, so it equals d_i.
    np.testing.assert_allclose(np.asarray(cross.used_expert_error), [distance[1], distance[0]], rtol=1e-10)


def test_a_fit_stopped_in_the_box_is_stationary_in_it():
    """At a fit on the box's faces, the gradient of S/2 vanishes on free coordinates and points out of
    the box on the faces (the KKT conditions), which plain clipping of the step does not ensure."""
    family, _, x, y, start = _fit_problem("softmax", "sigmoid", 400)
    bound = 6.0
    fit = run_solver(LevenbergMarquardt(R.RegressionMean(family), LeastSquaresConfig(bound=bound)), start, x, y, None, 0.0)
    flat, unravel = ravel_pytree(fit.params)
    gradient = np.asarray(jax.grad(lambda t: 0.5 * jnp.sum((y - R.mean_function(family, unravel(t), x)) ** 2))(flat))
    flat = np.asarray(flat)
    upper, lower = flat >= bound * (1 - 1e-12), flat <= -bound * (1 - 1e-12)
    free = ~(upper | lower)
    assert bool(fit.converged) and (upper | lower).any()
    scale = np.max(np.abs(gradient)) + 1.0
    assert np.all(np.abs(gradient[free]) < 1e-6 * scale)
    assert np.all(gradient[upper] <= 1e-6 * scale) and np.all(gradient[lower] >= -1e-6 * scale)
