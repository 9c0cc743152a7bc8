"""Direct maximum likelihood by quasi-Newton (L-BFGS), for any family (THEORY.md §3).

Maximises the weighted average log-likelihood

    ℓ(u) = Σ_j w_j log p(y_j | x_j; θ(u)) / Σ_j w_j

over unconstrained coordinates u (log-variances, log-τ, log-Cholesky covariances; see
:mod:`moe_theory.fit.newton`) with ``optax.lbfgs`` and its zoom line search (strong Wolfe
conditions [Nocedal & Wright 2006, Alg. 3.5]). The reference expert's gate coordinates of a
softmax-type gate and a fixed τ stay at their starting values, as in EM. It needs no M-step, so it
fits models without a convenient EM and cross-checks EM: on a well-posed problem both reach the
same log-likelihood.

Stopping rule, as in EM: the relative change of ℓ between iterations is at most ``tol``, or
``max_iter`` iterations. A NaN stops the loop and is reported ``finite = False``,
``converged = False``. A run that ends below its starting log-likelihood (L-BFGS assumes a smooth
ℓ; a top-K gate's ℓ jumps where the selection changes) returns its start with
``converged = False``, so the fitter never reports a worse point than it was given.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from ..models import Family, canonicalize, log_likelihood
from ..params import MoEParams
from .em import FitResult, _all_finite, relative_change_converged
from .newton import constrain, gate_free_mask, unconstrain


def _to_unconstrained(family: Family, params: MoEParams) -> MoEParams:
    return MoEParams(unconstrain(family.gate.fields, params.gate), unconstrain(family.expert.fields, params.expert))


def _to_constrained(family: Family, unconstrained: MoEParams) -> MoEParams:
    return MoEParams(
        constrain(family.gate.fields, unconstrained.gate), constrain(family.expert.fields, unconstrained.expert)
    )


@partial(jax.jit, static_argnames=("family", "max_iter", "memory_size"))
def fit_mle(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = 1e-10,
    max_iter: int = 500,
    memory_size: int = 10,
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
    dtype = jax.tree_util.tree_leaves(params0)[0].dtype
    weights = jnp.ones(x.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
    x = jnp.where(weights[:, None] > 0, x, 0.0).astype(dtype)
    y = jnp.where(weights > 0, y, 0).astype(y.dtype)
    start = _to_unconstrained(family, canonicalize(family, params0))
    free = MoEParams(gate_free_mask(family, start.gate), {k: jnp.ones_like(v) for k, v in start.expert.items()})

    def negative_log_likelihood(u):
        # Fixed coordinates are taken from the start, so their gradient is exactly zero.
        u = jax.tree_util.tree_map(lambda value, s, m: jnp.where(m > 0, value, s), u, start, free)
        return -log_likelihood(family, _to_constrained(family, u), x, y, weights)

    optimizer = optax.lbfgs(memory_size=memory_size)
    value_and_grad = optax.value_and_grad_from_state(negative_log_likelihood)

    def step(carry):
        u, state, value, _, iteration = carry
        value_new, gradient = value_and_grad(u, state=state)
        updates, state = optimizer.update(
            gradient, state, u, value=value_new, grad=gradient, value_fn=negative_log_likelihood
        )
        u = optax.apply_updates(u, updates)
        new_value = optax.tree.get(state, "value")
        return u, state, new_value, value, iteration + 1

    def keep_going(carry):
        _, _, value, previous, iteration = carry
        converged = relative_change_converged(value, previous, iteration, tol)
        return (iteration < max_iter) & jnp.isfinite(value) & ~converged

    initial_value = negative_log_likelihood(start)
    nan = jnp.asarray(jnp.nan, dtype)
    u, _, value, previous, iteration = jax.lax.while_loop(
        keep_going, step, (start, optimizer.init(start), initial_value, nan, jnp.asarray(0))
    )
    u = jax.tree_util.tree_map(lambda value_, s, m: jnp.where(m > 0, value_, s), u, start, free)
    params = canonicalize(family, _to_constrained(family, u))
    final = log_likelihood(family, params, x, y, weights)
    # A maximiser must not end below its start; L-BFGS can where ℓ is discontinuous (a top-K gate's
    # selection boundaries [2]), and then the start is returned, flagged as not converged. A NaN
    # end is left as it is, to be reported finite = False.
    start_log_likelihood = -initial_value
    below_start = jnp.isfinite(start_log_likelihood) & jnp.isfinite(final) & (final < start_log_likelihood)
    params = jax.tree_util.tree_map(
        lambda fitted, initial: jnp.where(below_start, initial, fitted), params, _to_constrained(family, start)
    )
    final = jnp.where(below_start, start_log_likelihood, final)
    finite = jnp.isfinite(final) & _all_finite(params)
    converged = relative_change_converged(value, previous, iteration, tol) & finite & ~below_start
    return FitResult(params=params, log_likelihood=final, n_iter=iteration, converged=converged, finite=finite)
