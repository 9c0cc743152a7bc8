"""The results folder of a study: layout, atomic writes, the lock, metadata and the tidy table.

Layout of one run, ``results/<name>/<run_id>/``::

    config.yaml     the resolved config (defaults filled, sample sizes expanded)
    meta.json       versions, device, dtype, git commit, timings and compile counts, one entry per session
    fits.parquet    one row per (fit group, n, replicate): losses, parameter errors, log-lik, flags
    metrics.parquet the same scores as one row per (fit, score), keyed by what they measure
    summary.csv     per (group, n, metric): counts, exclusions, mean / median / sd, bootstrap band
    rates.csv       per (group, metric): slope, bootstrap CI, theory exponent and verdict
    figures/        PNG and PDF
    report.md       the theory-against-measurement report
    parts/          while a sweep runs: one parquet file per finished cell (removed once merged)

Conventions:

* ``run_id`` is ``YYYYMMDD-HHMMSS-<6 hex>``, and the folder is created with an exclusive
  ``mkdir``, so two runs never share a folder; a clash just draws a new id.
* Every file is written to a temporary name in the same folder and moved into place with
  ``os.replace``, which is atomic on POSIX: a reader (or a resumed run) sees a whole file or none.
* A run folder is locked (``.lock`` holding the pid and host) while a sweep writes into it. A lock
  whose process is gone (a killed run) is stale and is taken over, with a note.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
TABLE_FILE = "fits.parquet"
METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.csv"
RATES_FILE = "rates.csv"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
PARTS_DIR = "parts"
LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """A run folder is missing, incomplete, or in use by another process."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def create_run_dir(root: str | Path, name: str) -> Path:
    """A new, empty ``root/name/<run_id>`` folder, created exclusively."""
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = parent / new_run_id()
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir


def latest_run(root: str | Path, name: str) -> Path | None:
    """The newest finished run of study ``name`` under ``root`` (run ids sort by time): a folder
    holding its report, which a study (an arms study too) writes last. None if there is none."""
    folder = Path(root) / name
    runs = sorted(path for path in folder.iterdir() if (path / REPORT_FILE).is_file()) if folder.is_dir() else []
    return runs[-1] if runs else None


def require_run_dir(run_dir: str | Path, need: Iterable[str] = (CONFIG_FILE,)) -> Path:
    """``run_dir`` as a Path, checking that it holds the named files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such run folder")
    for name in need:
        if not (run_dir / name).exists():
            raise RunFolderError(f"{run_dir}: not a finished run folder (no {name}); run `moe-theory run` first")
    return run_dir


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same folder, then ``os.replace``)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_frame(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame atomically as parquet (``.parquet``) or CSV (anything else)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".parquet":
        frame.to_parquet(temporary, index=False)
    else:
        frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------
# The lock.


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run folder by one process (a context manager); see the module docstring."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.took_over: str | None = None

    def __enter__(self) -> "RunLock":
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder and holder.get("host") == socket.gethostname() and _process_alive(int(holder.get("pid", -1))):
                    raise RunFolderError(
                        f"{self.path.parent}: in use by process {holder['pid']} (started {holder.get('since')}); "
                        "wait for it or stop it first"
                    ) from None
                self.took_over = f"took over the stale lock of process {holder.get('pid') if holder else '?'}"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, handle)
            return self

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Cell parts and the table.


def write_part(run_dir: Path, cell: str, frame: pd.DataFrame) -> Path:
    """Store the rows of one finished cell atomically as ``parts/<cell>.parquet``."""
    parts = Path(run_dir) / PARTS_DIR
    parts.mkdir(exist_ok=True)
    path = parts / f"{cell}.parquet"
    write_frame(path, frame)
    return path


def finished_parts(run_dir: Path) -> set[str]:
    """Names of the cells whose part file exists."""
    parts = Path(run_dir) / PARTS_DIR
    if not parts.is_dir():
        return set()
    return {path.stem for path in parts.glob("*.parquet") if not path.name.startswith(".")}


def read_parts(run_dir: Path) -> pd.DataFrame | None:
    parts = sorted((Path(run_dir) / PARTS_DIR).glob("*.parquet"))
    frames = [pd.read_parquet(path) for path in parts if not path.name.startswith(".")]
    return pd.concat(frames, ignore_index=True) if frames else None


def merge_table(run_dir: Path, frame: pd.DataFrame) -> Path:
    """Write the merged table as ``fits.parquet``, then remove the part files it came from."""
    path = Path(run_dir) / TABLE_FILE
    write_frame(path, frame)
    shutil.rmtree(Path(run_dir) / PARTS_DIR, ignore_errors=True)
    return path


def read_table(run_dir: str | Path) -> pd.DataFrame:
    run_dir = require_run_dir(run_dir, (TABLE_FILE,))
    return pd.read_parquet(run_dir / TABLE_FILE)


# ----------------------------------------------------------------------------------------------
# Metadata.


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def begin_session(run_dir: Path, meta: dict, command: str | None, lock: "RunLock", **details: Any) -> dict:
    """Open a session in ``meta``: earlier sessions still marked running become ``interrupted`` (their
    process died), a new running session is appended (with ``details``) and the meta is written."""
    for session in meta["sessions"]:
        if session.get("status") == "running":
            session["status"] = "interrupted"
    meta["sessions"].append({"status": "running", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "command": command, "lock": lock.took_over, **details})
    meta["status"] = "running"
    write_meta(run_dir, meta)
    return meta


def write_meta(run_dir: Path, meta: dict) -> None:
    write_text(Path(run_dir) / META_FILE, json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n")


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the git checkout holding ``path`` (the package by default), read-only."""
    path = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def environment() -> dict[str, Any]:
    """Package, Python and JAX versions and the devices JAX sees."""
    import jax
    import jaxlib
    import numpy

    from . import __version__

    devices = jax.devices()
    return {
        "moe_theory": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(device) for device in devices],
        "device_kind": devices[0].device_kind,
        "x64": bool(jax.config.jax_enable_x64),
    }
