"""Public fitting entry points: one dataset from one start, one dataset with several random starts,
or many datasets at once (``docs/estimators.md``).

* :func:`fit_em` and :func:`fit_em_trace` run EM from one start, with the solver that
  :func:`em_solver` picks: the fast path of :mod:`moe_theory.fit.fast` where it applies, else the
  generic iteration of :mod:`moe_theory.fit.em`, under the drivers of :mod:`moe_theory.fit.solver`.
* :func:`fit` fits one dataset (x, y, optional weights) from ``n_init`` starts and keeps the start
  with the highest final log-likelihood among the finite fits, with the meaning of scikit-learn's
  ``n_init``. Starts are random (k-means++ responsibilities then one M-step; see
  :mod:`moe_theory.fit.starts`) or given.
* :func:`fit_batch` fits R datasets × S starts in one compiled program: ``vmap`` over starts inside
  ``lax.map`` over replicates in chunks of ``batch_size``, which bounds memory and keeps the working
  set in cache on a CPU (large chunks suit a GPU; see :func:`default_batch_size`).

Method ``"em"`` is :func:`fit_em`, ``"squarem"`` is EM accelerated by squared extrapolation
(:mod:`moe_theory.fit.squarem`), ``"em_newton"`` is EM safeguarded by full-likelihood Newton steps
(:mod:`moe_theory.fit.newton_em`), ``"mle"`` is :func:`moe_theory.fit.mle.fit_mle`. Every entry point
is a plain function that calls a ``jax.jit`` of a module-level function, compiled with the XLA
options of :mod:`moe_theory.fit.compiling` (:func:`~moe_theory.fit.compiling.choose_program`).
Defaults come from :mod:`moe_theory.fit.settings`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp

from ..models import Family
from ..params import MoEParams
from .compiling import choose_program
from .em import GenericEM
from .fast import FastEM, fast_path_applies
from .mle import fit_mle
from .newton_em import NewtonEM
from .settings import EM_DEFAULTS, FIT_DEFAULTS, METHODS, EMConfig
from .solver import FitResult, Solver, run_solver, trace_solver
from .squarem import SquaremEM
from .starts import random_init

CPU_BATCH_SIZE = 16
"""Replicates per chunk on a CPU: one vmap over 64 datasets falls out of cache and is slower than
chunks of 8–16, while chunks below 8 leave XLA too little independent work for a second core."""


def default_batch_size(num_replicates: int, backend: str | None = None) -> int:
    """Chunk size of :func:`fit_batch` when none is given: :data:`CPU_BATCH_SIZE` on a CPU, every
    replicate at once on an accelerator (which needs large batches to fill its cores)."""
    backend = backend or jax.default_backend()
    return min(CPU_BATCH_SIZE if backend == "cpu" else num_replicates, num_replicates)


def em_solver(family: Family, config: EMConfig) -> Solver:
    """EM's solver for ``family`` under ``config``: :class:`~moe_theory.fit.fast.FastEM` where the
    fast path applies (:func:`~moe_theory.fit.fast.fast_path_applies`), else
    :class:`~moe_theory.fit.em.GenericEM`."""
    return FastEM(family, config) if fast_path_applies(family, config) else GenericEM(family, config)


def _em_program(driver, family: Family, params0: MoEParams, x, y, weights, tol, config: EMConfig):
    return driver(em_solver(family, config), params0, x, y, weights, tol)


def _run_em(driver, family: Family, params0: MoEParams, x, y, weights, tol, config: EMConfig):
    """``driver`` (:func:`~moe_theory.fit.solver.run_solver` or ``trace_solver``) on EM's solver, compiled."""
    static = ("driver", "family", "config")
    program = choose_program(_em_program, static, family, config, "em", (params0, x, y, weights, tol))
    return program(driver, family, params0, x, y, weights, tol, config)


def fit_em(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = FIT_DEFAULTS.tol,
    config: EMConfig = EM_DEFAULTS,
) -> FitResult:
    """Fit one dataset by EM from ``params0``.

    Args:
        family: model family (static).
        params0: starting parameters (put in canonical form first).
        x: (n, d) inputs; y: (n,) responses; weights: optional (n,) sample weights ≥ 0, or a
            boolean mask of the rows to fit (False marks padding), which the fast path sums as
            cheaply as unit weights.
        tol: relative log-likelihood change at which to stop (traced).
        config: static :class:`~moe_theory.fit.settings.EMConfig`.

    Returns:
        :class:`~moe_theory.fit.solver.FitResult`. Batch with ``jax.vmap`` or :func:`fit_batch`.
    """
    return _run_em(run_solver, family, params0, x, y, weights, tol, config)


def fit_em_trace(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = FIT_DEFAULTS.tol,
    config: EMConfig = EM_DEFAULTS,
) -> tuple[FitResult, jnp.ndarray]:
    """Like :func:`fit_em`, but also return the log-likelihood path.

    Runs ``config.max_iter`` scan steps and freezes the state once the stopping rule holds, so the
    result equals :func:`fit_em`'s. The trace holds ℓ(θ_t) for t = 0 .. max_iter − 1, with NaN
    after the fit stopped.
    """
    return _run_em(trace_solver, family, params0, x, y, weights, tol, config)


def _fit_annealed(family: Family, method: str, config: EMConfig, params0, x, y, weights, tol) -> FitResult:
    """The dense-to-sparse continuation of ``config.selection_schedule`` (docs/estimators.md): fits
    under the soft selection at each temperature in turn, then under the hard top-K gate; the result
    is the better (by log-likelihood, finite first) of that and the hard fit from ``params0`` itself,
    so it is never worse than the plain fit. ``n_iter`` is the work done: every soft stage's
    iterations plus both hard fits'; ``converged`` and ``finite`` are those of the hard fit returned."""
    if family.gate.selection_temperature is not None:
        raise ValueError("selection_schedule: the fitted gate already has a soft selection; anneal a hard top-K gate")
    plain = replace(config, selection_schedule=())
    params, iterations = params0, jnp.asarray(0)
    for temperature in config.selection_schedule:
        soft = replace(family, gate=replace(family.gate, selection_temperature=temperature))
        stage = _fit_one(soft, method, plain, params, x, y, weights, tol)
        params, iterations = stage.params, iterations + stage.n_iter
    annealed = _fit_one(family, method, plain, params, x, y, weights, tol)
    direct = _fit_one(family, method, plain, params0, x, y, weights, tol)
    better = annealed.finite & (~direct.finite | (annealed.log_likelihood >= direct.log_likelihood))
    chosen = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), annealed, direct)
    return chosen._replace(n_iter=iterations + annealed.n_iter + direct.n_iter)


def _fit_one(family: Family, method: str, config: EMConfig, params0, x, y, weights, tol) -> FitResult:
    if config.selection_schedule and family.gate.top_k is not None and family.gate.top_k < family.num_experts:
        return _fit_annealed(family, method, config, params0, x, y, weights, tol)
    if method == "em":
        return fit_em(family, params0, x, y, weights, tol, config)
    if method in ("mle", "em_newton") and config.likelihood != "conditional":
        raise ValueError(f"method {method!r} maximises the conditional likelihood; likelihood='joint' is fitted by EM")
    if method == "mle":
        if config.bound is not None:
            raise ValueError("bound: method 'mle' (L-BFGS) has no box; use 'em', 'squarem' or 'em_newton'")
        return fit_mle(family, params0, x, y, weights, tol, config.max_iter)
    if method == "em_newton":
        return run_solver(NewtonEM(family, config), params0, x, y, weights, tol)
    if method == "squarem":
        return run_solver(SquaremEM(family, config), params0, x, y, weights, tol)
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


def _fit_batch(
    family: Family, params0: MoEParams, x, y, weights, tol, method: str, config: EMConfig, batch_size: int | None
) -> FitResult:
    batch_size = default_batch_size(x.shape[0]) if batch_size is None else min(batch_size, x.shape[0])

    def one_replicate(data):
        starts, x_r, y_r, w_r = data  # w_r stays None for unit weights (an empty pytree under map)
        results = jax.vmap(lambda p: _fit_one(family, method, config, p, x_r, y_r, w_r, tol))(starts)
        return select_best(results)

    return _chunked_map(one_replicate, (params0, x, y, weights), batch_size)


_BATCH_STATIC = ("family", "method", "config", "batch_size")


def fit_batch_program(family: Family, config: EMConfig = EM_DEFAULTS, method: str = FIT_DEFAULTS.method, arguments=()):
    """The ``jax.jit`` that :func:`fit_batch` calls for these settings (compiled with the XLA options
    of :mod:`moe_theory.fit.compiling`), with ``fit_batch``'s arguments, for ahead-of-time
    compilation: ``fit_batch_program(family, config).lower(family, params0, x, y, ...).compile()``.
    ``arguments`` are the array arguments, only to tell whether they are traced."""
    return choose_program(_fit_batch, _BATCH_STATIC, family, config, method, arguments)


def fit_batch(
    family: Family,
    params0: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    tol: float | jnp.ndarray = FIT_DEFAULTS.tol,
    method: str = FIT_DEFAULTS.method,
    config: EMConfig = EM_DEFAULTS,
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
        method: one of :data:`~moe_theory.fit.settings.METHODS` (static).
        config: :class:`~moe_theory.fit.settings.EMConfig` (static); ``max_iter`` also bounds L-BFGS.
        batch_size: replicates fitted together per chunk (static); None picks
            :func:`default_batch_size` for the default backend.

    Returns:
        :class:`~moe_theory.fit.solver.FitResult` with a leading axis R.
    """
    program = fit_batch_program(family, config, method, (params0, x, y, weights, tol))
    return program(family, params0, x, y, weights, tol, method, config, batch_size)


def fit(
    family: Family,
    x: Any,
    y: Any,
    weights: Any = None,
    *,
    key: jax.Array | None = None,
    init: MoEParams | str = "random",
    n_init: int = FIT_DEFAULTS.n_init,
    method: str = FIT_DEFAULTS.method,
    tol: float = FIT_DEFAULTS.tol,
    config: EMConfig = EM_DEFAULTS,
    dtype: Any = None,
) -> FitResult:
    """Fit a mixture of experts to one dataset.

    Args:
        family: the model family to fit (e.g. ``make_family("softmax", "gaussian", 3)``).
        x: (n, d) inputs (a (n,) vector is read as d = 1); y: (n,) responses.
        weights: optional (n,) sample weights ≥ 0, or a boolean mask (False = leave the row out).
        key: PRNG key for random starts (required when ``init="random"``).
        init: ``"random"`` (k-means++ start, see :func:`moe_theory.fit.starts.random_init`) or
            starting parameters; given parameters with a leading axis are several starts.
        n_init: number of random starts; the best final log-likelihood is kept.
        method: ``"em"`` (default), ``"squarem"`` (EM accelerated by squared extrapolation, for
            slow EM), ``"em_newton"`` (EM with full-likelihood Newton steps, for flat likelihoods)
            or ``"mle"`` (L-BFGS on the log-likelihood).
        tol: relative log-likelihood change at which to stop.
        config: :class:`~moe_theory.fit.settings.EMConfig` with ``max_iter``, ``gate_steps`` and the other static settings.
        dtype: floating dtype of the fit, e.g. ``"float32"``; None uses JAX's default float
            (float64 once ``jax_enable_x64`` is on, as ``import moe_theory`` sets it). Data and
            given starts are cast to it.

    Returns:
        :class:`~moe_theory.fit.solver.FitResult` of the best start: ``params``, ``log_likelihood``, ``n_iter``,
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
