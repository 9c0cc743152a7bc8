"""Expectation–maximisation for gated mixtures of experts, as one compiled loop (THEORY.md §3).

For data (x_j, y_j) with sample weights w_j ≥ 0 (0 marks padding), one EM iteration from θ_t is

* **E-step** (log space): ℓ_j = logsumexp_i [log π_i(x_j) + log f(y_j | x_j; η_i)],
  r_{ji} = exp(log π_i(x_j) + log f(y_j | x_j; η_i) − ℓ_j), and ℓ(θ_t) = Σ_j w_j ℓ_j / Σ_j w_j;
* **expert M-step**: maximise Σ_j Σ_i w_j r_{ji} log f(y_j | x_j; η_i). Gaussian-linear experts use
  the closed form (weighted least squares, then the weighted residual variance); other experts take
  ``expert_steps`` damped Newton steps (:mod:`moe_theory.fit.newton`);
* **gate M-step**: up to ``gate_steps`` damped Newton steps with step halving on
  Q(θ_gate) = Σ_j Σ_i w_j r_{ji} log π_i(x_j; θ_gate), stopping early once a step gains at most
  ``inner_tol``·|Q|. With one step this is a generalised EM; the authors' code [1] iterates the
  gate's Newton/IRLS loop to convergence (up to 300 steps), which ``gate_steps=300`` reproduces.
  The gate's log-weights at the accepted point are carried into the next E-step, so each
  iteration evaluates the gate once per trial point and no more. A top-K gate's selection cannot
  cross a data point in this step: deselecting an expert that holds responsibility there makes
  Q = −∞, so every such step is rejected and EM keeps the selection pattern of its start [2].

Both M-steps never decrease their objectives, so ℓ(θ_t) never decreases.

**Stopping rule** [1]: stop when |ℓ(θ_t) − ℓ(θ_{t−1})| ≤ tol·|ℓ(θ_{t−1})| (``converged``) or after
``max_iter`` iterations. A NaN or infinite log-likelihood or parameter also stops the loop, and the
fit then reports ``finite = False`` and ``converged = False``: since ``NaN ≤ tol`` is False, a NaN
can never be mistaken for convergence. A final E-step makes the reported log-likelihood that of the
returned parameters, as scikit-learn does.

Everything is pure and jit/vmap-clean: ``tol`` is traced (changing it does not recompile), the
family and the iteration bounds are static.

**Joint likelihood of the Gaussian gate** [8]. With the Gaussian gate π_i(x) ∝ w_i N(x | c_i, Γ_i)
and Σ_i w_i = 1, the pair (x, y) has the joint density p(x, y) = Σ_i w_i N(x | c_i, Γ_i) f(y | x; η_i)
(x drawn from the gate's own mixture, as in [8]). The conditional likelihood identifies the gate
only up to a common shift of the quadratic log-scores (all Γ_i and c_i move together), so [8]'s
parameters are estimated from the joint likelihood: ``EMConfig(likelihood="joint")``. Its
responsibilities are the same r_{ji}; the E-step adds log p(x_j) to ℓ_j, and the gate M-step is the
closed form of a Gaussian mixture: w_i = Σ_j ω_{ji} / Σ_j w_j, c_i the ω-weighted mean of x and
Γ_i the ω-weighted covariance about c_i. The reported log-likelihood is then the joint one.

**Fast path.** For the plain softmax gate with Gaussian-linear experts (small k and d, one gate
step per iteration) :func:`fit_em` and :func:`fit_em_trace` run :mod:`moe_theory.fit.fast`, which
computes the same iteration in one fused pass over the data per iteration; both paths share the
loop drivers below, hence the stopping rule. ``EMConfig(fast_path=False)`` forces this module's
generic iteration.

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
from ..params import MoEParams
from .compiling import jit_fit
from .newton import constrain, gate_free_mask, newton_ascent, unconstrain


LIKELIHOODS = ("conditional", "joint")


@dataclass(frozen=True)
class EMConfig:
    """Static EM settings (changing one recompiles).

    Attributes:
        max_iter: at most this many EM iterations (the authors use 2000 [1]).
        gate_steps: damped Newton steps on the gate per iteration (1: generalised EM; the authors
            iterate to convergence, up to 300).
        expert_steps: Newton steps for experts without a closed-form M-step.
        inner_tol: the gate's (and such experts') Newton loop stops early once a step gains at most
            ``inner_tol``·|Q| (:func:`moe_theory.fit.newton.newton_ascent`), so ``gate_steps=300``
            costs only the steps that still move.
        max_halvings: step halvings tried per Newton step.
        variance_floor: lower bound on fitted Gaussian variances; 0 returns the exact MLE, under
            which an over-fitted expert may collapse onto one point (reported as ``finite=False``).
        likelihood: ``"conditional"`` (log p(y | x), the default) or ``"joint"`` (log p(x, y) under
            the Gaussian gate's input mixture [8]; plain Gaussian gate only, see the module docstring).
        fast_path: use :mod:`moe_theory.fit.fast` where it applies (softmax gate without
            activation, temperature or top-K, Gaussian-linear experts, 2 ≤ k ≤ 6, d ≤ 4,
            ``gate_steps == 1``). It computes the same iteration; False forces the generic path.
    """

    max_iter: int = 2000
    gate_steps: int = 1
    expert_steps: int = 1
    inner_tol: float = 1e-12
    max_halvings: int = 20
    variance_floor: float = 0.0
    likelihood: str = "conditional"
    fast_path: bool = True

    def __post_init__(self) -> None:
        for name in ("max_iter", "gate_steps", "expert_steps", "max_halvings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "max_iter" else 0):
                raise ValueError(f"{name}: expected a non-negative integer (max_iter ≥ 1), got {value!r}")
        if not self.inner_tol >= 0:
            raise ValueError(f"inner_tol: expected ≥ 0, got {self.inner_tol!r}")
        if not self.variance_floor >= 0:
            raise ValueError(f"variance_floor: expected ≥ 0, got {self.variance_floor!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not isinstance(self.fast_path, bool):
            raise ValueError(f"fast_path: expected True or False, got {self.fast_path!r}")


class FitResult(NamedTuple):
    """Outcome of one fit (fields gain leading batch axes under ``vmap``).

    Attributes:
        params: fitted parameters, in canonical form.
        log_likelihood: average log-likelihood Σ w_j ℓ_j / Σ w_j at ``params``.
        n_iter: number of EM iterations performed.
        converged: the relative-change rule was met before ``max_iter``, with finite values.
        finite: every parameter and the log-likelihood are finite.
    """

    params: MoEParams
    log_likelihood: jnp.ndarray
    n_iter: jnp.ndarray
    converged: jnp.ndarray
    finite: jnp.ndarray


class _State(NamedTuple):
    params: MoEParams
    log_gate: jnp.ndarray  # log π(x) at params.gate, reused by the next E-step
    log_likelihood: jnp.ndarray  # ℓ at params (computed by the E-step of the next iteration)
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray


def expert_mstep(family: Family, config: EMConfig, params: MoEParams, x, y, omega, total):
    """Maximise Σ_j Σ_i ω_ji log f(y_j | x_j; η_i) over the expert parameters.

    An expert whose update is not finite, as when it holds no responsibility (a top-K expert that
    is never selected) or too few points for its regression, keeps its previous parameters: with
    no data there is nothing to estimate, and keeping them leaves the objective unchanged.
    """
    expert = family.expert
    if expert.has_closed_form_mstep:
        new = expert.weighted_mstep(x, y, omega, config.variance_floor)
    else:
        fields = expert.fields

        def objective(unconstrained):
            log_f = expert.log_prob(constrain(fields, unconstrained), x, y)
            return weighted_sum(log_f, omega) / total, None

        start = unconstrain(fields, params.expert)
        free = {name: jnp.ones_like(value) for name, value in start.items()}
        updated, _, _ = newton_ascent(
            objective, start, free, config.expert_steps, config.max_halvings, tolerance=config.inner_tol
        )
        new = constrain(fields, updated)
        if "nu" in new:
            new["nu"] = jnp.maximum(new["nu"], config.variance_floor)
    per_expert_finite = jnp.stack(
        [jnp.all(jnp.isfinite(value.reshape(value.shape[0], -1)), axis=1) for value in new.values()]
    ).all(axis=0)
    keep = per_expert_finite & (jnp.sum(omega, axis=0) > 0)
    return {
        name: jnp.where(keep.reshape((-1,) + (1,) * (value.ndim - 1)), value, params.expert[name])
        for name, value in new.items()
    }


def _gate_derivatives(family: Family, x, omega, total):
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
    normaliser's exponentials, which dominate the cost on a CPU.
    """
    gate = family.gate
    fields = gate.fields
    log_phi = NORMALISERS[gate.normaliser].log_phi

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


def joint_log_gate(family: Family, gate_params, x) -> jnp.ndarray:
    """log(w_i N(x_j | c_i, Γ_i)), (n, k): the gate's full scores, which the joint E-step uses unnormalised."""
    return gate_scores(family.gate, gate_params, x)[1]


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
    gate = {
        "weight": mass / total,
        "centre": jnp.where(valid[:, None], centre, params.gate["centre"]),
        "covariance": jnp.where(valid[:, None, None], covariance, params.gate["covariance"]),
    }
    return gate, joint_log_gate(family, gate, x)


def gate_mstep(family: Family, config: EMConfig, params: MoEParams, log_gate, x, omega, total):
    if config.likelihood == "joint":
        return gaussian_gate_mstep(family, config, params, x, omega, total)
    fields = family.gate.fields

    def objective(unconstrained):
        log_pi = log_gate_weights(family.gate, constrain(fields, unconstrained), x)
        return weighted_sum(log_pi, omega) / total, log_pi

    if config.gate_steps == 0:
        return params.gate, log_gate
    start = unconstrain(fields, params.gate)
    updated, _, log_pi = newton_ascent(
        objective,
        start,
        gate_free_mask(family, start),
        config.gate_steps,
        config.max_halvings,
        derivatives=_gate_derivatives(family, x, omega, total),
        tolerance=config.inner_tol,
    )
    return constrain(fields, updated), log_pi


def _e_step(family: Family, params: MoEParams, log_gate, x, y, weights, total):
    joint = log_gate + family.expert.log_prob(params.expert, x, y)
    per_sample = jax.nn.logsumexp(joint, axis=-1)
    log_likelihood = weighted_sum(per_sample, weights) / total
    omega = jnp.where(weights[:, None] > 0, weights[:, None] * jnp.exp(joint - per_sample[:, None]), 0.0)
    return log_likelihood, omega


def _all_finite(tree) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _em_iteration(family: Family, config: EMConfig, x, y, weights, total, state: _State) -> _State:
    log_likelihood, omega = _e_step(family, state.params, state.log_gate, x, y, weights, total)
    expert = expert_mstep(family, config, state.params, x, y, omega, total)
    gate, log_gate = gate_mstep(family, config, state.params, state.log_gate, x, omega, total)
    params = MoEParams(gate, expert)
    return _State(
        params=params,
        log_gate=log_gate,
        log_likelihood=log_likelihood,
        previous=state.log_likelihood,
        iteration=state.iteration + 1,
        finite=jnp.isfinite(log_likelihood) & _all_finite(params),
    )


def relative_change_converged(value, previous, iteration, tol) -> jnp.ndarray:
    """The stopping rule of [1]: |ℓ_t − ℓ_{t−1}| ≤ tol·|ℓ_{t−1}| after at least two iterations.

    False whenever either value is NaN, so a NaN can never count as converged.
    """
    return (iteration >= 2) & (jnp.abs(value - previous) <= tol * jnp.abs(previous))


def _has_converged(state, tol) -> jnp.ndarray:
    return relative_change_converged(state.log_likelihood, state.previous, state.iteration, tol)


def _prepare(family: Family, config: EMConfig, params0: MoEParams, x, y, weights):
    dtype = jax.tree_util.tree_leaves(params0)[0].dtype
    weights = jnp.ones(x.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
    padded = weights > 0
    # Padding rows may hold anything; zero them so that 0-weight rows cannot inject NaN via 0·NaN.
    x = jnp.where(padded[:, None], x, 0.0).astype(dtype)
    y = jnp.where(padded, y, 0).astype(y.dtype)
    params0 = canonicalize(family, params0)
    if config.likelihood == "joint":
        check_joint_likelihood(family)
        log_gate = joint_log_gate(family, params0.gate, x)
    else:
        log_gate = log_gate_weights(family.gate, params0.gate, x)
    nan = jnp.asarray(jnp.nan, dtype)
    state = _State(params0, log_gate, nan, nan, jnp.asarray(0), _all_finite(params0))
    return x, y, weights, jnp.sum(weights), state


def _finish(family: Family, state: _State, converged, x, y, weights, total) -> FitResult:
    final_log_likelihood, _ = _e_step(family, state.params, state.log_gate, x, y, weights, total)
    finite = state.finite & jnp.isfinite(final_log_likelihood) & _all_finite(state.params)
    return FitResult(
        params=canonicalize(family, state.params),
        log_likelihood=final_log_likelihood,
        n_iter=state.iteration,
        converged=converged & finite,
        finite=finite,
    )


def _generic_problem(family: Family, config: EMConfig, params0: MoEParams, x, y, weights):
    """(initial state, iterate, finish) of this module's generic iteration, for the drivers below."""
    x, y, weights, total, initial = _prepare(family, config, params0, x, y, weights)

    def iterate(state: _State, active) -> _State:
        del active  # the generic iteration has no replicate-dependent work to skip
        return _em_iteration(family, config, x, y, weights, total, state)

    def finish(state: _State, converged) -> FitResult:
        return _finish(family, state, converged, x, y, weights, total)

    return initial, iterate, finish


def _problem(family: Family, config: EMConfig, params0: MoEParams, x, y, weights):
    # Imported here because the fast path builds on this module's helpers (FitResult, _prepare).
    from .fast import fast_em_problem, fast_path_applies

    build = fast_em_problem if fast_path_applies(family, config) else _generic_problem
    return build(family, config, params0, x, y, weights)


@jit_fit(("family", "config"))
def fit_em(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = 1e-6,
    config: EMConfig = EMConfig(),
) -> FitResult:
    """Fit one dataset by EM from ``params0``.

    Args:
        family: model family (static).
        params0: starting parameters (put in canonical form first).
        x: (n, d) inputs; y: (n,) responses; weights: optional (n,) sample weights ≥ 0, or a
            boolean mask of the rows to fit (False marks padding), which the fast path sums as
            cheaply as unit weights.
        tol: relative log-likelihood change at which to stop (traced).
        config: static :class:`EMConfig`.

    Returns:
        :class:`FitResult`. Batch with ``jax.vmap`` or :func:`moe_theory.fit.fit_batch`.
    """
    initial, iterate, finish = _problem(family, config, params0, x, y, weights)

    def keep_going(state):
        return (state.iteration < config.max_iter) & state.finite & ~_has_converged(state, tol)

    # Under vmap the body also runs for replicates that have stopped (their results are discarded);
    # ``active`` lets an iteration skip replicate-dependent extra work for them.
    state = jax.lax.while_loop(keep_going, lambda s: iterate(s, keep_going(s)), initial)
    return finish(state, _has_converged(state, tol))


@jit_fit(("family", "config"))
def fit_em_trace(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = 1e-6,
    config: EMConfig = EMConfig(),
) -> tuple[FitResult, jnp.ndarray]:
    """Like :func:`fit_em`, but also return the log-likelihood path.

    Runs ``config.max_iter`` scan steps and freezes the state once the stopping rule holds, so the
    result equals :func:`fit_em`'s. The trace holds ℓ(θ_t) for t = 0 .. max_iter − 1, with NaN
    after the fit stopped.
    """
    initial, iterate, finish = _problem(family, config, params0, x, y, weights)

    def step(state, _):
        active = state.finite & ~_has_converged(state, tol)
        new = iterate(state, active)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
        return state, jnp.where(active, state.log_likelihood, jnp.nan)

    state, trace = jax.lax.scan(step, initial, length=config.max_iter)
    return finish(state, _has_converged(state, tol)), trace
