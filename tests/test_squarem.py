"""Method ``squarem``: EM accelerated by squared extrapolation (moe_theory/fit/squarem.py).

Oracles:

* on an exactly linear fixed-point iteration u ↦ u* + ρ(u − u*), one S3 extrapolation from
  u₀, F(u₀), F²(u₀) lands on u* (closed form), in the unconstrained coordinates (log ν);
* the log-likelihood path is monotone (the safeguard), for the fast map (softmax × Gaussian) and the
  generic map (sigmoid-type gates × multinomial experts);
* every cycle is at least two plain EM iterations from its start, and kept points respect the
  variance floor that EM's M-step keeps;
* at a tight tolerance it reaches the maximum that ``em_newton`` (a different algorithm) reaches, in
  far fewer iterations than EM, and the fast and generic EM maps give the same fit;
* vmapped fits with padding rows equal a loop without them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_theory as mt
from moe_theory.fit import EMConfig, fit, fit_batch
from moe_theory.fit.solver import trace_solver
from moe_theory.fit.squarem import SquaremEM, em_map, extrapolate
from moe_theory.init import NearTruthNoise, near_truth_init

PAPER1_TRUTH = {
    "gate": {"beta0": [-8.0, 0.0], "beta1": [[25.0], [0.0]]},
    "expert": {"a": [[-20.0], [20.0]], "b": [15.0, -5.0], "nu": [0.09, 0.16]},
}


def paper1_case(n: int, seed: int = 0, num_experts: int = 3):
    """The over-fitted paper-1 fit (softmax × Gaussian, k* = 2, x on a grid of [0, 1]) from a start
    whose noise does not shrink with n."""
    true_family = mt.make_family("softmax", "gaussian", 2, 1)
    truth = mt.make_params(true_family, PAPER1_TRUTH)
    x, y, _ = mt.sample(jax.random.key(seed), true_family, truth, n, mt.make_inputs("grid"))
    family = mt.make_family("softmax", "gaussian", num_experts, 1)
    noise = NearTruthNoise(gate_exponent=0.0, mean_exponent=0.0, variance_exponent=0.0)
    start = near_truth_init(jax.random.key(seed + 100), family, true_family, truth, n, noise)
    return family, start, x, y


def test_extrapolation_lands_on_the_fixed_point_of_a_linear_iteration():
    family = mt.make_family("softmax", "gaussian", 3, 2)
    rng = np.random.default_rng(0)
    fixed = mt.make_params(family, {
        "gate": {"beta0": [0.3, -0.2, 0.0], "beta1": rng.normal(size=(3, 2)) * [[1], [1], [0]]},
        "expert": {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=3), "nu": [0.5, 1.5, 0.2]},
    })
    direction = mt.make_params(family, {
        "gate": {"beta0": [1.0, -2.0, 0.0], "beta1": rng.normal(size=(3, 2)) * [[1], [1], [0]]},
        "expert": {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=3), "nu": [2.0, 0.5, 3.0]},
    })
    rho = 0.97  # a slow EM: ~800 iterations per factor 1e-10

    def iterate(t):
        """u* + ρ^t (u₀ − u*), with ν moved multiplicatively (linear in log ν)."""
        gate = {name: fixed.gate[name] + rho**t * direction.gate[name] for name in fixed.gate}
        expert = {name: fixed.expert[name] + rho**t * direction.expert[name] for name in ("a", "b")}
        expert["nu"] = fixed.expert["nu"] * direction.expert["nu"] ** (rho**t)
        return mt.MoEParams(gate, expert)

    landed, alpha = extrapolate(family, iterate(0), iterate(1), iterate(2), jnp.asarray(1e6))
    np.testing.assert_allclose(float(alpha), -1.0 / (1.0 - rho), rtol=1e-9)
    for group in ("gate", "expert"):
        for name, value in getattr(fixed, group).items():
            np.testing.assert_allclose(getattr(landed, group)[name], value, rtol=1e-9, atol=1e-10)
    # With the bound s = 1 the point is u₂ itself: plain EM.
    unaccelerated, alpha = extrapolate(family, iterate(0), iterate(1), iterate(2), jnp.asarray(1.0))
    assert float(alpha) == -1.0
    np.testing.assert_allclose(unaccelerated.expert["nu"], iterate(2).expert["nu"], rtol=1e-12)


def _monotone(trace) -> np.ndarray:
    path = np.asarray(trace)
    path = path[np.isfinite(path)]
    assert np.all(np.diff(path) >= -1e-13 * np.abs(path[:-1])), np.diff(path).min()
    return path


def test_trace_is_monotone_on_the_fast_map():
    family, start, x, y = paper1_case(1000)
    solver = SquaremEM(family, EMConfig(max_iter=200))
    result, trace = jax.jit(lambda s, x, y: trace_solver(solver, s, x, y, None, 1e-13))(start, x, y)
    assert bool(result.finite) and _monotone(trace).size >= 10


@pytest.mark.parametrize("gate", ["sigmoid", "euclidean_sigmoid", "modified_softmax"])
def test_trace_is_monotone_on_the_generic_map(gate):
    true_family = mt.make_family(gate, "multinomial_logistic", 2, 2, num_classes=3)
    gate_values = {"beta0": [0.5, -0.5], "beta1": [[1.0, -1.0], [-1.0, 1.0]]}
    if gate == "modified_softmax":
        gate_values = {"beta0": [1.0, 0.0], "beta1": [[3.0, -3.0], [0.0, 0.0]]}
    truth = mt.make_params(true_family, {"gate": gate_values, "expert": {
        "eta0": [[1.0, -1.0], [-1.0, 1.0]], "eta1": [[[2.0, 0.0], [0.0, 2.0]], [[-2.0, 1.0], [1.0, -2.0]]]}})
    x, y, _ = mt.sample(jax.random.key(5), true_family, truth, 400, mt.make_inputs("normal"))
    family = mt.make_family(gate, "multinomial_logistic", 3, 2, num_classes=3)
    noise = NearTruthNoise(gate_scale=0.5, gate_exponent=0.0, mean_scale=0.5, mean_exponent=0.0)
    start = near_truth_init(jax.random.key(6), family, true_family, truth, 400, noise)
    solver = SquaremEM(family, EMConfig(max_iter=40))
    result, trace = jax.jit(lambda s, x, y: trace_solver(solver, s, x, y, None, 1e-13))(start, x, y)
    assert bool(result.finite) and _monotone(trace).size >= 10


@pytest.mark.parametrize("variance_floor", [0.0, 0.12])
def test_every_cycle_is_at_least_two_em_steps_and_keeps_the_variance_floor(variance_floor):
    """For 30 cycles (the step bound grows to 4, 16, … and extrapolations are kept and rejected):
    each cycle's ℓ is at least that of two EM steps from the cycle's start, ℓ never decreases, and
    with a floor on the variances above the truth's (0.09, 0.16) no kept point goes below it."""
    family, start, x, y = paper1_case(1000)
    config = EMConfig(max_iter=30, variance_floor=variance_floor)
    solver = SquaremEM(family, config)
    em = em_map(family, config)
    data, state = solver.init(start, x, y, None)
    step = jax.jit(lambda state: solver.step(data, state, jnp.asarray(True)))
    two_steps = jax.jit(lambda point: em.value(em.advance(data, em.advance(data, point, True), True)))
    bounds = []
    for _ in range(30):
        reference = float(two_steps(state.point))
        previous = float(state.log_likelihood)
        state = step(state)
        value = float(state.log_likelihood)
        assert value >= reference - 1e-14 * abs(reference) and value >= previous - 1e-14 * abs(previous)
        assert float(jnp.min(em.params(state.point).expert["nu"])) >= variance_floor
        bounds.append(float(state.step_bound))
    assert max(bounds) >= 16  # extrapolations were kept: the bound grew


def test_reaches_the_newton_maximum_in_far_fewer_iterations_than_em():
    """Over-fitted paper-1 fit at n = 2000: EM needs thousands of iterations; SQUAREM reaches the
    maximum that EM with Newton steps finds, with both EM maps (fast and generic)."""
    family, start, x, y = paper1_case(2000, seed=3)
    tight = EMConfig(max_iter=20000)
    em = fit(family, x, y, init=start, method="em", tol=1e-10, config=tight)
    newton = fit(family, x, y, init=start, method="em_newton", tol=1e-14, config=EMConfig(max_iter=500))
    fast = fit(family, x, y, init=start, method="squarem", tol=1e-14, config=tight)
    generic = fit(family, x, y, init=start, method="squarem", tol=1e-14, config=EMConfig(max_iter=20000, fast_path=False))
    assert all(bool(r.converged) for r in (em, newton, fast, generic))
    for result in (fast, generic):
        np.testing.assert_allclose(result.log_likelihood, newton.log_likelihood, rtol=1e-11)
        for name, value in newton.params.expert.items():
            np.testing.assert_allclose(result.params.expert[name], value, rtol=1e-4, atol=1e-4)
    # EM's stopping rule fires on its slow crawl, below the maximum.
    assert float(fast.log_likelihood) >= float(em.log_likelihood)
    assert 10 * int(fast.n_iter) < int(em.n_iter), (int(fast.n_iter), int(em.n_iter))


def test_padded_vmap_equals_loop():
    cases = [paper1_case(600, seed=s) for s in range(3)]
    family = cases[0][0]
    config = EMConfig(max_iter=300)
    loop = [fit(family, x, y, init=start, method="squarem", tol=1e-10, config=config) for _, start, x, y in cases]
    starts = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves)[:, None], *[c[1] for c in cases])
    xs = jnp.stack([c[2] for c in cases])
    ys = jnp.stack([c[3] for c in cases])
    padded = fit_batch(
        family, starts, jnp.concatenate([xs, 0.5 * jnp.ones_like(xs[:, :30])], axis=1),
        jnp.concatenate([ys, 9.0 * jnp.ones_like(ys[:, :30])], axis=1),
        jnp.concatenate([jnp.ones(ys.shape, bool), jnp.zeros((3, 30), bool)], axis=1),
        tol=1e-10, method="squarem", config=config,
    )
    for r, single in enumerate(loop):
        assert int(padded.n_iter[r]) == int(single.n_iter)
        np.testing.assert_allclose(padded.log_likelihood[r], single.log_likelihood, rtol=1e-12)
        for name, value in single.params.expert.items():
            np.testing.assert_allclose(padded.params.expert[name][r], value, rtol=1e-8, atol=1e-9)
