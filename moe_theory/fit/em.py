"""Expectation–maximisation for gated mixtures of experts, as a solver of :mod:`moe_theory.fit.solver`
(``docs/estimators.md``).

For data (x_j, y_j) with sample weights w_j ≥ 0 (0 marks padding), one EM iteration from θ_t is

* **E-step** (log space): ℓ_j = logsumexp_i [log π_i(x_j) + log f(y_j | x_j; η_i)],
  r_{ji} = exp(log π_i(x_j) + log f(y_j | x_j; η_i) − ℓ_j), and ℓ(θ_t) = Σ_j w_j ℓ_j / Σ_j w_j;
* **expert M-step**: maximise Σ_j Σ_i w_j r_{ji} log f(y_j | x_j; η_i). Gaussian-linear experts use
  the closed form (weighted least squares, then the weighted residual variance); other experts take
  ``expert_steps`` damped Newton steps (:mod:`moe_theory.fit.newton`), one ascent per expert, since
  the objective separates over experts;
* **gate M-step**: up to ``gate_steps`` damped Newton steps with step halving on
  Q(θ_gate) = Σ_j Σ_i w_j r_{ji} log π_i(x_j; θ_gate), stopping early once a step gains at most
  ``inner_tol``·|Q|. With one step this is a generalised EM; the authors' code [1] iterates the
  gate's Newton/IRLS loop to convergence (up to 300 steps), which ``gate_steps=300`` reproduces.
  The gate's log-weights at the accepted point are carried into the next E-step, so each
  iteration evaluates the gate once per trial point and no more. A top-K gate's selection cannot
  cross a data point in this step: deselecting an expert that holds responsibility there makes
  Q = −∞, so every such step is rejected and EM keeps the selection pattern of its start [2].

Both M-steps never decrease their objectives, so ℓ(θ_t) never decreases. With ``config.bound`` both
Newton M-steps stay in the box [−B, B] of unconstrained coordinates and the start is projected onto
it, so EM climbs towards the maximum over that compact set (:mod:`moe_theory.fit.newton`).

**Stopping rule** [1]: the one of :mod:`moe_theory.fit.solver`, applied by its drivers. A NaN or
infinite log-likelihood or parameter also stops the loop, and the fit then reports
``finite = False`` and ``converged = False``. A final E-step makes the reported log-likelihood that
of the returned parameters, as scikit-learn does.

Everything is pure and jit/vmap-clean: ``tol`` is traced (changing it does not recompile), the
family and the iteration bounds are static (:class:`~moe_theory.fit.settings.EMConfig`).

**Joint likelihood of the Gaussian gate** [8]. With the Gaussian gate π_i(x) ∝ w_i N(x | c_i, Γ_i)
and Σ_i w_i = 1, the pair (x, y) has the joint density p(x, y) = Σ_i w_i N(x | c_i, Γ_i) f(y | x; η_i)
(x drawn from the gate's own mixture, as in [8]). The conditional likelihood identifies the gate
only up to a common shift of the quadratic log-scores (all Γ_i and c_i move together), so [8]'s
parameters are estimated from the joint likelihood: ``EMConfig(likelihood="joint")``. Its
responsibilities are the same r_{ji}; the E-step adds log p(x_j) to ℓ_j, and the gate M-step is the
closed form of a Gaussian mixture: w_i = Σ_j ω_{ji} / Σ_j w_j, c_i the ω-weighted mean of x and
Γ_i the ω-weighted covariance about c_i. The reported log-likelihood is then the joint one.

**Fast path.** For the plain softmax gate with Gaussian-linear experts (small k and d, one gate
step per iteration) :func:`moe_theory.fit.api.em_solver` picks the solver of
:mod:`moe_theory.fit.fast`, which computes the same iteration in one fused pass over the data per
iteration; both solvers run under the same drivers, hence the same stopping rule.
``EMConfig(fast_path=False)`` forces this module's :class:`GenericEM`.

[1] Nguyen, Nguyen, Ho, "Demystifying Softmax Gating Function in Gaussian Mixture of Experts",
NeurIPS 2023, arXiv 2305.03288.
[2] Nguyen, Akbarian, Yan, Ho, "Statistical Perspective of Top-K Sparse Softmax Gating Mixture of
Experts", ICLR 2024, arXiv 2309.13850.
[8] Nguyen, Nguyen, Nguyen, Ho, "Towards Convergence Rates for Parameter Estimation in
Gaussian-gated Mixture of Experts", AISTATS 2024, arXiv 2305.07572.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import linalg
from ..gates import NORMALISERS, gate_scores, log_gate_weights, normalise, selection_mask
from ..models import Family, canonicalize, weighted_sum
from ..params import MoEParams, constrain, field_with_role, fields_with_role, unconstrain
from .newton import FACE_TOLERANCE, autodiff_derivatives, gate_free_mask, newton_ascent
from .settings import EMConfig
from .solver import FitResult, all_finite


def expert_mstep(family: Family, config: EMConfig, params: MoEParams, x, y, omega, total):
    """Maximise Σ_j Σ_i ω_ji log f(y_j | x_j; η_i) over the expert parameters.

    An expert whose update is not finite, as when it holds no responsibility (a top-K expert that
    is never selected) or too few points for its regression, keeps its previous parameters: with
    no data there is nothing to estimate, and keeping them leaves the objective unchanged.
    """
    expert = family.expert
    if expert.has_closed_form_mstep:
        check_bound(family, config)
        new = expert.weighted_mstep(x, y, omega, config.variance_floor)
    else:
        fields = expert.fields

        def one_expert(unconstrained, weight):
            # The objective is a sum of one term per expert, each in that expert's own parameters, so
            # its Hessian is block diagonal: a Newton ascent per expert (vmapped) costs k times less
            # differentiation than one over all experts, and each term still never decreases.
            def objective(own):
                single = {name: value[None] for name, value in constrain(fields, own).items()}
                return weighted_sum(expert.log_prob(single, x, y)[:, 0], weight) / total, None

            def derivatives(own):
                value, gradient, hessian, _ = expert.derivatives_one(own, x, y, weight)
                return value / total, None, gradient / total, hessian / total

            free = {name: jnp.ones_like(value) for name, value in unconstrained.items()}
            updated, _, _ = newton_ascent(
                objective, unconstrained, free, config.expert_steps, config.max_halvings,
                derivatives=derivatives, tolerance=config.inner_tol, bound=config.bound,
            )
            return updated

        new = constrain(fields, jax.vmap(one_expert, in_axes=(0, 1))(unconstrain(fields, params.expert), omega))
        for variance in fields_with_role(fields, "variance"):
            new[variance.name] = jnp.maximum(new[variance.name], config.variance_floor)
    per_expert_finite = jnp.stack(
        [jnp.all(jnp.isfinite(value.reshape(value.shape[0], -1)), axis=1) for value in new.values()]
    ).all(axis=0)
    keep = per_expert_finite & (jnp.sum(omega, axis=0) > 0)
    return {
        name: jnp.where(keep.reshape((-1,) + (1,) * (value.ndim - 1)), value, params.expert[name])
        for name, value in new.items()
    }


def gate_derivatives(family: Family, x, omega, total):
    """Q, log π, ∇Q and ∇²Q of the gate objective Q(u) = Σ_j Σ_i ω_{ji} log π_i(x_j; u) / Σ_j w_j.

    Q depends on u only through the scores s_j = s(x_j; u) ∈ R^k, so by the chain rule, with the
    score Jacobian J_j = ∂s_j/∂u (forward-mode autodiff of the registered score function),

        ∇Q  = Σ_j J_jᵀ g_j,      ∇²Q = Σ_j J_jᵀ A_j J_j + ∇²_u [Σ_j g_jᵀ s_j(u)]  (g_j held fixed),

    where, for the normaliser log π_i = ℓ_i − logsumexp(ℓ), ℓ_i = log φ(s_i) with ℓ' = φ'/φ and
    ℓ'' its derivative, W_j = Σ_i ω_{ji}:

        g_{ji} = (ω_{ji} − W_j π_{ji}) ℓ'_{ji},
        A_j    = −W_j (diag π_j − π_j π_jᵀ) ∘ ℓ'_j ℓ'_jᵀ + diag((ω_{ji} − W_j π_{ji}) ℓ''_{ji}).

    The last Hessian term vanishes for scores affine in u (the plain linear softmax gate) and is
    skipped there. This is the exact Hessian, computed without differentiating through the
    normaliser's exponentials, which dominate the cost on a CPU. A soft top-K selection makes
    log π depend on the slopes outside the scores; its derivatives come from automatic
    differentiation of Q instead.
    """
    gate = family.gate
    fields = gate.fields
    log_phi = NORMALISERS[gate.normaliser].log_phi

    if gate.selection_temperature is not None:
        return autodiff_derivatives(gate_objective(family, x, omega, total))

    def derivatives(unconstrained):
        flat, unravel = ravel_pytree(unconstrained)

        def score_of(flat_u):
            slope, score = gate_scores(gate, constrain(fields, unravel(flat_u)), x)
            return score, slope

        jacobian, slope = jax.jacfwd(score_of, has_aux=True)(flat)  # (n, k, p)
        score = score_of(flat)[0]
        mask = selection_mask(gate, slope, score)
        log_pi = normalise(gate, score, mask)
        pi = jnp.exp(log_pi)
        ones = jnp.ones_like(score)
        first = jax.jvp(log_phi, (score,), (ones,))[1]
        second = jax.jvp(lambda s: jax.jvp(log_phi, (s,), (ones,))[1], (score,), (ones,))[1]
        total_weight = jnp.sum(omega, axis=-1)
        residual = omega - total_weight[:, None] * pi
        if mask is not None:
            residual = jnp.where(mask, residual, 0.0)
        score_gradient = residual * first  # g_j, (n, k)
        gradient = jnp.einsum("nk,nkp->p", score_gradient, jacobian)
        # J_jᵀ A_j J_j = Σ_i a_ji J_ji J_jiᵀ − W_j v_j v_jᵀ with v_j = Σ_i π_ji ℓ'_ji J_ji.
        diagonal = residual * second - total_weight[:, None] * pi * first**2
        projected = jnp.einsum("nk,nkp->np", pi * first, jacobian)
        hessian = jnp.einsum("nkp,nkq->pq", jacobian * diagonal[..., None], jacobian) + jnp.einsum(
            "np,nq->pq", projected * total_weight[:, None], projected
        )
        if not gate.affine_in_parameters:
            fixed = jax.lax.stop_gradient(score_gradient)
            hessian = hessian + jax.hessian(lambda f: jnp.sum(fixed * score_of(f)[0]))(flat)
        value = weighted_sum(log_pi, omega)
        return value / total, log_pi, gradient / total, hessian / total

    return derivatives


def check_joint_likelihood(family: Family) -> None:
    """Raise unless ``family`` has the plain Gaussian gate that the joint likelihood needs."""
    gate = family.gate
    plain = (gate.score == "gaussian" and gate.normaliser == "softmax" and gate.transform is None
             and gate.activation is None and gate.temperature is None
             and (gate.top_k is None or gate.top_k >= family.num_experts))
    if not plain:
        raise ValueError(
            "likelihood='joint' needs the plain Gaussian gate (preset 'gaussian': π_i ∝ w_i N(x | c_i, Γ_i), "
            f"without transform, activation, temperature or top-K); got {gate}"
        )


def check_bound(family: Family, config: EMConfig) -> None:
    """Refuse ``config.bound`` where the M-step cannot keep it: a closed-form expert M-step (weighted
    least squares has no box) and the joint likelihood's closed-form gate M-step."""
    if config.bound is None:
        return
    if family.expert.has_closed_form_mstep:
        raise ValueError(f"bound: the {type(family.expert).__name__} expert's closed-form M-step has no box; "
                         "a bound is for experts fitted by Newton steps (multinomial logistic, nonlinear)")
    if config.likelihood == "joint":
        raise ValueError("bound: the joint likelihood's closed-form gate M-step has no box")


def project_params(family: Family, params: MoEParams, bound: float | None) -> MoEParams:
    """``params`` with every unconstrained coordinate clipped to [−B, B] (unchanged without a bound)."""
    if bound is None:
        return params
    gate, expert = (
        constrain(fields, {name: jnp.clip(value, -bound, bound) for name, value in unconstrain(fields, group).items()})
        for fields, group in ((family.gate.fields, params.gate), (family.expert.fields, params.expert))
    )
    return MoEParams(gate, expert)


def on_box(family: Family, params: MoEParams, bound: float) -> jnp.ndarray:
    """For a batch of fits, whether some unconstrained coordinate lies on the box |u| = ``bound``
    (the fit is then a maximum over the box, not an interior stationary point)."""

    def one(fitted):
        flat, _ = ravel_pytree(
            [unconstrain(family.gate.fields, fitted.gate), unconstrain(family.expert.fields, fitted.expert)]
        )
        return jnp.any(jnp.abs(flat) >= bound * (1 - FACE_TOLERANCE))

    return jax.vmap(one)(params)


def joint_log_gate(family: Family, gate_params, x) -> jnp.ndarray:
    """log(w_i N(x_j | c_i, Γ_i)), (n, k): the gate's full scores, which the joint E-step uses unnormalised."""
    return gate_scores(family.gate, gate_params, x)[1]


def log_gate_at(family: Family, config: EMConfig, gate_params, x) -> jnp.ndarray:
    """What the E-step adds to each expert's log-density: log π(x) at ``gate_params``, or under the
    joint likelihood the Gaussian gate's joint log-scores."""
    if config.likelihood == "joint":
        return joint_log_gate(family, gate_params, x)
    return log_gate_weights(family.gate, gate_params, x)


def gaussian_gate_mstep(family: Family, config: EMConfig, params: MoEParams, x, omega, total):
    """Closed-form joint-likelihood M-step of the Gaussian gate [8] (see the module docstring).

    ``variance_floor`` is added to the diagonal of every covariance. A component with no
    responsibility, or whose covariance is not positive definite (fewer distinct points than
    dimensions), keeps its previous centre and covariance.
    """
    mass = jnp.sum(omega, axis=0)  # (k,)
    centre = jnp.einsum("nk,nd->kd", omega, x) / mass[:, None]
    residual = x[:, None, :] - centre[None]  # (n, k, d)
    covariance = jnp.einsum("nk,nkd,nke->kde", omega, residual, residual) / mass[:, None, None]
    covariance = covariance + config.variance_floor * jnp.eye(x.shape[1], dtype=x.dtype)
    valid = (mass > 0) & jnp.all(jnp.isfinite(linalg.cholesky(covariance)), axis=(1, 2))
    fields = family.gate.fields
    weight_name, centre_name, covariance_name = (
        field_with_role(fields, role).name for role in ("weight", "location", "covariance")
    )
    gate = {
        **params.gate,
        weight_name: mass / total,
        centre_name: jnp.where(valid[:, None], centre, params.gate[centre_name]),
        covariance_name: jnp.where(valid[:, None, None], covariance, params.gate[covariance_name]),
    }
    return gate, joint_log_gate(family, gate, x)


def gate_objective(family: Family, x, omega, total):
    """Q(u) = Σ_j Σ_i ω_ji log π_i(x_j; u) / Σ_j w_j in the gate's unconstrained coordinates u, with
    log π as its auxiliary output."""
    fields = family.gate.fields

    def objective(unconstrained):
        log_pi = log_gate_weights(family.gate, constrain(fields, unconstrained), x)
        return weighted_sum(log_pi, omega) / total, log_pi

    return objective


def gate_mstep(family: Family, config: EMConfig, params: MoEParams, log_gate, x, omega, total):
    """Maximise Σ_j Σ_i ω_ji log π_i(x_j) over the gate: the closed form of the joint likelihood, else
    ``config.gate_steps`` damped Newton steps (see the module docstring). Returns the new gate
    parameters and log π (or the joint log-scores) at them, for the next E-step."""
    if config.likelihood == "joint":
        return gaussian_gate_mstep(family, config, params, x, omega, total)
    fields = family.gate.fields
    objective = gate_objective(family, x, omega, total)
    if config.gate_steps == 0:
        return params.gate, log_gate
    start = unconstrain(fields, params.gate)
    updated, _, log_pi = newton_ascent(
        objective,
        start,
        gate_free_mask(family, start),
        config.gate_steps,
        config.max_halvings,
        derivatives=gate_derivatives(family, x, omega, total),
        tolerance=config.inner_tol,
        bound=config.bound,
    )
    return constrain(fields, updated), log_pi


def e_step(family: Family, params: MoEParams, log_gate, x, y, weights, total):
    """ℓ(θ) = Σ_j w_j ℓ_j / Σ_j w_j and ω_ji = w_j r_ji, from the gate's log-weights ``log_gate`` at θ."""
    joint = log_gate + family.expert.log_prob(params.expert, x, y)
    per_sample = jax.nn.logsumexp(joint, axis=-1)
    log_likelihood = weighted_sum(per_sample, weights) / total
    omega = jnp.where(weights[:, None] > 0, weights[:, None] * jnp.exp(joint - per_sample[:, None]), 0.0)
    return log_likelihood, omega


class EMData(NamedTuple):
    """The data of one EM fit, prepared by :func:`prepare`: padding rows zeroed, weights explicit."""

    x: jnp.ndarray
    y: jnp.ndarray
    weights: jnp.ndarray
    total: jnp.ndarray  # Σ_j w_j


class EMState(NamedTuple):
    """The generic EM iteration's state (the solver-state fields of :mod:`moe_theory.fit.solver`)."""

    params: MoEParams
    log_gate: jnp.ndarray  # log π(x) at params.gate, reused by the next E-step
    log_likelihood: jnp.ndarray  # ℓ at params (computed by the E-step of the next iteration)
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray


def prepare(family: Family, config: EMConfig, params0: MoEParams, x, y, weights) -> tuple[EMData, EMState]:
    """The prepared data and the generic state before the first iteration, in the dtype of ``params0``.

    Padding rows (weight 0) may hold anything; they are zeroed so that they cannot inject NaN via
    0·NaN. The start is put in canonical form, and projected onto the box of ``config.bound``. Every
    solver but the fast path starts from here.
    """
    dtype = jax.tree_util.tree_leaves(params0)[0].dtype
    weights = jnp.ones(x.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
    padded = weights > 0
    x = jnp.where(padded[:, None], x, 0.0).astype(dtype)
    y = jnp.where(padded, y, 0).astype(y.dtype)
    check_bound(family, config)
    params0 = project_params(family, canonicalize(family, params0), config.bound)
    if config.likelihood == "joint":
        check_joint_likelihood(family)
    log_gate = log_gate_at(family, config, params0.gate, x)
    nan = jnp.asarray(jnp.nan, dtype)
    state = EMState(params0, log_gate, nan, nan, jnp.asarray(0), all_finite(params0))
    return EMData(x, y, weights, jnp.sum(weights)), state


@dataclass(frozen=True)
class GenericEM:
    """The generic EM iteration of the module docstring, as a solver of :mod:`moe_theory.fit.solver`."""

    family: Family
    config: EMConfig

    @property
    def max_iter(self) -> int:
        return self.config.max_iter

    def init(self, params0: MoEParams, x, y, weights) -> tuple[EMData, EMState]:
        return prepare(self.family, self.config, params0, x, y, weights)

    def step(self, data: EMData, state: EMState, active) -> EMState:
        del active  # the generic iteration has no replicate-dependent work to skip
        family, config = self.family, self.config
        log_likelihood, omega = e_step(family, state.params, state.log_gate, data.x, data.y, data.weights, data.total)
        expert = expert_mstep(family, config, state.params, data.x, data.y, omega, data.total)
        gate, log_gate = gate_mstep(family, config, state.params, state.log_gate, data.x, omega, data.total)
        params = MoEParams(gate, expert)
        return EMState(
            params=params,
            log_gate=log_gate,
            log_likelihood=log_likelihood,
            previous=state.log_likelihood,
            iteration=state.iteration + 1,
            finite=jnp.isfinite(log_likelihood) & all_finite(params),
        )

    def finish(self, data: EMData, state: EMState, converged) -> FitResult:
        final_log_likelihood, _ = e_step(
            self.family, state.params, state.log_gate, data.x, data.y, data.weights, data.total
        )
        finite = state.finite & jnp.isfinite(final_log_likelihood) & all_finite(state.params)
        return FitResult(
            params=canonicalize(self.family, state.params),
            log_likelihood=final_log_likelihood,
            n_iter=state.iteration,
            converged=converged & finite,
            finite=finite,
        )
