"""The sweep engine: a study config becomes a grid of cells, each computed on device and stored at once.

A **cell** is one fit group (fitted k and estimator settings, :class:`moe_theory.config.FitGroup`)
at one sample size n. For every replicate r = 0..R−1 a cell draws a dataset from the true model,
starts the fitter, fits, and scores the fit against the truth; the rows of the cell are written
atomically (:func:`moe_theory.storage.write_part`) as soon as it finishes, so an interrupted run
loses at most the cell in progress and ``--resume`` computes only the missing cells.

Cells, executors and resuming
-----------------------------
Cells are independent tasks (:class:`CellWork`: a group, an n and a replicate range) handed to an
executor (:mod:`moe_theory.executors`). The default runs them in this process, one after the other,
with the programs compiled ahead (below); the Dask executor runs them on worker processes
(:func:`compute_cell_on_worker`, which parses the resolved config again on the worker and returns
the rows). Either way this process alone writes the run folder, as results arrive, each cell once
(a Dask future completes once, even when its task was rerun after a worker was lost); a task that
fails does not stop the results of the others from being stored, and its error is raised after
them. The keys below make every row the same wherever it was computed (on the same kind of device
and device count).

Each part file records its key, the seed and a fingerprint of the settings that determine its
numbers (:func:`cell_determinants`). A resumed run keeps only rows computed under the folder's
current settings (:func:`stored_replicates`): raising ``replicates`` in the folder's config computes
the missing replicates of every cell (:func:`pending_work`); an edited seed, model, fit or metric,
fewer replicates, or a dropped group or sample size is refused with a message naming the change.
:func:`run_study` records in ``meta.json`` how each session ended: ``complete``, ``interrupted``
(Ctrl-C, SIGTERM) or ``failed`` (with the exception), keeping the cells finished before.

Compiled programs
-----------------
Two jitted programs do all the work, both on device; only fitted parameters (a few numbers per
replicate) and scores come back to the host:

* the **fit program** (one per fit group × bucket size): sample → init → fit for a chunk of
  ``sweep.batch_size`` replicates (``vmap`` over replicates and starts, via
  :func:`moe_theory.fit.fit_batch`);
* the **score program** (one per fit group): Voronoi losses, per-parameter errors and density
  distances of the fitted parameters. It is separate because its shapes do not depend on n: fused
  into the fit program it would be recompiled for every bucket, which costs more than the one
  extra dispatch per chunk.

Both are ``jax.jit`` of module-level functions (:func:`fit_cells`, :func:`score_cells`) whose static
argument is a frozen dataclass (:class:`FitSpec`, :class:`ScoreSpec`) holding every choice besides
the arrays, so ``jax.jit``'s own cache serves a repeated cell, a resumed or repeated sweep in the
same process, and a test. The fit program carries the fit's XLA options
(:mod:`moe_theory.fit.compiling`).

**Compiling ahead.** Before the first cell runs, every program the pending cells need is queued,
in the order they need it, for ``lower(...).compile()`` in one background thread; that fills the
caches the cells' calls then read, so XLA compiles the next bucket's program while the current
cells run, and a cell waits only for a program that is not ready yet. Compile time is read from
JAX's monitoring events, per thread: each program compiled adds an entry (trace and XLA seconds)
to the session's ``meta.json``; ``compile_seconds`` is their sum and ``compile_wait_seconds`` the
time the cells spent waiting for them.

**Buckets.** XLA compiles one program per array shape, so a sample of size n is padded to the
bucket size N(n) = the smallest ⌈g^i⌉ ≥ n (g = ``sweep.bucket_growth``; g = 2 gives powers of two)
with a boolean mask that leaves the padding out of the fit (:func:`moe_theory.models.log_likelihood`).
N depends on n alone, never on the other sizes of the sweep, so adding a size never changes another
cell's program. A 200-size sweep over 10²..10⁵ compiles 11 fit programs per group with g = 2.

**Exact-n data in a padded array.** The padded sample must *be* the size-n sample, not a size-N
sample cut down: :func:`sample_padded` returns, in its first n rows, what
``moe_theory.sample(key, family, truth, n, inputs)`` returns, with n traced (so one program serves
every n of a bucket, and the sampling costs no compilation of its own). This holds because JAX's
partitionable Threefry generator (the default since JAX 0.5, checked at run time) makes the random
bits of row j independent of the array length, and every row of the sampler is computed from its
own x_j and bits. The one input that depends on n itself, the grid x = linspace(low, high, n) of
paper 1's code [1], is recomputed with ``jnp.linspace``'s arithmetic for a traced n. The equality is
bit for bit for the random inputs and for the grid on [0, 1] (x_j = j/(n − 1) in both); on another
interval the grid points can differ in the last bit, because XLA contracts a·(1 − t) + b·t into a
fused multiply-add in some programs and not in others (two jitted copies of ``jnp.linspace`` can
differ the same way). ``tests/test_sweep.py`` checks both statements. Sampling at the exact n in a
small program per n would be the alternative; it costs one compilation per n (a second or more each
on a CPU), which is what bucketing avoids.

Keys
----
One root key ``jax.random.key(seed)``; every other key is a ``fold_in`` chain of stable integers,
so no key depends on the order or number of cells:

* data:    root → DATA_STREAM → n → replicate. The data do not depend on the fit group, so every
  fitted k sees the same datasets (common random numbers make the exact-vs-over-fitted contrast
  sharper);
* init:    root → INIT_STREAM → init id (CRC-32 of k, init protocol, n_init) → n → replicate, then
  split into n_init starts;
* density: root → DENSITY_STREAM (the Monte Carlo x draws, shared by every cell), and
  → EXPERT_ERROR_DRAWS under it for the expert errors' own draws.

Adding a sample size or a replicate therefore leaves every existing row bit-identical, provided
``sweep.batch_size`` and the device count are unchanged: replicates go through the fit program in
chunks of that size, and a last partial chunk is filled with the next replicate ids (computed and
discarded), so a row never depends on how many replicates there are.

On a machine with several accelerators the replicate axis of each chunk is sharded across them
(the chunk size is rounded up to a multiple of the device count). With the chunk size unchanged,
the sharded program gives the same fitted parameters and scores bit for bit; the reported
log-likelihood, a sum over the sample that the partitioned program may add in another order, can
differ in its last bit (``tests/test_executors.py`` checks both on two forced CPU devices).

[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import signal
import socket
import threading
import time
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import monitoring

from . import executors, storage
from .config import GRID_AXES, FitGroup, MetricsConfig, StudyConfig, parse_config
from .fit import EM_DEFAULTS, EMConfig, FitResult, fit_batch
from .fit.compiling import jit_variant, program_options
from .fit.em import on_box
from .fit.starts import random_init
from .init import NearTruthNoise, near_truth_init
from .losses import density_distances, exact_fitted_loss, expert_errors, over_fitted_loss, parameter_errors, voronoi_loss
from .metrics import (
    cell_size_column,
    error_column,
    expert_error_column,
    mass_column,
    mass_error_column,
    shared_error_column,
    used_expert_error_column,
)
from .models import Family, gate_log_weights
from .params import MoEParams
from .sampling import InputDistribution, bucket_size

__all__ = ["DATA_STREAM", "INIT_STREAM", "DENSITY_STREAM", "bucket_size", "cell_name", "run_sweep", "sample_padded"]

DATA_STREAM, INIT_STREAM, DENSITY_STREAM = 0, 1, 2
"""First ``fold_in`` ids under the root key: the data, the starting points, the density x draws."""
EXPERT_ERROR_DRAWS = 1
"""``fold_in`` id under the density key of the expert errors' x draws."""

ID_COLUMNS = ("group",) + GRID_AXES + ("n", "replicate", "bucket")
FIT_COLUMNS = ("log_likelihood", "n_iter", "converged", "finite", "at_bound")


def cell_name(group: FitGroup, n: int) -> str:
    """File-safe, stable name of a cell: the group id and n."""
    return f"g{group.group_id:08x}-n{n}"


# ----------------------------------------------------------------------------------------------
# Sampling at an exact, traced n inside a padded array.


def sample_padded(
    key: jax.Array, family: Family, params: MoEParams, n: jnp.ndarray, size: int, inputs: InputDistribution
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(x, y, mask) of ``size`` rows whose first n rows equal ``moe_theory.sample(key, family,
    params, n, inputs)``; the boolean mask is True there and False on the padding (see the module
    docstring), which EM's fast path sums as cheaply as unit weights. ``n`` may be traced; ``size``
    is static."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    # The same three streams, in the same order, as moe_theory.sampling.sample.
    input_key, label_key, response_key = jax.random.split(key, 3)
    x = inputs.draw_padded(input_key, n, size, family.dim, dtype, params)
    labels = jax.random.categorical(label_key, gate_log_weights(family, params, x), axis=-1).astype(jnp.int32)
    y = family.expert.sample(response_key, params.expert, x, labels)
    return x, y, jnp.arange(size) < n


# ----------------------------------------------------------------------------------------------
# The two programs: module-level functions of a static spec (a frozen dataclass holding every choice
# the program depends on besides its array arguments), compiled by ``jax.jit``, whose own cache
# serves every later cell, and every later sweep of this process, with an equal spec and shapes.


def em_config(config: StudyConfig, group: FitGroup) -> EMConfig:
    """The static EM settings of a fit group."""
    fit = config.fit
    return replace(
        EM_DEFAULTS,
        max_iter=fit.max_iter,
        gate_steps=group.gate_steps,
        expert_steps=fit.expert_steps,
        inner_tol=fit.inner_tol,
        max_halvings=fit.max_halvings,
        variance_floor=fit.variance_floor,
        likelihood=fit.likelihood,
        selection_schedule=fit.selection_schedule,
        bound=fit.bound,
    )


@dataclass(frozen=True)
class FitSpec:
    """Everything static in a fit program: the models, the inputs, the bucket size and the estimator."""

    true_family: Family
    family: Family
    inputs: InputDistribution
    size: int
    method: str
    init: str
    num_starts: int
    init_id: int
    em_config: EMConfig
    noise: NearTruthNoise
    assignment: tuple[int, ...] | None

    @classmethod
    def of(cls, config: StudyConfig, group: FitGroup, size: int) -> "FitSpec":
        return cls(config.true_family, config.fitted_family(group), config.inputs, size, group.method, group.init,
                   group.n_init, group.init_id, em_config(config, group), config.fit.near_truth, config.fit.assignment)


def fit_cells(spec: FitSpec, root_key, replicates, n, tol, truth) -> FitResult:
    """Sample → start → fit for a chunk of replicate ids at sample size n (padded to ``spec.size``)."""
    data_key = jax.random.fold_in(jax.random.fold_in(root_key, DATA_STREAM), n)
    init_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root_key, INIT_STREAM), spec.init_id), n)

    def prepare(replicate):
        x, y, weights = sample_padded(
            jax.random.fold_in(data_key, replicate), spec.true_family, truth, n, spec.size, spec.inputs
        )
        start_keys = jax.random.split(jax.random.fold_in(init_key, replicate), spec.num_starts)
        if spec.init == "near_truth":
            starts = jax.vmap(
                lambda k: near_truth_init(k, spec.family, spec.true_family, truth, n, spec.noise, spec.assignment)
            )(start_keys)
        else:
            starts = jax.vmap(lambda k: random_init(k, spec.family, x, y, weights))(start_keys)
        return x, y, weights, starts

    x, y, weights, starts = jax.vmap(prepare)(replicates)
    return fit_batch(spec.family, starts, x, y, weights, tol, spec.method, spec.em_config, replicates.shape[0])


def fit_cells_program(spec: FitSpec):
    """The jitted :func:`fit_cells` for ``spec``, with the XLA options of its fit (:mod:`moe_theory.fit.compiling`)."""
    fast_path = program_options(spec.family, spec.em_config, spec.method) is not None
    return jit_variant(fit_cells, ("spec",), fast_path)


@dataclass(frozen=True)
class ScoreSpec:
    """Everything static in a score program (its shapes do not depend on n)."""

    family: Family
    fitted_family: Family
    exact: bool
    metrics: MetricsConfig
    inputs: InputDistribution | None  # only the density distances and the expert errors draw inputs

    @classmethod
    def of(cls, config: StudyConfig, group: FitGroup) -> "ScoreSpec":
        metrics = config.metrics
        draws_inputs = metrics.density is not None or metrics.expert_errors is not None
        return cls(config.true_family, config.fitted_family(group), config.is_exact(group), metrics,
                   config.inputs if draws_inputs else None)


def score_cells(spec: ScoreSpec, fitted, truth, density_key) -> dict[str, jnp.ndarray]:
    """Voronoi losses, per-parameter errors and density distances of a chunk of fits."""
    family, metrics, exact, density = spec.family, spec.metrics, spec.exact, spec.metrics.density
    scores: dict[str, jnp.ndarray] = {}
    for loss, column, translation in metrics.loss_columns(exact):
        if loss.name == "D1":
            value = exact_fitted_loss(family, fitted, truth, translation=translation)
        elif loss.name == "D2":
            value = over_fitted_loss(family, fitted, truth, translation=translation)
        else:
            value = voronoi_loss(family, fitted, truth, exponents=loss.exponents, translation=translation)
        scores[column] = value.loss
    if metrics.parameter_errors:
        # The exponents matter only for the "infimum" translation: D1's when k = k*, the
        # over-fitted table otherwise (the translation is metrics.parameter_errors.translation).
        errors = parameter_errors(
            family, fitted, truth, exponents="first_order" if exact else None,
            translation=metrics.parameter_translation,
        )
        for block, value in errors.max_error.items():
            scores[f"err_{block}"] = value
        scores["mass_err"], scores["mass"], scores["cell_size"] = errors.mass_error, errors.cell_mass, errors.cell_sizes
        for block, value in errors.shared_error.items():
            scores[f"err_{block}"] = value
    if metrics.expert_errors is not None:
        # Their own x draws, so that turning them on leaves the density distances' draws unchanged.
        experts = expert_errors(jax.random.fold_in(density_key, EXPERT_ERROR_DRAWS), family, fitted, truth, spec.inputs,
                                metrics.expert_errors, fitted_family=spec.fitted_family, translation=metrics.parameter_translation,
                                exponents="first_order" if exact else None)
        scores["expert_err"], scores["used_expert_err"] = experts.max_error, experts.used_error
    if density is not None:
        distances = density_distances(
            density_key, family, fitted, truth, spec.inputs, density.num_inputs, density.grid_size,
            density.num_quadrature, fitted_family=spec.fitted_family,
        )
        if "hellinger" in density.distances:
            scores["hellinger"], scores["hellinger_se"] = distances.hellinger, distances.hellinger_se
        if "tv" in density.distances:
            scores["tv"], scores["tv_se"] = distances.total_variation, distances.total_variation_se
    return scores


score_cells_program = jax.jit(score_cells, static_argnames=("spec",))
"""The jitted :func:`score_cells` (XLA's defaults: it runs no fit)."""


_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclass
class _Counters:
    xla_compiles: int = 0
    xla_seconds: float = 0.0
    trace_seconds: float = 0.0


@dataclass
class _CompileLog:
    """Compilation seen through JAX's monitoring events, counted per thread (the sweep compiles
    ahead in a background thread while the main thread runs cells): per program and in total."""

    programs: list[dict] = field(default_factory=list)
    threads: dict[int, _Counters] = field(default_factory=dict)
    cache_hits: int = 0
    wait_seconds: float = 0.0

    def counters(self) -> _Counters:
        return self.threads.setdefault(threading.get_ident(), _Counters())

    def on_duration(self, event: str, duration: float, **_: Any) -> None:
        counters = self.counters()
        if event == _COMPILE_EVENT:
            counters.xla_compiles += 1
            counters.xla_seconds += duration
        elif event in _TRACE_EVENTS:
            counters.trace_seconds += duration

    def on_event(self, event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def timed(self, description: dict, work: Callable[[], Any]) -> Any:
        """``work()``, logging a program entry when it compiled in this thread (a miss of
        ``jax.jit``'s cache: tracing, lowering and an XLA compilation or a persistent-cache load)."""
        counters = self.counters()
        compiles, compile_seconds, trace_seconds = counters.xla_compiles, counters.xla_seconds, counters.trace_seconds
        result = work()
        if counters.xla_compiles > compiles:
            self.programs.append({
                **description,
                "trace_seconds": round(counters.trace_seconds - trace_seconds, 3),
                "compile_seconds": round(counters.xla_seconds - compile_seconds, 3),
                "ahead": threading.get_ident() != threading.main_thread().ident,
            })
        return result

    @property
    def xla_compiles(self) -> int:
        return sum(c.xla_compiles for c in self.threads.values())

    @property
    def xla_seconds(self) -> float:
        return sum(c.xla_seconds for c in self.threads.values())


class _AheadCompiler:
    """Compiles the sweep's programs in one background thread, in the order the cells need them,
    so that XLA compiles the next bucket's program while the current cells run.

    ``jit(f).lower(...).compile()`` fills the same in-memory caches a later ``jit(f)(...)`` call reads,
    so the main thread calls the programs as usual and finds them compiled; it only waits when a
    program is not ready yet (``wait_seconds``). Results are those of compiling on first use: the
    programs are the same.
    """

    def __init__(self, log: _CompileLog):
        self._log = log
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-theory-compile")
        self._futures: dict[tuple, Future] = {}

    def request(self, key: tuple, description: dict, compile_program: Callable[[], Any]) -> None:
        """Queue ``compile_program()`` (a ``lower(...).compile()``) under ``key``, once."""
        if key not in self._futures:
            self._futures[key] = self._pool.submit(self._log.timed, description, compile_program)

    def wait(self, key: tuple) -> None:
        future = self._futures.get(key)
        if future is None:
            return
        started = time.perf_counter()
        try:
            future.result()
        except Exception:  # noqa: BLE001 - the call on the main thread compiles again and raises the error there
            pass
        self._log.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Rows.


def _cell_frame(config: StudyConfig, group: FitGroup, n: int, size: int, replicates: np.ndarray,
                positions: np.ndarray, fits: Any, scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """The rows of one cell for the given replicate ids, found at ``positions`` of the chunk's host
    arrays (a DataFrame out)."""
    count = len(replicates)
    columns: dict[str, Any] = {"group": [group.label] * count}
    for axis, value in group.axes().items():
        columns[axis] = np.full(count, value) if not isinstance(value, str) else [value] * count
    columns["n"] = np.full(count, n, dtype=np.int64)
    columns["replicate"] = replicates.astype(np.int64)
    columns["bucket"] = np.full(count, size, dtype=np.int64)
    columns["log_likelihood"] = np.asarray(fits.log_likelihood, dtype=np.float64)[positions]
    columns["n_iter"] = np.asarray(fits.n_iter, dtype=np.int64)[positions]
    columns["converged"] = np.asarray(fits.converged, dtype=bool)[positions]
    columns["finite"] = np.asarray(fits.finite, dtype=bool)[positions]
    if config.fit.bound is not None:
        columns["at_bound"] = np.asarray(on_box(config.fitted_family(group), fits.params, config.fit.bound), dtype=bool)[positions]
    per_atom = {"mass_err": mass_error_column, "mass": mass_column, "cell_size": cell_size_column,
                "expert_err": expert_error_column, "used_expert_err": used_expert_error_column}
    for name, value in scores.items():
        value = np.asarray(value)[positions]
        if value.ndim == 2:  # (replicate, true atom): err_<block> or one of per_atom
            column = per_atom.get(name, lambda atom, name=name: f"{name}_atom{atom}")
            for atom in range(value.shape[1]):
                columns[column(atom)] = value[:, atom].astype(np.int64 if name == "cell_size" else np.float64)
        else:
            columns[name] = value.astype(np.float64)
    for group_name in ("gate", "expert"):
        for name, value in getattr(fits.params, group_name).items():
            value = np.asarray(value, dtype=np.float64)[positions].reshape(count, -1)
            shape = np.asarray(getattr(fits.params, group_name)[name]).shape[1:]
            for flat, index in enumerate(np.ndindex(*shape)):
                columns["hat_" + "_".join([name, *map(str, index)])] = value[:, flat]
    return pd.DataFrame(columns)


def fitted_params_from_table(family: Family, table: pd.DataFrame) -> MoEParams:
    """The fitted parameters of every row of a results table, batched along the rows: the inverse of
    the ``hat_<field>_<index…>`` columns :func:`_cell_frame` writes (for rescoring stored fits)."""
    groups = {}
    for group, fields in (("gate", family.gate.fields), ("expert", family.expert.fields)):
        values = {}
        for field_ in fields:
            shape = family.field_shape(field_)
            columns = ["hat_" + "_".join([field_.name, *map(str, index)]) for index in np.ndindex(*shape)]
            values[field_.name] = table[columns].to_numpy(dtype=np.float64).reshape((len(table),) + tuple(shape))
        groups[group] = values
    return MoEParams(groups["gate"], groups["expert"])


def column_order(config: StudyConfig) -> list[str]:
    """The canonical column order of ``fits.parquet`` for a config (a union over fit groups)."""
    order = list(ID_COLUMNS + FIT_COLUMNS)
    for loss in config.metrics.losses:
        order += [column for column, _ in loss.columns(config.metrics.translation)]
    if config.metrics.density is not None:
        for distance in config.metrics.density.distances:
            order += [distance, f"{distance}_se"]
    if config.metrics.parameter_errors:
        for atom in range(config.num_true):
            order += [error_column(block, atom) for block in config.atom_blocks()]
            order += [mass_error_column(atom), mass_column(atom), cell_size_column(atom)]
        order += [shared_error_column(block) for block in config.shared_blocks()]
    if config.metrics.expert_errors is not None:
        order += [expert_error_column(atom) for atom in range(config.num_true)]
        order += [used_expert_error_column(atom) for atom in range(config.num_true)]
    largest = max(config.groups, key=lambda g: g.num_experts)
    family = config.fitted_family(largest)
    for fields in (family.gate.fields, family.expert.fields):
        for field_ in fields:
            order += ["hat_" + "_".join([field_.name, *map(str, index)]) for index in np.ndindex(*family.field_shape(field_))]
    return order


# ----------------------------------------------------------------------------------------------
# What a run folder already holds, and whether it may be kept.


def cell_determinants(config: StudyConfig) -> dict[str, Any]:
    """The settings that determine a cell's numbers besides its key (fit group, n, replicate ids).

    That is the resolved config less its name and description, the sample sizes and the replicate
    count (they say which cells and rows exist, not what is in them: see "Keys" in the module
    docstring), the grid axes of ``fit`` (a group's own axes are part of its key) and ``rates``
    (used after the sweep only). ``sweep`` is kept: the batch size and the bucket ladder change the
    compiled programs, hence the last bits of the numbers.
    """
    resolved = config.to_dict()
    return {
        "seed": resolved["seed"],
        "model": resolved["model"],
        "inputs": resolved["inputs"],
        "fit": {key: value for key, value in resolved["fit"].items() if key not in GRID_AXES},
        "metrics": resolved["metrics"],
        "sweep": resolved["sweep"],
    }


def config_fingerprint(determinants: dict[str, Any]) -> str:
    """A short stable hash of :func:`cell_determinants`."""
    return hashlib.sha256(json.dumps(determinants, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(stored: Any, current: Any, path: str = "") -> list[str]:
    """``key.path: stored → current`` for every setting that differs (lists compared whole)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        changes = []
        for key in sorted(set(stored) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            changes += _differences(stored.get(key, "<absent>"), current.get(key, "<absent>"), where)
        return changes
    return [] if stored == current else [f"{path}: {json.dumps(stored, default=str)} → {json.dumps(current, default=str)}"]


def stored_replicates(config: StudyConfig, run_dir: str | Path) -> dict[tuple[int, int], set[int]]:
    """The replicate ids already stored in ``run_dir``, per cell (group index, n), after checking
    that every stored row may be kept under ``config``.

    Rows come from the part files and the merged table; each carries its key and the fingerprint of
    the settings it was computed with (:func:`config_fingerprint`) in its parquet metadata (a folder
    written before these keys existed has none, and its rows are taken as they are). Raises
    :class:`moe_theory.storage.RunFolderError`, naming what changed, when rows were computed with
    other settings (an edited seed, model, fit or metric), belong to a fit group or sample size the
    config no longer lists, or go beyond its replicate count: keeping them would mix two
    configurations in one table. A larger replicate count is not a conflict: the sweep computes the
    missing replicates, which the keys make bit-identical to those of a run that had them from the start.
    """
    run_dir = Path(run_dir)
    determinants = cell_determinants(config)
    fingerprint = config_fingerprint(determinants)
    by_axes = {tuple(group.axes().values()): group for group in config.groups}
    sample_sizes = set(config.sample_sizes)
    config_path = run_dir / storage.CONFIG_FILE
    remedy = f"Restore the earlier settings in {config_path}, or start a new run (moe-theory run CONFIG)."
    stored: dict[tuple[int, int], set[int]] = {}

    def add(source: Path, metadata: dict | None, axes: tuple, n: int, replicates: set[int]) -> None:
        where = f"{run_dir}: {source.relative_to(run_dir)}"
        if metadata is not None and metadata.get("fingerprint") != fingerprint:
            changes = _differences(metadata.get("determinants", {}), determinants)
            shown = ("; ".join(changes[:6]) + ("; …" if len(changes) > 6 else "") if changes
                     else f"settings fingerprint {metadata.get('fingerprint')} → {fingerprint}")
            raise storage.RunFolderError(
                f"{where} was computed with other settings than {config_path} now gives ({shown}); "
                f"resuming would mix them in one table. {remedy}"
            )
        group = by_axes.get(axes)
        if group is None:
            described = ", ".join(f"{axis}={value}" for axis, value in zip(GRID_AXES, axes))
            raise storage.RunFolderError(f"{where} holds the fit group {described}, which {config_path} no longer lists. {remedy}")
        if n not in sample_sizes:
            raise storage.RunFolderError(f"{where} holds n = {n}, which {config_path} no longer lists. {remedy}")
        if max(replicates) >= config.replicates:
            raise storage.RunFolderError(
                f"{where} holds replicates up to {max(replicates)} of {group.label}, n = {n}, but {config_path} "
                f"asks for replicates: {config.replicates}; the table would hold rows the config does not. {remedy}"
            )
        stored.setdefault((group.index, n), set()).update(replicates)

    def add_rows(source: Path, metadata: dict | None) -> None:
        rows = pd.read_parquet(source, columns=list(GRID_AXES) + ["n", "replicate"])
        for key, cell in rows.groupby(list(GRID_AXES) + ["n"], sort=False):
            add(source, metadata, tuple(key[:-1]), int(key[-1]), set(cell["replicate"].astype(int)))

    for path in storage.part_paths(run_dir):
        metadata = storage.read_metadata(path)
        if metadata is not None and "replicates" in metadata:
            axes = tuple(metadata["axes"][axis] for axis in GRID_AXES)
            add(path, metadata, axes, int(metadata["n"]), set(range(*metadata["replicates"])))
        else:
            add_rows(path, metadata)
    table = run_dir / storage.TABLE_FILE
    if table.is_file():
        add_rows(table, storage.read_metadata(table))
    return stored


@dataclass(frozen=True)
class CellWork:
    """One task of a sweep: replicates ``first`` ≤ r < ``stop`` of the cell (``group``, ``n``)."""

    group: FitGroup
    n: int
    first: int
    stop: int

    @property
    def name(self) -> str:
        """The part file's name: the cell's, with the replicate range when it does not start at 0
        (the replicates a resumed run adds to a stored cell)."""
        name = cell_name(self.group, self.n)
        return name if self.first == 0 else f"{name}-r{self.first}-{self.stop}"


def pending_work(config: StudyConfig, stored: dict[tuple[int, int], set[int]]) -> list[CellWork]:
    """What is missing, cell by cell in grid order: one task per run of consecutive missing replicates."""
    work = []
    for group in config.groups:
        for n in config.sample_sizes:
            have = stored.get((group.index, n), set())
            first = None
            for replicate in range(config.replicates + 1):
                missing = replicate < config.replicates and replicate not in have
                if missing and first is None:
                    first = replicate
                elif not missing and first is not None:
                    work.append(CellWork(group, n, first, replicate))
                    first = None
    return work


def merge_results(config: StudyConfig, run_dir: Path) -> pd.DataFrame:
    """Merge the stored cells into ``fits.parquet`` in canonical order (group, n, replicate), with
    the settings fingerprint its rows were checked against (:func:`stored_replicates`) and, per
    stored part, where and with which layout it was computed (its key less the settings)."""
    frames = [frame for frame in (storage.read_parts(run_dir),) if frame is not None]
    table_path = run_dir / storage.TABLE_FILE
    earlier = None
    if table_path.is_file():
        frames.append(pd.read_parquet(table_path))
        earlier = storage.read_metadata(table_path)
    provenance = list((earlier or {}).get("cells", []))
    for path in storage.part_paths(run_dir):
        key = storage.read_metadata(path)
        if key is not None:
            provenance.append({name: value for name, value in key.items() if name not in ("determinants", "fingerprint")})
    table = pd.concat(frames, ignore_index=True)
    order = {tuple(group.axes().values()): group.index for group in config.groups}
    table["_group_order"] = [order[tuple(row)] for row in table[list(GRID_AXES)].itertuples(index=False)]
    table = (
        table.drop_duplicates(subset=["_group_order", "n", "replicate"])
        .sort_values(["_group_order", "n", "replicate"], kind="stable")
        .drop(columns="_group_order")
        .reset_index(drop=True)
    )
    columns = [c for c in column_order(config) if c in table.columns]
    table = table[columns + [c for c in table.columns if c not in columns]]
    determinants = cell_determinants(config)
    storage.merge_table(run_dir, table, {"seed": config.seed, "fingerprint": config_fingerprint(determinants),
                                         "determinants": determinants, "cells": provenance})
    return table


# ----------------------------------------------------------------------------------------------
# The sweep.


def _chunk_size(config: StudyConfig) -> int:
    """Replicates per program call: ``sweep.batch_size`` rounded up to a multiple of the devices."""
    devices = jax.device_count()
    return math.ceil(config.sweep.batch_size / devices) * devices


def _replicate_sharding():
    """A sharding of the replicate axis over every device, or None on a single device."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("replicate",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replicate"))


def _check_prefix_stable_random_bits() -> None:
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError(
            "the sweep pads samples and relies on JAX's partitionable Threefry random bits "
            "(jax_threefry_partitionable=True, the default since JAX 0.5); it has been turned off"
        )


def plan(config: StudyConfig) -> dict[str, Any]:
    """What a sweep of ``config`` will do: cells, buckets and programs to compile."""
    growth = config.sweep.bucket_growth
    buckets = sorted({bucket_size(n, growth) for n in config.sample_sizes})
    batch = _chunk_size(config)
    chunks = math.ceil(config.replicates / batch)
    return {
        "groups": [group.label for group in config.groups],
        "sample_sizes": len(config.sample_sizes),
        "replicates": config.replicates,
        "cells": len(config.groups) * len(config.sample_sizes),
        "fits": len(config.groups) * len(config.sample_sizes) * config.replicates,
        "buckets": buckets,
        "batch_size": batch,
        "chunks_per_cell": chunks,
        "fit_programs": len(config.groups) * len(buckets),
        "score_programs": len(config.groups),
        "padding_overhead": float(np.mean([bucket_size(n, growth) / n for n in config.sample_sizes])),
    }


def _request_programs(compiler: _AheadCompiler, config: StudyConfig, pending, root_key, chunk, tol, truth,
                      density_key) -> None:
    """Queue every fit and score program the pending cells need, in the order they need them."""
    growth = config.sweep.bucket_growth
    for group, n in pending:
        size = bucket_size(n, growth)
        fit_spec = FitSpec.of(config, group, size)
        fit_program = fit_cells_program(fit_spec)
        fit_arguments = (fit_spec, root_key, chunk, np.int64(n), tol, truth)
        compiler.request(("fit", group.index, size), {"program": "fit", "group": group.label, "bucket": size},
                         lambda program=fit_program, arguments=fit_arguments: program.lower(*arguments).compile())

        def compile_score(spec=ScoreSpec.of(config, group), program=fit_program, arguments=fit_arguments):
            # The fit program's output shapes, from its (cached) trace: nothing runs or compiles here.
            fitted = program.trace(*arguments).out_info.params
            return score_cells_program.lower(spec, fitted, truth, density_key).compile()

        compiler.request(("score", group.index), {"program": "score", "group": group.label}, compile_score)


class _CellContext:
    """What the cells of one sweep share in one process: the keys, the truth, the tolerance, the
    chunk size and the replicate-id chunks (placed on the replicate sharding when there is one)."""

    def __init__(self, config: StudyConfig):
        self.config = config
        self.batch = _chunk_size(config)
        self.sharding = _replicate_sharding()
        self.root_key = jax.random.key(config.seed)
        self.density_key = jax.random.fold_in(self.root_key, DENSITY_STREAM)
        self.truth, self.tol = config.truth, np.float64(config.fit.tol)
        self._chunks: dict[int, jax.Array] = {}

    def chunk(self, first: int) -> jax.Array:
        """Replicate ids ``first`` .. ``first + batch − 1`` (``first`` a multiple of the batch)."""
        if first not in self._chunks:
            ids = jnp.arange(first, first + self.batch, dtype=jnp.int32)
            self._chunks[first] = jax.device_put(ids, self.sharding) if self.sharding is not None else ids
        return self._chunks[first]


@dataclass
class CellResult:
    """The rows of one :class:`CellWork` and where and how they were computed."""

    work: CellWork
    frame: pd.DataFrame
    seconds: float
    batch_size: int
    devices: int
    device_kind: str
    computed_by: str
    programs: list[dict] = field(default_factory=list)


def compute_cell(context: _CellContext, work: CellWork, log: _CompileLog,
                 compiler: _AheadCompiler | None = None) -> CellResult:
    """Sample → start → fit → score the replicates of ``work``, chunk by chunk (see "Keys" in the
    module docstring: a replicate is computed in the chunk of its id, whatever range is asked for)."""
    started = time.perf_counter()
    config, group, n = context.config, work.group, work.n
    size = bucket_size(n, config.sweep.bucket_growth)
    fit_spec, score_spec = FitSpec.of(config, group, size), ScoreSpec.of(config, group)
    fit_program = fit_cells_program(fit_spec)
    root_key, density_key, truth, tol = context.root_key, context.density_key, context.truth, context.tol
    frames = []
    for first in range(work.first - work.first % context.batch, work.stop, context.batch):
        chunk = context.chunk(first)
        if compiler is not None:
            compiler.wait(("fit", group.index, size))
        fits = log.timed({"program": "fit", "group": group.label, "bucket": size},
                         lambda: fit_program(fit_spec, root_key, chunk, np.int64(n), tol, truth))
        if compiler is not None:
            compiler.wait(("score", group.index))
        scores = log.timed({"program": "score", "group": group.label},
                           lambda: score_cells_program(score_spec, fits.params, truth, density_key))
        fits, scores = jax.device_get((fits, scores))
        ids = np.asarray(chunk)
        positions = np.flatnonzero((ids >= work.first) & (ids < work.stop))
        frames.append(_cell_frame(config, group, n, size, ids[positions], positions, fits, scores))
    return CellResult(work, pd.concat(frames, ignore_index=True), round(time.perf_counter() - started, 3),
                      context.batch, jax.device_count(), jax.devices()[0].device_kind,
                      f"{socket.gethostname()}:{os.getpid()}")


_WORKER_CONTEXTS: dict[str, _CellContext] = {}
_WORKER_CONTEXTS_LOCK = threading.Lock()


def _worker_context(payload: dict) -> _CellContext:
    """The context of the sweep described by ``payload``, built once per worker process, so that its
    later cells reuse the programs its first cells compiled."""
    with _WORKER_CONTEXTS_LOCK:
        context = _WORKER_CONTEXTS.get(payload["config_hash"])
        if context is None:
            cache = payload.get("compile_cache")
            if cache and not jax.config.jax_compilation_cache_dir:
                try:
                    Path(cache).mkdir(parents=True, exist_ok=True)
                    jax.config.update("jax_compilation_cache_dir", str(cache))
                except OSError:
                    pass  # a worker that cannot reach the driver's cache folder compiles for itself
            _check_prefix_stable_random_bits()
            config = parse_config(payload["config"], payload["source"])
            context = _WORKER_CONTEXTS[payload["config_hash"]] = _CellContext(config)
    return context


def compute_cell_on_worker(payload: dict, work: CellWork) -> CellResult:
    """The task an out-of-process executor runs: :func:`compute_cell` under the resolved config in
    ``payload`` (plain data, parsed again on the worker), with the worker's own compile log. It reads
    and writes no file; the driver stores what it returns."""
    context = _worker_context(payload)
    log = _CompileLog()
    monitoring.register_event_duration_secs_listener(log.on_duration)
    try:
        result = compute_cell(context, work, log)
    finally:
        monitoring.unregister_event_duration_listener(log.on_duration)
    result.programs = [{**program, "ahead": False, "worker": result.computed_by} for program in log.programs]
    return result


def _one_or_all(values: set) -> Any:
    """A session statistic that is one value on one machine and may vary across workers."""
    return next(iter(values)) if len(values) == 1 else sorted(values)


def run_sweep(
    config: StudyConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    after_cell: Callable[[int, str], None] | None = None,
    executor: executors.LocalExecutor | executors.DaskExecutor | executors.ExecutorOptions | None = None,
) -> dict[str, Any]:
    """Compute every cell of ``config`` not yet stored in ``run_dir``, then merge ``fits.parquet``.

    Args:
        config: the validated study.
        run_dir: its results folder (see :mod:`moe_theory.storage`); rows stored there are not
            recomputed, which is how ``--resume`` works (:func:`stored_replicates` checks that they
            may be kept and :func:`pending_work` lists what is missing).
        progress: show a tqdm progress bar (on stderr) with an ETA.
        after_cell: called as ``after_cell(cells_written_this_session, part_name)`` after each
            cell is stored (tests use it to kill a run mid-sweep).
        executor: where the cells are computed (:mod:`moe_theory.executors`): an open executor,
            which stays open, or options for one that is opened only if there is work and closed at
            the end. Default: in this process, as :class:`moe_theory.executors.LocalExecutor`.
            Whatever computes them, this process alone writes the folder, each cell once.

    Returns:
        This session's statistics (cells, wall and compile seconds, compile counts), also
        appended to ``meta.json`` by the caller.
    """
    _check_prefix_stable_random_bits()
    run_dir = Path(run_dir)
    started = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    determinants = cell_determinants(config)
    fingerprint = config_fingerprint(determinants)
    cells = [(group, n) for group in config.groups for n in config.sample_sizes]
    work = pending_work(config, stored_replicates(config, run_dir))
    cells_with_work = {(unit.group.index, unit.n) for unit in work}

    growth = config.sweep.bucket_growth
    batch = _chunk_size(config)
    owned = executor is None or isinstance(executor, executors.ExecutorOptions)
    if isinstance(executor, executors.ExecutorOptions) and work:
        executor = executor.open()
    elif owned:
        executor = executors.LocalExecutor()  # also when there is nothing to compute: no cluster is started
    description = executor.describe()

    def cost(unit: CellWork) -> int:
        """Padded data points fitted for ``unit``, the progress bar's measure: the ETA weighs a cell by its cost."""
        chunks = math.ceil((unit.stop - (unit.first - unit.first % batch)) / batch)
        return bucket_size(unit.n, growth) * chunks * batch

    log = _CompileLog()
    monitoring.register_event_duration_secs_listener(log.on_duration)
    monitoring.register_event_listener(log.on_event)
    compiler = None
    futures: dict[Any, CellWork] = {}
    results: list[CellResult] = []
    written: set[str] = set()
    failure: BaseException | None = None
    cell_seconds: dict[str, float] = {}
    bar = None
    try:
        if executor.in_process:
            context = _CellContext(config)
            compiler = _AheadCompiler(log)
            pending_cells = list(dict.fromkeys((unit.group, unit.n) for unit in work))
            _request_programs(compiler, config, pending_cells, context.root_key, context.chunk(0), context.tol,
                              context.truth, context.density_key)
            for unit in work:
                futures[executor.submit(compute_cell, context, unit, log, compiler)] = unit
        elif work:
            resolved = config.to_dict()
            payload = {
                "config": resolved,
                "source": config.source,
                "config_hash": hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest(),
                "compile_cache": jax.config.jax_compilation_cache_dir or None,
            }
            # Task names unique to this session: a long-lived scheduler may still hold an earlier
            # session's results under the same cell names.
            session_token = secrets.token_hex(6)
            for unit in work:
                futures[executor.submit(compute_cell_on_worker, payload, unit,
                                        key=f"moe-theory-cell-{unit.name}-{session_token}")] = unit
        if progress and work:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(cost(unit) for unit in work), desc=config.name, dynamic_ncols=True,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        for future in executor.as_completed(list(futures)):
            unit = futures[future]
            try:
                result = future.result()
            except Exception as error:
                if executor.in_process:
                    raise
                # Other workers' cells may be finished: store them all, then raise the first error.
                failure = failure or error
                continue
            executor.release(future)
            storage.write_part(run_dir, unit.name, result.frame, {
                "cell": cell_name(unit.group, unit.n), "group": unit.group.label, "axes": unit.group.axes(),
                "n": unit.n, "replicates": [unit.first, unit.stop], "seed": config.seed,
                "fingerprint": fingerprint, "determinants": determinants, "batch_size": result.batch_size,
                "devices": result.devices, "device_kind": result.device_kind, "computed_by": result.computed_by,
            })
            written.add(unit.name)
            results.append(replace(result, frame=None))
            cell_seconds[unit.name] = result.seconds
            if bar is not None:
                bar.set_postfix_str(f"{unit.group.label}, n={unit.n} (bucket {bucket_size(unit.n, growth)})")
                bar.update(cost(unit))
            if after_cell is not None:
                after_cell(len(written), unit.name)
        if failure is not None:
            raise failure
    finally:
        executor.cancel(future for future, unit in futures.items() if unit.name not in written)
        if owned:
            executor.close()
        if compiler is not None:
            compiler.close()
        if bar is not None:
            bar.close()
        monitoring.unregister_event_duration_listener(log.on_duration)
        monitoring.unregister_event_listener(log.on_event)

    merge_results(config, run_dir)
    programs = log.programs + [program for result in results for program in result.programs]
    return {
        "started_at": started_at,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "executor": description,
        "cells_total": len(cells),
        "cells_already_stored": len(cells) - len(cells_with_work),
        "cells_computed": len(work),
        "replicates_computed": sum(unit.stop - unit.first for unit in work),
        "batch_size": _one_or_all({result.batch_size for result in results} or {batch}),
        "devices": _one_or_all({result.devices for result in results} or {jax.device_count()}),
        "compile_count": len(programs),
        "compile_seconds": round(sum(p["trace_seconds"] + p["compile_seconds"] for p in programs), 3),
        "compile_wait_seconds": round(log.wait_seconds, 3),
        "programs": programs,
        "xla_compilations_all": log.xla_compiles,
        "xla_compile_seconds_all": round(log.xla_seconds, 3),
        "persistent_cache_hits": log.cache_hits,
        "cell_seconds": cell_seconds,
    }


# ----------------------------------------------------------------------------------------------
# A whole study: lock, metadata, sweep, then the tables, figures and report.


def _totals(sessions: list[dict]) -> dict[str, Any]:
    return {
        "sessions": len(sessions),
        "wall_seconds": round(sum(s.get("wall_seconds", 0.0) for s in sessions), 3),
        "compile_seconds": round(sum(s.get("compile_seconds", 0.0) for s in sessions), 3),
        "compile_wait_seconds": round(sum(s.get("compile_wait_seconds", 0.0) for s in sessions), 3),
        "compile_count": sum(s.get("compile_count", 0) for s in sessions),
        "cells_computed": sum(s.get("cells_computed", 0) for s in sessions),
    }


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception while a study runs so that it ends like Ctrl-C: the
    session is recorded as interrupted and the finished cells are kept."""


@contextmanager
def _sigterm_interrupts():
    """Raise :class:`Terminated` on SIGTERM in this block (only the main thread can handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("SIGTERM received")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _record_end(run_dir: Path, meta: dict, error: BaseException, cells_stored: int) -> None:
    """Record how the session ended (:func:`moe_theory.storage.end_session_by`), with the cells it
    stored and the run's totals."""
    storage.end_session_by(meta, error, cells_stored=cells_stored)
    meta["totals"] = _totals(meta["sessions"])
    storage.write_meta(run_dir, meta)


def run_study(
    config: StudyConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    command: str | None = None,
    after_cell: Callable[[int, str], None] | None = None,
    figures: bool = True,
    executor: executors.LocalExecutor | executors.DaskExecutor | executors.ExecutorOptions | None = None,
) -> dict[str, Any]:
    """Run (or resume) a study into ``run_dir`` and write every artefact of the results folder.

    ``run_dir`` must hold the resolved ``config.yaml`` (:func:`moe_theory.storage.create_run_dir`
    then :meth:`StudyConfig.to_yaml`, as ``moe-theory run`` does). Rows already stored there are
    not recomputed; a folder whose stored rows another configuration computed is refused before a
    session opens (:func:`stored_replicates`). ``executor`` is passed to :func:`run_sweep`.

    Whatever ends the session is recorded in ``meta.json``: ``complete``; ``interrupted`` (Ctrl-C or
    SIGTERM) or ``failed`` (an exception), with the reason, the exception propagating. Finished
    cells are kept either way, and ``--resume`` continues from them. Only a kill that leaves no
    chance to write (SIGKILL, power loss) leaves ``running``, which the next session marks
    ``interrupted``. Returns the updated ``meta.json`` contents.
    """
    from . import plotting, report  # here, not at the top: matplotlib is slow to import and only a whole study draws

    if isinstance(executor, executors.ExecutorOptions):
        executor.check()
    run_dir = Path(run_dir)
    with storage.RunLock(run_dir) as lock:
        stored_replicates(config, run_dir)
        meta = storage.read_meta(run_dir)
        if not meta:
            meta = {
                "run_id": run_dir.name,
                "name": config.name,
                "config_source": config.source,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "dtype": config.fit.dtype,
                "seed": config.seed,
                "environment": storage.environment(),
                "git": storage.git_state(),
                "sessions": [],
            }
        meta["plan"] = plan(config)  # a resumed folder's config may have been edited (more replicates)
        storage.begin_session(run_dir, meta, command, lock,
                              persistent_compile_cache=jax.config.jax_compilation_cache_dir or None)
        stored_this_session: list[str] = []

        def count_and_forward(written: int, name: str) -> None:
            stored_this_session.append(name)
            if after_cell is not None:
                after_cell(written, name)

        try:
            with _sigterm_interrupts():
                session = run_sweep(config, run_dir, progress=progress, after_cell=count_and_forward, executor=executor)
                meta["sessions"][-1].update(status="complete", **session)
                meta["status"] = "complete"
                meta["totals"] = _totals(meta["sessions"])
                storage.write_meta(run_dir, meta)
                start = time.perf_counter()
                report.write_tables(run_dir)
                if figures:
                    plotting.make_figures(run_dir)
                meta["sessions"][-1]["tables_and_figures_seconds"] = round(time.perf_counter() - start, 3)
                meta["totals"] = _totals(meta["sessions"])
                storage.write_meta(run_dir, meta)
                report.write_report(run_dir)
        except BaseException as error:
            _record_end(run_dir, meta, error, len(stored_this_session))
            raise
    return meta
