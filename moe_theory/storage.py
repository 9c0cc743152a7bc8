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
* A run folder is locked (``.lock`` holding the pid and host) while a sweep writes into it; see
  :class:`RunLock` for how the lock is taken, when it is stale and how a stale one is taken over.
* Every cell part (and the merged table) carries its key in the parquet file's own metadata (under
  ``moe_theory``): the fit group, n, the replicate range, the seed and a fingerprint of the config
  settings that determine its numbers, so a resumed run can tell which rows it may keep
  (:func:`moe_theory.sweep.stored_replicates`).
"""

from __future__ import annotations

import fcntl
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
import pyarrow as pa
import pyarrow.parquet as pq

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
KEY_METADATA = b"moe_theory"
"""Key of the parquet schema metadata entry (JSON) that holds what a part or the table was computed with."""


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


def write_frame(path: Path, frame: pd.DataFrame, metadata: dict | None = None) -> None:
    """Write a DataFrame atomically as parquet (``.parquet``) or CSV (anything else). ``metadata``
    (JSON-able, parquet only) is stored in the file's schema metadata under :data:`KEY_METADATA`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".parquet" and metadata is not None:
        # What DataFrame.to_parquet(index=False) writes, plus our entry beside pandas' own.
        table = pa.Table.from_pandas(frame, preserve_index=False)
        entries = {**(table.schema.metadata or {}), KEY_METADATA: json.dumps(metadata, default=str).encode()}
        pq.write_table(table.replace_schema_metadata(entries), temporary)
    elif path.suffix == ".parquet":
        frame.to_parquet(temporary, index=False)
    elif metadata is not None:
        raise ValueError(f"{path}: metadata can only be stored in a parquet file")
    else:
        frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


def read_metadata(path: Path) -> dict | None:
    """The :data:`KEY_METADATA` entry of a parquet file written by :func:`write_frame`, or None."""
    entry = (pq.read_schema(path).metadata or {}).get(KEY_METADATA)
    return json.loads(entry) if entry is not None else None


# ----------------------------------------------------------------------------------------------
# The lock.


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, 0) would ask about a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run folder by one process (a context manager).

    The lock is the file ``.lock`` holding the holder's pid, host, start time and a random token.

    * **Taking it** is one ``os.open(O_CREAT | O_EXCL)``: of several processes, exactly one creates
      the file, on a local disk and on NFS alike.
    * **Stale** means: the holder is on this host and its pid is gone (a killed run). A lock held on
      *another* host is never stale automatically, because this host cannot see that process; the
      error names the host and pid and says how to remove the lock by hand. An empty or unparsable
      lock file is a holder between creating and writing it, and is waited for, unless it is older
      than ``grace_seconds``.
    * **Taking over** a stale lock happens under an exclusive ``flock`` on the run folder (one
      takeover at a time on this host; the kernel releases it when its holder dies). The process
      judges the lock stale again under it, renames it to a unique name, checks that it moved the
      very file it judged (same inode and text), then takes the lock with ``O_EXCL`` like anyone
      else, and removes the moved file only afterwards, so that the new lock cannot reuse the stale
      file's inode number. Should the check fail all the same, the moved file is put back with
      ``os.link``, which cannot overwrite, and the process tries again.
    * **Releasing** removes the file only if it still holds this lock's token.
    """

    def __init__(self, run_dir: Path, *, grace_seconds: float = 10.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.grace_seconds = grace_seconds
        self.token = secrets.token_hex(8)
        self.took_over: str | None = None

    def __enter__(self) -> "RunLock":
        moved_aside: list[Path] = []
        try:
            while True:
                try:
                    descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    aside = self._take_over_if_stale()
                    if aside is not None:
                        moved_aside.append(aside)
                    continue
                holder = {"pid": os.getpid(), "host": socket.gethostname(),
                          "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": self.token}
                with os.fdopen(descriptor, "w") as handle:
                    json.dump(holder, handle)
                return self
        finally:
            for path in moved_aside:
                path.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> Path | None:
        """Move a stale lock file aside and return where it went (None if it was gone or moved by
        another process), so that the caller tries ``O_EXCL`` again; raise :class:`RunFolderError`
        if the lock belongs to a live process or to another host."""
        # Takeovers on this host are serialised by an flock on the run folder itself (released when
        # its holder exits, even killed; no file of its own): between judging the lock stale and
        # moving it aside no other takeover can replace it, so a live lock is never moved. Locks of
        # other hosts are never taken over.
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            return self._move_aside_if_stale()
        finally:
            os.close(folder)  # releases the flock

    def _move_aside_if_stale(self) -> Path | None:
        judged, text, reason = self._stale_lock()
        if judged is None:
            return None
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        moved = os.stat(aside)
        if (moved.st_dev, moved.st_ino) != (judged.st_dev, judged.st_ino) or aside.read_text() != text:
            # A lock created after our judgement (another takeover finished first): put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass  # a third process has locked meanwhile; the next O_EXCL reports it
            os.unlink(aside)
            return None
        self.took_over = f"took over the stale lock of {reason}"
        return aside

    def _stale_lock(self) -> tuple[os.stat_result | None, str, str]:
        """(stat, text, description) of the lock file once it is known to be stale; (None, "", "") if
        it is gone. Raises :class:`RunFolderError` if it is held, or may be held, by a running process."""
        waited_since = time.monotonic()
        while True:
            try:
                judged = os.stat(self.path)
                text = self.path.read_text()
            except FileNotFoundError:
                return None, "", ""
            holder = _parse_holder(text)
            if holder is not None:
                break
            age = time.time() - judged.st_mtime
            kind = "an empty" if not text.strip() else "an unreadable"
            if age >= self.grace_seconds:
                return judged, text, f"{kind} lock file {age:.1f} s old"
            if time.monotonic() - waited_since > self.grace_seconds:
                # Still unreadable after a whole grace period though recently written: no writer mid-write.
                return judged, text, f"{kind} lock file that stayed so for {self.grace_seconds:g} s"
            time.sleep(min(0.05, self.grace_seconds / 10))
        pid, host, since = holder["pid"], holder["host"], holder.get("since", "?")
        if host != socket.gethostname():
            raise RunFolderError(
                f"{self.path.parent}: locked by process {pid} on host {host} (since {since}). A lock held on another "
                f"host is never taken over automatically: this host cannot tell whether that process is still "
                f"running. If it is not, remove the lock by hand (rm {self.path}) and run again."
            )
        if _process_alive(pid):
            raise RunFolderError(
                f"{self.path.parent}: in use by process {pid} (started {since}); wait for it or stop it first"
            )
        return judged, text, f"process {pid}"

    def _holds(self) -> bool:
        try:
            holder = _parse_holder(self.path.read_text())
        except FileNotFoundError:
            return False
        return holder is not None and holder.get("token") == self.token

    def __exit__(self, *exc) -> None:
        if self._holds():
            self.path.unlink(missing_ok=True)


def _parse_holder(text: str) -> dict | None:
    """The holder recorded in a lock file (pid and host at least), or None if the text is not one."""
    try:
        holder = json.loads(text)
        holder["pid"] = int(holder["pid"])
        holder["host"] = str(holder["host"])
    except (ValueError, TypeError, KeyError):
        return None
    return holder


# ----------------------------------------------------------------------------------------------
# Cell parts and the table.


def write_part(run_dir: Path, cell: str, frame: pd.DataFrame, metadata: dict | None = None) -> Path:
    """Store the rows of one finished cell atomically as ``parts/<cell>.parquet``, with ``metadata``
    (what the rows were computed with, see :func:`write_frame`) in the file."""
    parts = Path(run_dir) / PARTS_DIR
    parts.mkdir(exist_ok=True)
    path = parts / f"{cell}.parquet"
    write_frame(path, frame, metadata)
    return path


def part_paths(run_dir: Path) -> list[Path]:
    """The finished part files, by name."""
    parts = Path(run_dir) / PARTS_DIR
    return sorted(path for path in parts.glob("*.parquet") if not path.name.startswith(".")) if parts.is_dir() else []


def finished_parts(run_dir: Path) -> set[str]:
    """Names of the cells whose part file exists."""
    return {path.stem for path in part_paths(run_dir)}


def read_parts(run_dir: Path) -> pd.DataFrame | None:
    frames = [pd.read_parquet(path) for path in part_paths(run_dir)]
    return pd.concat(frames, ignore_index=True) if frames else None


def merge_table(run_dir: Path, frame: pd.DataFrame, metadata: dict | None = None) -> Path:
    """Write the merged table as ``fits.parquet`` (with ``metadata``, see :func:`write_frame`), then
    remove the part files it came from."""
    path = Path(run_dir) / TABLE_FILE
    write_frame(path, frame, metadata)
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


def end_session_by(meta: dict, error: BaseException, **details: Any) -> None:
    """Mark the last session and the run ``interrupted`` (Ctrl-C, SIGTERM, exit) or ``failed`` (any
    other exception) in ``meta``, with the reason and ``details``, in place of ``running``; the
    caller writes it."""
    status = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    meta["sessions"][-1].update(status=status, reason=reason, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), **details)
    meta["status"] = status


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
