"""The ``moe-theory`` command line (also ``python -m moe_theory``).

* ``moe-theory run CONFIG [--set KEY.PATH=VALUE ...] [--out DIR]`` runs a rate study described by a
  YAML config (:mod:`moe_theory.config`) into a new folder ``DIR/<name>/<run_id>/``
  (:mod:`moe_theory.storage`): the sweep (:mod:`moe_theory.sweep`) with a progress bar, then
  ``summary.csv``, ``rates.csv``, the figures and ``report.md``; it ends by printing where
  everything went and the rate table. ``--resume RUN_DIR`` completes an interrupted run in its
  own folder without recomputing finished cells (CONFIG may then be left out; if given, it must
  resolve to the run's saved config).
* ``moe-theory plot RUN_DIR`` redraws the figures and ``moe-theory report RUN_DIR`` rewrites the
  tables and the report, from ``fits.parquet`` alone.
* ``moe-theory list`` lists the configs shipped in ``configs/`` with their one-line descriptions
  (``--rates`` lists the theoretical-rate registry instead).
* ``moe-theory fit --data FILE.csv --gate softmax --expert gaussian --num-experts 3`` fits a user's
  own data: a CSV with input columns ``x1 .. xd`` and a response column ``y`` (integer classes for
  classification experts). It prints the fitted parameters, log-likelihood and convergence flags
  as JSON, or writes them with ``--out``; the ``params`` block uses the same layout a config's true
  parameters use, so a fit can be fed back as a starting point or a truth. With ``--estimator lse``
  it fits the regression MoE y = Σ_i w_i(x) h(x; η_i) + ε of [5] and [10] by least squares instead
  (:mod:`moe_theory.regression`): ``--gate softmax|sigmoid`` (the sigmoid unnormalised), ``--expert``
  a regression expert (``linear``, ``relu``, ``gelu``, ``sigmoid``, ``tanh``, ``constant`` or
  ``{"name": "polynomial", "degree": 3}``), optionally ``--bound B`` to keep every parameter in
  [−B, B]; it reports the mean squared residual instead of a log-likelihood.

Before anything compiles, ``run`` estimates the study's peak memory (:mod:`moe_theory.resources`) and
refuses a plan larger than the memory available, naming the key to change; ``--memory-limit SIZE``
sets the budget and ``--allow-large`` runs anyway. Every refused command ends in :func:`main`, which
prints one line, ``moe-theory: error: ...``, and exits with status 2 (1 for ``fit``), without a
traceback; an unexpected exception keeps its traceback.

``run`` keeps JAX's persistent compilation cache in ``$MOE_THEORY_CACHE`` (default
``~/.cache/moe_theory/jax``), so a repeated or resumed run loads its compiled programs instead of
compiling them again; ``--no-compile-cache`` turns it off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .fit.settings import EM_DEFAULTS, FIT_DEFAULTS, LIKELIHOODS, METHODS

CLI_RANDOM_STARTS = 5
"""Random starts of ``moe-theory fit`` (the API's default is one start, :data:`FIT_DEFAULTS`): a user's
own data has no known truth to start near, so the command line fits from several starts by default."""


class CommandError(Exception):
    """A command cannot go on: bad arguments, data or files. :func:`main` prints its message as one
    line (``moe-theory: error: ...``) and exits with a non-zero status, without a traceback."""


ERROR_STATUS = 2
"""Exit status of a refused command (a bad config, run folder, option or file), as argparse's own."""
INTERRUPTED_STATUS = 130
"""Exit status after Ctrl-C: 128 + SIGINT, as a shell reports a process killed by it."""
TERMINATED_STATUS = 143
"""Exit status after SIGTERM (a scheduler's kill, ``timeout``): 128 + SIGTERM."""
BROKEN_PIPE_STATUS = 141
"""Exit status when the reader of stdout went away (``moe-theory list | head``): 128 + SIGPIPE."""
NAN_TEXTS = frozenset({"nan", "na", "n/a", "null", "none"})
"""Cell texts read as a missing value rather than as a word that is not a number."""


@dataclass(frozen=True)
class CsvData:
    """The data of ``fit --data``: inputs (n, d), responses (n,) and each row's line in the file."""

    x: np.ndarray
    y: np.ndarray
    lines: np.ndarray


def _read_csv(path: Path) -> CsvData:
    """Read and check a CSV of x1..xd, y: every problem (unreadable, empty, ragged or duplicated
    columns, a missing, non-numeric or infinite value) is a :class:`CommandError` naming the line
    and column, because a silently dropped or coerced value would change the fit."""
    import pandas as pd

    where = f"--data {path}"
    if not path.is_file():
        raise CommandError(f"{where}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CommandError(f"{where}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                           f"{error.start}); expected a CSV file") from None
    except OSError as error:
        raise CommandError(f"{where}: cannot read the file ({error.strerror})") from None
    if "\x00" in text:
        raise CommandError(f"{where}: holds NUL bytes, so it is a binary file; expected a CSV text file")
    rows = [(reader_line, row) for reader_line, row in _csv_rows(text) if any(cell.strip() for cell in row)]
    if not rows:
        raise CommandError(f"{where}: empty file; expected a header x1,...,xd,y and data rows")
    (_, header), body = rows[0], rows[1:]
    header = [name.strip() for name in header]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise CommandError(f"{where}: duplicated column(s) {duplicated}; expected each column once")
    inputs = sorted((c for c in header if c.startswith("x") and c[1:].isdigit()), key=lambda c: int(c[1:]))
    if "y" not in header or not inputs:
        raise CommandError(f"{where}: expected columns x1..xd and y, found {header}")
    if [int(c[1:]) for c in inputs] != list(range(1, len(inputs) + 1)):
        raise CommandError(f"{where}: input columns must be x1..xd without gaps, found {inputs}")
    if not body:
        raise CommandError(f"{where}: no data rows under the header; expected at least one row")
    for line, row in body:
        if len(row) != len(header):
            raise CommandError(f"{where}: line {line} has {len(row)} fields; expected {len(header)}, as in the header")
    lines = np.array([line for line, _ in body])
    table = pd.DataFrame([row for _, row in body], columns=header)[inputs + ["y"]]
    raw = table.apply(lambda column: column.str.strip())
    values = raw.apply(lambda column: pd.to_numeric(column, errors="coerce")).to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        cell = raw.iat[row, column]
        if cell == "" or cell.lower() in NAN_TEXTS:
            what = "missing value"
        elif np.isinf(values[row, column]):
            what = f"{cell!r} is infinite"
        else:
            what = f"{cell!r} is not a number"
        raise CommandError(f"{where}: line {lines[row]}, column {raw.columns[column]}: {what}; "
                           "expected finite numbers in every x and y")
    return CsvData(values[:, :-1], values[:, -1], lines)


def _csv_rows(text: str):
    """(line number, fields) of every CSV record in ``text``."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        yield reader.line_num, row


def _json_or_name(text: str, option: str):
    """A registry name, or a JSON object for a name with options (``{"name": ..., ...}``)."""
    if not text.lstrip().startswith(("{", "[", '"')):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{option}: invalid JSON ({error})") from None
    if not isinstance(value, dict) or not isinstance(value.get("name", ""), str):
        raise CommandError(f"{option}: expected a name or a JSON object (with a \"name\" string if any), got {text}")
    return value


def _check_fit_settings(args: argparse.Namespace) -> None:
    from .resources import MAX_SEED

    if args.num_experts < 1:
        raise CommandError(f"--num-experts: expected a positive integer, got {args.num_experts}")
    if args.n_init < 1:
        raise CommandError(f"--n-init: expected a positive integer, got {args.n_init}")
    if not args.tol >= 0 or not math.isfinite(args.tol):
        raise CommandError(f"--tol: expected a non-negative number, got {args.tol}")
    if args.max_iter < 1:
        raise CommandError(f"--max-iter: expected a positive integer, got {args.max_iter}")
    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed: expected an integer in [0, 2^63) (JAX's random key takes a signed 64-bit "
                           f"integer), got {args.seed}")
    if args.bound is not None and not (args.bound > 0 and math.isfinite(args.bound)):
        raise CommandError(f"--bound: expected a positive finite number, got {args.bound}")


def _check_output_file(out: str | None) -> None:
    """Refuse an ``--out`` file that cannot be written, before any fitting."""
    if out is None:
        return
    path = Path(out)
    folder = path.parent
    if path.is_dir():
        raise CommandError(f"--out {out}: is a folder; expected a file path")
    if not folder.is_dir():
        raise CommandError(f"--out {out}: no such folder {folder}; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CommandError(f"--out {out}: not writable")


def _finite_or_none(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity) and
    NumPy scalars and arrays made plain."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, np.ndarray):
        return _finite_or_none(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _write_report(args: argparse.Namespace, report: dict) -> None:
    text = json.dumps(_finite_or_none(report), indent=2, ensure_ascii=False, allow_nan=False)
    if args.out:
        try:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        except OSError as error:
            raise CommandError(f"--out {args.out}: cannot write ({error.strerror})") from None
        print(f"wrote {args.out}")
    else:
        print(text)


def _parameter_count(family) -> int:
    """Number of parameters of a :class:`~moe_theory.models.Family` (every field's entries)."""
    return sum(int(np.prod(family.field_shape(field))) for fields in family.fields.values() for field in fields)


def _check_enough_rows(args: argparse.Namespace, rows: int, num_parameters: int, description: str) -> None:
    """Refuse data with no more rows than parameters: the fit would interpolate (or divide by zero)
    and still report convergence."""
    if rows <= num_parameters:
        raise CommandError(f"--data {args.data}: {rows} rows cannot determine the {num_parameters} parameters "
                           f"of {description}; expected more rows than parameters")


def _report_non_finite(finite: bool) -> int:
    """The exit status of a finished fit, with a line on stderr when it did not reach a finite value."""
    if finite:
        return 0
    print("moe-theory: error: the fit did not reach a finite objective from any start (non-finite values are "
          "written as null); try more --n-init starts or fewer experts", file=sys.stderr)
    return 1


def _least_squares_command(args: argparse.Namespace, data: CsvData) -> int:
    """``fit --estimator lse``: the best of ``--n-init`` data-scaled random starts, all fitted at once."""
    import jax
    import jax.numpy as jnp

    from . import regression
    from .fit.least_squares import LeastSquaresConfig, LevenbergMarquardt, at_bound
    from .fit.solver import run_solver

    x, y = data.x, data.y
    expert = _json_or_name(args.expert or "linear", "--expert")
    try:
        family = regression.make_regression_family(args.gate, expert, args.num_experts, x.shape[1], args.score)
        settings = LeastSquaresConfig(max_iter=args.max_iter, bound=args.bound)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    _check_enough_rows(args, x.shape[0], _parameter_count(family.moe_family), family.describe())
    solver = LevenbergMarquardt(regression.RegressionMean(family), settings)
    x, y = jnp.asarray(x, float), jnp.asarray(y, float)
    keys = jax.random.split(jax.random.key(args.seed), args.n_init)
    starts = jax.vmap(lambda key: regression.random_start(key, family, x, y))(keys)
    results = jax.jit(jax.vmap(lambda start: run_solver(solver, start, x, y, None, args.tol)))(starts)
    objective = np.where(np.asarray(results.finite), np.asarray(results.log_likelihood), -np.inf)
    best = int(np.argmax(objective))
    params = jax.tree_util.tree_map(lambda leaf: leaf[best], results.params)
    finite = bool(results.finite[best])
    _write_report(args, {
        "family": family.describe(),
        "estimator": "lse",
        "n": int(x.shape[0]),
        "mean_squared_residual": float(-results.log_likelihood[best]) if finite else None,
        "n_iter": int(results.n_iter[best]),
        "converged": bool(results.converged[best]),
        "finite": finite,
        "at_bound": bool(at_bound(params, args.bound)),
        "starts_converged": int(np.sum(np.asarray(results.converged))),
        "params": regression.as_numpy(params),
    })
    return _report_non_finite(finite)


def _fit_command(args: argparse.Namespace) -> int:
    import jax

    from .fit import fit
    from .models import make_family
    from .params import params_to_dict

    _check_fit_settings(args)
    if args.estimator != "lse" and (args.bound is not None or args.score != "linear"):
        raise CommandError("--bound and --score apply to --estimator lse only")
    _check_output_file(args.out)
    data = _read_csv(Path(args.data))
    if args.estimator == "lse":
        return _least_squares_command(args, data)
    x, y = data.x, data.y
    gate = _json_or_name(args.gate, "--gate")
    expert = _json_or_name(args.expert or "gaussian", "--expert")
    try:
        family = make_family(gate, expert, args.num_experts, x.shape[1], args.num_classes)
        config = replace(EM_DEFAULTS, max_iter=args.max_iter, gate_steps=args.gate_steps, likelihood=args.likelihood)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    if family.expert.is_classifier:
        not_a_class = (np.mod(y, 1) != 0) | (y < 0) | (y >= family.num_classes)
        if not_a_class.any():
            row = int(np.argmax(not_a_class))
            raise CommandError(f"--data {args.data}: line {data.lines[row]}, column y: {y[row]:g} is not a class; "
                               f"y must hold integer classes 0..{family.num_classes - 1}")
        y = y.astype(np.int64)
    _check_enough_rows(args, x.shape[0], _parameter_count(family), family.describe())
    try:
        # The fitters check the family against the likelihood and the method when they trace,
        # before any iteration runs.
        result = fit(
            family, x, y, key=jax.random.key(args.seed), n_init=args.n_init, method=args.method, tol=args.tol,
            config=config,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    report = {
        "family": family.describe(),
        "method": args.method,
        "likelihood": args.likelihood,
        "n": int(x.shape[0]),
        "log_likelihood": float(result.log_likelihood),
        "n_iter": int(result.n_iter),
        "converged": bool(result.converged),
        "finite": bool(result.finite),
        "params": params_to_dict(result.params),
    }
    _write_report(args, report)
    return _report_non_finite(bool(result.finite))


def _default_cache_dir() -> Path:
    if os.environ.get("MOE_THEORY_CACHE"):
        return Path(os.environ["MOE_THEORY_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe_theory" / "jax"


def _error(message: str) -> int:
    """Print a refused command's message as one line on stderr; the exit status is :data:`ERROR_STATUS`."""
    print(f"moe-theory: error: {_one_line(message)}", file=sys.stderr)
    return ERROR_STATUS


def _one_line(message: str) -> str:
    """``message`` on one line (YAML parser messages span several)."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


DEFAULT_RESULTS_ROOT = "results"
"""Where ``run`` puts a new run when ``--out`` is not given."""


def _resolve_config(config: str | None) -> str | None:
    """A config path, or the name ``moe-theory list`` prints (``quickstart.yaml``, or ``quickstart``)
    of a config in one of :func:`config_folders`, searched in the same order."""
    if config is None or Path(config).exists() or os.sep in config:
        return config
    file_name = config if config.endswith((".yaml", ".yml")) else f"{config}.yaml"
    for folder in config_folders():
        if (folder / file_name).is_file():
            return str(folder / file_name)
    return config  # load_config reports "no such config file"


def _check_folder_usable(path: Path, option: str) -> None:
    """Refuse a folder that cannot be created or written, without creating anything: its nearest
    existing ancestor must be a writable folder."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise CommandError(f"{option} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: {probe} is not writable")


def _check_run_arguments(args: argparse.Namespace) -> None:
    """What ``run`` can refuse before reading a config: ``--out`` with ``--resume`` (a resumed run
    stays in its own folder, so an ``--out`` would be ignored), unusable ``--out`` and
    ``--compile-cache`` folders, and a bad ``--memory-limit``. Resolves a shipped config's name."""
    from .resources import parse_memory_size

    if args.resume and args.out is not None:
        raise CommandError("--out cannot be combined with --resume: a resumed run continues in its own folder "
                           f"({args.resume}); leave out --out")
    args.out = DEFAULT_RESULTS_ROOT if args.out is None else args.out
    args.config = _resolve_config(args.config)
    if not args.resume:
        _check_folder_usable(Path(args.out), "--out")
    if not args.no_compile_cache:
        _check_folder_usable(Path(args.compile_cache) if args.compile_cache else _default_cache_dir(), "--compile-cache")
    if args.memory_limit is not None:
        try:
            args.memory_limit = parse_memory_size(args.memory_limit)
        except ValueError as error:
            raise CommandError(f"--memory-limit: {error}") from None


def _check_memory(args: argparse.Namespace, config) -> None:
    """Refuse a study whose largest cell would not fit in memory (:func:`moe_theory.resources.check_study`),
    before anything compiles; with ``--allow-large``, say so and go on."""
    from .resources import check_study

    note = check_study(config, limit=args.memory_limit, allow_large=args.allow_large)
    if note:
        print(f"moe-theory: warning: {note}", file=sys.stderr, flush=True)


def _add_resource_options(run_parser: argparse.ArgumentParser) -> None:
    run_parser.add_argument("--memory-limit", metavar="SIZE",
                            help="memory the study may use, e.g. 8G or 512M (default: the machine's, or the "
                                 "accelerator's); a study whose estimated peak exceeds it is refused")
    run_parser.add_argument("--allow-large", action="store_true",
                            help="run even if the estimated peak memory exceeds the memory available")


def _structured_config(args: argparse.Namespace) -> Path | None:
    """The config to hand to :mod:`moe_theory.structured` (one with a top-level ``kind``: a hierarchical
    or attention study), or None for a flat sweep config."""
    import yaml

    from . import storage
    from .config import ConfigError, read_config_text, read_yaml

    path = Path(args.config) if args.config else (Path(args.resume) / storage.CONFIG_FILE if args.resume else None)
    if path is None or not path.is_file():
        return None
    try:
        data = read_yaml(read_config_text(path))
    except (ConfigError, yaml.YAMLError):
        return None  # the flat loader reports the problem with its own message
    return path if isinstance(data, dict) and "kind" in data else None


def _run_command(args: argparse.Namespace) -> int:
    import jax

    from . import storage, sweep
    from .config import ArmsStudy, ConfigError, load_config

    _check_run_arguments(args)
    if not args.no_compile_cache:
        # Set before anything compiles: JAX decides once whether to use the persistent cache.
        cache = Path(args.compile_cache) if args.compile_cache else _default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
    structured_config = _structured_config(args)
    if structured_config is not None:
        from . import structured

        if args.set:
            return _error(f"{structured_config}: --set is not supported for structured studies; edit a copy of the config")
        ignored = [option for option, given in (("--executor", args.executor), ("--workers", args.workers),
                                                 ("--scheduler", args.scheduler), ("--memory-limit", args.memory_limit),
                                                 ("--allow-large", args.allow_large)) if given]
        if ignored:
            return _error(f"{structured_config}: {', '.join(ignored)} apply to the sweep of flat and arms studies; "
                          "a structured study (kind:) runs its own engine in this process")
        try:
            run_dir = structured.run(structured_config, args.out, args.resume)
        except (structured.StudyConfigError, storage.RunFolderError) as error:
            return _error(str(error))
        print(f"results: {run_dir}")
        return 0
    try:
        if args.resume:
            run_dir = storage.require_run_dir(args.resume)
            config = load_config(run_dir / storage.CONFIG_FILE)
            _check_memory(args, config)
            if args.config:
                given = load_config(args.config, args.set)
                if given.to_dict() != config.to_dict():
                    differing = sorted(k for k in config.to_dict() if given.to_dict().get(k) != config.to_dict()[k])
                    return _error(
                        f"{args.config} does not match the config of the run being resumed ({run_dir / storage.CONFIG_FILE}); "
                        f"they differ in {differing}. Start a new run instead, or resume without CONFIG."
                    )
            elif args.set:
                return _error("--set cannot change a run being resumed; start a new run instead")
        else:
            if not args.config:
                return _error("run: give a CONFIG file (see `moe-theory list`) or --resume RUN_DIR")
            config = load_config(args.config, args.set)
            _check_memory(args, config)
            run_dir = storage.create_run_dir(args.out, config.name)
            storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
    except (ConfigError, storage.RunFolderError) as error:
        return _error(str(error))

    if isinstance(config, ArmsStudy):
        return _run_arms(args, config, run_dir)
    planned = sweep.plan(config)
    print(
        f"{'resuming' if args.resume else 'running'} {config.name}: {len(planned['groups'])} fit group(s) "
        f"({', '.join(planned['groups'])}) × {planned['sample_sizes']} sample sizes × {planned['replicates']} replicates "
        f"= {planned['fits']} fits; {planned['fit_programs'] + planned['score_programs']} programs to compile "
        f"(buckets {planned['buckets']}) on {jax.devices()[0].device_kind}",
        flush=True,
    )
    print(f"results: {run_dir}", flush=True)
    from .executors import ExecutorError, ExecutorOptions

    try:
        meta = sweep.run_study(config, run_dir, progress=not args.no_progress, command=args.command_line,
                               executor=ExecutorOptions(args.executor, args.workers, args.scheduler))
    except (storage.RunFolderError, ExecutorError) as error:
        return _error(str(error))

    session = meta["sessions"][-1]
    print(
        f"\ndone in {session['wall_seconds']:.0f} s (sweep; {session['compile_seconds']:.0f} s compiling "
        f"{session['compile_count']} program(s), {session.get('compile_wait_seconds', 0):.0f} s waited for, "
        f"{session['cells_computed']} cell(s) computed, "
        f"{session['cells_already_stored']} already stored) + {session['tables_and_figures_seconds']:.0f} s tables and figures"
    )
    print(f"\n{run_dir}/")
    for name, what in (
        (storage.CONFIG_FILE, "resolved config"),
        (storage.META_FILE, "versions, device, timings, compile counts"),
        (storage.TABLE_FILE, "one row per fit"),
        (storage.SUMMARY_FILE, "per (group, n, metric) statistics"),
        (storage.RATES_FILE, "fitted slopes, CIs, theory, verdicts"),
        (storage.FIGURES_DIR + "/", ", ".join(sorted(p.name for p in (run_dir / storage.FIGURES_DIR).glob("*.png")))),
        (storage.REPORT_FILE, "the report"),
    ):
        print(f"  {name:<14} {what}")
    _print_rates(run_dir)
    return 0


def _run_arms(args: argparse.Namespace, study, run_dir: Path) -> int:
    from . import arms, storage, sweep

    for name, config in study.arms:
        planned = sweep.plan(config)
        print(f"arm {name}: {len(planned['groups'])} fit group(s) × {planned['sample_sizes']} sample sizes × "
              f"{planned['replicates']} replicates = {planned['fits']} fits", flush=True)
    print(f"results: {run_dir}", flush=True)
    from .executors import ExecutorError, ExecutorOptions

    try:
        meta = arms.run_arms(study, run_dir, progress=not args.no_progress, command=args.command_line,
                             executor=ExecutorOptions(args.executor, args.workers, args.scheduler))
    except (storage.RunFolderError, ExecutorError) as error:
        return _error(str(error))
    print(f"\ndone in {meta['sessions'][-1]['wall_seconds']:.0f} s; report: {run_dir / storage.REPORT_FILE}")
    _print_contrasts(run_dir)
    return 0


def _print_contrasts(out_dir: Path) -> None:
    import pandas as pd

    from .comparison import CONTRASTS_FILE

    path = out_dir / CONTRASTS_FILE
    if not path.is_file() or path.stat().st_size <= 1:
        return
    contrasts = pd.read_csv(path)
    if contrasts.empty:
        return
    print("\ncontrasts (slope of the arm − slope of the reference):")
    for row in contrasts.itertuples():
        print(f"  {row.metric}: {row.verdict}")


def _compare_command(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import arms, comparison, plotting, report, storage
    from .config import ComparisonSettings

    if args.out:
        _check_folder_usable(Path(args.out), "--out")
    loaded = []
    for folder in args.run_dirs:
        with _reading_run(folder):
            if arms.is_arms_run(folder):
                study, members = arms.load_arms(folder)
                loaded += [(f"{study.name}:{arm.label}", arm) for arm in members]
            else:
                arm = arms.load_arm(folder, "")
                loaded.append((arm.config.name, arm))
    labels = [label for label, _ in loaded]
    if len(set(labels)) != len(labels):
        labels = [f"{label}@{Path(arm.run_dir).name}" for label, arm in loaded]
    members = [replace(arm, label=label, long=arm.long.assign(arm=label)) for label, (_, arm) in zip(labels, loaded)]
    if args.arms:
        unknown = sorted(set(args.arms) - set(labels))
        if unknown:
            raise CommandError(f"--arms: unknown arm(s) {unknown}; the runs hold {labels}")
        members = [arm for arm in members if arm.label in args.arms]
    try:
        selectors = tuple(_parse_selector(text) for text in args.metric) if args.metric else ComparisonSettings().metrics
        statistic = args.statistic if args.statistic in ("mean", "median") else float(args.statistic)
        settings = ComparisonSettings(metrics=selectors, epsilons=tuple(sorted(args.epsilon)) if args.epsilon else None,
                                      statistic=statistic, reference=args.reference, n_boot=args.n_boot)
        tables = comparison.compare_arms(members, settings)
    except ValueError as error:
        raise CommandError(str(error)) from None
    out_dir = Path(args.out) if args.out else storage.create_run_dir("results", "compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_frame(out_dir / storage.METRICS_FILE, pd.concat([arm.long for arm in members], ignore_index=True))
    comparison.write_tables(out_dir, tables)
    figures = plotting.comparison_figures(out_dir, members, tables, settings)
    preamble = ["Compared runs: " + ", ".join(f"`{folder}`" for folder in args.run_dirs) + ".", ""]
    path = report.comparison_report(f"comparison: {' vs '.join(a.label for a in members)}", preamble, members, tables,
                                    settings, figures, out_dir)
    print(path)
    _print_contrasts(out_dir)
    return 0


def _parse_selector(text: str):
    """``D1`` or ``error,block=beta1,atom=0`` → a metric selector."""
    from .config import SELECTOR_KEYS, MetricSelector

    metric, *pairs = [part.strip() for part in text.split(",")]
    keys = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or key not in SELECTOR_KEYS[1:]:
            raise ValueError(f"--metric {text!r}: expected METRIC[,block=B][,atom=J][,translation=T]")
        keys[key] = int(value) if key == "atom" else value
    return MetricSelector(metric, **keys)


def _print_rates(run_dir: Path) -> None:
    import pandas as pd

    from . import report, storage
    from .config import load_config
    from .metrics import metric_specs

    rates = pd.read_csv(run_dir / storage.RATES_FILE, keep_default_na=False, na_values=[""])
    if rates.empty:
        return
    for column in ("label", "theory_rate", "verdict"):
        rates[column] = rates[column].fillna("").astype(str)
    config = load_config(run_dir / storage.CONFIG_FILE)
    per_atom = {spec.column for group in config.groups for spec in metric_specs(config, group)
                if spec.metric in ("error", "mass_error", "shared_error", "expert_error")}
    main = rates[~rates["metric"].isin(per_atom)]
    shown = report.rates_for_display(main if len(main) else rates)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.2f}".format):
        print("\nrates (log-log slope of the per-n %s):" % rates["statistic"].iloc[0])
        print(shown.to_string(index=False))
    if len(main) < len(rates):
        print(f"(+ {len(rates) - len(main)} per-parameter rates in {run_dir / storage.RATES_FILE})")


@contextmanager
def _reading_run(run_dir) -> Iterator[None]:
    """Turn a results table that Parquet cannot read (truncated, overwritten, not Parquet) into a
    :class:`CommandError` naming the run folder; config and folder errors pass through to :func:`main`."""
    import pyarrow

    try:
        yield
    except pyarrow.ArrowException as error:
        raise CommandError(f"{run_dir}: a results table (.parquet) cannot be read, it is damaged or not Parquet "
                           f"({_one_line(str(error))})") from None


def _plot_command(args: argparse.Namespace) -> int:
    from . import arms, comparison, plotting

    with _reading_run(args.run_dir):
        if arms.is_arms_run(args.run_dir):
            study, members = arms.load_arms(args.run_dir)
            tables = comparison.compare_arms(members, study.comparison)
            paths = [path for arm in members for path in plotting.make_figures(arm.run_dir)]
            paths += plotting.comparison_figures(args.run_dir, members, tables, study.comparison)
        else:
            paths = plotting.make_figures(args.run_dir)
    for path in paths:
        print(path)
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from . import arms, report, storage

    with _reading_run(args.run_dir):
        if arms.is_arms_run(args.run_dir):
            study, members = arms.load_arms(args.run_dir)
            for arm in members:
                report.write_tables(arm.run_dir)
                report.write_report(arm.run_dir)
            path = arms.write_comparison(args.run_dir, study)
            print(path)
            _print_contrasts(Path(args.run_dir))
            return 0
        report.write_tables(args.run_dir)
        path = report.write_report(args.run_dir)
    run_dir = Path(args.run_dir)
    for name in (storage.SUMMARY_FILE, storage.RATES_FILE):
        print(run_dir / name)
    print(path)
    _print_rates(run_dir)
    return 0


def config_folders() -> list[Path]:
    """Where ``list`` looks for configs: ./configs and the configs/ next to the package's source tree."""
    candidates = [Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"]
    unique = []
    for folder in candidates:
        if folder.is_dir() and folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def _list_command(args: argparse.Namespace) -> int:
    if args.rates:
        import pandas as pd

        from .rates import list_theoretical_rates

        registry = list_theoretical_rates()
        registry["paper"] = registry["citation"].str.extract(r"^\[(\d+)\]", expand=False).fillna("")
        with pd.option_context("display.width", 200, "display.max_colwidth", 40):
            print(registry[["family", "setting", "quantity", "rate", "paper"]].to_string(index=False))
        print("\npapers: numbering of docs/README.md#papers (moe_theory.rates.PAPERS); use these keys in a config's rates section")
        return 0
    import yaml

    from .config import ConfigError, read_config_text, read_yaml

    folders = config_folders()
    if not folders:
        raise CommandError("no configs/ folder found here or next to the package")
    for folder in folders:
        print(f"{folder}:")
        for path in sorted(folder.glob("*.yaml")):
            try:
                data = read_yaml(read_config_text(path)) or {}
                description = data.get("description", "") if isinstance(data, dict) else ""
            except yaml.YAMLError:
                description = "(not valid YAML)"
            except ConfigError as error:
                description = f"(not readable: {_one_line(str(error)).removeprefix(f'{path}:').strip()})"
            print(f"  {path.name:<24} {_one_line(str(description))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-theory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"moe-theory {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="run a rate study from a YAML config")
    run_parser.add_argument("config", nargs="?", help="the study's YAML config (see `moe-theory list`)")
    run_parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                            help="override one config key, value parsed as YAML (repeatable), e.g. --set replicates=10")
    run_parser.add_argument("--out", default=None,
                            help="results root; the run goes to OUT/<name>/<run_id>/ (default results)")
    run_parser.add_argument("--resume", metavar="RUN_DIR", help="complete an interrupted run in its folder")
    run_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_parser.add_argument("--compile-cache", metavar="DIR", help="persistent compilation cache folder")
    run_parser.add_argument("--no-compile-cache", action="store_true", help="do not use a persistent compilation cache")
    run_parser.add_argument("--executor", choices=("local", "dask"), default=None,
                            help="where cells are computed: in this process (local, the default) or on Dask "
                                 "workers (dask; needs the 'distributed' extra and --workers or --scheduler)")
    where = run_parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="--executor dask: start a local Dask cluster of N worker processes (one thread each)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="--executor dask: use the running Dask scheduler at ADDRESS (tcp://host:8786) "
                            "or described by a scheduler file; see docs/distributed.md")
    _add_resource_options(run_parser)
    run_parser.set_defaults(handler=_run_command)

    plot_parser = commands.add_parser("plot", help="redraw a run's figures from its results table")
    plot_parser.add_argument("run_dir")
    plot_parser.set_defaults(handler=_plot_command)

    report_parser = commands.add_parser("report", help="rewrite a run's summary, rates and report.md")
    report_parser.add_argument("run_dir")
    report_parser.set_defaults(handler=_report_command)

    compare_parser = commands.add_parser(
        "compare", help="compare finished runs (or arms of them): rate contrasts, sample-complexity curves, a report")
    compare_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                                help="run folders; an arms run contributes each of its arms")
    compare_parser.add_argument("--arms", nargs="+", help="only these arms (labels as printed in the report)")
    compare_parser.add_argument("--metric", action="append", default=[],
                                help="METRIC[,block=B][,atom=J][,translation=T], repeatable (default: main_loss)")
    compare_parser.add_argument("--epsilon", type=float, action="append", default=[],
                                help="a target ε of the sample-complexity curves, repeatable (default: chosen from the data)")
    compare_parser.add_argument("--statistic", default="mean", help="mean, median or a quantile level in (0, 1)")
    compare_parser.add_argument("--reference", help="the arm the others are compared with (default: the first)")
    compare_parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    compare_parser.add_argument("--out", help="output folder (default results/compare/<run_id>)")
    compare_parser.set_defaults(handler=_compare_command)

    list_parser = commands.add_parser("list", help="list the shipped configs (or --rates: the theoretical rates)")
    list_parser.add_argument("--rates", action="store_true", help="list the theoretical-rate registry")
    list_parser.set_defaults(handler=_list_command)

    fit_parser = commands.add_parser("fit", help="fit a mixture of experts to a CSV of x1..xd, y")
    fit_parser.add_argument("--data", required=True, help="CSV file with columns x1..xd and y")
    fit_parser.add_argument("--gate", default="softmax", help="gate preset name or a JSON dict (default softmax)")
    fit_parser.add_argument("--expert", default=None,
                            help="expert name or a JSON dict (default gaussian; linear with --estimator lse)")
    fit_parser.add_argument("--num-experts", "-k", type=int, required=True, help="number of experts k")
    fit_parser.add_argument("--num-classes", type=int, default=None, help="classes C for multinomial-logistic experts")
    fit_parser.add_argument("--method", choices=METHODS, default=FIT_DEFAULTS.method)
    fit_parser.add_argument("--n-init", type=int, default=CLI_RANDOM_STARTS,
                            help=f"random starts; the best is kept (default {CLI_RANDOM_STARTS})")
    fit_parser.add_argument("--tol", type=float, default=FIT_DEFAULTS.tol,
                            help=f"relative log-likelihood tolerance (default {FIT_DEFAULTS.tol:g})")
    fit_parser.add_argument("--max-iter", type=int, default=EM_DEFAULTS.max_iter)
    fit_parser.add_argument("--gate-steps", type=int, default=EM_DEFAULTS.gate_steps,
                            help="gate Newton steps per EM iteration")
    fit_parser.add_argument(
        "--likelihood", choices=LIKELIHOODS, default=EM_DEFAULTS.likelihood,
        help="log p(y|x) (default), or log p(x,y) for the Gaussian gate (paper 8)",
    )
    fit_parser.add_argument("--estimator", choices=("mle", "lse"), default="mle",
                            help="maximum likelihood (default) or least squares for the regression MoE of [5], [10]")
    fit_parser.add_argument("--score", default="linear", help="gate score for --estimator lse (default linear)")
    fit_parser.add_argument("--bound", type=float, default=None,
                            help="--estimator lse: keep every parameter in [-B, B] (default: unbounded)")
    fit_parser.add_argument("--seed", type=int, default=0)
    fit_parser.add_argument("--out", help="write the JSON here instead of printing it")
    fit_parser.set_defaults(handler=_fit_command)
    return parser


def _version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe_theory")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _expected_error_message(error: Exception) -> str | None:
    """The message of a failure the user can act on (a bad config, option, file or run folder), or
    None for anything else: an unexpected exception is a bug, and keeps its traceback."""
    from . import executors, storage, structured
    from .config import ConfigError
    from .resources import ResourceError

    expected = (CommandError, ConfigError, ResourceError, storage.RunFolderError, structured.StudyConfigError,
                executors.ExecutorError)
    if isinstance(error, expected):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return None


def _stop_writing_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null, so that the interpreter's
    final flush does not fail again and print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a file (redirected in-process): nothing will be flushed to the pipe


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every refused command ends here, in one place: its message is printed as
    ``moe-theory: error: ...`` (one line, no traceback) and the status is :data:`ERROR_STATUS`, except
    ``fit``, which exits with status 1 through ``SystemExit(message)`` as it always has. Ctrl-C exits
    with :data:`INTERRUPTED_STATUS` and a closed stdout pipe quietly with :data:`BROKEN_PIPE_STATUS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.command_line = " ".join(["moe-theory", *argv])  # recorded in a run's meta.json
        return args.handler(args)
    except KeyboardInterrupt as interruption:
        from .sweep import Terminated  # SIGTERM during a sweep arrives as this KeyboardInterrupt

        if isinstance(interruption, Terminated):
            print("moe-theory: terminated", file=sys.stderr)
            return TERMINATED_STATUS
        print("moe-theory: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except BrokenPipeError:
        _stop_writing_stdout()
        return BROKEN_PIPE_STATUS
    except Exception as error:
        message = _expected_error_message(error)
        if message is None:
            raise
        if args is not None and args.command == "fit":
            raise SystemExit(f"moe-theory: error: {_one_line(message)}") from None
        return _error(message)


if __name__ == "__main__":
    sys.exit(main())
