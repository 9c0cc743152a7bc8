"""Comparisons between arms: contrasts of rates, sample-complexity curves, figures and the report.

An **arm** is one variant of a study (a gate, a fitted k, an estimator) with its results: the
resolved config and the long metrics table (:mod:`moe_theory.metrics`). Arms come from one arms
study (``arms:`` in a config, :func:`moe_theory.arms.run_arms`) or from separate runs
(``moe-theory compare RUN_DIR ...``); both end here, so a committed study and a new one are
compared with the same tables and figures.

For every compared metric (:class:`moe_theory.config.MetricSelector`) and every arm B against the
reference arm A, on fit groups matched by label (or the one group of each arm):

* **rate contrast**: the log-log slopes α̂_A, α̂_B of the per-n statistic and Δ = α̂_B − α̂_A with
  a percentile bootstrap CI, paired when the arms saw the same datasets (same true model, inputs
  and seed: common random numbers), independent otherwise (:func:`moe_theory.complexity.slope_difference`);
* **laws**: power law against 1/log(n)^λ for each arm by AIC (:func:`moe_theory.rates.compare_power_vs_log`),
  and the curvature test (:func:`moe_theory.rates.curvature`): a contrast involving a curve that
  still steepens across the range compares the approach to the asymptotic regime, not rates, and
  its verdict says so;
* **sample complexity**: n(ε) read from the data with a bootstrap band, and from both fitted laws,
  at targets ε (given, or six spanning the reference arm's measured levels), and the ratio n_B(ε)/n_A(ε)
  with its CI; a ratio whose ε lies outside either arm's data is labelled so, never extrapolated.

Fits whose estimator failed (``finite`` False) count as missing values: they are resampled and
ignored like any non-finite score, and their number is reported. The mathematics is in
``docs/rates.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import complexity, storage
from .config import MAIN_LOSS, ComparisonSettings, FitGroup, MetricSelector, StudyConfig
from .metrics import select
from .rates import Curvature, compare_power_vs_log, curvature

CONTRASTS_FILE = "contrasts.csv"
COMPLEXITY_FILE = "sample_complexity.csv"
RATIOS_FILE = "sample_complexity_ratios.csv"
NUM_DEFAULT_EPSILONS = 6


@dataclass(frozen=True)
class Arm:
    """One arm's results: its label, resolved config, long metrics table and run folder."""

    label: str
    config: StudyConfig
    long: pd.DataFrame
    run_dir: Path | None = None

    def same_data_as(self, other: "Arm") -> bool:
        """Whether both arms drew the same datasets: equal truth, inputs, seed, sizes and replicates."""
        mine, theirs = self.config, other.config
        return (
            mine.true_family == theirs.true_family
            and all(np.array_equal(a, b) for a, b in zip(_leaves(mine.truth), _leaves(theirs.truth)))
            and mine.inputs == theirs.inputs
            and (mine.seed, mine.sample_sizes, mine.replicates) == (theirs.seed, theirs.sample_sizes, theirs.replicates)
        )


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(params.gate[k]) for k in sorted(params.gate)] + [np.asarray(params.expert[k]) for k in sorted(params.expert)]


# ----------------------------------------------------------------------------------------------
# Selecting one series (n, replicate, value) per arm, group and metric.


def resolve(selector: MetricSelector, config: StudyConfig, group: FitGroup) -> dict[str, Any] | None:
    """The long-table keys a selector names for one group, or None when the group lacks the metric.

    ``main_loss`` is D1 for an exact fit and D2 otherwise (the first loss if neither is listed); a
    loss is taken at the config's default translation, a parameter error at the parameter
    translation, unless the selector names one.
    """
    losses = [(loss.name, translation) for loss, _, translation in config.metrics.loss_columns(config.is_exact(group))]
    if selector.metric == MAIN_LOSS:
        names = [name for name, _ in losses]
        for preferred in ("D1", "D2"):
            if preferred in names:
                return {"metric": preferred, "translation": config.metrics.translation}
        return {"metric": names[0], "translation": config.metrics.translation} if names else None
    keys: dict[str, Any] = {"metric": selector.metric}
    if selector.block is not None:
        keys["block"] = selector.block
    if selector.atom is not None:
        keys["atom"] = selector.atom
    if selector.translation is not None:
        keys["translation"] = selector.translation
    elif selector.metric in {name for name, _ in losses}:
        keys["translation"] = config.metrics.translation
    elif selector.metric in ("error", "mass_error", "shared_error"):
        keys["translation"] = config.metrics.parameter_translation
    return keys


def series(arm: Arm, group: FitGroup, selector: MetricSelector) -> tuple[pd.DataFrame, dict] | None:
    """(n, replicate, value) of one metric of one group at n ≥ ``rates.min_n``, NaN where the fit
    failed or the score is 0, and its keys."""
    keys = resolve(selector, arm.config, group)
    if keys is None:
        return None
    rows = select(arm.long, group=group.label, **keys)
    if rows.empty:
        return None
    if rows.duplicated(["n", "replicate"]).any():
        columns = sorted(rows["column"].unique())
        raise ValueError(
            f"arm {arm.label!r}, group {group.label}: metric {selector.label()!r} matches several scores per fit "
            f"({columns[:6]}); name its block and atom"
        )
    rows = rows[rows["n"] >= arm.config.rates.min_n]  # the sizes the arm's own rates use
    values = rows["value"].to_numpy(dtype=float)
    # A failed fit has no score; a score of exactly 0 (zero by construction, as the reference expert's
    # fixed gate slope) has no logarithm. Both count as missing, like a non-finite value.
    usable = rows["finite"].to_numpy(dtype=bool) & (values > 0)
    table = pd.DataFrame({"n": rows["n"].to_numpy(), "replicate": rows["replicate"].to_numpy(),
                          "value": np.where(usable, values, np.nan)})
    return table, {**keys, "column": rows["column"].iloc[0]}


def matched_groups(arm_a: Arm, arm_b: Arm) -> list[tuple[FitGroup, FitGroup]]:
    """Groups to compare: the one group of each arm, or else the groups with equal labels."""
    groups_a, groups_b = arm_a.config.groups, arm_b.config.groups
    if len(groups_a) == 1 and len(groups_b) == 1:
        return [(groups_a[0], groups_b[0])]
    by_label = {group.label: group for group in groups_b}
    return [(group, by_label[group.label]) for group in groups_a if group.label in by_label]


# ----------------------------------------------------------------------------------------------
# Tables.


def _statistic_per_n(table: pd.DataFrame, statistic) -> np.ndarray:
    grid = table.pivot(index="n", columns="replicate", values="value").sort_index().to_numpy(dtype=float)
    return complexity.reduce_statistic(grid, statistic)


def default_epsilons(reference: pd.DataFrame, statistic, count: int = NUM_DEFAULT_EPSILONS) -> np.ndarray:
    """Targets strictly inside the reference arm's measured levels (between its smallest and largest
    per-n statistic, ends excluded: at an end, half the bootstrap draws fall outside the data), so
    that n(ε) is read from the data for the reference, and every other arm is compared with it
    where it has data, or reported beyond or below its data."""
    values = _statistic_per_n(reference, statistic)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0 or not values.min() < values.max():
        return np.array([])
    return np.geomspace(values.min(), values.max(), count + 2)[1:-1]


def bend(table: pd.DataFrame, settings: ComparisonSettings) -> Curvature | None:
    """The curvature test of one series (:func:`moe_theory.rates.curvature`), None below 4 sizes."""
    statistic = settings.statistic if settings.statistic in ("mean", "median") else "median"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # failed fits are counted by the caller
            return curvature(table.dropna(subset=["value"]), "value", statistic, settings.n_boot, settings.ci)
    except ValueError:
        return None


def _laws(table: pd.DataFrame, statistic) -> dict[str, Any]:
    """Power law and 1/log(n)^λ fitted to one series, or NaNs when it cannot be fitted."""
    law_statistic = statistic if statistic in ("mean", "median") else "median"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # non-finite values are counted by the caller
            fitted = compare_power_vs_log(table.dropna(subset=["value"]), "value", law_statistic)
    except ValueError as error:
        return {"law_note": str(error).split(";")[0], "power_exponent": math.nan, "power_intercept": math.nan,
                "log_exponent": math.nan, "log_intercept": math.nan, "delta_aic": math.nan, "preferred_law": ""}
    return {"law_note": "", "power_exponent": fitted.power_exponent, "power_intercept": fitted.power_intercept,
            "log_exponent": fitted.log_exponent, "log_intercept": fitted.log_intercept,
            "delta_aic": fitted.aic_difference, "preferred_law": fitted.preferred}


@dataclass(frozen=True)
class ComparisonTables:
    contrasts: pd.DataFrame
    curves: pd.DataFrame
    ratios: pd.DataFrame


def compare_arms(arms: list[Arm], settings: ComparisonSettings) -> ComparisonTables:
    """Every contrast, curve and ratio of the module docstring, as three tidy tables; the
    reference arm is ``settings.reference``, or the first arm."""
    if len(arms) < 2:
        raise ValueError(f"a comparison needs at least two arms, got {[arm.label for arm in arms]}")
    labels = [arm.label for arm in arms]
    if len(set(labels)) != len(labels):
        raise ValueError(f"arm labels must be distinct, got {labels}")
    reference = settings.reference
    reference_arm = arms[0] if reference is None else next((a for a in arms if a.label == reference), None)
    if reference_arm is None:
        raise ValueError(f"reference arm {reference!r} is not among {labels}")
    statistic, n_boot, ci = settings.statistic, settings.n_boot, settings.ci
    contrasts, curves, ratios = [], [], []
    seen_curves: set[tuple] = set()
    for other in (arm for arm in arms if arm is not reference_arm):
        paired = reference_arm.same_data_as(other)
        for group_a, group_b in matched_groups(reference_arm, other):
            for selector in settings.metrics:
                pair = [series(reference_arm, group_a, selector), series(other, group_b, selector)]
                if any(item is None for item in pair):
                    continue
                (table_a, keys_a), (table_b, keys_b) = pair
                epsilons = (np.asarray(settings.epsilons) if settings.epsilons is not None
                            else default_epsilons(table_a, statistic))
                identity = {"metric": selector.label(), "arm_a": reference_arm.label, "group_a": group_a.label,
                            "column_a": keys_a["column"], "arm_b": other.label, "group_b": group_b.label,
                            "column_b": keys_b["column"], "paired": paired}
                laws = {}
                for arm, group, table in ((reference_arm, group_a, table_a), (other, group_b, table_b)):
                    laws[arm.label] = _laws(table, statistic)
                    key = (arm.label, group.label, selector.label(), tuple(np.round(epsilons, 12)))
                    if key not in seen_curves and epsilons.size:
                        seen_curves.add(key)
                        try:
                            curves.append(_curve_frame(arm, group, selector, table, epsilons, settings, laws[arm.label]))
                        except ValueError:  # fewer than 2 sizes with data: no curve, the contrast says why
                            pass
                record = {**identity, "failed_a": int(table_a["value"].isna().sum()),
                          "failed_b": int(table_b["value"].isna().sum())}
                shapes = {arm.label: bend(table, settings) for arm, table in ((reference_arm, table_a), (other, table_b))}
                record.update(shape_a=getattr(shapes[reference_arm.label], "shape", ""),
                              shape_b=getattr(shapes[other.label], "shape", ""))
                steepening = [label for label, shape in shapes.items() if shape is not None and shape.shape == "steepening"]
                try:
                    contrast = complexity.slope_difference(table_a, table_b, "value", statistic, n_boot, ci, paired=paired)
                    verdict = contrast.verdict(reference_arm.label, other.label)
                    if steepening:
                        # A curve still leaving its plateau has no rate yet: its slope measures the approach.
                        verdict = (f"pre-asymptotic ({' and '.join(steepening)} still steepening), so this compares "
                                   f"approaches, not rates: {verdict}")
                    record.update(slope_a=contrast.slope_a, slope_b=contrast.slope_b, difference=contrast.difference,
                                  ci_low=contrast.ci_low, ci_high=contrast.ci_high, verdict=verdict)
                except ValueError as error:
                    record.update(slope_a=math.nan, slope_b=math.nan, difference=math.nan, ci_low=math.nan,
                                  ci_high=math.nan, verdict=f"not fitted: {str(error).split(';')[0]}")
                for side, arm in (("a", reference_arm), ("b", other)):
                    record[f"law_{side}"] = laws[arm.label]["preferred_law"]
                    record[f"delta_aic_{side}"] = laws[arm.label]["delta_aic"]
                contrasts.append(record)
                if epsilons.size:
                    try:
                        ratio = complexity.sample_complexity_ratio(table_a, table_b, "value", epsilons, statistic, n_boot,
                                                                   ci, paired=paired)
                    except ValueError:  # as for the curves
                        continue
                    ratios.append(ratio.drop(columns="paired").assign(**identity))
    return ComparisonTables(
        contrasts=pd.DataFrame(contrasts),
        curves=pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(),
        ratios=pd.concat(ratios, ignore_index=True) if ratios else pd.DataFrame(),
    )


def _curve_frame(arm: Arm, group: FitGroup, selector: MetricSelector, table: pd.DataFrame, epsilons: np.ndarray,
                 settings: ComparisonSettings, laws: dict) -> pd.DataFrame:
    curve = complexity.sample_complexity_curve(table, "value", epsilons, settings.statistic, settings.n_boot, settings.ci)
    frame = curve.to_frame()
    frame["n_power_law"] = (complexity.power_law_sample_complexity(laws["power_intercept"], laws["power_exponent"], epsilons)
                            if math.isfinite(laws["power_exponent"]) else math.nan)
    frame["n_log_law"] = (complexity.log_law_sample_complexity(laws["log_intercept"], laws["log_exponent"], epsilons)
                          if math.isfinite(laws["log_exponent"]) else math.nan)
    sizes = table["n"].to_numpy(dtype=float)
    return frame.assign(arm=arm.label, group=group.label, metric=selector.label(), power_exponent=laws["power_exponent"],
                        log_exponent=laws["log_exponent"], preferred_law=laws["preferred_law"],
                        delta_aic=laws["delta_aic"], n_min=sizes.min(), n_max=sizes.max())


def write_tables(out_dir: Path, tables: ComparisonTables) -> None:
    storage.write_frame(out_dir / CONTRASTS_FILE, tables.contrasts)
    storage.write_frame(out_dir / COMPLEXITY_FILE, tables.curves)
    storage.write_frame(out_dir / RATIOS_FILE, tables.ratios)


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "∞" if isinstance(value, float) and value == math.inf else "—"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _samples(value: float) -> str:
    """A sample size n(ε), interpolated, shown as a whole number (∞ beyond the data)."""
    if not math.isfinite(value):
        return "∞" if value == math.inf else "—"
    return f"{value:,.0f}"


def _interval(low: float, high: float) -> str:
    return f"[{_fmt(low)}, {_fmt(high)}]"


_STATUS_WORDS = {"interpolated": "", "at_or_below_smallest_n": "≤ smallest n", "beyond_data": "beyond the data"}


def report_lines(tables: ComparisonTables, settings: ComparisonSettings) -> list[str]:
    """Markdown: the contrast table with verdicts, the laws, and the sample-complexity ratios."""
    lines = []
    contrasts = tables.contrasts
    level = int(round(settings.ci * 100))
    if contrasts.empty:
        return ["No arm pair shares a metric to compare.", ""]
    lines += [
        f"### Rate contrasts (log-log slope of the per-n {settings.statistic}; {level}% bootstrap CI)",
        "",
        "Δ = slope of the arm − slope of the reference; a negative Δ whose interval excludes 0 means the arm's "
        "error falls faster. *Paired*: both arms saw the same datasets and are resampled together.",
        "",
        "| metric | reference (group) | slope | arm (group) | slope | Δ [CI] | paired | failed fits | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in contrasts.itertuples():
        lines.append(
            f"| {row.metric} | {row.arm_a} ({row.group_a}) | {_fmt(row.slope_a)} | {row.arm_b} ({row.group_b}) | "
            f"{_fmt(row.slope_b)} | {_fmt(row.difference)} {_interval(row.ci_low, row.ci_high)} | "
            f"{'yes' if row.paired else 'no'} | {row.failed_a} / {row.failed_b} | {row.verdict} |"
        )
    law_statistic = "" if settings.statistic in ("mean", "median") else " Fitted to the per-n median (the laws take no quantile)."
    lines += ["", "### Power law or 1/log(n)^λ", "",
              "ΔAIC = AIC(power) − AIC(log); positive favours the 1/log(n)^λ law (\"slower than any polynomial\"), "
              f"|ΔAIC| < 2 decides nothing.{law_statistic}", "",
              "| arm | group | metric | power slope | λ | ΔAIC | preferred |", "|---|---|---|---|---|---|---|"]
    curves = tables.curves
    if not curves.empty:
        laws = curves.drop_duplicates(["arm", "group", "metric"])
        for row in laws.itertuples():
            lines.append(f"| {row.arm} | {row.group} | {row.metric} | {_fmt(row.power_exponent)} | {_fmt(row.log_exponent)} | "
                         f"{_fmt(row.delta_aic)} | {row.preferred_law or '—'} |")
    ratios = tables.ratios
    if not ratios.empty:
        lines += ["", f"### Sample complexity n(ε) (per-n {settings.statistic} interpolated on log scales; {level}% CI)", "",
                  "n(ε) is the smallest measured n after which the statistic stays ≤ ε. A ratio n_arm/n_reference > 1 "
                  "means the arm needs more samples. Where ε lies outside an arm's data the entry says so and the "
                  "ratio is only a bound.", "",
                  "| metric | reference | arm | ε | n reference | n arm | ratio [CI] | note |", "|---|---|---|---|---|---|---|---|"]
        for row in ratios.itertuples():
            notes = [f"{side}: {_STATUS_WORDS[status]}" for side, status in (("reference", row.status_a), ("arm", row.status_b))
                     if _STATUS_WORDS[status]]
            if row.defined < 0.95:
                notes.append(f"CI from the {row.defined:.0%} of draws in which both arms reach ε")
            lines.append(f"| {row.metric} | {row.arm_a} | {row.arm_b} | {_fmt(row.epsilon)} | {_samples(row.n_a)} | "
                         f"{_samples(row.n_b)} | {_fmt(row.ratio)} {_interval(row.ratio_low, row.ratio_high)} | "
                         f"{'; '.join(notes)} |")
    lines.append("")
    return lines
