"""Executors: the in-process default runs cells lazily in order; the replicate axis sharded over two
(forced) CPU devices gives the one-device table; Dask workers (a two-process LocalCluster on
loopback) give the local executor's table bit for bit, through the API and the command line, and a
worker killed mid-run loses no cell and duplicates none.

The expected tables are in-process runs of the same config with the local executor."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_theory import executors, plotting, storage, sweep
from moe_theory.cli import main
from moe_theory.config import load_config

from conftest import new_smoke_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ONE_GROUP = ("fit.num_experts=2",)  # one fit group: two programs, shared with tests/test_sweep.py
MORE_CELLS = ONE_GROUP + ("sample_sizes=[40, 44, 48, 52, 56, 60, 64]", "replicates=8")  # the same programs, more work


def new_run(root: Path, overrides=()) -> tuple:
    return new_smoke_run(root, overrides)


@pytest.fixture(scope="module")
def local(smoke_table):
    """local(overrides) → the table of an in-process run (computed once per overrides)."""
    return smoke_table


def test_the_local_executor_runs_each_task_when_reached_in_order():
    executor, log = executors.LocalExecutor(), []

    def task(name):
        log.append(f"run {name}")
        if name == "bad":
            raise ValueError(name)
        return name

    futures = [executor.submit(task, name) for name in ("a", "bad", "c")]
    assert log == []  # nothing runs ahead: a cell is stored before the next one starts
    for future in executor.as_completed(futures):
        try:
            log.append(f"got {future.result()}")
        except ValueError as error:
            log.append(f"raised {error}")
    assert log == ["run a", "got a", "run bad", "raised bad", "run c", "got c"]


def test_executor_options_are_checked_before_any_work():
    with pytest.raises(executors.ExecutorError, match="apply to --executor dask only"):
        executors.ExecutorOptions("local", workers=2).check()
    with pytest.raises(executors.ExecutorError, match="needs --workers N .* or --scheduler ADDRESS"):
        executors.ExecutorOptions("dask").check()
    with pytest.raises(executors.ExecutorError, match="--workers must be at least 1, got 0"):
        executors.ExecutorOptions("dask", workers=0).check()
    assert executors.ExecutorOptions(None, workers=2).resolved_kind() == "dask"
    assert isinstance(executors.ExecutorOptions().open(), executors.LocalExecutor)


TWO_DEVICES = """
import sys
from moe_theory import storage, sweep
from moe_theory.config import load_config
import jax
assert jax.device_count() == 2, jax.devices()
config = load_config({smoke!r}, {overrides!r})
run_dir = storage.create_run_dir({root!r}, config.name)
storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
session = sweep.run_sweep(config, run_dir, progress=False)
print(session["devices"], session["batch_size"])
print(run_dir)
"""


def test_replicates_sharded_over_two_devices_give_the_one_device_table(tmp_path, local):
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    script = TWO_DEVICES.format(smoke=str(SMOKE), overrides=list(ONE_GROUP), root=str(tmp_path))
    sharded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert sharded.returncode == 0, sharded.stderr
    devices_line, folder = sharded.stdout.strip().splitlines()[-2:]
    assert devices_line == "2 2"  # two devices, batch_size 2: one replicate per device per call
    sharded_table, one_device = storage.read_table(folder), local(ONE_GROUP)
    # Every fitted parameter, iteration count and score is the same bit for bit. The reported
    # log-likelihood is a sum over the sample that the partitioned program may add up in another
    # order: it agrees to the last bit or two.
    exact = [column for column in one_device.columns if column != "log_likelihood"]
    pd.testing.assert_frame_equal(sharded_table[exact], one_device[exact], check_exact=True)
    pd.testing.assert_series_equal(sharded_table.log_likelihood, one_device.log_likelihood, check_exact=False,
                                   rtol=4 * np.finfo(float).eps, atol=0)


# ----------------------------------------------------------------------------------------------
# Dask distributed.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two single-threaded worker processes on loopback, sharing a persistent compilation cache
    (so that a worker restarted after a kill loads the programs instead of compiling them)."""
    distributed = pytest.importorskip("distributed")
    cache = tmp_path_factory.mktemp("worker-xla-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))  # read by the workers' JAX only
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        local_cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                                 dashboard_address=None, host="127.0.0.1")
    client = distributed.Client(local_cluster)
    yield local_cluster, client
    client.close()
    local_cluster.close()


def test_an_unreachable_scheduler_is_a_clear_error():
    pytest.importorskip("distributed")
    with pytest.raises(executors.ExecutorError, match="cannot reach the Dask scheduler tcp://127.0.0.1:9"):
        executors.DaskExecutor(scheduler="tcp://127.0.0.1:9", connect_timeout=0.5)


def run_cli(*arguments):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in arguments])
    return code, out.getvalue(), err.getvalue()


def test_the_command_line_runs_on_a_dask_scheduler(tmp_path, cluster, local, monkeypatch):
    local_cluster, _ = cluster
    monkeypatch.setattr(plotting, "make_figures", lambda run_dir: [])  # tests/test_cli.py checks the figures
    overrides = [item for override in ONE_GROUP for item in ("--set", override)]
    code, out, err = run_cli("run", SMOKE, *overrides, "--out", tmp_path, "--no-progress", "--no-compile-cache",
                             "--scheduler", local_cluster.scheduler_address)
    assert code == 0, err
    (run_dir,) = (tmp_path / "smoke").iterdir()
    meta = json.loads((run_dir / storage.META_FILE).read_text())
    assert meta["sessions"][-1]["executor"]["scheduler"] == local_cluster.scheduler_address
    pd.testing.assert_frame_equal(storage.read_table(run_dir), local(ONE_GROUP), check_exact=True)

    code, _, err = run_cli("run", SMOKE, "--out", tmp_path, "--no-compile-cache", "--executor", "local", "--workers", "2")
    assert code == 2 and "--workers and --scheduler apply to --executor dask only" in err


def test_a_worker_killed_mid_run_loses_no_cell_and_duplicates_none(tmp_path, cluster, local):
    _, client = cluster
    config, run_dir = new_run(tmp_path, MORE_CELLS)
    stored, computed_by, killed = [], set(), {}

    def kill_a_busy_worker_once_a_cell_is_stored(written, name):
        stored.append(name)
        computed_by.add(storage.read_metadata(run_dir / storage.PARTS_DIR / f"{name}.parquet")["computed_by"])
        busy = {worker: tasks for worker, tasks in client.processing().items() if tasks}
        if not killed and busy:
            worker = max(busy, key=lambda address: len(busy[address]))
            pid = client.run(os.getpid, workers=[worker])[worker]
            killed.update(pid=pid, tasks=len(busy[worker]), after=written)
            os.kill(pid, signal.SIGKILL)  # no cleanup, like a node lost

    meta = sweep.run_study(config, run_dir, progress=False, figures=False, executor=executors.DaskExecutor(client),
                           after_cell=kill_a_busy_worker_once_a_cell_is_stored)
    assert killed["tasks"] >= 1 and killed["after"] < len(config.sample_sizes)  # it died mid-run, holding work
    assert f"{socket.gethostname()}:{os.getpid()}" not in computed_by  # the driver only wrote
    expected = {sweep.cell_name(group, n) for group in config.groups for n in config.sample_sizes}
    assert sorted(stored) == sorted(expected)  # every cell stored, each once
    session = meta["sessions"][-1]
    assert session["cells_computed"] == len(expected) and meta["status"] == "complete"
    table = storage.read_table(run_dir)
    assert not table.duplicated(["num_experts", "n", "replicate"]).any()
    pd.testing.assert_frame_equal(table, local(MORE_CELLS), check_exact=True)
