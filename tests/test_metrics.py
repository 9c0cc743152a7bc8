"""The long metrics table: every wide score column becomes rows whose keys say what it measures."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_theory import metrics
from moe_theory.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def config():
    # Exact and over-fitted groups, D1 and D2 (the latter under two translations), parameter errors, densities.
    return load_config(CONFIGS / "smoke.yaml", ["metrics.parameter_errors=true", "metrics.density=true"])


@pytest.fixture(scope="module")
def temperature_config():
    # A shared parameter: the fitted temperature τ.
    study = load_config(CONFIGS / "paper3_temperature_vs_activation.yaml", ["fit.num_experts=[2, 3]"])
    return study.arm("temperature")


def wide_table(config, seed=0):
    """A fits.parquet-like table with random scores and cell sizes, 2 sizes × 3 replicates per group."""
    rng = np.random.default_rng(seed)
    frames = []
    for group in config.groups:
        rows = {"group": group.label, "n": np.repeat([100, 200], 3), "replicate": np.tile([0, 1, 2], 2),
                "finite": [True, True, False] * 2, "converged": [True, False, False] * 2}
        for column in config.metric_columns(group):
            rows[column] = rng.uniform(0.1, 1.0, 6)
        for atom in range(config.num_true):
            rows[metrics.cell_size_column(atom)] = rng.integers(0, 3, 6)
        frames.append(pd.DataFrame(rows))
    return pd.concat(frames, ignore_index=True)


def test_the_keys_name_exactly_the_config_s_metric_columns(config, temperature_config):
    for study in (config, temperature_config):
        for group in study.groups:
            assert [spec.column for spec in metrics.metric_specs(study, group)] == study.metric_columns(group)


def test_every_value_and_key_comes_from_its_wide_cell(config, temperature_config):
    table = wide_table(config)
    long = metrics.long_table(config, table, arm="temperature")
    expected_rows = sum(len(config.metric_columns(g)) * 6 for g in config.groups)
    assert len(long) == expected_rows and list(long.columns) == list(metrics.LONG_COLUMNS)
    assert (long["arm"] == "temperature").all()
    wide = table.set_index(["group", "n", "replicate"])
    for row in long.itertuples():
        source = wide.loc[(row.group, row.n, row.replicate)]
        assert row.value == source[row.column]
        assert (row.finite, row.converged) == (source["finite"], source["converged"])
        if row.atom >= 0:
            assert row.cell_size == source[metrics.cell_size_column(row.atom)]
    # Keys as data: a parameter error of β₁ in atom 1's cell, the shared τ, a loss's translation.
    beta = metrics.select(long, metric="error", block="beta1", atom=1)
    assert set(beta["column"]) == {"err_beta1_atom1"} and set(beta["translation"]) == {config.metrics.parameter_translation}
    d2 = metrics.select(long, metric="D2")
    assert set(zip(d2["column"], d2["translation"])) == {("D2", "infimum"), ("D2_none", "none")}
    assert set(metrics.select(long, metric="D1")["group"]) == {config.groups[0].label}  # exact fits only
    assert set(metrics.select(long, metric="hellinger")["atom"]) == {metrics.NO_ATOM}
    tau = metrics.select(metrics.long_table(temperature_config, wide_table(temperature_config)), metric="shared_error")
    assert set(tau["block"]) == {"tau"} and set(tau["column"]) == {"err_tau"}


def test_select_refuses_unknown_keys(config):
    with pytest.raises(ValueError, match="unknown key"):
        metrics.select(metrics.long_table(config, wide_table(config)), metirc="D1")
