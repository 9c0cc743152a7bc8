"""Running and reading arms studies: several variants of one study in one results folder.

Layout of an arms run, ``results/<name>/<run_id>/``::

    config.yaml              the config as given (base keys, arms, comparison)
    meta.json                the arms, their status and compute time, one entry per session
    arms/<arm>/              one complete run folder per arm (config.yaml, fits.parquet, rates.csv, …)
    metrics.parquet          every arm's long metrics table, stacked (:mod:`moe_theory.metrics`)
    contrasts.csv            slope contrasts between arms (:mod:`moe_theory.comparison`)
    sample_complexity.csv    n(ε) per arm, from the data and from the fitted laws
    sample_complexity_ratios.csv
    figures/                 sample_complexity and comparison figures
    report.md                the claim, the arms, their rates and the comparison

Each arm runs as an ordinary study (:func:`moe_theory.sweep.run_study`) in its own folder, so an
interrupted arms run resumes arm by arm and cell by cell, and an arm can be inspected, redrawn or
reported on alone. Every arm's cells go to the same executor (:mod:`moe_theory.executors`), opened
once for the whole study, and ``meta.json`` records how the session ended (``complete``,
``interrupted`` or ``failed`` with the reason), as for a single study. Arms that share the true
model, inputs and seed draw the same datasets (the sweep's data keys depend on the seed, n and the
replicate only).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from . import comparison, metrics, storage
from .config import ArmsStudy, StudyConfig, load_config

ARMS_DIR = "arms"


def arm_dir(run_dir: Path, arm: str) -> Path:
    return Path(run_dir) / ARMS_DIR / arm


def is_arms_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / ARMS_DIR).is_dir()


def run_arms(
    study: ArmsStudy,
    run_dir: str | Path,
    *,
    progress: bool = True,
    command: str | None = None,
    figures: bool = True,
    after_arm: Callable[[str], None] | None = None,
    executor: Any = None,
) -> dict:
    """Run (or resume) every arm of ``study`` into ``run_dir``, then write the comparison.

    ``run_dir`` must hold the study's ``config.yaml``. Arms already complete are kept; an
    interrupted arm resumes without recomputing its finished cells. ``executor`` is an open executor
    or :class:`moe_theory.executors.ExecutorOptions` (opened here for all arms, closed at the end),
    as for :func:`moe_theory.sweep.run_study`.
    """
    from . import executors  # imports JAX programs (the sweep); reading a finished run does not need them

    if isinstance(executor, executors.ExecutorOptions):
        executor.check()
        with _opened(executor) as opened:
            return run_arms(study, run_dir, progress=progress, command=command, figures=figures,
                            after_arm=after_arm, executor=opened)
    run_dir = Path(run_dir)
    with storage.RunLock(run_dir) as lock:
        meta = storage.read_meta(run_dir) or {
            "run_id": run_dir.name,
            "name": study.name,
            "config_source": study.source,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "arms": list(study.arm_names),
            "environment": storage.environment(),
            "git": storage.git_state(),
            "sessions": [],
        }
        storage.begin_session(run_dir, meta, command, lock)
        started = time.perf_counter()
        try:
            _run_each_arm(study, run_dir, progress, command, figures, after_arm, executor)
        except BaseException as error:
            storage.end_session_by(meta, error, wall_seconds=round(time.perf_counter() - started, 3))
            storage.write_meta(run_dir, meta)
            raise
        meta["sessions"][-1].update(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    wall_seconds=round(time.perf_counter() - started, 3))
        meta["status"] = "complete"
        storage.write_meta(run_dir, meta)
        write_comparison(run_dir, study, figures=figures)
    return meta


@contextmanager
def _opened(options):
    """The executor of ``options``, open for the block and closed after it."""
    executor = options.open()
    try:
        yield executor
    finally:
        executor.close()


def _run_each_arm(study: ArmsStudy, run_dir: Path, progress: bool, command: str | None, figures: bool,
                  after_arm: Callable[[str], None] | None, executor: Any) -> None:
    """Each arm not yet complete, in order, as an ordinary study in its own folder."""
    from . import sweep

    for name, config in study.arms:
        folder = arm_dir(run_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        arm_meta = storage.read_meta(folder)
        if arm_meta.get("status") == "complete":
            continue
        stored = folder / storage.CONFIG_FILE
        if stored.is_file():
            # Resuming: the arm's cells must be computed under the settings they started with.
            if load_config(stored).to_dict() != config.to_dict():
                raise storage.RunFolderError(
                    f"{stored}: arm {name!r} of this run was started with other settings than {study.source} "
                    "now resolves to (an edited config or other defaults); start a new run instead"
                )
        else:
            storage.write_text(stored, config.to_yaml())
        sweep.run_study(config, folder, progress=progress, command=command, figures=figures, executor=executor)
        if after_arm is not None:
            after_arm(name)


def load_arms(run_dir: str | Path) -> tuple[ArmsStudy, list[comparison.Arm]]:
    """The study and its arms (config and long metrics table) from a finished arms run."""
    run_dir = storage.require_run_dir(run_dir)
    study = load_config(run_dir / storage.CONFIG_FILE)
    if not isinstance(study, ArmsStudy):
        raise storage.RunFolderError(f"{run_dir}: not an arms run (its config lists no arms)")
    return study, [load_arm(arm_dir(run_dir, name), name) for name in study.arm_names]


def load_arm(run_dir: str | Path, label: str) -> comparison.Arm:
    """One finished run as an arm: its resolved config and long metrics table."""
    run_dir = storage.require_run_dir(run_dir, (storage.CONFIG_FILE, storage.TABLE_FILE))
    config = load_config(run_dir / storage.CONFIG_FILE)
    if not isinstance(config, StudyConfig):
        raise storage.RunFolderError(f"{run_dir}: an arms run; give one of its arms/<arm> folders, or compare it as a whole")
    long = metrics.long_table(config, storage.read_table(run_dir), arm=label)
    return comparison.Arm(label, config, long, Path(run_dir))


def write_comparison(run_dir: str | Path, study: ArmsStudy | None = None, *, figures: bool = True) -> Path:
    """metrics.parquet, the comparison tables, figures and report.md of an arms run, from its arms' tables."""
    from . import plotting, report

    run_dir = Path(run_dir)
    if study is None:
        study, arms = load_arms(run_dir)
    else:
        arms = [load_arm(arm_dir(run_dir, name), name) for name in study.arm_names]
    storage.write_frame(run_dir / storage.METRICS_FILE, pd.concat([arm.long for arm in arms], ignore_index=True))
    tables = comparison.compare_arms(arms, study.comparison)
    comparison.write_tables(run_dir, tables)
    figure_paths = plotting.comparison_figures(run_dir, arms, tables, study.comparison) if figures else []
    return report.write_arms_report(run_dir, study, arms, tables, figure_paths)
