"""Tests for moe_theory.rates: slope fitting, bootstrap intervals, diagnostics and the registry.

Each test checks a known answer: synthetic data with a planted rate, an independent NumPy
computation (np.polyfit, the delta method) or a value transcribed from docs/rates.md.
"""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from moe_theory.rates import (
    ModelComparison,
    RateFit,
    TheoreticalRate,
    asymptotic_slope,
    compare_power_vs_log,
    fit_rate,
    list_theoretical_rates,
    sample_complexity,
    sliding_window_slopes,
    theoretical_rate,
    verdict,
)

GEOMETRIC_SIZES = np.unique(np.round(np.geomspace(100, 100_000, 15)))


def make_table(curve, sizes, num_replicates, noise_sd, seed):
    """Tidy table with value = curve(n)·exp(noise_sd·Z), Z standard normal, per replicate."""
    rng = np.random.default_rng(seed)
    sample_size = np.repeat(np.asarray(sizes, dtype=float), num_replicates)
    replicate = np.tile(np.arange(num_replicates), len(sizes))
    value = curve(sample_size) * np.exp(noise_sd * rng.standard_normal(sample_size.size))
    return pd.DataFrame({"n": sample_size, "replicate": replicate, "value": value})


def power_law(constant, exponent):
    return lambda sample_size: constant * sample_size**exponent


# --- fit_rate -----------------------------------------------------------------------------------


def test_slope_recovery_on_planted_power_law():
    noise_sd = 0.5
    table = make_table(power_law(3.0, -0.5), GEOMETRIC_SIZES, 200, noise_sd, seed=1)
    fit = fit_rate(table)
    width = fit.ci_high - fit.ci_low
    assert 0 < width < 0.05
    assert abs(fit.slope + 0.5) < 3 * width
    assert fit.ci_low <= -0.5 <= fit.ci_high
    # The mean of a log-normal multiplies the curve by exp(σ²/2) and leaves the slope alone.
    assert fit.constant == pytest.approx(3.0 * math.exp(noise_sd**2 / 2), rel=0.1)
    assert fit.r_squared > 0.99
    assert fit.n_values == tuple(GEOMETRIC_SIZES)
    assert fit.n_nonfinite == 0 and fit.n_boot == 2000 and fit.statistic == "mean"


def test_point_estimate_matches_polyfit_oracle():
    table = make_table(power_law(0.7, -0.3), GEOMETRIC_SIZES, 7, 0.8, seed=2)
    per_size = table.groupby("n")["value"]
    for statistic, reduced in (("mean", per_size.mean()), ("median", per_size.median())):
        expected_slope, expected_intercept = np.polyfit(
            np.log(reduced.index.to_numpy()), np.log(reduced.to_numpy()), 1
        )
        fit = fit_rate(table, statistic=statistic, n_boot=50)
        assert fit.slope == pytest.approx(expected_slope, rel=1e-12)
        assert fit.intercept == pytest.approx(expected_intercept, rel=1e-12)
        assert fit.statistic_values == pytest.approx(tuple(reduced.to_numpy()))


def test_bootstrap_width_matches_delta_method():
    # For log-normal values, Var(log mean_j) ≈ (exp(σ²) − 1)/R, and the OLS slope is the linear
    # combination Σ w_j log mean_j with w_j = (x_j − x̄)/Sxx, so sd(slope)² ≈ Σ w_j² (exp(σ²) − 1)/R.
    noise_sd, num_replicates = 0.4, 100
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, num_replicates, noise_sd, seed=3)
    fit = fit_rate(table, n_boot=4000)
    centred = np.log(GEOMETRIC_SIZES) - np.log(GEOMETRIC_SIZES).mean()
    weights = centred / (centred @ centred)
    delta_sd = math.sqrt((weights @ weights) * math.expm1(noise_sd**2) / num_replicates)
    bootstrap_sd = (fit.ci_high - fit.ci_low) / (2 * 1.959964)
    assert bootstrap_sd == pytest.approx(delta_sd, rel=0.15)


def test_bootstrap_is_deterministic_for_a_seed():
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 10, 0.5, seed=4)
    first, second = fit_rate(table, n_boot=300, seed=7), fit_rate(table, n_boot=300, seed=7)
    assert first == second
    other = fit_rate(table, n_boot=300, seed=8)
    assert other.slope == first.slope
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_confidence_interval_coverage():
    # A percentile bootstrap of a mean has variance (R − 1)/R of the truth and the log-normal is
    # skewed, so with R = 20 the long-run coverage is about 0.93 (1,500 simulated datasets);
    # the band allows ±0.05, about 2.8 binomial standard deviations for 200 datasets.
    true_slope, num_datasets = -0.5, 200
    covered = 0
    for dataset in range(num_datasets):
        table = make_table(power_law(2.0, true_slope), GEOMETRIC_SIZES, 20, 0.5, seed=1000 + dataset)
        fit = fit_rate(table, n_boot=300, seed=dataset)
        covered += fit.ci_low <= true_slope <= fit.ci_high
    assert 0.88 <= covered / num_datasets <= 0.99


def test_median_is_robust_to_gross_outliers_and_mean_is_not():
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 21, 0.3, seed=5)
    # One divergent fit, 10⁴ times the typical loss, at each of the three largest n.
    for sample_size in GEOMETRIC_SIZES[-3:]:
        row = table.index[(table["n"] == sample_size) & (table["replicate"] == 0)]
        table.loc[row, "value"] *= 1e4
    median_fit = fit_rate(table, statistic="median", n_boot=500)
    mean_fit = fit_rate(table, statistic="mean", n_boot=500)
    assert abs(median_fit.slope + 0.5) < 0.05
    assert median_fit.ci_low <= -0.5 <= median_fit.ci_high
    assert abs(mean_fit.slope + 0.5) > 0.2


def test_label_format():
    fit = fit_rate(make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 5, 0.1, seed=6), n_boot=10)
    labelled = dataclasses.replace(fit, intercept=math.log(3.5), slope=-0.64)
    assert labelled.label() == "3.5·n^{-0.64}"
    assert labelled.constant == pytest.approx(3.5)


# --- non-finite values and input validation ------------------------------------------------------


def test_nonfinite_values_are_counted_and_excluded():
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 10, 0.3, seed=7)
    clean_fit = fit_rate(table, n_boot=200)
    corrupted = table.copy()
    bad_rows = corrupted.index[[0, 15, 42]]
    corrupted.loc[bad_rows, "value"] = [np.nan, np.inf, -np.inf]
    with pytest.warns(RuntimeWarning, match=r"3 of 150 values .* non-finite"):
        fit = fit_rate(corrupted, n_boot=200)
    assert fit.n_nonfinite == 3
    expected = fit_rate(table.drop(index=bad_rows), n_boot=200)
    assert fit == dataclasses.replace(expected, n_nonfinite=3)
    assert fit.slope != clean_fit.slope
    with pytest.warns(RuntimeWarning):
        assert compare_power_vs_log(corrupted).n_nonfinite == 3


def test_missing_column_is_named():
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 3, 0.1, seed=8)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['loss'\]"):
        fit_rate(table, value="loss")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['replicate'\]"):
        fit_rate(table.drop(columns="replicate"))


def test_fewer_than_three_sizes_is_rejected():
    table = make_table(power_law(1.0, -0.5), [100, 1000], 5, 0.1, seed=9)
    with pytest.raises(ValueError, match=r"at least 3 distinct n .* got 2 \(n = \[100, 1000\]\)"):
        fit_rate(table)


def test_non_positive_values_name_their_n():
    table = make_table(power_law(1.0, -0.5), [100, 1000, 10_000], 4, 0.1, seed=10)
    table.loc[(table["n"] == 1000) & (table["replicate"] == 2), "value"] = 0.0
    with pytest.raises(ValueError, match=r"must be > 0 .* 1 non-positive value\(s\) at n = \[1000\]"):
        fit_rate(table)


def test_repeated_rows_and_bad_options_are_rejected():
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 3, 0.1, seed=11)
    with pytest.raises(ValueError, match="repeated \\(n, replicate\\) rows"):
        fit_rate(pd.concat([table, table.iloc[:1]]))
    with pytest.raises(ValueError, match="statistic must be 'mean' or 'median'"):
        fit_rate(table, statistic="trimmed")
    with pytest.raises(ValueError, match="ci must lie strictly between 0 and 1"):
        fit_rate(table, ci=1.5)
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        fit_rate(table, n_boot=0)
    with pytest.raises(TypeError, match="pandas DataFrame"):
        fit_rate(table.to_dict())


# --- power law versus 1/log(n)^λ ------------------------------------------------------------------


def test_compare_prefers_log_model_on_inverse_log_data():
    table = make_table(lambda n: 2.0 / np.log(n), GEOMETRIC_SIZES, 40, 0.1, seed=12)
    comparison = compare_power_vs_log(table)
    assert isinstance(comparison, ModelComparison)
    assert comparison.preferred == "log"
    assert comparison.aic_difference > 2
    assert comparison.log_exponent == pytest.approx(1.0, abs=0.1)


def test_compare_prefers_power_model_on_power_law_data():
    table = make_table(power_law(2.0, -0.25), GEOMETRIC_SIZES, 40, 0.1, seed=13)
    comparison = compare_power_vs_log(table)
    assert comparison.preferred == "power"
    assert comparison.aic_difference < -2
    assert comparison.power_exponent == pytest.approx(-0.25, abs=0.02)


def test_compare_aic_matches_manual_computation():
    table = make_table(power_law(1.0, -0.4), GEOMETRIC_SIZES, 5, 0.5, seed=14)
    log_mean = np.log(table.groupby("n")["value"].mean().to_numpy())
    log_sizes = np.log(GEOMETRIC_SIZES)
    num_points = log_sizes.size
    aics = {}
    for name, regressor in (("power", log_sizes), ("log", np.log(log_sizes))):
        coefficients = np.polyfit(regressor, log_mean, 1)
        rss = np.sum((log_mean - np.polyval(coefficients, regressor)) ** 2)
        aics[name] = (coefficients, rss, num_points * np.log(rss / num_points) + 2 * 2)
    comparison = compare_power_vs_log(table)
    assert comparison.power_exponent == pytest.approx(aics["power"][0][0])
    assert comparison.log_exponent == pytest.approx(-aics["log"][0][0])
    assert comparison.power_rss == pytest.approx(aics["power"][1])
    assert comparison.log_rss == pytest.approx(aics["log"][1])
    assert comparison.power_aic == pytest.approx(aics["power"][2])
    assert comparison.log_aic == pytest.approx(aics["log"][2])
    assert comparison.aic_difference == pytest.approx(aics["power"][2] - aics["log"][2])


def test_compare_rejects_n_of_one():
    table = make_table(power_law(1.0, -0.5), [1, 10, 100, 1000], 3, 0.1, seed=15)
    with pytest.raises(ValueError, match=r"every n > 1 .* n = \[1\]"):
        compare_power_vs_log(table)


# --- sample complexity ---------------------------------------------------------------------------


def test_sample_complexity_inverts_the_fitted_curve():
    fit = fit_rate(make_table(power_law(3.0, -0.5), GEOMETRIC_SIZES, 20, 0.3, seed=16), n_boot=100)
    for epsilon in (0.5, 0.01, 1e-4):
        sample_size = sample_complexity(fit, epsilon)
        assert fit.constant * sample_size**fit.slope == pytest.approx(epsilon, rel=1e-10)
        assert fit.predict(sample_size * 1.01) < epsilon < fit.predict(sample_size * 0.99)


def test_sample_complexity_edge_cases():
    fit = fit_rate(make_table(power_law(3.0, -0.5), GEOMETRIC_SIZES, 5, 0.1, seed=17), n_boot=10)
    increasing = dataclasses.replace(fit, slope=0.2)
    flat = dataclasses.replace(fit, slope=0.0, intercept=math.log(2.0))
    assert sample_complexity(increasing, 0.1) == math.inf
    assert sample_complexity(flat, 1.0) == math.inf
    assert sample_complexity(flat, 3.0) == 0.0
    for epsilon in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="epsilon must be a finite positive number"):
            sample_complexity(fit, epsilon)


# --- sliding window -------------------------------------------------------------------------------


def test_sliding_window_finds_asymptotic_slope_after_flat_start():
    sizes = np.unique(np.round(np.geomspace(10, 100_000, 25)))
    # Flat at 1 up to n = 1000 (pre-asymptotic plateau), then (n/1000)^{-1/2}.
    curve = lambda n: np.minimum(1.0, (n / 1000.0) ** -0.5)  # noqa: E731
    table = make_table(curve, sizes, 30, 0.2, seed=18)
    slopes = sliding_window_slopes(table, window=5)
    assert list(slopes.columns) == ["n_min", "n_max", "slope"]
    assert len(slopes) == sizes.size - 5 + 1
    assert slopes["n_min"].is_monotonic_increasing
    assert abs(slopes["slope"].iloc[0]) < 0.1
    assert asymptotic_slope(table, window=5) == pytest.approx(-0.5, abs=0.08)
    # The whole-range fit mixes the two regimes and is visibly too shallow.
    assert fit_rate(table, n_boot=100).slope > -0.4


def test_sliding_window_slopes_match_polyfit_on_each_window():
    table = make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 6, 0.5, seed=19)
    log_mean = np.log(table.groupby("n")["value"].mean().to_numpy())
    log_sizes = np.log(GEOMETRIC_SIZES)
    slopes = sliding_window_slopes(table, window=4)
    for start, row in enumerate(slopes.itertuples()):
        expected = np.polyfit(log_sizes[start : start + 4], log_mean[start : start + 4], 1)[0]
        assert row.slope == pytest.approx(expected)
        assert (row.n_min, row.n_max) == (GEOMETRIC_SIZES[start], GEOMETRIC_SIZES[start + 3])
    with pytest.raises(ValueError, match="window must be an integer between 2 and"):
        sliding_window_slopes(table, window=len(GEOMETRIC_SIZES) + 1)


# --- theoretical-rate registry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "quantity", "exponent"),
    [
        ("exact", "D1", -1 / 2),
        ("exact", "beta1", -1 / 2),
        ("overfit", "D2", -1 / 2),
        ("overfit", "cell_mass", -1 / 2),
        ("overfit_cell2", "beta1", -1 / 8),
        ("overfit_cell2", "b", -1 / 8),
        ("overfit_cell2", "a", -1 / 4),
        ("overfit_cell2", "nu", -1 / 4),
        ("overfit_cell3", "beta1", -1 / 12),
        ("overfit_cell3", "b", -1 / 12),
        ("overfit_cell3", "a", -1 / 6),
        ("overfit_cell3", "nu", -1 / 6),
    ],
)
def test_registry_holds_paper_one_rates(setting, quantity, exponent):
    rate = theoretical_rate("softmax_gaussian", setting, quantity)
    assert rate.exponent == pytest.approx(exponent)
    assert "arXiv 2305.03288" in rate.citation and rate.citation.startswith("[1]")


def test_registry_other_families():
    assert theoretical_rate("gaussian_gated_gaussian", "any", "D").exponent == -0.5
    assert "2305.07572" in theoretical_rate("gaussian_gated_gaussian", "any", "D").citation
    temperature = theoretical_rate("temperature_softmax_gaussian", "any", "parameters")
    assert temperature.exponent is None and "slower than any polynomial" in temperature.note
    assert temperature.rate_label() == "slower than any polynomial"
    assert theoretical_rate("softmax_gaussian", "overfit_cell2", "beta1").rate_label() == "n^{-1/8}"


def test_every_registry_entry_is_well_formed():
    table = list_theoretical_rates()
    assert list(table.columns) == [
        "family", "setting", "quantity", "exponent", "rate", "citation", "note"
    ]
    assert not table.duplicated(subset=["family", "setting", "quantity"]).any()
    for row in table.itertuples():
        rate = theoretical_rate(row.family, row.setting, row.quantity)
        assert isinstance(rate, TheoreticalRate)
        assert rate.exponent is None or -1 <= rate.exponent < 0
        assert "arXiv" in rate.citation and rate.note


def test_unknown_rate_lists_available_entries():
    with pytest.raises(KeyError, match=r"(?s)no theoretical rate .*\n.*'softmax_gaussian', 'exact', 'D1'"):
        theoretical_rate("softmax_gaussian", "exact", "D7")


# --- verdict ---------------------------------------------------------------------------------------


@pytest.fixture
def fit_with_interval():
    fit = fit_rate(make_table(power_law(1.0, -0.5), GEOMETRIC_SIZES, 5, 0.1, seed=20), n_boot=10)
    return dataclasses.replace(fit, slope=-0.5, ci_low=-0.625, ci_high=-0.375)


@pytest.mark.parametrize(
    ("exponent", "tolerance", "expected"),
    [
        (-0.5, 0.1, "consistent"),
        (-0.65, 0.1, "consistent"),  # outside the CI, inside the tolerance
        (-0.65, 0.0, "slower than theory"),
        (-1 / 8, 0.1, "faster than theory"),
        (-1.0, 0.1, "slower than theory"),
        (-0.27, 0.1, "faster than theory"),
        # The widened interval is closed; these bounds are exact in binary floating point.
        (-0.25, 0.125, "consistent"),
        (-0.75, 0.125, "consistent"),
        (None, 0.1, "no polynomial rate predicted"),
    ],
)
def test_verdict(fit_with_interval, exponent, tolerance, expected):
    assert isinstance(fit_with_interval, RateFit)
    assert verdict(fit_with_interval, exponent, tolerance=tolerance) == expected


def test_verdict_accepts_registry_entries(fit_with_interval):
    assert verdict(fit_with_interval, theoretical_rate("softmax_gaussian", "exact", "D1")) == (
        "consistent"
    )
    assert verdict(
        fit_with_interval, theoretical_rate("temperature_softmax_gaussian", "any", "parameters")
    ) == "no polynomial rate predicted"
    with pytest.raises(ValueError, match="tolerance must be"):
        verdict(fit_with_interval, -0.5, tolerance=-0.1)


def _table_from_curve(sizes, curve, replicates=6, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"n": n, "replicate": r, "value": m * np.exp(noise * rng.normal())}
            for n, m in zip(sizes, curve) for r in range(replicates)]
    return pd.DataFrame(rows)


def test_curvature_matches_a_quadratic_polyfit_and_flags_only_real_bends():
    from moe_theory.rates import curvature

    sizes = np.geomspace(500, 5e4, 7)
    x = np.log(sizes)
    # A plateau that the curve is still leaving: log m = −0.1 x − 0.3 (x − x̄)².
    bending = np.exp(-0.1 * x - 0.3 * (x - x.mean()) ** 2)
    table = _table_from_curve(sizes, bending, noise=0.05)
    result = curvature(table, n_boot=300)
    per_n = table.groupby("n")["value"].mean().to_numpy()
    gamma_oracle = np.polyfit(x - x.mean(), np.log(per_n), 2)[0]
    assert result.gamma == pytest.approx(gamma_oracle, rel=1e-10)
    assert result.slope_change == pytest.approx(2 * gamma_oracle * (x.max() - x.min()), rel=1e-10)
    assert result.shape == "steepening" and result.ci_high < 0
    # A power law with the same noise is straight; a 1/log(n) decay flattens.
    assert curvature(_table_from_curve(sizes, 3 * sizes**-0.5, noise=0.05), n_boot=300).shape == "straight"
    assert curvature(_table_from_curve(sizes, 1 / np.log(sizes) ** 3, noise=0.01), n_boot=300,
                     tolerance=0.05).shape == "flattening"
    with pytest.raises(ValueError, match="at least 4 distinct n"):
        curvature(_table_from_curve(sizes[:3], bending[:3]))
