"""Public fitting entry points: one dataset with several random starts, or many datasets at once.

* :func:`fit` fits one dataset (x, y, optional weights) from ``n_init`` starts and keeps the start
  with the highest final log-likelihood among the finite fits, with the meaning of scikit-learn's
  ``n_init``. Starts are random (k-means++ responsibilities then one M-step; see
  :mod:`moe_theory.init`) or given.
* :func:`fit_batch` fits R datasets × S starts in one compiled program: ``vmap`` over starts inside
  ``lax.map`` over replicates in chunks of ``batch_size``, which bounds memory and keeps the working
  set in cache on a CPU (large chunks suit a GPU).

Method ``"em"`` is :func:`moe_theory.fit.em.fit_em`, ``"mle"`` is :func:`moe_theory.fit.mle.fit_mle`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from ..init import random_init
from ..models import Family
from ..params import MoEParams
from .em import EMConfig, FitResult, fit_em
from .mle import fit_mle

METHODS = ("em", "mle")


def _fit_one(family: Family, method: str, config: EMConfig, params0, x, y, weights, tol) -> FitResult:
    if method == "em":
        return fit_em(family, params0, x, y, weights, tol, config)
    if method == "mle":
        return fit_mle(family, params0, x, y, weights, tol, config.max_iter)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def select_best(results: FitResult) -> FitResult:
    """The start (leading axis) with the highest log-likelihood among finite fits.

    If no start is finite the first start is returned, flagged ``finite=False``.
    """
    score = jnp.where(results.finite, results.log_likelihood, -jnp.inf)
    best = jnp.argmax(score)
    return jax.tree_util.tree_map(lambda leaf: leaf[best], results)


@partial(jax.jit, static_argnames=("family", "method", "config", "batch_size"))
def fit_batch(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = 1e-6,
    method: str = "em",
    config: EMConfig = EMConfig(),
    batch_size: int = 8,
) -> FitResult:
    """Fit R datasets, each from S starts, keeping each dataset's best start.

    Args:
        family: model family (static).
        params0: starting parameters whose leaves have leading axes (R, S).
        x: (R, n, d); y: (R, n); weights: optional (R, n) sample weights (0 = padding).
        tol: relative log-likelihood tolerance (traced).
        method: ``"em"`` or ``"mle"`` (static).
        config: :class:`EMConfig` (static); ``max_iter`` also bounds L-BFGS.
        batch_size: replicates fitted together per chunk (static).

    Returns:
        :class:`FitResult` with a leading axis R.
    """
    if weights is None:
        weights = jnp.ones(y.shape, x.dtype)

    def one_replicate(data):
        starts, x_r, y_r, w_r = data
        results = jax.vmap(lambda p: _fit_one(family, method, config, p, x_r, y_r, w_r, tol))(starts)
        return select_best(results)

    return jax.lax.map(one_replicate, (params0, x, y, weights), batch_size=min(batch_size, x.shape[0]))


def fit(
    family: Family,
    x: Any,
    y: Any,
    weights: Any = None,
    *,
    key: jax.Array | None = None,
    init: MoEParams | str = "random",
    n_init: int = 1,
    method: str = "em",
    tol: float = 1e-6,
    config: EMConfig = EMConfig(),
) -> FitResult:
    """Fit a mixture of experts to one dataset.

    Args:
        family: the model family to fit (e.g. ``make_family("softmax", "gaussian", 3)``).
        x: (n, d) inputs (a (n,) vector is read as d = 1); y: (n,) responses.
        weights: optional (n,) sample weights ≥ 0.
        key: PRNG key for random starts (required when ``init="random"``).
        init: ``"random"`` (k-means++ start, see :func:`moe_theory.init.random_init`) or
            starting parameters; given parameters with a leading axis are several starts.
        n_init: number of random starts; the best final log-likelihood is kept.
        method: ``"em"`` (default) or ``"mle"`` (L-BFGS on the log-likelihood).
        tol: relative log-likelihood change at which to stop.
        config: :class:`EMConfig` with ``max_iter``, ``gate_steps`` and the other static settings.

    Returns:
        :class:`FitResult` of the best start: ``params``, ``log_likelihood``, ``n_iter``,
        ``converged``, ``finite``.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    dtype = jnp.zeros(()).dtype
    x = jnp.asarray(x, dtype)
    x = x[:, None] if x.ndim == 1 else x
    y = jnp.asarray(y, jnp.int32 if family.expert.is_classifier else dtype)
    if x.ndim != 2 or x.shape[1] != family.dim or y.shape != x.shape[:1]:
        raise ValueError(f"data: expected x of shape (n, {family.dim}) and y of shape (n,), got {x.shape} and {y.shape}")
    weights = None if weights is None else jnp.asarray(weights, dtype)
    if isinstance(init, str):
        if init != "random":
            raise ValueError(f"init: expected 'random' or starting parameters, got {init!r}")
        if key is None:
            raise ValueError("key: a PRNG key is required for random starts (there is no default key)")
        starts = jax.vmap(lambda k: random_init(k, family, x, y, weights))(jax.random.split(key, n_init))
    else:
        leading = jax.tree_util.tree_leaves(init.gate)[0].ndim - len(family.field_shape(family.gate.fields[0]))
        starts = init if leading == 1 else jax.tree_util.tree_map(lambda leaf: leaf[None], init)
    batched = fit_batch(
        family,
        jax.tree_util.tree_map(lambda leaf: leaf[None], starts),
        x[None],
        y[None],
        None if weights is None else weights[None],
        tol,
        method,
        config,
        1,
    )
    return jax.tree_util.tree_map(lambda leaf: leaf[0], batched)
