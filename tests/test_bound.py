"""EM over a compact parameter set (``EMConfig.bound``, ``fit.bound``; docs/estimators.md).

Oracles:

* k = 1 is multinomial logistic regression: with a box that binds, every EM method reaches the
  box-constrained maximum that ``scipy.optimize.minimize`` (L-BFGS-B with the same bounds) finds on a
  plain NumPy log-likelihood;
* on over-fitted multinomial fits at a small n, where the unbounded likelihood has no finite
  maximiser, the bounded fits stay in the box, their traces are monotone, and the end point satisfies
  the box's optimality (KKT) conditions for the autodiff gradient of ``moe_theory.log_likelihood``:
  zero gradient in the interior, a gradient pointing out of the box on its faces;
* the config refuses a box that excludes the truth, a closed-form expert and L-BFGS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

import moe_theory as mt
from moe_theory.config import ConfigError, parse_config
from moe_theory.fit import EMConfig, fit
from moe_theory.fit.em import on_box
from moe_theory.fit.newton import box_movable, gate_free_mask
from moe_theory.fit.newton_em import NewtonEM
from moe_theory.fit.solver import trace_solver
from moe_theory.fit.squarem import SquaremEM
from moe_theory.params import constrain, unconstrain

from test_multinomial_em import GATES, case, start_near

BOUND = 3.0


def _numpy_bounded_mle(x: np.ndarray, y: np.ndarray, bound: float) -> tuple[float, np.ndarray]:
    """Box-constrained multinomial logistic regression (last class at 0) by L-BFGS-B."""

    def negative_log_likelihood(vector):
        eta0 = np.append(vector[:2], 0.0)
        eta1 = np.vstack([vector[2:].reshape(2, 2), np.zeros(2)])
        logits = x @ eta1.T + eta0
        return -np.mean(logits[np.arange(len(y)), y] - np.logaddexp.reduce(logits, axis=1))

    result = scipy.optimize.minimize(negative_log_likelihood, np.zeros(6), method="L-BFGS-B",
                                     bounds=[(-bound, bound)] * 6, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
    return -result.fun, result.x


# The over-fitted test below checks the bounded SQUAREM and EM-Newton too; their k = 1 cases (about
# 15 s each, mostly compilation) run with the slow set.
@pytest.mark.parametrize("method", ["em", pytest.param("squarem", marks=pytest.mark.slow),
                                    pytest.param("em_newton", marks=pytest.mark.slow)])
def test_one_expert_reaches_the_box_constrained_mle(method):
    """Well-separated classes at n = 40: the unbounded MLE has slopes beyond 10, the box |η| ≤ 3
    binds, and the bounded fit is scipy's bounded maximiser."""
    family = mt.make_family("sigmoid", "multinomial_logistic", 1, 2, num_classes=3)
    gate = {"beta0": [0.0], "beta1": [[0.0, 0.0]]}
    truth = mt.make_params(family, {"gate": gate, "expert": {"eta0": [[0.5, -0.3]], "eta1": [[[6.0, -4.0], [-3.0, 7.0]]]}})
    x, y, _ = mt.sample(jax.random.key(3), family, truth, 40, mt.make_inputs("normal"))
    start = mt.make_params(family, {"gate": gate, "expert": {"eta0": [[0.0, 0.0]], "eta1": np.zeros((1, 2, 2))}})
    unbounded = fit(family, x, y, init=start, method=method, tol=1e-14, config=EMConfig(max_iter=2000, expert_steps=3))
    assert float(np.max(np.abs(unbounded.params.expert["eta1"]))) > 10
    # A box that does not bind gives the unbounded fit (to rounding: the projection changes how
    # XLA fuses the step).
    wide = fit(family, x, y, init=start, method=method, tol=1e-14, config=EMConfig(max_iter=2000, expert_steps=3, bound=1e3))
    np.testing.assert_allclose(wide.log_likelihood, unbounded.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(wide.params.expert["eta1"], unbounded.params.expert["eta1"], rtol=1e-6)

    ours = fit(family, x, y, init=start, method=method, tol=1e-14, config=EMConfig(max_iter=2000, expert_steps=3, bound=BOUND))
    value, vector = _numpy_bounded_mle(np.asarray(x), np.asarray(y), BOUND)
    assert bool(ours.converged)
    np.testing.assert_allclose(ours.log_likelihood, value, rtol=1e-10)
    np.testing.assert_allclose(ours.params.expert["eta0"][0], vector[:2], atol=1e-5)
    np.testing.assert_allclose(ours.params.expert["eta1"][0], vector[2:].reshape(2, 2), atol=1e-5)
    assert np.sum(np.isclose(np.abs(vector), BOUND)) >= 1  # the box binds
    assert bool(on_box(family, jax.tree_util.tree_map(lambda v: v[None], ours.params), BOUND)[0])


def _kkt_violation(family, params, x, y, bound) -> tuple[float, float]:
    """(largest |gradient| over free interior coordinates, largest gradient pointing into the box on
    its faces) of the mean log-likelihood in unconstrained coordinates."""
    groups = {"gate": unconstrain(family.gate.fields, params.gate), "expert": unconstrain(family.expert.fields, params.expert)}
    flat, unravel = ravel_pytree(groups)

    def log_likelihood(point):
        u = unravel(point)
        fitted = mt.MoEParams(constrain(family.gate.fields, u["gate"]), constrain(family.expert.fields, u["expert"]))
        return mt.log_likelihood(family, fitted, x, y)

    gradient = np.asarray(jax.grad(log_likelihood)(flat))
    free = np.asarray(ravel_pytree({"gate": gate_free_mask(family, groups["gate"]),
                                    "expert": {name: jnp.ones_like(v) for name, v in groups["expert"].items()}})[0]) > 0
    flat = np.asarray(flat)
    interior = free & (np.abs(flat) < bound * (1 - 1e-9))
    on_face = free & ~interior
    inward = np.where(flat[on_face] > 0, -gradient[on_face], gradient[on_face])
    return float(np.max(np.abs(gradient[interior]), initial=0.0)), float(np.max(inward, initial=0.0))


# About 17 s per gate: the sigmoid runs by default, the others with the slow set.
@pytest.mark.parametrize("gate_id", ["sigmoid", pytest.param("softmax", marks=pytest.mark.slow),
                                     pytest.param("euclidean_sigmoid", marks=pytest.mark.slow)])
def test_overfitted_bounded_fit_is_monotone_and_box_optimal(gate_id):
    """k = 3 on k* = 2 at n = 300: the bounded SQUAREM and EM-Newton traces never decrease, every
    coordinate stays in the box, and the end point is a KKT point of the box-constrained likelihood."""
    family, true_family, truth, x, y = case(gate_id, 300, seed=4, num_experts=3)
    start = start_near(family, true_family, truth, 300, seed=5)
    config = EMConfig(max_iter=3000, bound=BOUND)
    for solver in (SquaremEM(family, config), NewtonEM(family, config)):
        result, trace = jax.jit(lambda s, x, y: trace_solver(solver, s, x, y, None, 1e-13))(start, x, y)
        path = np.asarray(trace)[np.isfinite(np.asarray(trace))]
        assert bool(result.finite) and bool(result.converged), type(solver).__name__
        assert np.all(np.diff(path) >= -1e-12 * np.abs(path[:-1])), np.diff(path).min()
        flat = ravel_pytree([unconstrain(family.gate.fields, result.params.gate),
                             unconstrain(family.expert.fields, result.params.expert)])[0]
        assert float(jnp.max(jnp.abs(flat))) <= BOUND * (1 + 1e-12)
        interior, inward = _kkt_violation(family, result.params, x, y, BOUND)
        assert interior < 1e-4 and inward < 1e-4, (type(solver).__name__, interior, inward)


def test_box_movable_holds_only_faces_the_gradient_leaves():
    flat = jnp.array([3.0, 3.0, -3.0, -3.0, 0.5])
    gradient = jnp.array([1.0, -1.0, 1.0, -1.0, 7.0])
    np.testing.assert_array_equal(box_movable(flat, gradient, 3.0), [0.0, 1.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(box_movable(flat, gradient, None), np.ones(5))


BASE = {
    "name": "bounded",
    "model": {"gate": "sigmoid", "expert": "multinomial_logistic", "num_classes": 3,
              "params": {"gate": {"beta0": [0.5, -0.5], "beta1": [[2.0, -1.0], [-1.0, 2.0]]},
                         "expert": {"eta0": [[1.0, -1.0], [-1.0, 1.0]],
                                    "eta1": [[[2.0, 0.0], [0.0, 2.0]], [[-2.0, 1.0], [1.0, -2.0]]]}}},
    "inputs": {"name": "normal"},
    "sample_sizes": [100, 200],
    "replicates": 2,
    "fit": {"num_experts": 3, "method": "squarem", "bound": 10},
}


def _with_fit(**changes):
    raw = {**BASE, "fit": {**BASE["fit"], **changes}}
    return raw


def test_config_accepts_a_bound_and_passes_it_to_em():
    from moe_theory.sweep import em_config

    config = parse_config(_with_fit())
    assert config.fit.bound == 10.0
    assert em_config(config, config.groups[0]).bound == 10.0
    assert parse_config(config.to_dict()).fit.bound == 10.0


@pytest.mark.parametrize("changes, message", [
    ({"bound": 1.5}, "excludes a true coordinate of size 2"),
    ({"bound": 0}, "fit.bound"),
    ({"bound": "wide"}, "fit.bound"),
    ({"method": "mle"}, "method 'mle'"),
])
def test_config_refuses_a_bound_it_cannot_keep(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_with_fit(**changes))


def test_config_refuses_a_bound_on_gaussian_experts():
    raw = {**BASE, "model": {"gate": "softmax", "expert": "gaussian",
                             "params": {"gate": {"beta0": [0.0, 0.0], "beta1": [[1.0], [0.0]]},
                                        "expert": {"a": [[1.0], [-1.0]], "b": [0.0, 1.0], "nu": [1.0, 1.0]}}},
           "inputs": {"name": "uniform"}}
    with pytest.raises(ConfigError, match="closed-form M-step"):
        parse_config(raw)
