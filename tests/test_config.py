"""Study configs: every shipped config loads and round-trips; every error names the file, the line
where there is one, the key path and what was expected; overrides, grids and sample-size specs."""

from pathlib import Path

import pytest
import yaml

from moe_theory.config import ConfigError, apply_overrides, expand_sample_sizes, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE = """\
name: study
seed: 3
model:
  gate: softmax
  expert: gaussian
  params:
    gate: {beta0: [-8.0, 0.0], beta1: [25.0, 0.0]}
    expert: {a: [-20.0, 20.0], b: [15.0, -5.0], nu: [0.09, 0.16]}
inputs: grid
sample_sizes: [100, 200, 400]
replicates: 4
fit:
  num_experts: 2
"""


def write(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


FLAT_CONFIGS = sorted(path for path in CONFIGS.glob("*.yaml") if "kind" not in yaml.safe_load(path.read_text()))
"""The sweep's configs; those with a top-level ``kind`` belong to moe_theory.structured (tests/test_structured.py)."""


@pytest.mark.parametrize("path", FLAT_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    config = load_config(path)
    assert config.description, "every shipped config needs a one-line description for `moe-theory list`"
    again = parse_config(yaml.safe_load(config.to_yaml()))
    assert again == config and again.to_dict() == config.to_dict()


def test_unknown_key_names_file_line_and_path(tmp_path):
    path = write(tmp_path, BASE.replace("  num_experts: 2\n", "  num_experts: 2\n  tool: 1.0e-6\n"))
    message = error_of(path)
    assert f"{path}:14: fit.tool: unknown key" in message and "'tol'" in message
    message = error_of(write(tmp_path, BASE + "extra: 1\n", "top.yaml"))
    assert message.startswith(f"{tmp_path / 'top.yaml'}:14: extra: unknown key")


def test_wrong_types_name_the_key_and_the_expected_type(tmp_path):
    path = write(tmp_path, BASE.replace("replicates: 4", "replicates: many"))
    assert f"{path}:11: replicates: expected a number, got 'many'" in error_of(path)
    assert "fit.tol: expected a number" in error_of(path, ["replicates=4", "fit.tol=small"])
    assert "fit.method[1]: expected one of ['em', 'squarem', 'em_newton', 'mle'], got 'newton'" in error_of(path, ["replicates=4", "fit.method=[em, newton]"])
    assert "replicates: expected an integer" in error_of(path, ["replicates=2.5"])
    assert "metrics.density: expected true, false or a mapping" in error_of(path, ["replicates=4", "metrics.density=7"])


def test_near_truth_assignment_sets_the_cell_sizes_and_is_checked(tmp_path):
    from moe_theory.sweep import FitSpec

    path = write(tmp_path, BASE)
    config = load_config(path, ["fit.num_experts=4", "fit.assignment=[0, 1, 1, 1]"])
    assert config.fit.assignment == (0, 1, 1, 1) and parse_config(yaml.safe_load(config.to_yaml())) == config
    assert FitSpec.of(config, config.groups[0], 100).assignment == (0, 1, 1, 1)
    assert "assignment" not in load_config(path).to_dict()["fit"]  # unset: the default, and no new key
    for overrides, expected in (
        (["fit.num_experts=4", "fit.assignment=[0, 1, 1]"], "fit.assignment: expected one index per fitted expert"),
        (["fit.num_experts=[3, 4]", "fit.assignment=[0, 1, 1]"], "for a single fit.num_experts"),
        (["fit.num_experts=3", "fit.assignment=[0, 2, 1]"], "fit.assignment[1]: expected a true atom index in [0, 2), got 2"),
        (["fit.num_experts=3", "fit.assignment=[1, 1, 1]"], "fit.assignment: every true atom needs a fitted atom; none is assigned to [0]"),
        (["fit.num_experts=3", "fit.assignment=0"], "fit.assignment: expected a list of true-atom indices"),
        (["fit.num_experts=3", "fit.assignment=[0, 1, 1]", "fit.init=random"], "fit.assignment: an assignment places near-truth starts"),
    ):
        assert expected in error_of(path, overrides), overrides


def test_selection_schedule_reaches_the_fit_and_is_checked(tmp_path):
    from moe_theory.sweep import em_config

    path = write(tmp_path, BASE)
    top_k = ["model.gate={name: topk_softmax, top_k: 1}", "fit.num_experts=3", "fit.top_k=2"]
    config = load_config(path, top_k + ["fit.selection_schedule=[1.0, 0.1, 0.01]"])
    assert em_config(config, config.groups[0]).selection_schedule == (1.0, 0.1, 0.01)
    assert parse_config(yaml.safe_load(config.to_yaml())) == config
    assert "selection_schedule" not in load_config(path, top_k).to_dict()["fit"]
    for overrides, expected in (
        (["fit.selection_schedule=[1.0, 0.1]"], "fit.selection_schedule: the gate (linear score, softmax normaliser) is not a top-K gate"),
        (top_k + ["fit.selection_schedule=[1.0, 1.0]"], "fit.selection_schedule[1]: expected a temperature below the previous 1, got 1"),
        (top_k + ["fit.selection_schedule=[0.0]"], "fit.selection_schedule[0]: expected a number > 0, got 0.0"),
        (top_k + ["fit.selection_schedule=[-1.0]"], "fit.selection_schedule[0]: expected a number > 0, got -1.0"),
        (top_k + ["fit.top_k=3", "fit.selection_schedule=[1.0]"], "with K̄ = 3 active experts of k = 3 the fitted gate is dense"),
        (["model.gate={name: topk_softmax, top_k: 1, selection_temperature: 0.5}"],
         "model.gate.selection_temperature: a soft selection is a fitting device"),
        (top_k + ["fit.selection_schedule=0.5"], "fit.selection_schedule: expected a list of decreasing temperatures"),
    ):
        assert expected in error_of(path, overrides), overrides


def test_bad_shapes_and_values_of_true_parameters_name_the_field(tmp_path):
    path = write(tmp_path, BASE.replace("nu: [0.09, 0.16]", "nu: [0.09, 0.16, 0.2]"))
    message = error_of(path)
    assert message.startswith(f"{path}:8: model.params.expert.nu: expected shape (2,)") and "got (3,)" in message
    negative = write(tmp_path, BASE.replace("nu: [0.09, 0.16]", "nu: [0.09, -0.16]"), "negative.yaml")
    assert f"{negative}:8: model.params.expert.nu[1] = -0.16: expected > 0" in error_of(negative)
    missing = write(tmp_path, BASE.replace("b: [15.0, -5.0], ", ""), "missing.yaml")
    assert "model.params.expert: missing parameter(s) ['b']" in error_of(missing)
    assert "model.gate: unknown gate 'bogus'" in error_of(path, ["model.gate=bogus"])


def test_inconsistent_models_stop_before_any_work(tmp_path):
    path = write(tmp_path, BASE)
    message = error_of(path, ["fit.num_experts=[1, 3]"])
    assert "(set by --set fit.num_experts): fit.num_experts[0]: the fitted k = 1 is smaller than the true k* = 2" in message
    assert "metrics.losses[0]: D1 (the exact-fitted loss) needs a fitted k equal to k* = 2" in error_of(
        path, ["fit.num_experts=3", "metrics.losses=[D1, D2]"]
    )
    assert "model.gate.top_k: K = 3 exceeds the number of experts k = 2" in error_of(
        path, ["model.gate={name: topk_softmax, top_k: 3}"]
    )
    assert "inputs: the grid input distribution needs d = 1" in error_of(
        path, ["model.params.gate.beta1=[[1, 2], [0, 0]]", "model.params.expert.a=[[1, 2], [0, 0]]"]
    )
    assert "fit.likelihood: likelihood='joint' needs the plain Gaussian gate" in error_of(path, ["fit.likelihood=joint"])
    assert "fit.top_k: the true gate (" in error_of(path, ["fit.top_k=2"])
    top_k = load_config(path, ["model.gate={name: topk_softmax, top_k: 1}", "fit.num_experts=[2, 3]", "fit.top_k=2"])
    assert [top_k.fitted_family(group).gate.top_k for group in top_k.groups] == [2, 2]
    assert top_k.true_family.gate.top_k == 1 and parse_config(yaml.safe_load(top_k.to_yaml())) == top_k
    # A comparison with another registry family than rates.theory survives the resolved config.
    other = load_config(path, ["rates.compare=[{metric: D1, family: density_moe, setting: any, quantity: hellinger}]"])
    assert parse_config(yaml.safe_load(other.to_yaml())) == other
    assert "fit.likelihood: expected one of ['conditional', 'joint'], got 'marginal'" in error_of(
        path, ["fit.likelihood=marginal"]
    )
    assert "rates.compare[0]: ('softmax_gaussian', 'exact', 'D9') is not in the theoretical-rate registry" in error_of(
        path, ["rates.compare=[{metric: D1, setting: exact, quantity: D9}]"]
    )


def test_duplicated_yaml_keys_are_errors(tmp_path):
    path = write(tmp_path, BASE + "replicates: 5\n")
    assert error_of(path).startswith(f"{path}:14: replicates: duplicated key")


def test_overrides_parse_yaml_values_and_create_missing_keys():
    data, paths = apply_overrides({"fit": {"num_experts": 2}}, ["fit.num_experts=[2, 3]", "fit.tol=1e-8", "sweep.batch_size=4"])
    # PyYAML reads 1e-8 (no dot) as a string; the number fields of the config accept it.
    assert data == {"fit": {"num_experts": [2, 3], "tol": "1e-8"}, "sweep": {"batch_size": 4}}
    assert paths == ["fit.num_experts", "fit.tol", "sweep.batch_size"]
    for bad in ("fit.tol", "=3", "fit..tol=3"):
        with pytest.raises(ConfigError, match="--set"):
            apply_overrides({}, [bad])


def test_lists_expand_to_a_grid_with_stable_ids(tmp_path):
    path = write(tmp_path, BASE)
    single = load_config(path)
    grid = load_config(path, ["fit.num_experts=[2, 3]", "fit.method=[em, mle]", "fit.tol=1e-8"])
    assert grid.fit.tol == 1e-8  # "1e-8" is a string to PyYAML; number fields accept it
    assert [g.label for g in grid.groups] == ["k=2 · method=em", "k=2 · method=mle", "k=3 · method=em", "k=3 · method=mle"]
    # A group's id depends on its own settings only, not on which other groups the grid holds.
    assert grid.groups[0].group_id == single.groups[0].group_id
    assert grid.groups[0].init_id == grid.groups[1].init_id != grid.groups[2].init_id
    assert "D1" in grid.metric_columns(grid.groups[0]) and "D1" not in grid.metric_columns(grid.groups[2])


def test_sample_size_specs_concatenate_round_and_deduplicate():
    paper1 = expand_sample_sizes([{"linspace": [100, 900, 5]}, {"linspace": [1000, "1e5", 195]}])
    assert len(paper1) == 200 and paper1[:6] == (100, 300, 500, 700, 900, 1000) and paper1[-1] == 100_000
    # Halves round up; repeats are kept once; the result is sorted.
    assert expand_sample_sizes([10.5, 12, {"geomspace": [4, 16, 3]}, 12.4]) == (4, 8, 11, 12, 16)
    assert expand_sample_sizes(300) == (300,)
    for bad, expected in (
        ([1, 10], "sample_sizes: expected sample sizes ≥ 2"),
        ({"logspace": [1, 2, 3]}, "sample_sizes.logspace: unknown key"),
        ({"geomspace": [0, 10, 3]}, "sample_sizes.geomspace[0]: expected a number > 0"),
        ({"linspace": [1, 10]}, "sample_sizes.linspace: expected [start, stop, num]"),
        ([], "sample_sizes: expected at least one sample size"),
    ):
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            expand_sample_sizes(bad)


def test_missing_file_and_invalid_yaml(tmp_path):
    assert "no such config file" in error_of(tmp_path / "absent.yaml")
    assert "not valid YAML" in error_of(write(tmp_path, "name: [unclosed\n"))


def test_joint_likelihood_refuses_conditional_only_methods():
    path = CONFIGS / "paper8_gaussian_gate.yaml"
    message = error_of(path, ["fit.method=[em, em_newton, mle]"])
    assert "fit.method: ['em_newton', 'mle'] maximise the conditional likelihood; with fit.likelihood: joint use 'em'" in message
