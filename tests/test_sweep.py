"""The sweep engine: exact-n data in padded arrays, the bucket ladder, determinism, growing a grid,
resuming after a failure, compile accounting, and summaries that state every exclusion."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import moe_theory as mt
from moe_theory import report, storage, sweep
from moe_theory.config import load_config
from moe_theory.metrics import metric_specs
from moe_theory.rates import theoretical_rate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def start_run(tmp_path, overrides=()):
    config = load_config(SMOKE, overrides)
    run_dir = storage.create_run_dir(tmp_path, config.name)
    storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
    return config, run_dir


def run(tmp_path, overrides=(), **options):
    config, run_dir = start_run(tmp_path, overrides)
    meta = sweep.run_study(config, run_dir, progress=False, figures=False, **options)
    return run_dir, meta, storage.read_table(run_dir)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run(tmp_path_factory.mktemp("smoke"))


def test_bucket_ladder_depends_on_n_alone():
    assert [sweep.bucket_size(n, 2.0) for n in (1, 2, 3, 64, 65, 1000, 100_000)] == [1, 2, 4, 64, 128, 1024, 131072]
    assert [sweep.bucket_size(n, 4.0) for n in (300, 1024, 1025)] == [1024, 1024, 4096]
    assert sweep.bucket_size(777, 1.0) == 777
    sizes = [sweep.bucket_size(n, 1.5) for n in range(2, 3000)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])) and all(s >= n for s, n in zip(sizes, range(2, 3000)))
    assert len(set(sizes)) <= 20


INPUTS = {
    "grid": "grid",
    "uniform": {"name": "uniform", "low": -2.0, "high": 3.0},
    "gaussian_mixture": {"name": "gaussian_mixture", "weights": [0.3, 0.7], "means": [-1.0, 1.0], "covariances": [0.5, 0.2]},
}


@pytest.mark.parametrize(
    "inputs, dtype, sizes",
    [("grid", jnp.float64, (2, 37, 64)), ("grid", jnp.float32, (37,))]
    + [(INPUTS[name], jnp.float64, (37,)) for name in ("uniform", "gaussian_mixture")],
    ids=["grid-float64", "grid-float32", "uniform", "gaussian_mixture"],
)
def test_padded_sample_is_the_exact_n_sample(inputs, dtype, sizes):
    """The first n of N rows equal moe_theory.sample at n, bit for bit, with n traced. (Normal
    inputs draw their bits like the uniform ones and the mixture's noise; they add no case.)"""
    family, truth = mt.model_from_dict(load_config(SMOKE).model, dtype=dtype)
    distribution = mt.make_inputs(inputs)
    padded = jax.jit(lambda key, n: sweep.sample_padded(key, family, truth, n, 64, distribution))
    for n in sizes:
        key = jax.random.key(n)
        x, y, _ = mt.sample(key, family, truth, n, distribution)
        x_padded, y_padded, weights = padded(key, n)
        np.testing.assert_array_equal(x_padded[:n], x)
        np.testing.assert_array_equal(y_padded[:n], y)
        np.testing.assert_array_equal(weights, np.arange(64) < n)


def test_grid_on_other_intervals_matches_linspace_to_rounding():
    """Off [0, 1] the grid's a·(1 − t) + b·t may round differently in differently fused programs
    (XLA contracts multiply-adds per program); the points agree to a couple of ulps."""
    distribution = mt.make_inputs({"name": "grid", "low": -1.3, "high": 2.7})
    family, truth = mt.model_from_dict(load_config(SMOKE).model)
    x_padded, _, _ = jax.jit(lambda n: sweep.sample_padded(jax.random.key(0), family, truth, n, 64, distribution))(37)
    np.testing.assert_allclose(x_padded[:37, 0], np.linspace(-1.3, 2.7, 37), rtol=0, atol=4 * np.finfo(float).eps * 2.7)


def test_smoke_run_table_and_meta(smoke):
    run_dir, meta, table = smoke
    config = load_config(run_dir / storage.CONFIG_FILE)
    assert len(table) == len(config.groups) * len(config.sample_sizes) * config.replicates
    assert list(table[["num_experts", "n", "replicate"]].itertuples(index=False, name=None))[:4] == [
        (2, 40, 0), (2, 40, 1), (2, 40, 2), (2, 50, 0)]
    assert table.loc[table.num_experts == 3, "D1"].isna().all() and table.loc[table.num_experts == 2, "D1"].notna().all()
    for column in ("D2", "D2_none", "err_beta1_atom0", "mass_err_atom1", "cell_size_atom1", "hat_beta0_2",
                   "log_likelihood", "n_iter", "converged", "finite"):
        assert column in table.columns
    assert not (run_dir / storage.PARTS_DIR).exists() and not (run_dir / storage.LOCK_FILE).exists()
    session = meta["sessions"][-1]
    assert meta["status"] == "complete" and session["cells_computed"] == 6 and session["cells_total"] == 6
    for program in session["programs"]:
        assert program["program"] in ("fit", "score") and program["compile_seconds"] > 0
    assert session["compile_count"] == len(session["programs"]) <= 4  # 2 fit (one bucket) + 2 score programs
    assert {"jax", "device_kind", "x64"} <= set(meta["environment"]) and "commit" in meta["git"]


def test_same_config_twice_gives_identical_values(smoke, tmp_path):
    _, _, first = smoke
    _, meta, second = run(tmp_path)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    # The programs were compiled by the first run; this process reuses them.
    assert meta["sessions"][-1]["compile_count"] == 0


def test_adding_sample_sizes_and_replicates_leaves_existing_rows_unchanged(smoke, tmp_path):
    _, _, base = smoke
    _, _, grown = run(tmp_path, ["sample_sizes=[40, 50, 55, 60]", "replicates=4"])
    assert len(grown) == 2 * 4 * 4
    key = ["num_experts", "n", "replicate"]
    common = grown.merge(base[key], on=key)[base.columns]
    pd.testing.assert_frame_equal(common.reset_index(drop=True), base, check_exact=True)


class Interrupted(RuntimeError):
    pass


def test_resume_after_a_failure_equals_an_uninterrupted_run(smoke, tmp_path):
    _, _, uninterrupted = smoke
    config, run_dir = start_run(tmp_path)

    def fail_after_two(written, cell):
        if written == 2:
            raise Interrupted(cell)

    with pytest.raises(Interrupted):
        sweep.run_study(config, run_dir, progress=False, figures=False, after_cell=fail_after_two)
    assert len(storage.finished_parts(run_dir)) == 2 and not (run_dir / storage.TABLE_FILE).exists()
    failed = storage.read_meta(run_dir)
    assert failed["status"] == "failed" and failed["sessions"][-1]["reason"].startswith("Interrupted")

    meta = sweep.run_study(config, run_dir, progress=False, figures=False)
    assert [s["status"] for s in meta["sessions"]] == ["failed", "complete"]
    assert meta["sessions"][-1]["cells_already_stored"] == 2 and meta["sessions"][-1]["cells_computed"] == 4
    pd.testing.assert_frame_equal(storage.read_table(run_dir), uninterrupted, check_exact=True)


def test_a_locked_run_folder_is_refused(smoke):
    run_dir, _, _ = smoke
    with storage.RunLock(run_dir):
        with pytest.raises(storage.RunFolderError, match="in use by process"):
            with storage.RunLock(run_dir):
                pass


def test_summaries_keep_and_count_nonfinite_fits(smoke):
    run_dir, _, table = smoke
    config = load_config(run_dir / storage.CONFIG_FILE)
    broken = table.copy()
    first = broken.index[(broken.num_experts == 2) & (broken.n == 40)][0]
    broken.loc[first, "finite"] = False
    broken.loc[first, ["D1", "D2", "log_likelihood"]] = np.nan
    second = broken.index[(broken.num_experts == 2) & (broken.n == 50)][0]
    broken.loc[second, "D2_none"] = np.inf  # a finite fit with a non-finite metric value
    summary = report.summarise(config, broken)
    d1 = summary[(summary.group == "k=2") & (summary.metric == "D1")].set_index("n")
    assert d1.loc[40, "rows"] == 3 and d1.loc[40, "used"] == 2 and d1.loc[40, "excluded_nonfinite_fit"] == 1
    finite = summary[(summary.group == "k=2") & (summary.metric == "finite")].set_index("n")
    assert finite.loc[40, "mean"] == pytest.approx(2 / 3)
    none = summary[(summary.group == "k=2") & (summary.metric == "D2_none")].set_index("n")
    assert none.loc[50, "nonfinite_values"] == 1 and none.loc[50, "used"] == 2
    rates = report.rate_table(config, broken).set_index(["group", "metric"])
    assert rates.loc[("k=2", "D1"), "rows_used"] == 8 and rates.loc[("k=2", "D1"), "excluded_nonfinite_fit"] == 1
    assert rates.loc[("k=2", "D1"), "theory_key"] == "softmax_gaussian/exact/D1"
    assert rates.loc[("k=3", "D2"), "theory_key"] == "softmax_gaussian/overfit/D2"
    assert rates.loc[("k=3", "D2_none"), "theory_key"] == ""  # theory bounds the infimum loss only
    assert rates.loc[("k=3", "err_b_atom1"), "theory_key"] == "softmax_gaussian/overfit_cell2/b"


def test_parameter_groups_use_the_registrys_setting_then_any(tmp_path):
    """Families whose theorem gives one rate per parameter group ([3]) are matched without rates.compare."""
    source = Path(__file__).resolve().parents[1] / "configs" / "paper3_temperature_vs_activation.yaml"
    config = load_config(source, ["arms.activation.rates.compare=[]"]).arm("activation")
    (group,) = config.groups
    rows = pd.DataFrame({"finite": [True, True], "cell_size_atom0": [1, 1], "cell_size_atom1": [1, 1]})
    family = "activation_temperature_softmax_gaussian"
    expected = {
        "err_beta1_atom0": (family, "exact", "gate_parameters"),
        "err_tau": (family, "exact", "gate_parameters"),
        "mass_err_atom0": (family, "exact", "gate_parameters"),
        "err_a_atom1": (family, "exact", "expert_parameters"),
        "hellinger": ("density_moe", "any", "hellinger"),
    }
    specs = {spec.column: spec for spec in metric_specs(config, group)}
    for metric, key in expected.items():
        assert report._theory_key(config, group, specs[metric], rows)[0] == key, metric
    assert theoretical_rate(*expected["err_a_atom1"]).exponent == -0.5  # an exact fit is parametric
    # Over-specified (k = 3): the expert parameters' slower n^{-1/4}, the gate's n^{-1/2}.
    overfit = load_config(source, ["arms.activation.rates.compare=[]", "fit.num_experts=3", "metrics.losses=[D2]",
                                          "comparison.metrics=[hellinger]"]).arm("activation")
    (overfit_group,) = overfit.groups
    overfit_specs = {spec.column: spec for spec in metric_specs(overfit, overfit_group)}
    overfit_rows = rows.assign(cell_size_atom1=[2, 2])
    key = report._theory_key(overfit, overfit_group, overfit_specs["err_a_atom1"], overfit_rows)[0]
    assert key == (family, "overfit", "expert_parameters") and theoretical_rate(*key).exponent == -0.25
    key = report._theory_key(overfit, overfit_group, overfit_specs["err_beta1_atom1"], overfit_rows)[0]
    assert key == (family, "overfit", "gate_parameters") and theoretical_rate(*key).exponent == -0.5
    temperature = load_config(source, ["arms.activation.rates.compare=[]",
                                       "arms.activation.rates.theory=temperature_softmax_gaussian"]).arm("activation")
    assert report._theory_key(temperature, group, specs["err_nu_atom0"], rows)[0] == (
        "temperature_softmax_gaussian", "any", "parameters")


def test_latest_run_is_the_newest_finished_run(tmp_path):
    assert storage.latest_run(tmp_path, "study") is None  # no folder yet
    for run_id, finished in (("20260101-000000-aaaaaa", True), ("20260102-000000-bbbbbb", True), ("20260103-000000-cccccc", False)):
        run_dir = tmp_path / "study" / run_id
        run_dir.mkdir(parents=True)
        if finished:
            (run_dir / storage.REPORT_FILE).write_text("# report\n")
    # The newest folder is still running (no report yet): the newest finished one is returned.
    assert storage.latest_run(tmp_path, "study") == tmp_path / "study" / "20260102-000000-bbbbbb"
