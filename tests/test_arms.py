"""Arms studies: config validation with the key named, common random numbers, resumable runs, and
the comparison written from stored tables (also across separate runs with ``moe-theory compare``)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moe_theory import arms, cli, comparison, storage
from moe_theory.config import ArmsStudy, ConfigError, MetricSelector, load_config

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def arms_config(tmp_path, arms_section, comparison_section=None, **top):
    base = yaml.safe_load(SMOKE.read_text())
    base.update(name="arms_smoke", sample_sizes=[40, 60, 100, 160], replicates=4, **top)
    base["fit"] = {"num_experts": 2, "tol": 1.0e-5, "max_iter": 100}
    base["metrics"] = {"losses": ["D1", "D2"], "parameter_errors": True}
    base["arms"] = arms_section
    if comparison_section is not None:
        base["comparison"] = comparison_section
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


THREE_ARMS = {
    "exact": {},
    "twin": {"description": "the same fit again: it must see the same data and give the same numbers"},
    "overfit": {"fit": {"num_experts": 3}, "metrics": {"losses": ["D2"]}},
}


def test_arms_merge_into_the_base_and_share_sizes_and_seed(tmp_path):
    study = load_config(arms_config(tmp_path, {"softmax": {}, "sigmoid": {"model": {"gate": "sigmoid"}}}))
    assert isinstance(study, ArmsStudy) and study.arm_names == ("softmax", "sigmoid")
    softmax, sigmoid = study.arm("softmax"), study.arm("sigmoid")
    assert softmax.true_family.gate.normaliser == "softmax" and sigmoid.true_family.gate.normaliser == "sigmoid"
    # Everything not overridden is inherited, including the parameters of the gate.
    np.testing.assert_array_equal(sigmoid.truth.gate["beta1"], softmax.truth.gate["beta1"])
    assert (sigmoid.seed, sigmoid.sample_sizes, sigmoid.replicates) == (softmax.seed, softmax.sample_sizes, softmax.replicates)
    assert study.reference == "softmax"


@pytest.mark.parametrize("arms_section, comparison_section, message", [
    ({"a": {"sample_sizes": [10, 20]}, "b": {}}, None, r"arms\.yaml:\d+: arms\.a\.sample_sizes: arms share .*set sample_sizes at the top level"),
    ({"a": {"seed": 4}, "b": {}}, None, r"arms\.a\.seed: arms share"),
    ({"a": {"modle": {}}, "b": {}}, None, r"arms\.yaml:\d+: arms\.a\.modle: unknown key"),
    ({"a": {}}, None, r"arms: expected at least two named arms"),
    ({"a": {}, "b": {"fit": {"num_experts": 1}}}, None, r"arms\.yaml:\d+: arms\.b\.fit\.num_experts"),
    # A parameter group is replaced whole, so an arm that gives only nu lacks a and b.
    ({"a": {}, "b": {"model": {"params": {"expert": {"nu": [0.1, 0.2]}}}}}, None,
     r"arms\.yaml:\d+: arms\.b\.model\.params\.expert: missing parameter\(s\) \['a', 'b'\]"),
    ({"a": {}, "b": {}}, {"reference": "c"}, r"comparison\.reference: expected one of the arms \['a', 'b'\]"),
    ({"a": {}, "b": {}}, {"metrics": [{"metric": "D7"}]}, r"comparison\.metrics\[0\]\.metric: 'D7' is measured by no arm"),
    ({"a": {}, "b": {}}, {"epsilons": [0.1, -1]}, r"comparison\.epsilons\[1\]"),
])
def test_bad_arms_are_refused_naming_the_file_line_and_key(tmp_path, arms_section, comparison_section, message):
    with pytest.raises(ConfigError, match=message):
        load_config(arms_config(tmp_path, arms_section, comparison_section))


def test_an_inherited_value_that_breaks_an_arm_names_the_base_key_and_the_arm(tmp_path):
    # The base parameters are those of a softmax gate; an arm switching to the Gaussian gate without
    # its own parameters inherits beta0/beta1, which that gate does not have.
    with pytest.raises(ConfigError, match=r"arm 'gauss'.*model\.params\.gate"):
        load_config(arms_config(tmp_path, {"a": {}, "gauss": {"model": {"gate": "gaussian"}}}))


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("arms")
    study = load_config(arms_config(tmp_path, THREE_ARMS, {"metrics": ["main_loss", "D2", {"metric": "error", "block": "b", "atom": 1}]}))
    run_dir = storage.create_run_dir(tmp_path, study.name)
    storage.write_text(run_dir / storage.CONFIG_FILE, study.to_yaml())
    stopped = []

    def stop_after_first(arm):
        stopped.append(arm)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        arms.run_arms(study, run_dir, progress=False, figures=False, after_arm=stop_after_first)
    assert stopped == ["exact"]
    meta = arms.run_arms(load_config(run_dir / storage.CONFIG_FILE), run_dir, progress=False)
    return run_dir, meta


def test_arms_with_the_same_truth_see_the_same_datasets(arms_run):
    run_dir, _ = arms_run
    exact = storage.read_table(arms.arm_dir(run_dir, "exact"))
    twin = storage.read_table(arms.arm_dir(run_dir, "twin"))
    pd.testing.assert_frame_equal(exact, twin, check_exact=True)


def test_an_interrupted_arms_run_resumes_without_recomputing_a_finished_arm(arms_run):
    run_dir, meta = arms_run
    assert meta["status"] == "complete" and [s["status"] for s in meta["sessions"]] == ["interrupted", "complete"]
    first = storage.read_meta(arms.arm_dir(run_dir, "exact"))
    assert len(first["sessions"]) == 1  # finished before the interruption, not run again
    for name in ("twin", "overfit"):
        assert storage.read_meta(arms.arm_dir(run_dir, name))["status"] == "complete"


def test_a_failed_arms_run_records_failed_with_the_reason_and_keeps_its_arms(tmp_path):
    study = load_config(arms_config(tmp_path, THREE_ARMS))
    run_dir = storage.create_run_dir(tmp_path, study.name)
    storage.write_text(run_dir / storage.CONFIG_FILE, study.to_yaml())

    def break_after_first(arm):
        raise RuntimeError(f"disk full after {arm}")

    with pytest.raises(RuntimeError):
        arms.run_arms(study, run_dir, progress=False, figures=False, after_arm=break_after_first)
    meta = storage.read_meta(run_dir)
    assert meta["status"] == "failed" and meta["sessions"][-1]["reason"] == "RuntimeError: disk full after exact"
    assert storage.read_meta(arms.arm_dir(run_dir, "exact"))["status"] == "complete"


def test_the_comparison_is_written_from_the_stored_tables(arms_run):
    run_dir, _ = arms_run
    long = pd.read_parquet(run_dir / storage.METRICS_FILE)
    assert set(long["arm"]) == {"exact", "twin", "overfit"}
    contrasts = pd.read_csv(run_dir / comparison.CONTRASTS_FILE)
    assert set(contrasts["arm_b"]) == {"twin", "overfit"} and set(contrasts["arm_a"]) == {"exact"}
    # Identical arms: zero difference with a zero-width paired interval.
    twin = contrasts[(contrasts.arm_b == "twin")]
    assert twin["paired"].all() and np.allclose(twin[["difference", "ci_low", "ci_high"]].to_numpy(), 0.0)
    # The over-fitted arm's main loss is D2 and the exact arm's D1; both are listed as such.
    main = contrasts[(contrasts.arm_b == "overfit") & (contrasts.metric == "main_loss")].iloc[0]
    assert (main.column_a, main.column_b) == ("D1", "D2") and main.paired
    curves = pd.read_csv(run_dir / comparison.COMPLEXITY_FILE)
    assert set(curves["status"]) <= {"interpolated", "at_or_below_smallest_n", "beyond_data"}
    ratios = pd.read_csv(run_dir / comparison.RATIOS_FILE)
    twin_ratios = ratios[ratios.arm_b == "twin"]
    assert np.allclose(twin_ratios.loc[twin_ratios.status_a == "interpolated", "ratio"], 1.0)
    report = (run_dir / storage.REPORT_FILE).read_text()
    assert "Rate contrasts" in report and "twin" in report and "figures/sample_complexity.png" in report
    assert (run_dir / storage.FIGURES_DIR / "sample_complexity.png").is_file()


def test_compare_draws_the_same_tables_across_separate_runs(arms_run, tmp_path, capsys):
    run_dir, _ = arms_run
    out = tmp_path / "cmp"
    code = cli.main(["compare", str(arms.arm_dir(run_dir, "exact")), str(arms.arm_dir(run_dir, "overfit")),
                     "--metric", "D2", "--out", str(out), "--n-boot", "200"])
    assert code == 0
    contrasts = pd.read_csv(out / comparison.CONTRASTS_FILE)
    stored = pd.read_csv(run_dir / comparison.CONTRASTS_FILE)
    stored = stored[(stored.arm_b == "overfit") & (stored.metric == "D2")].iloc[0]
    # Labels differ (the runs share a name); slopes are the same numbers from the same tables.
    assert len(contrasts) == 1 and np.isclose(contrasts.slope_b.iloc[0], stored.slope_b)
    assert (out / storage.REPORT_FILE).is_file()
    assert cli.main(["compare", str(run_dir), "--arms", "nope", "--out", str(out)]) == 2
    assert "unknown arm" in capsys.readouterr().err


def test_a_metric_that_is_zero_by_construction_is_reported_not_fatal(arms_run):
    run_dir, _ = arms_run
    study, members = arms.load_arms(run_dir)
    # The reference expert's gate slope is fixed at 0 in the exact arms: no logarithm, no rate.
    settings = replace(study.comparison, metrics=(MetricSelector("error", block="beta1", atom=1),))
    tables = comparison.compare_arms(members[:2], settings)
    assert len(tables.contrasts) == 1 and np.isnan(tables.contrasts["slope_a"].iloc[0])
    assert tables.contrasts["failed_a"].iloc[0] == 16  # every fit counted as missing, none dropped


def test_resuming_an_arm_under_changed_settings_is_refused(arms_run, tmp_path):
    run_dir, _ = arms_run
    study = load_config(run_dir / storage.CONFIG_FILE)
    arm_meta = arms.arm_dir(run_dir, "twin") / storage.META_FILE
    meta = storage.read_meta(arms.arm_dir(run_dir, "twin"))
    meta["status"] = "running"  # as if interrupted
    storage.write_meta(arms.arm_dir(run_dir, "twin"), meta)
    changed = replace(study, arms=tuple((name, replace(config, replicates=5) if name == "twin" else config)
                                        for name, config in study.arms))
    with pytest.raises(storage.RunFolderError, match="arm 'twin' of this run was started with other settings"):
        arms.run_arms(changed, run_dir, progress=False, figures=False)
    meta["status"] = "complete"
    storage.write_meta(arms.arm_dir(run_dir, "twin"), meta)
    assert arm_meta.is_file()
