"""The structured-study runner (moe_theory.structured): config errors, resume, reproducibility."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moe_theory import structured

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = {
    "name": "tiny_attention",
    "kind": "attention",
    "claim": "runner test",
    "seed": 3,
    "sample_sizes": [60, 120, 240],
    "replicates": 3,
    "batch_size": 2,
    "error_draws": 256,
    "truth": {
        "heads": 1, "dim": 2, "tokens": 3, "noise": 0.1,
        "score": [[[1.0, 0.5], [-0.5, 1.0]]], "value": [[1.0, -0.5]],
        "gates": {"value": [[1.0, -1.0]]},
    },
    "fit": {"max_iter": 30, "tol": 1.0e-10, "start_scale": 0.1},
    "arms": [{"name": "mhsa", "position": None}, {"name": "value", "position": "value", "compare_to": "mhsa"}],
}


def _write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    run_dir = structured.run(_write(tmp, TINY), tmp / "results")
    return run_dir, pd.read_parquet(run_dir / "fits.parquet")


def test_every_fit_is_a_row_and_the_report_is_written(full_run):
    run_dir, table = full_run
    assert len(table) == 2 * 3 * 3
    assert set(table.columns) >= {"arm", "n", "replicate", "converged", "finite", "n_iter", "expert_error_0", "cell_seconds"}
    assert table["finite"].all()
    rates = pd.read_csv(run_dir / "rates.csv")
    assert set(rates["arm"]) == {"mhsa", "value"}
    ratios = pd.read_csv(run_dir / "complexity_ratios.csv")
    assert set(ratios["arm"]) == {"value"} and set(ratios["reference"]) == {"mhsa"}
    report = (run_dir / "report.md").read_text()
    assert "runner test" in report and "| mhsa |" in report
    assert (run_dir / "figures" / "expert_error.png").is_file()


def test_more_replicates_leave_existing_rows_bit_identical(full_run, tmp_path):
    _, table = full_run
    bigger = structured.run(_write(tmp_path, {**TINY, "replicates": 4}), tmp_path / "results")
    grown = pd.read_parquet(bigger / "fits.parquet")
    assert len(grown) == 2 * 3 * 4
    kept = grown[grown["replicate"] < 3].reset_index(drop=True).drop(columns="cell_seconds")
    pd.testing.assert_frame_equal(kept, table.drop(columns="cell_seconds"), check_exact=True)


def test_an_interrupted_run_resumes_without_redoing_cells(full_run, tmp_path, monkeypatch):
    _, table = full_run
    config = _write(tmp_path, TINY)
    real = structured._run_cell
    calls = []

    def interrupted(config_, arm, n):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((arm["name"], n))
        return real(config_, arm, n)

    monkeypatch.setattr(structured, "_run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        structured.run(config, tmp_path / "results")
    run_dir = next((tmp_path / "results" / "tiny_attention").iterdir())
    assert len(list((run_dir / "parts").glob("*.parquet"))) == 2

    resumed_calls = []

    def counting(config_, arm, n):
        resumed_calls.append((arm["name"], n))
        return real(config_, arm, n)

    monkeypatch.setattr(structured, "_run_cell", counting)
    structured.run(config, tmp_path / "results", resume=run_dir)
    assert len(resumed_calls) == 6 - 2 and not set(resumed_calls) & set(calls)
    resumed = pd.read_parquet(run_dir / "fits.parquet").drop(columns="cell_seconds")
    pd.testing.assert_frame_equal(resumed, table.drop(columns="cell_seconds"), check_exact=True)

    meta = json.loads((run_dir / "meta.json").read_text())
    assert [session["status"] for session in meta["sessions"]] == ["interrupted", "finished"]
    assert [session["cells"] for session in meta["sessions"]] == [2, 4]

    # Prose may change; a number may not. Resuming a complete run computes nothing and records no session.
    _write(tmp_path, {**TINY, "claim": "reworded"}, "prose.yaml")
    structured.run(tmp_path / "prose.yaml", tmp_path / "results", resume=run_dir)
    assert len(resumed_calls) == 4 and json.loads((run_dir / "meta.json").read_text()) == meta
    with pytest.raises(structured.StudyConfigError, match="differs from"):
        structured.run(_write(tmp_path, {**TINY, "seed": 4}, "seed.yaml"), tmp_path / "results", resume=run_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"replicate": 3}, r"unknown key\(s\) \['replicate'\]"),
        ({"kind": "mixture"}, "kind: expected one of"),
        ({"sample_sizes": [100, 100, 200]}, "sample_sizes: repeated"),
        ({"sample_sizes": [100, 200]}, "sample_sizes: expected at least 3"),
        ({"fit": {"max_iters": 3}}, "fit: expected a mapping"),
        ({"arms": [{"name": "a", "position": "keys"}]}, r"arms\[a\]: gate position"),
        ({"arms": [{"name": "a", "heads": 0}]}, r"arms\[a\]\.heads: expected a positive integer"),
        ({"arms": [{"name": "a", "gate": "sdpa"}]}, r"arms\[a\]: unknown key"),
        ({"arms": [{"name": "a"}, {"name": "b", "compare_to": "c"}]}, r"arms\[b\]\.compare_to"),
        ({"truth": {**TINY["truth"], "value": [[1.0]]}}, r"params.value: expected shape \(1, 2\)"),
        ({"seed": -1}, "seed: expected an integer"),
        ({"arms": []}, "arms: expected at least one arm"),
    ],
)
def test_malformed_configs_name_the_file_and_the_key(tmp_path, change, message):
    path = _write(tmp_path, {**TINY, **change})
    with pytest.raises(structured.StudyConfigError, match=message) as error:
        structured.load_config(path)
    assert str(path) in str(error.value)


def test_hmoe_config_errors_name_the_group(tmp_path):
    config = yaml.safe_load((CONFIGS / "paper9_laplace_hmoe.yaml").read_text())
    config["truth"]["params"]["expert"]["nu"] = [[0.05, -0.05], [0.05, 0.05]]
    with pytest.raises(structured.StudyConfigError, match=r"expert\[0\]\.nu\[1\] = -0.05"):
        structured.load_config(_write(tmp_path, config))


def test_shipped_structured_configs_load():
    for name, arms in (("paper7_gated_attention", 8), ("paper9_laplace_hmoe", 8), ("paper10_lse_softmax", 4),
                       ("paper5_sigmoid_vs_softmax", 8)):
        config = structured.load_config(CONFIGS / f"{name}.yaml")
        assert config.name == name and len(config.arms) == arms
        assert config.raw.get("description"), "every shipped config needs a one-line description for `moe-theory list`"
        assert np.all(np.diff(config.sample_sizes) > 0)


def test_a_split_start_is_refused_where_it_would_change_the_density(tmp_path):
    config = yaml.safe_load((CONFIGS / "paper9_laplace_hmoe.yaml").read_text())
    config["arms"] = [{"name": "sigmoid_over", "outer_gate": "softmax", "inner_gate": "sigmoid", "extra_experts": 1}]
    config["reference_arm"] = "sigmoid_over"
    with pytest.raises(structured.StudyConfigError, match=r"arms\[sigmoid_over\]\.extra_experts: the split start"):
        structured.load_config(_write(tmp_path, config))
    config["arms"][0]["extra_experts"] = 0
    structured.load_config(_write(tmp_path, config))



REGRESSION = {
    "name": "tiny_regression", "kind": "regression", "seed": 1, "sample_sizes": [80, 160, 320], "replicates": 3,
    "batch_size": 2, "error_draws": 256,
    "truths": {"soft": {"gate": "softmax", "expert": "relu", "noise": 0.1,
                        "params": {"gate": {"beta0": [-5.0, 0.0], "beta1": [[10.0], [0.0]]},
                                   "expert": {"eta0": [3.6, -0.2], "eta1": [[-4.0], [2.0]]}}}},
    "fit": {"max_iter": 50, "tol": 1.0e-10, "start_scale": 0.1, "bound": 20.0},
    "arms": [{"name": "own", "truth": "soft", "extra_experts": 1},
             {"name": "cross", "truth": "soft", "gate": "sigmoid", "extra_experts": 1, "compare_to": "own"}],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arms": [{"name": "a", "truth": "hard"}]}, r"arms\[a\]\.truth: expected one of \['soft'\]"),
        ({"arms": [{"name": "a", "truth": "soft", "gate": "cosine"}]}, r"arms\[a\]\.gate: expected one of"),
        ({"arms": [{"name": "a", "truth": "soft", "extra_experts": -1}]}, r"arms\[a\]\.extra_experts"),
        ({"fit": {"bound": 5.0}}, r"fit\.bound: 5 excludes a true parameter of size 10"),
        ({"fit": {"bound": -1.0}}, r"fit\.bound: expected a finite number > 0"),
        ({"fit": {"bound": True}}, r"fit\.bound: expected a finite number > 0, got True"),
        ({"fit": {"bound": "20"}}, r"fit\.bound: expected a finite number > 0, got '20'"),
        ({"fit": {"max_iter": 0}}, r"fit\.max_iter: expected a positive integer"),
        ({"fit": {"tol": -1.0}}, r"fit\.tol: expected a finite number ≥ 0"),
        ({"truth": {}}, "truth: a regression study names its truths under 'truths'"),
        ({"truths": {"soft": {**REGRESSION["truths"]["soft"], "expert": "swish"}}}, r"truths\.soft: expert: unknown regression"),
        ({"truths": {"soft": {**REGRESSION["truths"]["soft"], "noise": -0.1}}}, r"truths\.soft\.noise: expected a finite number"),
        ({"truths": {"soft": {**REGRESSION["truths"]["soft"], "colour": 1}}}, r"truths\.soft: unknown key"),
        ({"truths": {"soft": {**REGRESSION["truths"]["soft"], "inputs": "cauchy"}}}, r"truths\.soft: .*cauchy"),
        ({"truths": {"soft": {k: v for k, v in REGRESSION["truths"]["soft"].items() if k != "gate"}}},
         r"truths\.soft\.gate: missing"),
        ({"truths": {**REGRESSION["truths"], "spare": {"gate": "softmax"}}}, r"truths\.spare\.params: missing"),
    ],
)
def test_malformed_regression_configs_name_the_file_and_the_key(tmp_path, change, message):
    path = _write(tmp_path, {**REGRESSION, **change})
    with pytest.raises(structured.StudyConfigError, match=message) as error:
        structured.load_config(path)
    assert str(path) in str(error.value)


@pytest.mark.slow  # 80 s; the sweep's resume is bit-identical by default (tests/test_sweep.py, test_run_folder.py)
def test_a_regression_study_runs_resumes_bit_identically_and_reports(tmp_path, monkeypatch):
    """Every fit is a row with its flags, a cross-gate arm has NaN gate errors but expert errors, a
    run with another batch size and fewer replicates reproduces the shared rows bit for bit, and a
    resumed complete run recomputes nothing."""
    path = _write(tmp_path, REGRESSION)
    run_dir = structured.run(path, tmp_path / "results")
    table = pd.read_parquet(run_dir / "fits.parquet")
    assert len(table) == 2 * 3 * 3 and set(table["arm"]) == {"own", "cross"}
    cross, own = table[table["arm"] == "cross"], table[table["arm"] == "own"]
    assert cross["beta1_error_0"].isna().all() and cross["expert_error_0"].notna().any()
    assert own["beta1_error_0"].notna().any() and set(table["at_bound_0"].unique()) <= {0.0, 1.0}
    # The truth's objective is recorded on each fit's own data; least squares from a near-truth start
    # ends at or below the truth's mean squared residual on well-specified arms.
    assert (own["objective"] >= own["truth_objective"]).mean() > 0.5
    assert "beats_truth" in pd.read_csv(run_dir / "cells.csv").columns
    report = (run_dir / "report.md").read_text()
    assert "the other gate, but well-specified" in report and "What the theory says per arm" in report
    key = ["arm", "n", "replicate"]
    stable = lambda frame: frame.drop(columns="cell_seconds").sort_values(key).reset_index(drop=True)  # noqa: E731
    regrouped = structured.run(_write(tmp_path, {**REGRESSION, "batch_size": 3, "replicates": 2}, "regrouped.yaml"),
                               tmp_path / "regrouped")
    fewer = stable(pd.read_parquet(regrouped / "fits.parquet"))
    pd.testing.assert_frame_equal(fewer, stable(table[table["replicate"] < 2]), check_exact=True)
    monkeypatch.setattr(structured, "_run_cell", lambda *args: pytest.fail("a finished cell was recomputed"))
    resumed = structured.run(path, tmp_path / "results", resume=run_dir)
    pd.testing.assert_frame_equal(stable(table), stable(pd.read_parquet(resumed / "fits.parquet")), check_exact=True)
