"""EM accelerated by squared extrapolation (SQUAREM), with a likelihood safeguard: method ``"squarem"``
(``docs/estimators.md``).

EM is a fixed-point iteration θ_{t+1} = F(θ_t) that converges linearly, at the rate of the largest
fraction of missing information. In an over-fitted cell of a softmax-gated Gaussian MoE [1] that
rate is close to 1 (the likelihood is nearly flat along the directions that split the cell), and EM
needs ~10⁴ iterations to a relative change of 1e-10. SQUAREM [11] (scheme S3) extrapolates along the
path of two EM steps. From u₀ (θ in the unconstrained coordinates of :mod:`moe_theory.params`):

    u₁ = F(u₀),   u₂ = F(u₁),   r = u₁ − u₀,   v = u₂ − 2u₁ + u₀,
    α = −‖r‖ / ‖v‖, clipped to [−s, −1],
    u′ = u₀ − 2αr + α²v.

At α = −1, u′ = u₂: plain EM. For a linear iteration u ↦ u* + ρ(u − u*), α = −1/(1 − ρ) and u′ = u*
exactly, whatever ρ: the extrapolation removes the slow direction that EM crawls along, which is what
turns thousands of EM steps into hundreds of cycles.

**Safeguard (monotone).** The cycle ends at u′ only if ℓ(u′) is finite, u′ satisfies the bounds
EM keeps (expert variances are raised to ``variance_floor``; a joint-likelihood Gaussian gate's
covariances must stay above it; u′ is projected onto the box of ``EMConfig.bound``) and ℓ(u′) is at
least ℓ(u₂), the value after two plain EM steps; otherwise it ends at u₂. Hence ℓ never decreases
and a cycle is never worse than two EM iterations, whatever the extrapolation did (a non-finite or out-of-support
u′ is simply rejected). [11] follows the extrapolation by one stabilising EM step, F(u′); here the
next cycle's first step is that step, so it is not taken twice. The step bound s starts at 1 and
is multiplied by 4 whenever a cycle at α = −s is kept, and divided by 4 (never below 1) when one is
rejected: the adaptive bound of [11]'s reference implementation.

**The EM map.** F is EM's own iteration: the fast path's (:mod:`moe_theory.fit.fast`, one fused
pass over the data per step) where it applies, else the generic one of :mod:`moe_theory.fit.em`
(every gate, expert and likelihood EM supports). The reference expert of a softmax-type gate and a
held τ stay fixed because F keeps them fixed (r = v = 0 there, and such fields are copied, not
extrapolated).

**Cost and counting.** A cycle costs two M-steps and three E-steps (at u₁, u₂ and u′), or three
fused passes on the fast path (measured: 2.6–3.3 fast-path iterations). ``n_iter`` counts cycles
and ``max_iter`` bounds them. The stopping rule is the relative change of ℓ between consecutive
cycles (:mod:`moe_theory.fit.solver`).

[1] Nguyen, Nguyen, Ho, "Demystifying Softmax Gating Function in Gaussian Mixture of Experts",
NeurIPS 2023, arXiv 2305.03288.
[11] Varadhan, Roland, "Simple and globally convergent methods for accelerating the convergence of
any EM algorithm", Scandinavian Journal of Statistics 35 (2008) 335–353.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ..models import Family, canonicalize
from ..params import MoEParams, constrain, field_with_role, fields_with_role, unconstrain
from . import fast
from .em import e_step, expert_mstep, gate_mstep, log_gate_at, prepare
from .newton import box_project
from .settings import EMConfig
from .solver import FitResult, all_finite

STEP_GROWTH = 4.0
"""Factor by which the step bound s grows after a kept cycle at α = −s, and shrinks after a
rejected one ([11]'s reference implementation uses the same factor)."""


class _GenericPoint(NamedTuple):
    """A point of the generic EM map with its E-step: θ, log π(θ) (or the joint log-scores), ℓ(θ), ω(θ)."""

    params: MoEParams
    log_gate: jnp.ndarray
    log_likelihood: jnp.ndarray
    omega: jnp.ndarray


@dataclass(frozen=True)
class _GenericMap:
    """EM's generic iteration as a map between evaluated points."""

    family: Family
    config: EMConfig

    def prepare(self, params0, x, y, weights):
        data, state = prepare(self.family, self.config, params0, x, y, weights)
        return data, state.params

    def evaluate(self, data, params: MoEParams, active) -> _GenericPoint:
        del active
        log_gate = log_gate_at(self.family, self.config, params.gate, data.x)
        return _GenericPoint(params, log_gate, *e_step(self.family, params, log_gate, data.x, data.y, data.weights, data.total))

    def advance(self, data, point: _GenericPoint, active) -> _GenericPoint:
        del active
        family, config = self.family, self.config
        expert = expert_mstep(family, config, point.params, data.x, data.y, point.omega, data.total)
        gate, log_gate = gate_mstep(family, config, point.params, point.log_gate, data.x, point.omega, data.total)
        params = MoEParams(gate, expert)
        return _GenericPoint(params, log_gate, *e_step(family, params, log_gate, data.x, data.y, data.weights, data.total))

    @staticmethod
    def params(point: _GenericPoint) -> MoEParams:
        return point.params

    @staticmethod
    def value(point: _GenericPoint) -> jnp.ndarray:
        return point.log_likelihood


class _FastPoint(NamedTuple):
    """A point of the fast EM map: the fast state whose last step evaluated the E-step at θ (θ's gate is
    its ``gate``; its pending step and ``expert`` are already the next iteration's), and θ's experts."""

    state: fast.FastState
    expert: tuple


@dataclass(frozen=True)
class _FastMap:
    """EM's fast-path iteration (:class:`~moe_theory.fit.fast.FastEM`) as a map between evaluated points."""

    solver: fast.FastEM

    def prepare(self, params0, x, y, weights):
        data, state = self.solver.init(params0, x, y, weights)
        return data, fast.params_at(state.gate, state.expert)

    def evaluate(self, data, params: MoEParams, active) -> _FastPoint:
        state = fast.state_at(params)
        return _FastPoint(self.solver.step(data, state, active), state.expert)

    def advance(self, data, point: _FastPoint, active) -> _FastPoint:
        return _FastPoint(self.solver.step(data, point.state, active), point.state.expert)

    @staticmethod
    def params(point: _FastPoint) -> MoEParams:
        return fast.params_at(point.state.gate, point.expert)

    @staticmethod
    def value(point: _FastPoint) -> jnp.ndarray:
        return point.state.log_likelihood


def em_map(family: Family, config: EMConfig):
    """The EM map SQUAREM extrapolates: the fast path's where it applies, else the generic one."""
    return _FastMap(fast.FastEM(family, config)) if fast.fast_path_applies(family, config) else _GenericMap(family, config)


class SquaremState(NamedTuple):
    """The state of :class:`SquaremEM`: the current point with its E-step, and the solver-state fields
    of :mod:`moe_theory.fit.solver`."""

    point: Any  # the EM map's evaluated point at the current θ
    log_likelihood: jnp.ndarray  # ℓ at the current θ
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray
    step_bound: jnp.ndarray  # s


def _coordinates(family: Family, params: MoEParams):
    """θ as one flat vector of unconstrained coordinates, and the inverse map."""
    return ravel_pytree(
        {"gate": unconstrain(family.gate.fields, params.gate), "expert": unconstrain(family.expert.fields, params.expert)}
    )


def extrapolate(family: Family, theta0: MoEParams, theta1: MoEParams, theta2: MoEParams, step_bound, variance_floor=0.0,
                parameter_bound=None):
    """[11]'s S3 point u₀ − 2αr + α²v from θ₀, θ₁ = F(θ₀), θ₂ = F(θ₁) (module docstring), and α.

    A field that EM did not move (r = v = 0: a held τ, the reference expert's gate coordinates)
    keeps its value exactly, not its value through log and exp; expert variances are raised to
    ``variance_floor``, the bound EM's M-step keeps them above; with a ``parameter_bound`` B
    (``EMConfig.bound``) the point is projected onto the box [−B, B] that EM stays in."""
    u0, unravel = _coordinates(family, theta0)
    u1, _ = _coordinates(family, theta1)
    u2, _ = _coordinates(family, theta2)
    r = u1 - u0
    v = u2 - 2.0 * u1 + u0
    r_norm, v_norm = jnp.sqrt(jnp.sum(r * r)), jnp.sqrt(jnp.sum(v * v))
    # v = 0 (a straight path, or EM at rest) has no curvature to extrapolate by: α = −1 gives u₂.
    ratio = jnp.where(v_norm > 0, r_norm / jnp.where(v_norm > 0, v_norm, 1.0), 1.0)
    alpha = -jnp.clip(ratio, 1.0, step_bound)
    unconstrained = unravel(box_project(u0 - 2.0 * alpha * r + alpha**2 * v, parameter_bound))
    moved = unravel(jnp.abs(r) + jnp.abs(v))
    groups = {}
    for group, fields in (("gate", family.gate.fields), ("expert", family.expert.fields)):
        new = constrain(fields, unconstrained[group])
        old = getattr(theta0, group)
        groups[group] = {name: jnp.where(jnp.any(moved[group][name] > 0), new[name], old[name]) for name in new}
    for variance in fields_with_role(family.expert.fields, "variance"):
        groups["expert"][variance.name] = jnp.maximum(groups["expert"][variance.name], variance_floor)
    return canonicalize(family, MoEParams(groups["gate"], groups["expert"])), alpha


def _feasible(family: Family, config: EMConfig, params: MoEParams) -> jnp.ndarray:
    """Whether ``params`` satisfies the bounds EM keeps: under the joint likelihood, Gaussian-gate
    covariances at least ``variance_floor``·I (their M-step adds that to the diagonal)."""
    if config.likelihood != "joint" or config.variance_floor == 0:
        return jnp.asarray(True)
    covariance = params.gate[field_with_role(family.gate.fields, "covariance").name]
    return jnp.all(jnp.linalg.eigvalsh(covariance) >= config.variance_floor)


@dataclass(frozen=True)
class SquaremEM:
    """The iteration of the module docstring, as a solver of :mod:`moe_theory.fit.solver`."""

    family: Family
    config: EMConfig

    @property
    def max_iter(self) -> int:
        return self.config.max_iter

    def init(self, params0: MoEParams, x, y, weights):
        em = em_map(self.family, self.config)
        data, params = em.prepare(params0, x, y, weights)
        point = em.evaluate(data, params, jnp.asarray(True))
        value = em.value(point)
        return data, SquaremState(
            point=point,
            log_likelihood=value,
            previous=jnp.full_like(value, jnp.nan),
            iteration=jnp.asarray(0),
            finite=all_finite(params) & jnp.isfinite(value),
            step_bound=jnp.ones((), value.dtype),
        )

    def step(self, data, state: SquaremState, active) -> SquaremState:
        em = em_map(self.family, self.config)
        first = em.advance(data, state.point, active)
        second = em.advance(data, first, active)
        params, alpha = extrapolate(self.family, em.params(state.point), em.params(first), em.params(second),
                                    state.step_bound, self.config.variance_floor, self.config.bound)
        candidate = em.evaluate(data, params, active)
        value = em.value(candidate)
        keep = jnp.isfinite(value) & all_finite(params) & _feasible(self.family, self.config, params) & (value >= em.value(second))
        point = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), candidate, second)
        at_bound = alpha <= -state.step_bound
        grown = jnp.where(keep, state.step_bound * STEP_GROWTH, jnp.maximum(1.0, state.step_bound / STEP_GROWTH))
        value = em.value(point)
        return SquaremState(
            point=point,
            log_likelihood=value,
            previous=state.log_likelihood,
            iteration=state.iteration + 1,
            finite=jnp.isfinite(value) & all_finite(em.params(point)),
            step_bound=jnp.where(at_bound, grown, state.step_bound),
        )

    def finish(self, data, state: SquaremState, converged) -> FitResult:
        del data  # ℓ at the current point is already known
        params = em_map(self.family, self.config).params(state.point)
        finite = state.finite & jnp.isfinite(state.log_likelihood) & all_finite(params)
        return FitResult(
            params=canonicalize(self.family, params),
            log_likelihood=state.log_likelihood,
            n_iter=state.iteration,
            converged=converged & finite,
            finite=finite,
        )
