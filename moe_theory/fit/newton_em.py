"""EM safeguarded by full-likelihood Newton steps: method ``"em_newton"`` (``docs/estimators.md``).

EM converges linearly, at a rate set by the fraction of missing information: where the likelihood
is nearly flat along some direction (an over-fitted cell, a gate and an expert that trade off [4],
a temperature that trades off against the gate slopes [3, 6]) it can need thousands of iterations to
reach a relative change of 1e-10, and a fit stopped at ``max_iter`` is not an estimate of the MLE.
Newton's method on the log-likelihood converges quadratically near a non-degenerate maximum, but it
is not monotone and has no global guarantee. This solver takes, at every iteration, the better of
the two.

**One iteration** from θ_t, in the unconstrained coordinates u of :mod:`moe_theory.fit.newton`
(the reference expert's gate coordinates of a softmax-type gate and a fixed τ held, as in EM):

1. the EM iteration of :mod:`moe_theory.fit.em` gives θ_EM, with ℓ(θ_EM) ≥ ℓ(θ_t);
2. the gradient g and Hessian H of the full log-likelihood ℓ at u_t give the damped Newton direction
   δ = (−H + μI)⁻¹ g of :func:`~moe_theory.fit.newton.damped_newton_direction` (the Levenberg
   shift μ makes it an ascent direction where −H is not positive definite);
3. step halving tries u_t + αδ for α = 1, 1/2, …, 1/16 (:data:`NEWTON_HALVINGS`), until
   ℓ(u_t + αδ) > ℓ(θ_EM);
4. θ_{t+1} is the Newton point if one was found, else θ_EM.

With ``EMConfig.bound`` the Newton step is the projected one of :mod:`moe_theory.fit.newton`
(coordinates on a face of the box that the gradient leaves are held, trial points are projected),
so both candidates stay in the box.

Hence ℓ(θ_{t+1}) ≥ ℓ(θ_EM) ≥ ℓ(θ_t): the log-likelihood never decreases, as in EM, and the iteration
is never slower than EM's, iteration for iteration. Far from a maximum the EM point usually wins;
near a non-degenerate one the Newton point wins and the fit ends in a few steps. Along an exactly
flat direction (τ and β₁ of a temperature gate with an affine score) H is singular, g has no
component there, and the step does not move along it: the fit stops where its path met the flat
set, as EM's does.

**Cost.** H is exact, from Louis' identity (:func:`_gradient_and_hessian`): EM's complete-data
Hessian, which the gate and each expert provide block by block, plus the covariance of the per-sample
score vectors. It needs forward derivatives of the (n, k) gate log-weights and of each expert's
log-density in its own coordinates only. An iteration costs a few EM iterations;
``python benchmarks/bench_accel.py`` measures both.

The stopping rule and the drivers are those of :mod:`moe_theory.fit.solver`; ``ℓ`` in the state is
the log-likelihood at the state's own parameters, so the rule compares consecutive iterates.

[3] Nguyen, Akbarian, Ho, ICML 2024, arXiv 2401.13875. [4] Nguyen, Akbarian, Nguyen, Ho, ICML 2024,
arXiv 2310.14188. [6] Pham, Cao, Nguyen, Nguyen, Ho, Rinaldo, arXiv 2602.01466.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ..gates import log_gate_weights
from ..models import Family, canonicalize
from ..params import MoEParams, constrain, unconstrain
from .em import EMData, e_step, expert_mstep, gate_derivatives, gate_mstep, prepare
from .newton import box_movable, box_project, damped_newton_direction, gate_free_mask
from .settings import EMConfig
from .solver import FitResult, all_finite

NEWTON_HALVINGS = 4
"""Step halvings tried on the Newton direction per iteration. Its job is to win near a maximum, where
α = 1 does; beyond α = 1/16 the EM point is taken, and under ``vmap`` every halving costs a
likelihood evaluation for the whole batch."""


class NewtonEMState(NamedTuple):
    """The state of :class:`NewtonEM` (the solver-state fields of :mod:`moe_theory.fit.solver`)."""

    params: MoEParams
    log_gate: jnp.ndarray  # log π(x) at params.gate
    log_likelihood: jnp.ndarray  # ℓ at params
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray


def _gate_coordinates(family: Family, gate_params):
    """The gate's unconstrained coordinates, flattened, and the inverse map."""
    return ravel_pytree(unconstrain(family.gate.fields, gate_params))


def _expert_coordinates(family: Family, expert_params):
    """Each expert's unconstrained coordinates, (k, q), and the inverse map of one row."""
    unconstrained = unconstrain(family.expert.fields, expert_params)
    _, unravel_one = ravel_pytree({name: value[0] for name, value in unconstrained.items()})
    rows = jax.vmap(lambda i: ravel_pytree({name: value[i] for name, value in unconstrained.items()})[0])(
        jnp.arange(family.num_experts)
    )
    return rows, unravel_one


def _params_at(family: Family, gate_flat, unravel_gate, expert_rows, unravel_expert) -> MoEParams:
    gate = constrain(family.gate.fields, unravel_gate(gate_flat))
    rows = jax.vmap(unravel_expert)(expert_rows)
    return MoEParams(gate, constrain(family.expert.fields, rows))


def _expert_log_prob_one(family: Family, unravel_expert, row, x, y):
    """log f(y_j | x_j; η) of one expert at its unconstrained coordinates ``row``, (n,)."""
    single = {name: value[None] for name, value in constrain(family.expert.fields, unravel_expert(row)).items()}
    return family.expert.log_prob(single, x, y)[:, 0]


def _gradient_and_hessian(family: Family, params: MoEParams, data: EMData):
    """∇ℓ and ∇²ℓ of ℓ = Σ_j w_j ℓ_j / Σ_j w_j in the coordinates (gate, expert 1, …, expert k).

    With a_{ji} = log π_i(x_j) + log f(y_j | x_j; η_i), r_{ji} = softmax_i(a_{ji}) and the score
    vectors g_{ji} = ∇a_{ji} (gate block, and expert i's block), Louis' identity gives

        ∇ℓ  = Σ_j w_j ḡ_j,     ḡ_j = Σ_i r_{ji} g_{ji},
        ∇²ℓ = ∇²Q + Σ_j w_j (Σ_i r_{ji} g_{ji} g_{ji}ᵀ − ḡ_j ḡ_jᵀ),

    where Q(θ') = Σ_j Σ_i w_j r_{ji} a_{ji}(θ') with r held at θ is EM's objective: its Hessian is
    the gate's (:func:`~moe_theory.fit.em.gate_derivatives`) and one block per expert. Every term
    needs only forward derivatives of the (n, k) log-weights and of each expert's (n,) log-density
    in its own coordinates, never a derivative of the likelihood's log-sum-exp over all parameters.
    """
    x, y, weights, total = data
    gate_flat, unravel_gate = _gate_coordinates(family, params.gate)
    expert_rows, unravel_expert = _expert_coordinates(family, params.expert)
    k, q = expert_rows.shape

    def log_gate_of(flat):
        return log_gate_weights(family.gate, constrain(family.gate.fields, unravel_gate(flat)), x)

    def value_twice(flat):
        value = log_gate_of(flat)
        return value, value

    gate_scores, log_gate = jax.jacfwd(value_twice, has_aux=True)(gate_flat)  # (n, k, p_gate), (n, k)
    log_f = jax.vmap(lambda row: _expert_log_prob_one(family, unravel_expert, row, x, y))(expert_rows).T  # (n, k)
    joint = log_gate + log_f
    responsibility = jnp.exp(joint - jax.nn.logsumexp(joint, axis=-1, keepdims=True))
    omega = jnp.where(weights[:, None] > 0, weights[:, None] * responsibility, 0.0)
    gate_scores = jnp.where(weights[:, None, None] > 0, gate_scores, 0.0)
    # The complete-data Hessian of each expert (Q's expert blocks) and its per-sample scores.
    _, _, expert_hessians, expert_scores = jax.vmap(
        lambda row, weight: family.expert.derivatives_one(unravel_expert(row), x, y, weight), in_axes=(0, 1)
    )(expert_rows, omega)
    expert_scores = jnp.where(weights[None, :, None] > 0, expert_scores, 0.0)  # (k, n, q)

    # Score vectors g_{ji}: gate block, then expert i's block (zeros in the other experts' blocks).
    expert_blocks = jnp.einsum("knq,ki->nikq", expert_scores, jnp.eye(k, dtype=expert_scores.dtype)).reshape(
        gate_scores.shape[:2] + (k * q,)
    )
    scores = jnp.concatenate([gate_scores, expert_blocks], axis=-1)  # (n, k, p)
    mean_score = jnp.einsum("nk,nkp->np", responsibility, scores)
    gradient = jnp.einsum("n,np->p", weights, mean_score) / total
    # Both sums as Gram matrices of rows scaled by √weight: one matrix product each, where a
    # three-operand einsum may materialise an (n, k, p, p) array.
    scaled_scores = (jnp.sqrt(omega)[..., None] * scores).reshape(-1, scores.shape[-1])
    scaled_mean = jnp.sqrt(weights)[:, None] * mean_score
    missing = (scaled_scores.T @ scaled_scores - scaled_mean.T @ scaled_mean) / total

    _, _, _, gate_hessian = gate_derivatives(family, x, omega, total)(unravel_gate(gate_flat))

    complete = jax.scipy.linalg.block_diag(gate_hessian, *[expert_hessians[i] / total for i in range(k)])
    return gate_flat, unravel_gate, expert_rows, unravel_expert, gradient, complete + missing


@dataclass(frozen=True)
class NewtonEM:
    """The iteration of the module docstring, as a solver of :mod:`moe_theory.fit.solver`."""

    family: Family
    config: EMConfig

    @property
    def max_iter(self) -> int:
        return self.config.max_iter

    def init(self, params0: MoEParams, x, y, weights) -> tuple[EMData, NewtonEMState]:
        data, state = prepare(self.family, self.config, params0, x, y, weights)
        log_likelihood, _ = e_step(self.family, state.params, state.log_gate, data.x, data.y, data.weights, data.total)
        nan = jnp.full_like(log_likelihood, jnp.nan)
        finite = state.finite & jnp.isfinite(log_likelihood)
        return data, NewtonEMState(state.params, state.log_gate, log_likelihood, nan, state.iteration, finite)

    def step(self, data: EMData, state: NewtonEMState, active) -> NewtonEMState:
        del active
        family, config = self.family, self.config
        x, y, weights, total = data

        _, omega = e_step(family, state.params, state.log_gate, x, y, weights, total)
        em_expert = expert_mstep(family, config, state.params, x, y, omega, total)
        em_gate, em_log_gate = gate_mstep(family, config, state.params, state.log_gate, x, omega, total)
        em_params = MoEParams(em_gate, em_expert)
        em_value, _ = e_step(family, em_params, em_log_gate, x, y, weights, total)

        gate_flat, unravel_gate, expert_rows, unravel_expert, gradient, hessian = _gradient_and_hessian(
            family, state.params, data
        )
        flat = jnp.concatenate([gate_flat, expert_rows.reshape(-1)])
        flat_free = jnp.concatenate(
            [ravel_pytree(gate_free_mask(family, unravel_gate(gate_flat)))[0], jnp.ones(expert_rows.size, flat.dtype)]
        )
        moving_free = flat_free * box_movable(flat, gradient, config.bound)
        gradient = gradient * moving_free
        curvature = -hessian * moving_free[:, None] * moving_free[None, :] + jnp.diag(1.0 - moving_free)
        direction = moving_free * damped_newton_direction(curvature, gradient)

        def params_at(candidate):
            rows = candidate[gate_flat.size:].reshape(expert_rows.shape)
            return _params_at(family, candidate[: gate_flat.size], unravel_gate, rows, unravel_expert)

        def evaluate(step_size):
            candidate = jnp.where(flat_free > 0, box_project(flat + step_size * direction, config.bound), flat)
            params = params_at(candidate)
            log_gate = log_gate_weights(family.gate, params.gate, x)
            value, _ = e_step(family, params, log_gate, x, y, weights, total)
            return candidate, value, log_gate

        def try_step(carry):
            step_size, _, _, _, _ = carry
            candidate, value, log_gate = evaluate(step_size)
            return step_size * 0.5, candidate, value, log_gate, value > em_value

        def keep_halving(carry):
            step_size, _, _, _, better = carry
            return (~better) & (step_size > 0.5**NEWTON_HALVINGS)

        initial = (jnp.asarray(1.0, flat.dtype), flat, em_value, em_log_gate, jnp.asarray(False))
        _, candidate, newton_value, newton_log_gate, better = jax.lax.while_loop(keep_halving, try_step, try_step(initial))
        use_newton = better & jnp.isfinite(newton_value) & jnp.all(jnp.isfinite(candidate))
        newton_params = params_at(candidate)
        params = jax.tree_util.tree_map(lambda a, b: jnp.where(use_newton, a, b), newton_params, em_params)
        log_gate = jnp.where(use_newton, newton_log_gate, em_log_gate)
        value = jnp.where(use_newton, newton_value, em_value)
        return NewtonEMState(
            params=params,
            log_gate=log_gate,
            log_likelihood=value,
            previous=state.log_likelihood,
            iteration=state.iteration + 1,
            finite=jnp.isfinite(value) & all_finite(params),
        )

    def finish(self, data: EMData, state: NewtonEMState, converged) -> FitResult:
        finite = state.finite & jnp.isfinite(state.log_likelihood) & all_finite(state.params)
        return FitResult(
            params=canonicalize(self.family, state.params),
            log_likelihood=state.log_likelihood,
            n_iter=state.iteration,
            converged=converged & finite,
            finite=finite,
        )
