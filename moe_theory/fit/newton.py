"""Unconstrained coordinates and the damped Newton ascent used by every M-step without a closed form.

**Coordinates.** Fitters move in the unconstrained space of :func:`moe_theory.params.unconstrain`: a
``positive`` field (variances ν, the temperature τ, Gaussian-gate weights w) through u = log v, a
``positive_definite`` field Γ through its log-Cholesky factor (Γ = LLᵀ, the diagonal of L stored as
logs), and ``real`` fields unchanged.

**Free coordinates.** Some coordinates are fixed during fitting: the reference (last) expert's gate
offset, and its slope where the gate is translatable, for softmax-type gates (the authors' convention
[1]: without it the gate's Hessian is singular along the common translation), and τ when the family
fixes the temperature.

**Newton ascent** maximises a smooth objective Q(u) over the free coordinates. With g = ∇Q and
A = −∇²Q (fixed coordinates replaced by identity rows), each step solves (A + μI) δ = g with
μ = ε·max(1, max|A_ii|), ε = √(machine epsilon), when A + μI is positive definite: on a concave
objective (the softmax gate [1]) this is the ordinary Newton step. Where it is not (sigmoid and
Euclidean gates, nonlinear experts can be locally non-concave), μ is raised to the Gershgorin bound
max_i (Σ_{j≠i} |A_ij| − A_ii) + ε·max(1, max|A_ii|), which makes A + μI diagonally dominant and
hence positive definite, so δ is a Levenberg–Marquardt ascent direction. The factorisations use
:mod:`moe_theory.linalg` (no LAPACK calls inside the compiled loop). Step halving then tries
α = 1, 1/2, 1/4, … until Q(u + αδ) ≥ Q(u); if no halving succeeds the point
is left unchanged. Hence Q never decreases, which keeps EM's log-likelihood monotone (a generalised
EM). Gradients and Hessians come from automatic differentiation, so a new gate needs no M-step code.

**A compact parameter set** (``EMConfig.bound`` = B). The theorems of [4, 6] are about the MLE over
a compact set Θ, and for classification experts this matters: a multinomial-logistic expert that
separates the classes of its share of the data has no finite maximiser, and an over-fitted fit at
moderate n often finds such a share. With a bound every free coordinate stays in [−B, B] (a real
parameter |θ| ≤ B; a positive one e^{−B} ≤ v ≤ e^{B}). The ascent is then a projected Newton
method with an active set, as in bound-constrained Levenberg–Marquardt: a coordinate on a face of
the box whose gradient points out of it is held for the step (:func:`box_movable`), and every trial
point is projected onto the box (:func:`box_project`). Q still never decreases, so EM stays monotone,
now towards the maximum over Θ.

[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288 (the authors' IRLS gate update with step
halving, ``docs/estimators.md``).
[4] Nguyen, Akbarian, Nguyen, Ho, ICML 2024, arXiv 2310.14188 (softmax and modified softmax gates,
multinomial-logistic experts).
[6] Pham, Cao, Nguyen, Nguyen, Ho, Rinaldo, arXiv 2602.01466 (sigmoid gates, multinomial-logistic experts).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import linalg
from ..gates import SCORES
from ..models import Family
from ..params import field_with_role


def gate_free_mask(family: Family, like: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """1 for gate coordinates the fitter moves, 0 for those it holds fixed (see module docstring)."""
    gate = family.gate
    mask = {name: jnp.ones_like(value) for name, value in like.items()}
    if gate.shift_invariant:
        offset = SCORES[gate.score].offset_field.name
        mask[offset] = mask[offset].at[-1].set(0.0)
        if gate.slope_translatable:
            slope = gate.slope_field.name
            mask[slope] = mask[slope].at[-1].set(0.0)
    if gate.temperature == "fixed":
        tau = field_with_role(gate.fields, "temperature").name
        mask[tau] = jnp.zeros_like(mask[tau])
    for field in gate.fields:
        if field.constraint == "positive_definite":
            # Only the lower triangle of a log-Cholesky factor is a coordinate.
            mask[field.name] = jnp.tril(mask[field.name])
    return mask


FACE_TOLERANCE = 1e-9
"""Relative distance from a face of the box at which a coordinate counts as on it."""


def box_project(flat: jnp.ndarray, bound: float | None) -> jnp.ndarray:
    """``flat`` clipped to the box [−B, B] (unchanged when there is no bound)."""
    return flat if bound is None else jnp.clip(flat, -bound, bound)


def box_movable(flat: jnp.ndarray, gradient: jnp.ndarray, bound: float | None) -> jnp.ndarray:
    """1.0 for the coordinates an ascent step may move: all, except those on a face of the box whose
    gradient points out of it (moving them would only be undone by the projection)."""
    if bound is None:
        return jnp.ones_like(flat)
    # A face within a relative 1e-9 counts as reached (an ε-active set): a coordinate just inside
    # after a log/exp round trip would otherwise take steps of 1e-9 towards it, one per iteration.
    face = bound * (1 - FACE_TOLERANCE)
    leaving = ((flat >= face) & (gradient > 0)) | ((flat <= -face) & (gradient < 0))
    return jnp.where(leaving, 0.0, 1.0).astype(flat.dtype)


def damped_newton_direction(curvature: jnp.ndarray, gradient: jnp.ndarray) -> jnp.ndarray:
    """Solve (A + μI) δ = g with the smallest of the two shifts μ of the module docstring that works."""
    diagonal = jnp.diagonal(curvature)
    ridge = jnp.finfo(curvature.dtype).eps ** 0.5 * jnp.maximum(jnp.max(jnp.abs(diagonal)), 1.0)
    identity = jnp.eye(curvature.shape[0], dtype=curvature.dtype)
    newton_factor = linalg.cholesky(curvature + ridge * identity)
    gershgorin = jnp.max(jnp.sum(jnp.abs(curvature), axis=1) - jnp.abs(diagonal) - diagonal)
    shifted_factor = linalg.cholesky(curvature + (jnp.maximum(gershgorin, 0.0) + ridge) * identity)
    # A failed factorisation shows up as NaN (square root of a negative pivot).
    factor = jnp.where(jnp.all(jnp.isfinite(newton_factor)), newton_factor, shifted_factor)
    return linalg.solve_upper_transposed(factor, linalg.solve_lower(factor, gradient))


def _value_gradient_hessian(flat_objective: Callable, flat: jnp.ndarray) -> tuple:
    """(Q, aux, ∇Q, ∇²Q) of ``flat_objective`` f ↦ (Q, aux) at ``flat``, from one forward-over-reverse pass."""

    def gradient_with_value(point):
        (value, aux), gradient = jax.value_and_grad(flat_objective, has_aux=True)(point)
        return gradient, (value, aux, gradient)

    hessian, (value, aux, gradient) = jax.jacfwd(gradient_with_value, has_aux=True)(flat)
    return value, aux, gradient, hessian


def autodiff_derivatives(objective: Callable[[dict], tuple]) -> Callable[[dict], tuple]:
    """u ↦ (Q, aux, ∇Q, ∇²Q) of ``objective`` u ↦ (Q, aux) by automatic differentiation, gradient and
    Hessian flattened in ``ravel_pytree`` order: the ``derivatives`` that :func:`newton_ascent` uses
    by default, for callers that need them outside it."""

    def derivatives(unconstrained: dict) -> tuple:
        flat, unravel = ravel_pytree(unconstrained)
        return _value_gradient_hessian(lambda point: objective(unravel(point)), flat)

    return derivatives


def newton_ascent(
    objective: Callable[[dict], tuple[jnp.ndarray, jnp.ndarray]],
    start: dict,
    free: dict,
    num_steps: int,
    max_halvings: int = 20,
    derivatives: Callable[[dict], tuple] | None = None,
    tolerance: float = 0.0,
    bound: float | None = None,
) -> tuple[dict, jnp.ndarray, jnp.ndarray]:
    """Maximise ``objective`` from ``start`` by at most ``num_steps`` damped Newton steps on the free coordinates.

    The loop stops early after a step whose gain Q(u_new) − Q(u_old) is at most
    ``tolerance``·|Q(u_old)| (when ``tolerance > 0``), or that no halving could make ascend. A step
    that was not accepted leaves a fixed point (the next step would compute the same direction and
    fail the same way), so with ``tolerance = 0`` the result is exactly that of all ``num_steps``
    steps.

    Args:
        objective: u ↦ (Q(u), aux); aux is any array computed alongside Q (the E-step reuses the
            gate's log-weights at the accepted point, so they are not recomputed).
        start: unconstrained parameter dict.
        free: dict of the same structure, 1 where a coordinate may move and 0 where it is fixed.
        num_steps: the most Newton steps (static).
        max_halvings: at most this many step halvings per step.
        derivatives: optional u ↦ (Q, aux, ∇Q, ∇²Q) with gradient and Hessian flattened in
            ``ravel_pytree`` order, for objectives with exploitable structure; by default one
            forward-over-reverse automatic-differentiation pass.
        tolerance: relative gain at or below which the loop stops (static).
        bound: B to keep the free coordinates in [−B, B] (module docstring), or None (static). The
            start is expected inside the box.

    Returns:
        (u, Q(u), aux(u)) at the last accepted point; Q never decreases along the way.
    """
    flat_start, unravel = ravel_pytree(start)
    flat_free, _ = ravel_pytree(free)

    def flat_objective(flat):
        return objective(unravel(flat))

    def flat_derivatives(flat):
        if derivatives is not None:
            return derivatives(unravel(flat))
        return _value_gradient_hessian(flat_objective, flat)

    def one_step(carry):
        step, flat, _, _, _ = carry
        value, aux, gradient, hessian = flat_derivatives(flat)
        moving_free = flat_free * box_movable(flat, gradient, bound)
        gradient = gradient * moving_free
        hessian = hessian * moving_free[:, None] * moving_free[None, :]
        direction = moving_free * damped_newton_direction(-hessian + jnp.diag(1.0 - moving_free), gradient)

        def try_step(state):
            step_size, _, _, _, _ = state
            candidate = jnp.where(flat_free > 0, box_project(flat + step_size * direction, bound), flat)
            candidate_value, candidate_aux = flat_objective(candidate)
            improved = candidate_value >= value
            return step_size * 0.5, candidate, candidate_value, candidate_aux, improved

        def keep_halving(state):
            step_size, _, _, _, improved = state
            return (~improved) & (step_size > 0.5**max_halvings)

        initial = (jnp.asarray(1.0, flat.dtype), flat, value, aux, jnp.asarray(False))
        _, candidate, candidate_value, candidate_aux, improved = jax.lax.while_loop(
            keep_halving, try_step, try_step(initial)
        )
        accept = improved & jnp.isfinite(candidate_value)
        moving = accept
        if tolerance > 0:
            moving = moving & (candidate_value - value > tolerance * jnp.abs(value))
        return (
            step + 1,
            jnp.where(accept, candidate, flat),
            jnp.where(accept, candidate_value, value),
            jax.tree_util.tree_map(lambda new, old: jnp.where(accept, new, old), candidate_aux, aux),
            moving,
        )

    def keep_stepping(carry):
        step, _, _, _, moving = carry
        return (step < num_steps) & moving

    if num_steps == 0:
        value, aux = flat_objective(flat_start)
        return start, value, aux
    # one_step ignores the incoming value and aux, so zeros of the right shape start the loop and
    # the step is traced once, whatever num_steps is.
    value_shape, aux_shape = jax.eval_shape(flat_objective, flat_start)
    placeholders = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (value_shape, aux_shape))
    start_carry = (jnp.asarray(0), flat_start, *placeholders, jnp.asarray(True))
    _, flat, value, aux, _ = jax.lax.while_loop(keep_stepping, one_step, start_carry)
    return unravel(flat), value, aux
