"""Public fitting entry points: one dataset with several random starts, or many datasets at once.

* :func:`fit` fits one dataset (x, y, optional weights) from ``n_init`` starts and keeps the start
  with the highest final log-likelihood among the finite fits, with the meaning of scikit-learn's
  ``n_init``. Starts are random (k-means++ responsibilities then one M-step; see
  :mod:`moe_theory.init`) or given.
* :func:`fit_batch` fits R datasets × S starts in one compiled program: ``vmap`` over starts inside
  ``lax.map`` over replicates in chunks of ``batch_size``, which bounds memory and keeps the working
  set in cache on a CPU (large chunks suit a GPU; see :func:`default_batch_size`).

Method ``"em"`` is :func:`moe_theory.fit.em.fit_em`, ``"mle"`` is :func:`moe_theory.fit.mle.fit_mle`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..init import random_init
from ..models import Family
from ..params import MoEParams
from .compiling import jit_fit
from .em import EMConfig, FitResult, fit_em
from .mle import fit_mle

METHODS = ("em", "mle")

CPU_BATCH_SIZE = 16
"""Replicates per chunk on a CPU: one vmap over 64 datasets falls out of cache and is slower than
chunks of 8–16, while chunks below 8 leave XLA too little independent work for a second core."""


def default_batch_size(num_replicates: int, backend: str | None = None) -> int:
    """Chunk size of :func:`fit_batch` when none is given: :data:`CPU_BATCH_SIZE` on a CPU, every
    replicate at once on an accelerator (which needs large batches to fill its cores)."""
    backend = backend or jax.default_backend()
    return min(CPU_BATCH_SIZE if backend == "cpu" else num_replicates, num_replicates)


def _fit_one(family: Family, method: str, config: EMConfig, params0, x, y, weights, tol) -> FitResult:
    if method == "em":
        return fit_em(family, params0, x, y, weights, tol, config)
    if method == "mle":
        if config.likelihood != "conditional":
            raise ValueError("method 'mle' maximises the conditional likelihood; likelihood='joint' is fitted by EM")
        return fit_mle(family, params0, x, y, weights, tol, config.max_iter)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def _chunked_map(function, xs, batch_size: int):
    """``lax.map(function, xs, batch_size=batch_size)`` that also accepts zero-size leaves.

    ``lax.map`` reshapes every leaf with a −1 axis, which fails on zero-size arrays such as the
    (R, n, 0) inputs and (…, k, 0) slopes of d = 0 families; those leaves hold no data, so they are
    kept out of the map and rebuilt as zeros of the right shape on both sides.
    """
    leaves, tree = jax.tree_util.tree_flatten(xs)
    empty = [leaf.size == 0 for leaf in leaves]

    def full_inputs(mapped):
        remaining = iter(mapped)
        return jax.tree_util.tree_unflatten(
            tree, [jnp.zeros(leaf.shape[1:], leaf.dtype) if e else next(remaining) for leaf, e in zip(leaves, empty)]
        )

    mapped = [leaf for leaf, e in zip(leaves, empty) if not e]
    out_shapes = jax.eval_shape(lambda first: function(full_inputs(first)), [leaf[0] for leaf in mapped])
    out_leaves, out_tree = jax.tree_util.tree_flatten(out_shapes)
    out_empty = [leaf.size == 0 for leaf in out_leaves]

    def body(mapped):
        outs = jax.tree_util.tree_leaves(function(full_inputs(mapped)))
        return [out for out, e in zip(outs, out_empty) if not e]

    mapped_outs = iter(jax.lax.map(body, mapped, batch_size=batch_size))
    num_items = leaves[0].shape[0]
    return jax.tree_util.tree_unflatten(
        out_tree,
        [jnp.zeros((num_items, *leaf.shape), leaf.dtype) if e else next(mapped_outs) for leaf, e in zip(out_leaves, out_empty)],
    )


def select_best(results: FitResult) -> FitResult:
    """The start (leading axis) with the highest log-likelihood among finite fits.

    If no start is finite the first start is returned, flagged ``finite=False``.
    """
    score = jnp.where(results.finite, results.log_likelihood, -jnp.inf)
    best = jnp.argmax(score)
    return jax.tree_util.tree_map(lambda leaf: leaf[best], results)


@jit_fit(("family", "method", "config", "batch_size"))
def fit_batch(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = 1e-6,
    method: str = "em",
    config: EMConfig = EMConfig(),
    batch_size: int | None = None,
) -> FitResult:
    """Fit R datasets, each from S starts, keeping each dataset's best start.

    Args:
        family: model family (static).
        params0: starting parameters whose leaves have leading axes (R, S).
        x: (R, n, d); y: (R, n); weights: optional (R, n) sample weights (0 = padding), or a
            boolean mask (False = padding). Leave it None for unit weights, and pass padding as a
            mask: EM's fast path then sums logarithms as logs of products instead of one per sample.
        tol: relative log-likelihood tolerance (traced).
        method: ``"em"`` or ``"mle"`` (static).
        config: :class:`EMConfig` (static); ``max_iter`` also bounds L-BFGS.
        batch_size: replicates fitted together per chunk (static); None picks
            :func:`default_batch_size` for the default backend.

    Returns:
        :class:`FitResult` with a leading axis R.
    """
    batch_size = default_batch_size(x.shape[0]) if batch_size is None else min(batch_size, x.shape[0])

    def one_replicate(data):
        starts, x_r, y_r, w_r = data  # w_r stays None for unit weights (an empty pytree under map)
        results = jax.vmap(lambda p: _fit_one(family, method, config, p, x_r, y_r, w_r, tol))(starts)
        return select_best(results)

    return _chunked_map(one_replicate, (params0, x, y, weights), batch_size)


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
    dtype: Any = None,
) -> FitResult:
    """Fit a mixture of experts to one dataset.

    Args:
        family: the model family to fit (e.g. ``make_family("softmax", "gaussian", 3)``).
        x: (n, d) inputs (a (n,) vector is read as d = 1); y: (n,) responses.
        weights: optional (n,) sample weights ≥ 0, or a boolean mask (False = leave the row out).
        key: PRNG key for random starts (required when ``init="random"``).
        init: ``"random"`` (k-means++ start, see :func:`moe_theory.init.random_init`) or
            starting parameters; given parameters with a leading axis are several starts.
        n_init: number of random starts; the best final log-likelihood is kept.
        method: ``"em"`` (default) or ``"mle"`` (L-BFGS on the log-likelihood).
        tol: relative log-likelihood change at which to stop.
        config: :class:`EMConfig` with ``max_iter``, ``gate_steps`` and the other static settings.
        dtype: floating dtype of the fit, e.g. ``"float32"``; None uses JAX's default float
            (float64 once ``jax_enable_x64`` is on, as ``import moe_theory`` sets it). Data and
            given starts are cast to it.

    Returns:
        :class:`FitResult` of the best start: ``params``, ``log_likelihood``, ``n_iter``,
        ``converged``, ``finite``.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype: expected a floating dtype such as 'float32' or 'float64', got {dtype}")
    x = jnp.asarray(x, dtype)
    x = x[:, None] if x.ndim == 1 else x
    y = jnp.asarray(y, jnp.int32 if family.expert.is_classifier else dtype)
    if x.ndim != 2 or x.shape[1] != family.dim or y.shape != x.shape[:1]:
        raise ValueError(f"data: expected x of shape (n, {family.dim}) and y of shape (n,), got {x.shape} and {y.shape}")
    weights = None if weights is None else jnp.asarray(weights)
    weights = weights if weights is None or weights.dtype == jnp.bool_ else weights.astype(dtype)
    if isinstance(init, str):
        if init != "random":
            raise ValueError(f"init: expected 'random' or starting parameters, got {init!r}")
        if key is None:
            raise ValueError("key: a PRNG key is required for random starts (there is no default key)")
        starts = jax.vmap(lambda k: random_init(k, family, x, y, weights))(jax.random.split(key, n_init))
    else:
        leading = jax.tree_util.tree_leaves(init.gate)[0].ndim - len(family.field_shape(family.gate.fields[0]))
        starts = init if leading == 1 else jax.tree_util.tree_map(lambda leaf: leaf[None], init)
        starts = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, dtype), starts)
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
