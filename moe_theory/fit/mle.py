"""Direct maximum likelihood by quasi-Newton (L-BFGS), for any family (``docs/estimators.md``).

Maximises the weighted average log-likelihood

    ℓ(u) = Σ_j w_j log p(y_j | x_j; θ(u)) / Σ_j w_j

over unconstrained coordinates u (log-variances, log-τ, log-Cholesky covariances; see
:mod:`moe_theory.fit.newton`) with ``optax.lbfgs`` and its zoom line search (strong Wolfe
conditions [Nocedal & Wright 2006, Alg. 3.5]). The reference expert's gate coordinates of a
softmax-type gate and a fixed τ stay at their starting values, as in EM. It needs no M-step, so it
fits models without a convenient EM and cross-checks EM: on a well-posed problem both reach the
same log-likelihood.

L-BFGS is a solver of :mod:`moe_theory.fit.solver`, so its stopping rule is EM's: the relative
change of ℓ between iterations is at most ``tol``, or ``max_iter`` iterations. A NaN stops the loop and is reported ``finite = False``,
``converged = False``. A run that ends below its starting log-likelihood (L-BFGS assumes a smooth
ℓ; a top-K gate's ℓ jumps where the selection changes) returns its start with
``converged = False``, so the fitter never reports a worse point than it was given.

[2] Nguyen, Akbarian, Yan, Ho, "Statistical Perspective of Top-K Sparse Softmax Gating Mixture of
Experts", ICLR 2024, arXiv 2309.13850.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..models import Family, canonicalize, log_likelihood
from ..params import MoEParams
from ..params import constrain, unconstrain
from .newton import gate_free_mask
from .settings import LBFGS_DEFAULTS
from .solver import FitResult, all_finite, run_solver


def _to_unconstrained(family: Family, params: MoEParams) -> MoEParams:
    return MoEParams(unconstrain(family.gate.fields, params.gate), unconstrain(family.expert.fields, params.expert))


def _to_constrained(family: Family, unconstrained: MoEParams) -> MoEParams:
    return MoEParams(
        constrain(family.gate.fields, unconstrained.gate), constrain(family.expert.fields, unconstrained.expert)
    )


class LBFGSData(NamedTuple):
    """The data of one L-BFGS fit: padding rows zeroed, and the unconstrained start, whose fixed
    coordinates (``free`` = 0) the fit keeps."""

    x: jnp.ndarray
    y: jnp.ndarray
    weights: jnp.ndarray
    start: MoEParams
    free: MoEParams
    start_log_likelihood: jnp.ndarray


class LBFGSState(NamedTuple):
    """L-BFGS's state: the point, optax's state, and the solver-state fields (ℓ = −objective)."""

    point: MoEParams
    optimizer_state: Any
    log_likelihood: jnp.ndarray
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray


@dataclass(frozen=True)
class LBFGS:
    """Direct maximum likelihood by ``optax.lbfgs``, as a solver of :mod:`moe_theory.fit.solver`."""

    family: Family
    max_iter: int = LBFGS_DEFAULTS.max_iter
    memory_size: int = LBFGS_DEFAULTS.memory_size

    def _optimizer(self):
        return optax.lbfgs(memory_size=self.memory_size)

    def _negative_log_likelihood(self, data: LBFGSData):
        def negative_log_likelihood(u):
            # Fixed coordinates are taken from the start, so their gradient is exactly zero.
            u = jax.tree_util.tree_map(lambda value, s, m: jnp.where(m > 0, value, s), u, data.start, data.free)
            return -log_likelihood(self.family, _to_constrained(self.family, u), data.x, data.y, data.weights)

        return negative_log_likelihood

    def init(self, params0: MoEParams, x, y, weights) -> tuple[LBFGSData, LBFGSState]:
        family = self.family
        dtype = jax.tree_util.tree_leaves(params0)[0].dtype
        weights = jnp.ones(x.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
        x = jnp.where(weights[:, None] > 0, x, 0.0).astype(dtype)
        y = jnp.where(weights > 0, y, 0).astype(y.dtype)
        start = _to_unconstrained(family, canonicalize(family, params0))
        free = MoEParams(gate_free_mask(family, start.gate), {k: jnp.ones_like(v) for k, v in start.expert.items()})
        unscored = LBFGSData(x, y, weights, start, free, jnp.asarray(jnp.nan, dtype))
        initial_value = self._negative_log_likelihood(unscored)(start)
        data = unscored._replace(start_log_likelihood=-initial_value)
        nan = jnp.asarray(jnp.nan, dtype)
        state = LBFGSState(
            point=start,
            optimizer_state=self._optimizer().init(start),
            log_likelihood=-initial_value,
            previous=nan,
            iteration=jnp.asarray(0),
            finite=jnp.isfinite(initial_value),
        )
        return data, state

    def step(self, data: LBFGSData, state: LBFGSState, active) -> LBFGSState:
        del active  # an L-BFGS iteration has no replicate-dependent work to skip
        negative_log_likelihood = self._negative_log_likelihood(data)
        optimizer = self._optimizer()
        value_and_grad = optax.value_and_grad_from_state(negative_log_likelihood)
        value, gradient = value_and_grad(state.point, state=state.optimizer_state)
        updates, optimizer_state = optimizer.update(
            gradient, state.optimizer_state, state.point, value=value, grad=gradient, value_fn=negative_log_likelihood
        )
        new_value = optax.tree.get(optimizer_state, "value")
        return LBFGSState(
            point=optax.apply_updates(state.point, updates),
            optimizer_state=optimizer_state,
            log_likelihood=-new_value,
            previous=state.log_likelihood,
            iteration=state.iteration + 1,
            finite=jnp.isfinite(new_value),
        )

    def finish(self, data: LBFGSData, state: LBFGSState, converged) -> FitResult:
        family = self.family
        u = jax.tree_util.tree_map(lambda value, s, m: jnp.where(m > 0, value, s), state.point, data.start, data.free)
        params = canonicalize(family, _to_constrained(family, u))
        final = log_likelihood(family, params, data.x, data.y, data.weights)
        # A maximiser must not end below its start; L-BFGS can where ℓ is discontinuous (a top-K gate's
        # selection boundaries [2]), and then the start is returned, flagged as not converged. A NaN
        # end is left as it is, to be reported finite = False.
        start_log_likelihood = data.start_log_likelihood
        below_start = jnp.isfinite(start_log_likelihood) & jnp.isfinite(final) & (final < start_log_likelihood)
        params = jax.tree_util.tree_map(
            lambda fitted, initial: jnp.where(below_start, initial, fitted), params, _to_constrained(family, data.start)
        )
        final = jnp.where(below_start, start_log_likelihood, final)
        finite = jnp.isfinite(final) & all_finite(params)
        return FitResult(
            params=params,
            log_likelihood=final,
            n_iter=state.iteration,
            converged=converged & finite & ~below_start,
            finite=finite,
        )


@partial(jax.jit, static_argnames=("family", "max_iter", "memory_size"))
def fit_mle(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = LBFGS_DEFAULTS.tol,
    max_iter: int = LBFGS_DEFAULTS.max_iter,
    memory_size: int = LBFGS_DEFAULTS.memory_size,
) -> FitResult:
    """Fit one dataset by L-BFGS on the log-likelihood from ``params0``.

    Args:
        family: model family (static).
        params0: starting parameters.
        x: (n, d) inputs; y: (n,) responses; weights: optional (n,) sample weights ≥ 0 or a
            boolean mask (False marks padding).
        tol: relative log-likelihood change at which to stop (traced). L-BFGS takes many cheap
            steps, so its default is tighter than EM's.
        max_iter: iteration bound (static).
        memory_size: L-BFGS history length (static).

    Returns:
        :class:`moe_theory.fit.FitResult` (``n_iter`` counts L-BFGS iterations).
    """
    return run_solver(LBFGS(family, max_iter, memory_size), params0, x, y, weights, tol)
