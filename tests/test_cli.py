"""The command line end to end: a smoke run produces every artefact, plot and report rerun from the
table alone, list shows the shipped configs, a config error stops before any work, and a run
killed with SIGKILL mid-sweep resumes to exactly the table of an uninterrupted run."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moe_theory import storage
from moe_theory.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
FIGURES = ("losses", "metrics", "parameters", "convergence")


def run_cli(*arguments):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in arguments])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    code, out, err = run_cli("run", SMOKE, "--out", root, "--no-progress", "--no-compile-cache")
    assert code == 0, err
    (run_dir,) = (root / "smoke").iterdir()
    return run_dir, out


def test_run_writes_every_artefact_and_prints_where_and_the_rates(smoke_run):
    run_dir, out = smoke_run
    for name in (storage.CONFIG_FILE, storage.META_FILE, storage.TABLE_FILE, storage.SUMMARY_FILE,
                 storage.RATES_FILE, storage.REPORT_FILE):
        assert (run_dir / name).is_file(), name
    for figure in FIGURES:
        for suffix in (".png", ".pdf"):
            assert (run_dir / storage.FIGURES_DIR / f"{figure}{suffix}").stat().st_size > 1000
    assert str(run_dir) in out and "fits.parquet" in out and "rates (log-log slope of the per-n mean)" in out
    assert "k=2      D1" in out
    meta = json.loads((run_dir / storage.META_FILE).read_text())
    assert meta["status"] == "complete" and meta["totals"]["cells_computed"] == 6
    report = (run_dir / storage.REPORT_FILE).read_text()
    assert "## Measured rates" in report and "figures/losses.png" in report and "excluded" in report


def test_plot_and_report_rerun_from_the_table_alone(smoke_run):
    run_dir, _ = smoke_run
    table_bytes = (run_dir / storage.TABLE_FILE).read_bytes()
    for figure in (run_dir / storage.FIGURES_DIR).iterdir():
        figure.unlink()
    (run_dir / storage.REPORT_FILE).unlink()
    code, out, _ = run_cli("plot", run_dir)
    assert code == 0 and all((run_dir / storage.FIGURES_DIR / f"{f}.png").is_file() for f in FIGURES)
    code, out, _ = run_cli("report", run_dir)
    assert code == 0 and (run_dir / storage.REPORT_FILE).is_file() and "rates (log-log" in out
    assert (run_dir / storage.TABLE_FILE).read_bytes() == table_bytes
    code, _, err = run_cli("plot", run_dir.parent / "no-such-run")
    assert code == 2 and "no such run folder" in err


def test_list_shows_the_shipped_configs_and_the_rate_registry():
    code, out, _ = run_cli("list")
    assert code == 0 and "quickstart.yaml" in out and "smoke.yaml" in out and "Paper-1 miniature" in out
    code, out, _ = run_cli("list", "--rates")
    assert code == 0 and "softmax_gaussian" in out and "overfit_cell2" in out


def test_config_errors_stop_the_run_before_any_work(tmp_path):
    code, _, err = run_cli("run", SMOKE, "--out", tmp_path, "--set", "fit.num_experts=1", "--no-compile-cache")
    assert code == 2
    assert f"error: {SMOKE} (set by --set fit.num_experts): fit.num_experts: the fitted k = 1 is smaller" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text(SMOKE.read_text().replace("replicates: 3", "replicates: 3\nrepeats: 2"))
    code, _, err = run_cli("run", broken, "--out", tmp_path, "--no-compile-cache")
    assert code == 2 and f"{broken}:" in err and "repeats: unknown key" in err
    assert not (tmp_path / "smoke").exists()


KILLED_RUN = """
import os, signal
from moe_theory import storage, sweep
from moe_theory.config import load_config

config = load_config({config!r}, ["fit.num_experts=2"])
run_dir = storage.create_run_dir({root!r}, config.name)
storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
print(run_dir, flush=True)

def kill_after_two_cells(written, cell):
    if written == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, like a real kill

sweep.run_study(config, run_dir, progress=False, after_cell=kill_after_two_cells)
"""


def test_killed_run_resumes_to_the_uninterrupted_table(smoke_run, tmp_path):
    environment = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache")}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN.format(config=str(SMOKE), root=str(tmp_path))],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = Path(killed.stdout.strip().splitlines()[-1])
    assert len(storage.finished_parts(run_dir)) == 2 and (run_dir / storage.LOCK_FILE).exists()
    assert not (run_dir / storage.TABLE_FILE).exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "moe_theory", "run", "--resume", str(run_dir), "--no-progress",
         "--compile-cache", str(tmp_path / "xla-cache")],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "1 cell(s) computed, 2 already stored" in resumed.stdout
    meta = json.loads((run_dir / storage.META_FILE).read_text())
    assert [s["status"] for s in meta["sessions"]] == ["interrupted", "complete"]
    assert "stale lock" in meta["sessions"][-1]["lock"]

    # The uninterrupted reference: the k = 2 rows of the two-group smoke run, computed in another
    # process (the data do not depend on the fit group, and the k = 2 group is the same group).
    reference_dir, _ = smoke_run
    reference = storage.read_table(reference_dir)
    reference = reference[reference.num_experts == 2].dropna(axis=1, how="all").reset_index(drop=True)
    resumed_table = storage.read_table(run_dir)
    pd.testing.assert_frame_equal(resumed_table[reference.columns], reference, check_exact=True)


def test_fit_command_fits_a_csv_and_writes_the_estimate_as_json(tmp_path):
    """`moe-theory fit` on a CSV equals the library's fit of the same arrays, for both likelihoods."""
    import jax
    import numpy as np

    import moe_theory as mt
    from moe_theory.fit import EMConfig, fit

    family, truth = mt.model_from_dict({"gate": "gaussian", "expert": "gaussian", "params": {
        "gate": {"weight": [0.4, 0.6], "centre": [[-1.0], [1.0]], "covariance": [[[0.5]], [[0.3]]]},
        "expert": {"a": [[2.0], [-1.0]], "b": [0.5, -0.5], "nu": [0.1, 0.2]}}})
    x, y, _ = mt.sample(jax.random.key(0), family, truth, 3000, mt.make_inputs({"name": "gaussian_mixture", "from_gate": True}))
    data = tmp_path / "data.csv"
    pd.DataFrame({"x1": np.asarray(x[:, 0]), "y": np.asarray(y)}).to_csv(data, index=False)
    for likelihood in ("conditional", "joint"):
        out = tmp_path / f"{likelihood}.json"
        code, _, err = run_cli("fit", "--data", data, "--gate", "gaussian", "-k", "2", "--n-init", "3",
                               "--likelihood", likelihood, "--out", out)
        assert code == 0, err
        written = json.loads(out.read_text())
        reference = fit(family, np.asarray(x), np.asarray(y), key=jax.random.key(0), n_init=3,
                        config=EMConfig(likelihood=likelihood))
        assert written["likelihood"] == likelihood and written["n"] == 3000
        np.testing.assert_allclose(written["log_likelihood"], float(reference.log_likelihood), rtol=1e-12)
        np.testing.assert_allclose(sorted(np.ravel(written["params"]["expert"]["a"])), [-1.0, 2.0], atol=0.1)
    with pytest.raises(SystemExit, match="error: likelihood='joint' needs the plain Gaussian gate"):
        run_cli("fit", "--data", data, "-k", "2", "--likelihood", "joint")


def test_fit_with_least_squares_recovers_a_regression_moe_and_refuses_bad_input(tmp_path):
    """`moe-theory fit --estimator lse` on a CSV drawn from a softmax-gated GELU regression MoE: the
    mean squared residual reaches the noise variance, the fitted function is the truth's, and bad
    settings or data stop with a message naming them."""
    import jax
    import numpy as np

    from moe_theory import regression

    family = regression.make_regression_family("softmax", "gelu", 2, 1)
    truth = regression.make_regression_params(family, {"gate": {"beta0": [-5.0, 0.0], "beta1": [[10.0], [0.0]]},
                                                       "expert": {"eta0": [3.6, -0.4], "eta1": [[-4.0], [4.0]]}})
    x, y = regression.sample(jax.random.key(0), family, truth, 4000, 0.1)
    data = tmp_path / "data.csv"
    pd.DataFrame({"x1": np.asarray(x[:, 0]), "y": np.asarray(y)}).to_csv(data, index=False)
    out = tmp_path / "fit.json"
    code, _, err = run_cli("fit", "--data", data, "--estimator", "lse", "--expert", "gelu", "-k", "2", "--n-init", "8",
                           "--bound", "30", "--out", out)
    assert code == 0, err
    written = json.loads(out.read_text())
    assert written["estimator"] == "lse" and written["converged"] and written["n"] == 4000
    assert abs(written["mean_squared_residual"] - 0.01) < 0.001
    fitted = regression.make_regression_params(family, written["params"])
    grid = np.linspace(0, 1, 101)[:, None]
    gap = np.abs(np.asarray(regression.mean_function(family, fitted, grid) - regression.mean_function(family, truth, grid)))
    assert gap.max() < 0.05
    with pytest.raises(SystemExit, match="unknown regression expert 'gaussian'"):
        run_cli("fit", "--data", data, "--estimator", "lse", "--expert", "gaussian", "-k", "2")
    with pytest.raises(SystemExit, match="--expert: invalid JSON"):
        run_cli("fit", "--data", data, "--estimator", "lse", "--expert", "{name: relu", "-k", "2")
    with pytest.raises(SystemExit, match="--bound and --score apply to --estimator lse only"):
        run_cli("fit", "--data", data, "-k", "2", "--bound", "5")
    with pytest.raises(SystemExit, match="--tol: expected a non-negative number"):
        run_cli("fit", "--data", data, "--estimator", "lse", "--expert", "relu", "-k", "2", "--tol", "-1")
    tiny = tmp_path / "tiny.csv"
    pd.DataFrame({"x1": [0.1, 0.2, 0.3], "y": [1.0, 2.0, 3.0]}).to_csv(tiny, index=False)
    with pytest.raises(SystemExit, match="3 rows cannot determine the 8 parameters"):
        run_cli("fit", "--data", tiny, "--estimator", "lse", "--expert", "relu", "-k", "2")
    infinite = tmp_path / "inf.csv"
    pd.DataFrame({"x1": [0.1, 0.2, np.inf] * 5, "y": [1.0, 2.0, 3.0] * 5}).to_csv(infinite, index=False)
    with pytest.raises(SystemExit, match="finite numbers"):
        run_cli("fit", "--data", infinite, "--estimator", "lse", "--expert", "relu", "-k", "2")
