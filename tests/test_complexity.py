"""Sample-complexity curves and arm contrasts against hand computations and plain NumPy loops."""

import math

import numpy as np
import pandas as pd
import pytest

from moe_theory import complexity


def table_from(sizes, values_by_size):
    """A tidy (n, replicate, value) table; values_by_size[j] lists the replicates at sizes[j]."""
    rows = [
        {"n": n, "replicate": r, "value": v}
        for n, values in zip(sizes, values_by_size)
        for r, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def constant_table(sizes, means, replicates=4):
    return table_from(sizes, [[m] * replicates for m in means])


def test_n_of_epsilon_matches_a_hand_computation():
    sizes, means = [100, 200, 400, 800], [1.0, 0.5, 0.3, 0.1]
    curve = complexity.sample_complexity_curve(constant_table(sizes, means), "value", [0.05, 0.4, 2.0], n_boot=50)
    # ε = 0.4: m > ε at n = 100, 200 and not after, so n(ε) lies between 200 and 400 on log scales.
    hand = math.exp(math.log(200) + (math.log(0.4) - math.log(0.5)) * (math.log(400) - math.log(200))
                    / (math.log(0.3) - math.log(0.5)))
    assert curve.status == ("beyond_data", "interpolated", "at_or_below_smallest_n")
    np.testing.assert_allclose(curve.n, [np.inf, hand, 100.0], rtol=1e-12)
    # Replicates without spread: every bootstrap draw is the data itself.
    np.testing.assert_allclose(curve.lower, curve.n, rtol=1e-12)
    np.testing.assert_allclose(curve.upper, curve.n, rtol=1e-12)
    np.testing.assert_array_equal(curve.reached, [0.0, 1.0, 1.0])


def test_a_dip_below_epsilon_does_not_count_as_reached():
    curve = complexity.sample_complexity_curve(constant_table([100, 200, 400, 800], [1.0, 0.2, 0.5, 0.1]), "value", 0.3, n_boot=10)
    hand = math.exp(math.log(400) + (math.log(0.3) - math.log(0.5)) * math.log(2) / (math.log(0.1) - math.log(0.5)))
    np.testing.assert_allclose(curve.n, [hand], rtol=1e-12)


def test_failed_fits_are_ignored_but_an_all_failed_size_is_not_reached():
    sizes = [100, 200, 400]
    table = table_from(sizes, [[1.0, 1.0], [0.5, np.nan], [np.nan, np.nan]])
    curve = complexity.sample_complexity_curve(table, "value", [0.7], n_boot=20)
    assert curve.status == ("beyond_data",)  # n = 400 has no finite fit: ε is not shown reached there


def test_interpolating_a_power_law_is_exact_so_a_shifted_arm_needs_four_times_the_samples():
    sizes = np.geomspace(100, 1e5, 7)
    arm_a = constant_table(sizes, sizes**-0.5)
    arm_b = constant_table(sizes, (sizes / 4) ** -0.5)
    ratios = complexity.sample_complexity_ratio(arm_a, arm_b, "value", [0.02, 0.05], n_boot=20)
    assert list(ratios.status_a) == list(ratios.status_b) == ["interpolated"] * 2
    np.testing.assert_allclose(ratios.ratio, 4.0, rtol=1e-10)
    np.testing.assert_allclose(ratios.ratio_low, 4.0, rtol=1e-10)
    assert ratios.paired.all()


def test_fitted_laws_invert_exactly():
    epsilons = np.array([0.01, 0.1])
    n = complexity.power_law_sample_complexity(math.log(3.0), -0.5, epsilons)
    np.testing.assert_allclose(3.0 * n**-0.5, epsilons, rtol=1e-12)
    n_log = complexity.log_law_sample_complexity(math.log(2.0), 1.5, epsilons)
    np.testing.assert_allclose(2.0 / np.log(n_log) ** 1.5, epsilons, rtol=1e-10)
    assert np.all(np.isinf(complexity.power_law_sample_complexity(0.0, 0.1, epsilons)))
    # The 1/log law needs far more samples than any power law for small ε: it bends upward.
    assert n_log[0] / n_log[1] > (0.1 / 0.01) ** 10


def bootstrap_difference_loop(arm_a, arm_b, n_boot, seed, ci):
    """Plain loops: the same replicate draws for both arms at each n, OLS by np.polyfit."""
    sizes = sorted(arm_a.n.unique())
    rng = np.random.default_rng(seed)
    draws = {}
    for n in sizes:
        count = int((arm_a.n == n).sum())
        draws[n] = rng.integers(0, count, size=(n_boot, count))
    differences = []
    for b in range(n_boot):
        slopes = []
        for arm in (arm_a, arm_b):
            log_means = []
            for n in sizes:
                values = arm[arm.n == n].sort_values("replicate").value.to_numpy()
                log_means.append(math.log(np.mean(values[draws[n][b]])))
            slopes.append(np.polyfit(np.log(sizes), log_means, 1)[0])
        differences.append(slopes[1] - slopes[0])
    tail = (1 - ci) / 2
    return np.quantile(differences, [tail, 1 - tail])


def test_paired_slope_difference_equals_a_plain_loop_and_is_tighter_than_unpaired():
    rng = np.random.default_rng(5)
    sizes = [200, 400, 800, 1600, 3200]
    shared = [np.exp(rng.normal(0, 0.5, 12)) for _ in sizes]  # dataset noise both arms see
    arm_a = table_from(sizes, [n**-0.5 * s for n, s in zip(sizes, shared)])
    arm_b = table_from(sizes, [n**-0.75 * s * np.exp(rng.normal(0, 0.02, 12)) for n, s in zip(sizes, shared)])

    contrast = complexity.slope_difference(arm_a, arm_b, "value", n_boot=300, seed=11)
    assert contrast.paired and contrast.failed_draws == 0
    np.testing.assert_allclose([contrast.ci_low, contrast.ci_high],
                               bootstrap_difference_loop(arm_a, arm_b, 300, 11, 0.95), rtol=1e-12)
    assert contrast.ci_low < -0.25 < contrast.ci_high and contrast.ci_high < 0
    assert contrast.verdict("softmax", "sigmoid").startswith("sigmoid faster than softmax: slope difference -0.2")

    unpaired = complexity.slope_difference(arm_a, arm_b, "value", n_boot=300, seed=11, paired=False)
    assert not unpaired.paired
    assert (unpaired.ci_high - unpaired.ci_low) > 3 * (contrast.ci_high - contrast.ci_low)


def test_bad_input_is_refused_with_the_reason():
    table = constant_table([100, 200, 400], [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="statistic"):
        complexity.sample_complexity_curve(table, "value", 0.3, statistic="mode")
    with pytest.raises(ValueError, match="epsilons"):
        complexity.sample_complexity_curve(table, "value", [0.0])
    with pytest.raises(ValueError, match="must be > 0"):
        complexity.sample_complexity_curve(constant_table([100, 200], [1.0, -0.5]), "value", 0.3)
    shorter = constant_table([100, 200, 400], [1.0, 0.5, 0.2], replicates=3)
    with pytest.raises(ValueError, match="paired=True needs"):
        complexity.slope_difference(table, shorter, "value", paired=True)
    with pytest.raises(ValueError, match="missing column"):
        complexity.slope_difference(table, table.rename(columns={"value": "v"}), "value")


def test_a_quantile_statistic_reads_the_upper_tail():
    table = table_from([100, 200, 400], [[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0], [0.1, 0.2, 0.3, 0.4]])
    median = complexity.sample_complexity_curve(table, "value", 1.0, statistic="median", n_boot=10)
    upper = complexity.sample_complexity_curve(table, "value", 1.0, statistic=0.9, n_boot=10)
    assert median.n[0] < upper.n[0]
