"""A safe run folder: the lock (atomic, host-aware, one winner of a takeover race), resuming only
rows computed with the folder's settings (more replicates computed, an edited seed or fewer
replicates refused), and meta.json recording how a session ended (failed with the reason,
interrupted by Ctrl-C or SIGTERM) with its finished cells kept and resumable.

The expected tables are fresh, uninterrupted runs of the same config in another folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_theory import storage, sweep
from moe_theory.config import load_config

from conftest import new_smoke_run

ROOT = Path(__file__).resolve().parents[1]
ONE_GROUP = ["fit.num_experts=2"]  # one fit group: two programs, shared with tests/test_sweep.py


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: Path, holder: dict | str) -> Path:
    path = run_dir / storage.LOCK_FILE
    path.write_text(holder if isinstance(holder, str) else json.dumps(holder))
    return path


def lock_holder(run_dir: Path) -> dict:
    return json.loads((run_dir / storage.LOCK_FILE).read_text())


# ----------------------------------------------------------------------------------------------
# The lock.


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, {"pid": pid, "host": socket.gethostname(), "since": "earlier"})
    with storage.RunLock(tmp_path) as lock:
        assert lock.took_over == f"took over the stale lock of process {pid}"
        holder = lock_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["token"] == lock.token
    assert not (tmp_path / storage.LOCK_FILE).exists()
    assert [path.name for path in tmp_path.iterdir()] == []  # the stale file moved aside is gone too


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    holder = {"pid": dead_pid(), "host": "compute-node-17", "since": "2026-01-01T00:00:00"}
    path = write_lock(tmp_path, holder)
    with pytest.raises(storage.RunFolderError) as refused:
        with storage.RunLock(tmp_path):
            pass
    message = str(refused.value)
    assert f"process {holder['pid']} on host compute-node-17" in message
    assert f"rm {path}" in message and "never taken over automatically" in message
    assert json.loads(path.read_text()) == holder  # untouched


def test_an_empty_lock_file_is_waited_for_then_stale_after_the_grace_period(tmp_path):
    # Older than the grace period: a writer that died between creating and writing it.
    path = write_lock(tmp_path, "")
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    with storage.RunLock(tmp_path, grace_seconds=10) as lock:
        assert lock.took_over.startswith("took over the stale lock of an empty lock file")

    # Young, and its writer fills it in while we wait: a live holder, refused.
    path = write_lock(tmp_path, "")
    writer = threading.Timer(0.2, lambda: path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()})))
    writer.start()
    started = time.monotonic()
    with pytest.raises(storage.RunFolderError, match=f"in use by process {os.getpid()}"):
        with storage.RunLock(tmp_path, grace_seconds=5):
            pass
    assert 0.2 <= time.monotonic() - started < 5
    writer.join()

    # Young and garbled for the whole grace period: stale once the period has passed.
    path = write_lock(tmp_path, '{"pid": ')
    started = time.monotonic()
    with storage.RunLock(tmp_path, grace_seconds=0.5) as lock:
        assert time.monotonic() - started >= 0.5
        assert "unreadable lock file" in lock.took_over


def attempt(run_dir: Path, outcomes: list, hold: threading.Event | None = None, **options) -> None:
    try:
        with storage.RunLock(run_dir, **options) as lock:
            outcomes.append(("won", lock.token))
            if hold is not None:
                hold.wait(10)
    except storage.RunFolderError as error:
        outcomes.append(("refused", str(error)))


def test_two_takeovers_of_one_stale_lock_exactly_one_wins(tmp_path, monkeypatch):
    """Both threads reach the takeover while the lock is stale, and judging it is made slow: without
    the flock on the folder both would judge the same dead holder and move each other's files; with
    it the second judges after the first has taken the lock, and is refused."""
    write_lock(tmp_path, {"pid": dead_pid(), "host": socket.gethostname()})
    stale_lock = storage.RunLock._stale_lock

    def slow_judgement(self):
        judged = stale_lock(self)
        time.sleep(0.3)
        return judged

    monkeypatch.setattr(storage.RunLock, "_stale_lock", slow_judgement)
    outcomes, hold = [], threading.Event()
    threads = [threading.Thread(target=attempt, args=(tmp_path, outcomes, hold)) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(outcomes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    hold.set()
    for thread in threads:
        thread.join()
    assert sorted(kind for kind, _ in outcomes) == ["refused", "won"], outcomes
    (refusal,) = [text for kind, text in outcomes if kind == "refused"]
    assert f"in use by process {os.getpid()}" in refusal

RACER = """
import importlib.util, os, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("storage", {storage!r})
storage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(storage)  # storage.py alone: no JAX to import
done = Path({done!r})
while time.time() < {start}:
    time.sleep(0.001)
try:
    with storage.RunLock({run_dir!r}) as lock:
        print("won", flush=True)
        # Held until every other racer has tried, however late it started.
        while len(list(done.iterdir())) < {racers} - 1 and time.time() < {start} + 30:
            time.sleep(0.01)
except storage.RunFolderError as error:
    print("refused", error, flush=True)
    (done / str(os.getpid())).touch()
"""


def test_processes_racing_for_a_stale_lock_leave_exactly_one_holder(tmp_path):
    run_dir, done = tmp_path / "run", tmp_path / "done"
    run_dir.mkdir()
    done.mkdir()
    write_lock(run_dir, {"pid": dead_pid(), "host": socket.gethostname()})
    script = RACER.format(storage=str(ROOT / "moe_theory" / "storage.py"), start=time.time() + 1.5, run_dir=str(run_dir),
                          done=str(done), racers=4)
    racers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    outputs = [racer.communicate(timeout=60) for racer in racers]
    lines = [out.strip() for out, _ in outputs]
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in outputs]
    winners = [racer.pid for racer, line in zip(racers, lines) if line == "won"]
    assert len(winners) == 1, lines
    for line in lines:
        if line != "won":
            assert line.startswith("refused") and f"in use by process {winners[0]}" in line, line
    assert list(run_dir.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Resuming: which stored rows may be kept.


def new_run(root: Path, overrides=()) -> tuple:
    return new_smoke_run(root, [*ONE_GROUP, *overrides])


def edit_config(run_dir: Path, old: str, new: str):
    """Hand-edit the folder's config.yaml and load it, as `moe-theory run --resume` does."""
    path = run_dir / storage.CONFIG_FILE
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return load_config(path)


def study(config, run_dir, **options) -> dict:
    return sweep.run_study(config, run_dir, progress=False, figures=False, **options)


def interrupted_after_two_cells(root: Path) -> tuple:
    """(config, run folder) of a run stopped by Ctrl-C after its second cell was stored."""
    config, run_dir = new_run(root)

    def interrupt_after_two(written, cell):
        if written == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study(config, run_dir, after_cell=interrupt_after_two)
    return config, run_dir


@pytest.fixture(scope="module")
def fresh(smoke_table):
    """fresh(*overrides) → the table of an uninterrupted run of the one-group smoke study."""
    return lambda *overrides: smoke_table((*ONE_GROUP, *overrides))


def test_more_replicates_in_an_edited_config_computes_only_the_missing_rows(tmp_path, fresh):
    config, run_dir = new_run(tmp_path)
    study(config, run_dir)
    assert storage.read_metadata(run_dir / storage.TABLE_FILE)["fingerprint"] == sweep.config_fingerprint(
        sweep.cell_determinants(config))
    grown = edit_config(run_dir, "replicates: 3", "replicates: 5")
    meta = study(grown, run_dir)
    session = meta["sessions"][-1]
    assert session["cells_computed"] == 3 and session["replicates_computed"] == 3 * 2
    assert meta["plan"]["replicates"] == 5 and meta["plan"]["fits"] == 3 * 5
    table = storage.read_table(run_dir)
    assert table.groupby("n").replicate.apply(list).tolist() == [[0, 1, 2, 3, 4]] * 3
    pd.testing.assert_frame_equal(table, fresh("replicates=5"), check_exact=True)


def test_more_replicates_after_an_interruption_completes_every_cell(tmp_path, fresh):
    config, run_dir = interrupted_after_two_cells(tmp_path)
    grown = edit_config(run_dir, "replicates: 3", "replicates: 5")
    session = study(grown, run_dir)["sessions"][-1]
    # Two stored cells get replicates 3-4, the third cell all five.
    assert session["cells_computed"] == 3 and session["replicates_computed"] == 2 * 2 + 5
    pd.testing.assert_frame_equal(storage.read_table(run_dir), fresh("replicates=5"), check_exact=True)


def test_a_folder_written_before_cells_carried_keys_resumes_as_before(tmp_path, fresh):
    config, run_dir = interrupted_after_two_cells(tmp_path)
    for path in storage.part_paths(run_dir):  # as an earlier version wrote them: rows only
        pd.read_parquet(path).to_parquet(path, index=False)
        assert storage.read_metadata(path) is None
    session = study(config, run_dir)["sessions"][-1]
    assert session["cells_already_stored"] == 2 and session["cells_computed"] == 1
    pd.testing.assert_frame_equal(storage.read_table(run_dir), fresh(), check_exact=True)


@pytest.mark.parametrize("finished", [True, False], ids=["merged-table", "parts"])
def test_an_edited_seed_or_fewer_replicates_is_refused(tmp_path, finished):
    config, run_dir = new_run(tmp_path)

    def stop_after_one(written, cell):
        if written == 1:
            raise KeyboardInterrupt

    if finished:
        study(config, run_dir)
    else:
        with pytest.raises(KeyboardInterrupt):
            study(config, run_dir, after_cell=stop_after_one)
    stored = {path.name: path.read_bytes() for path in (*storage.part_paths(run_dir), run_dir / storage.TABLE_FILE)
              if path.is_file()}
    meta = storage.read_meta(run_dir)

    reseeded = edit_config(run_dir, "seed: 0", "seed: 1")
    with pytest.raises(storage.RunFolderError, match="seed: 0 → 1") as refused:
        study(reseeded, run_dir)
    assert "mix them in one table" in str(refused.value) and "Restore the earlier settings" in str(refused.value)
    edit_config(run_dir, "seed: 1", "seed: 0")

    fewer = edit_config(run_dir, "replicates: 3", "replicates: 2")
    with pytest.raises(storage.RunFolderError, match="holds replicates up to 2 of k=2, n = 40, but .* asks for replicates: 2"):
        study(fewer, run_dir)

    # Nothing was written: the stored rows, and the meta (no session opened for a refused resume).
    assert {path.name: path.read_bytes() for path in (*storage.part_paths(run_dir), run_dir / storage.TABLE_FILE)
            if path.is_file()} == stored
    assert storage.read_meta(run_dir) == meta
    assert not (run_dir / storage.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------
# How a session ends, in meta.json.


def test_a_crash_in_a_cell_marks_the_run_failed_and_keeps_finished_cells(tmp_path, monkeypatch, fresh):
    config, run_dir = new_run(tmp_path)
    cell_frame, calls = sweep._cell_frame, []

    def crash_in_the_second_cell(*args, **kwargs):
        calls.append(args[2])  # n
        if len(set(calls)) == 2:
            raise ValueError("injected: the second cell breaks")
        return cell_frame(*args, **kwargs)

    monkeypatch.setattr(sweep, "_cell_frame", crash_in_the_second_cell)
    with pytest.raises(ValueError, match="injected"):
        study(config, run_dir)
    meta = storage.read_meta(run_dir)
    assert meta["status"] == "failed"
    assert meta["sessions"][-1]["status"] == "failed" and meta["sessions"][-1]["cells_stored"] == 1
    assert meta["sessions"][-1]["reason"] == "ValueError: injected: the second cell breaks"
    (part,) = storage.part_paths(run_dir)
    key = storage.read_metadata(part)
    assert (key["n"], key["replicates"], key["seed"]) == (40, [0, 3], 0)
    assert key["fingerprint"] == sweep.config_fingerprint(sweep.cell_determinants(config))
    assert not (run_dir / storage.LOCK_FILE).exists()

    monkeypatch.setattr(sweep, "_cell_frame", cell_frame)
    meta = study(config, run_dir)
    assert [s["status"] for s in meta["sessions"]] == ["failed", "complete"] and meta["status"] == "complete"
    assert meta["sessions"][-1]["cells_already_stored"] == 1
    pd.testing.assert_frame_equal(storage.read_table(run_dir), fresh(), check_exact=True)


@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_an_interrupted_run_is_recorded_so_and_resumes(tmp_path, fresh, how):
    config, run_dir = new_run(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)

    def interrupt_after_two(written, cell):
        if written == 2:
            if how == "keyboard":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends

    with pytest.raises(KeyboardInterrupt):
        study(config, run_dir, after_cell=interrupt_after_two)
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    meta = storage.read_meta(run_dir)
    session = meta["sessions"][-1]
    assert meta["status"] == session["status"] == "interrupted" and session["cells_stored"] == 2
    assert session["reason"] == ("KeyboardInterrupt" if how == "keyboard" else "Terminated: SIGTERM received")
    assert len(storage.part_paths(run_dir)) == 2 and not (run_dir / storage.LOCK_FILE).exists()

    meta = study(config, run_dir)
    assert [s["status"] for s in meta["sessions"]] == ["interrupted", "complete"]
    assert meta["sessions"][-1]["cells_already_stored"] == 2 and meta["sessions"][-1]["cells_computed"] == 1
    pd.testing.assert_frame_equal(storage.read_table(run_dir), fresh(), check_exact=True)
