"""Figures of a run, drawn from its results table alone (``fits.parquet`` and the resolved config).

Every figure is written as PNG (150 dpi) and PDF under ``figures/`` of the run folder; rerunning
``moe-theory plot RUN_DIR`` redraws them without fitting anything. The statistics come from
:func:`moe_theory.report.summarise` and :func:`moe_theory.report.rate_table`, so the figures show
exactly the numbers of ``summary.csv`` and ``rates.csv``:

* ``losses``: the headline — each fit group's main loss (D1 where k = k*, else D2) against n on
  log-log axes: the per-n statistic (mean by default) as points, its bootstrap band over
  replicates shaded, the fitted power law dashed and labelled like "3.5·n^{-0.64}", and the
  theoretical slope as a dotted reference line through the middle of the fitted line. Exact- and
  over-fitted groups share the axes, which is the contrast of paper 1 [1].
* ``metrics``: one panel per loss column or density distance, every group that has it.
* ``parameters``: one row per fit group, one column per atom block (β₁, a, b, ν, …) and the cell
  mass; one curve per true atom (its Voronoi cell's worst error), with fitted and theory slopes.
* ``convergence``: the fraction of converged fits and the mean number of iterations against n.

Matplotlib is used through its object API (``matplotlib.figure.Figure``), which needs no pyplot
state or interactive backend.

[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import storage
from .comparison import bend, series
from .complexity import reduce_statistic
from .config import FitGroup, StudyConfig
from .report import load_run, rate_table, summarise

__all__ = ["comparison_figures", "make_figures"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
_BLOCK_LABELS = {"beta1": r"$\beta_1$", "a": "$a$", "b": "$b$", "nu": r"$\nu$", "centre": "$c$", "covariance": r"$\Gamma$",
                 "eta0": r"$\eta_0$", "eta1": r"$\eta_1$"}
_METRIC_LABELS = {"hellinger": "Hellinger distance", "tv": "total variation"}
_ZERO_FLOOR = 1e-12
_LEGEND_NOTE = "dashed: fitted power law · dotted: theory slope · shaded: {level}% bootstrap band of the {statistic}"


def _power_label(intercept: float, slope: float) -> str:
    """Mathtext for C·n^α with C = exp(intercept), e.g. ``$3.5\\cdot n^{-0.64}$``."""
    exponent10 = intercept / math.log(10.0)
    if -2 <= exponent10 < 2:
        mantissa = f"{math.exp(intercept):.2g}"
    else:
        power = math.floor(exponent10)
        mantissa = rf"{10 ** (exponent10 - power):.2g}\times 10^{{{power}}}"
    return rf"${mantissa}\cdot n^{{{slope:.2f}}}$"


def _theory_label(rate: str) -> str:
    return f"theory ${rate}$" if rate.startswith("n^") else f"theory: {rate}"


def _rows(summary: pd.DataFrame, group: FitGroup, metric: str) -> pd.DataFrame:
    selected = summary[(summary["group"] == group.label) & (summary["metric"] == metric)]
    return selected[selected["used"] > 0].sort_values("n")


def _rate(rates: pd.DataFrame, group: FitGroup, metric: str) -> pd.Series | None:
    selected = rates[(rates["group"] == group.label) & (rates["metric"] == metric)]
    return None if selected.empty else selected.iloc[0]


def _draw_curve(ax, rows: pd.DataFrame, rate: pd.Series | None, statistic: str, color: str, name: str,
                marker: str = "o") -> None:
    """Points with a bootstrap band, the fitted power law (dashed) and the theory slope (dotted).

    One legend entry per curve: its name, the fitted law and the theory rate. A curve the report
    calls pre-asymptotic (its log-log slope steepens significantly across the measured range) is
    drawn with hollow points joined by a thin line and no fitted or theory line: a straight line
    through a bending curve would show a rate the data do not have.
    """
    n = rows["n"].to_numpy(dtype=float)
    values = rows[statistic].to_numpy(dtype=float)
    # Values at rounding level are zeros by construction (a cell mass matched by the translation).
    shown = values > _ZERO_FLOOR
    fitted = rate is not None and math.isfinite(rate["slope"])
    band = rows[["band_low", "band_high"]].to_numpy(dtype=float)
    if np.isfinite(band).all() and (band > _ZERO_FLOOR).all():
        ax.fill_between(n, band[:, 0], band[:, 1], color=color, alpha=0.18, linewidth=0)
    if fitted and rate.get("shape") == "steepening":
        label = f"{name}: pre-asymptotic (slope steepens by {float(rate['slope_change']):+.1f}); no rate"
        ax.plot(n[shown], values[shown], marker=marker, linestyle=":", linewidth=0.8, color=color, markersize=4,
                markerfacecolor="none", label=label)
        return
    label = name
    if fitted:
        label += f": {_power_label(rate['intercept'], rate['slope'])}"
        if rate.get("theory_rate"):
            label += f", {_theory_label(rate['theory_rate'])}"
    ax.plot(n[shown], values[shown], marker=marker, linestyle="none", color=color, markersize=4, label=label)
    if not fitted:
        return
    low, high = float(rate["n_min"]), float(rate["n_max"])
    grid = np.geomspace(low, high, 50)
    # exp(intercept + slope·log n): stays finite where the constant alone would overflow.
    ax.plot(grid, np.exp(rate["intercept"] + rate["slope"] * np.log(grid)), color=color, linestyle="--", linewidth=1.3)
    exponent = rate.get("theory_exponent", math.nan)
    if exponent is not None and math.isfinite(float(exponent)):
        # Anchor the theory slope at the fitted line's value at the geometric middle of the range.
        middle = math.sqrt(low * high)
        anchor = math.exp(rate["intercept"] + rate["slope"] * math.log(middle))
        ax.plot(grid, anchor * (grid / middle) ** float(exponent), color=color, linestyle=":", linewidth=1.3)


_LARGEST_SHOWN = 1e200
"""Log axes stop here: a divergent fit's loss can reach 1e300, where matplotlib's tick arithmetic
overflows; what lies above is off the figure, and the tables keep the values."""


def _style(ax, title: str | None = None, ylabel: str | None = None) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    low, high = ax.dataLim.intervaly
    if np.isfinite(high) and high > _LARGEST_SHOWN:
        ax.set_ylim(max(low, 1 / _LARGEST_SHOWN) if np.isfinite(low) and low > 0 else None, _LARGEST_SHOWN)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.set_xlabel("sample size n")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)


def _main_loss(config: StudyConfig, group: FitGroup) -> str | None:
    names = [column for _, column, _ in config.metrics.loss_columns(config.is_exact(group))]
    for preferred in ("D1", "D2"):
        if preferred in names:
            return preferred
    return names[0] if names else None


def _statistic_label(config: StudyConfig) -> str:
    return f"{config.rates.statistic} over replicates"


def _losses_figure(config: StudyConfig, summary: pd.DataFrame, rates: pd.DataFrame) -> Figure | None:
    """The headline figure, or None when no group has a Voronoi loss to draw."""
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = figure.add_subplot()
    statistic = config.rates.statistic
    drawn = False
    for index, group in enumerate(config.groups):
        metric = _main_loss(config, group)
        if metric is None:
            continue
        rows = _rows(summary, group, metric)
        if rows.empty:
            continue
        regime = "exact" if config.is_exact(group) else "over-fitted"
        _draw_curve(ax, rows, _rate(rates, group, metric), statistic, _COLORS[index % len(_COLORS)],
                    f"{group.label} ({regime}) {metric}", marker="os^vD"[index % 5])
        drawn = True
    if not drawn:
        return None
    _style(ax, f"{config.name}: Voronoi loss against n (k* = {config.num_true}, {config.replicates} replicates)",
           f"loss, {_statistic_label(config)}")
    ax.legend(fontsize=7.5, loc="best", title=_note(config), title_fontsize=6.5)
    return figure


def _note(config: StudyConfig) -> str:
    return _LEGEND_NOTE.format(level=int(round(config.rates.ci * 100)), statistic=config.rates.statistic)


def _metrics_figure(config: StudyConfig, summary: pd.DataFrame, rates: pd.DataFrame) -> Figure | None:
    metrics = []
    for loss in config.metrics.losses:
        metrics += [column for column, _ in loss.columns(config.metrics.translation)]
    if config.metrics.density is not None:
        metrics += list(config.metrics.density.distances)
    if len(metrics) < 2:
        return None
    columns = 2 if len(metrics) in (2, 4) else min(3, len(metrics))
    rows_count = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows_count), layout="constrained")
    for position, metric in enumerate(metrics):
        ax = figure.add_subplot(rows_count, columns, position + 1)
        for index, group in enumerate(config.groups):
            rows = _rows(summary, group, metric)
            if not rows.empty:
                _draw_curve(ax, rows, _rate(rates, group, metric), config.rates.statistic, _COLORS[index % len(_COLORS)],
                            group.label, marker="os^vD"[index % 5])
        _style(ax, _METRIC_LABELS.get(metric, metric), _statistic_label(config) if position % columns == 0 else None)
        ax.legend(fontsize=6.5, loc="best")
    figure.suptitle(f"{config.name}: every loss and distance; {_note(config)}", fontsize=9)
    return figure


def _parameters_figure(config: StudyConfig, summary: pd.DataFrame, rates: pd.DataFrame) -> Figure | None:
    if not config.metrics.parameter_errors:
        return None
    blocks = list(config.atom_blocks()) + ["mass"]
    groups = config.groups
    figure = Figure(figsize=(3.3 * len(blocks), 2.9 * len(groups)), layout="constrained")
    for row, group in enumerate(groups):
        for column, block in enumerate(blocks):
            ax = figure.add_subplot(len(groups), len(blocks), row * len(blocks) + column + 1)
            for atom in range(config.num_true):
                metric = f"mass_err_atom{atom}" if block == "mass" else f"err_{block}_atom{atom}"
                rows = _rows(summary, group, metric)
                if rows.empty or float(rows[config.rates.statistic].abs().max()) <= 1e-12:
                    continue  # fixed by the parametrisation (the reference expert's gate slope)
                rate = _rate(rates, group, metric)
                cell_size = None if rate is None else rate.get("cell_size")
                known = isinstance(cell_size, (int, float, np.number)) and math.isfinite(cell_size)
                size = f", |A|={int(cell_size)}" if known else ""
                _draw_curve(ax, rows, rate, config.rates.statistic, _COLORS[atom % len(_COLORS)], f"atom {atom}{size}")
            name = "cell mass" if block == "mass" else _BLOCK_LABELS.get(block, block)
            _style(ax, f"{group.label}: {name}", "worst error in cell" if column == 0 else None)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="best")
    figure.suptitle(f"{config.name}: per-parameter errors by true atom (|A| = Voronoi cell size); {_note(config)}",
                    fontsize=9)
    return figure


def _convergence_figure(config: StudyConfig, summary: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(8.4, 3.2), layout="constrained")
    converged_ax, iterations_ax = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for index, group in enumerate(config.groups):
        color, marker = _COLORS[index % len(_COLORS)], "os^vD"[index % 5]
        for ax, metric in ((converged_ax, "converged"), (iterations_ax, "n_iter")):
            rows = summary[(summary["group"] == group.label) & (summary["metric"] == metric)].sort_values("n")
            ax.plot(rows["n"], rows["mean"], marker=marker, color=color, markersize=4, label=group.label)
    converged_ax.set_xscale("log")
    converged_ax.set_ylim(-0.03, 1.03)
    converged_ax.set_ylabel("fraction converged")
    iterations_ax.set_xscale("log")
    iterations_ax.set_yscale("log")
    iterations_ax.set_ylabel("mean iterations")
    for ax in (converged_ax, iterations_ax):
        ax.set_xlabel("sample size n")
        ax.grid(True, alpha=0.35)
        ax.legend(fontsize=7)
    converged_ax.set_title(f"converged (tol {config.fit.tol:g}, max_iter {config.fit.max_iter})", fontsize=10)
    iterations_ax.set_title("iterations to stop", fontsize=10)
    return figure


def make_figures(run_dir: str | Path) -> list[Path]:
    """Draw every figure of a run folder into ``figures/`` (PNG and PDF); return the paths."""
    run_dir = Path(run_dir)
    config, table = load_run(run_dir)
    summary, rates = summarise(config, table), rate_table(config, table)
    folder = run_dir / storage.FIGURES_DIR
    folder.mkdir(exist_ok=True)
    figures = {
        "losses": _losses_figure(config, summary, rates),
        "metrics": _metrics_figure(config, summary, rates),
        "parameters": _parameters_figure(config, summary, rates),
        "convergence": _convergence_figure(config, summary),
    }
    return _save(folder, figures)


def _save(folder: Path, figures: dict[str, Figure | None]) -> list[Path]:
    """Write each figure as PNG and PDF, atomically; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        for suffix, options in ((".png", {"dpi": 150}), (".pdf", {})):
            path = folder / f"{name}{suffix}"
            temporary = folder / f".{name}.tmp{suffix}"
            figure.savefig(temporary, **options)
            temporary.replace(path)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Comparisons between arms (:mod:`moe_theory.comparison`).


def _panels(count: int, height: float, columns: int = 2) -> tuple[Figure, list]:
    """A figure with ``count`` panels, at most ``columns`` per row; unused cells are hidden."""
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(6.4 * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, list(axes[:count])


def _curve_key(row) -> tuple[str, str]:
    return row["arm"], row["group"]


def _sample_complexity_figure(tables, settings) -> Figure | None:
    """n(ε) against ε on log-log axes, one panel per metric, every arm on each panel.

    Points are n(ε) read from the data (filled where interpolated; a hollow downward triangle at
    the smallest n where the statistic is already ≤ ε there, a hollow upward one at the largest n
    where ε is beyond the data), the
    shaded band is the bootstrap interval, the dashed line the power law's n(ε) and the dotted line
    the 1/log(n)^λ law's. A polynomial sample complexity is a straight line, an exponential one
    bends upward. The grey band is the measured range of n: outside it the lines are extrapolations.
    """
    curves = tables.curves
    if curves.empty:
        return None
    metrics = list(dict.fromkeys(curves["metric"]))
    figure, axes = _panels(len(metrics), 4.8)
    keys = list(dict.fromkeys(_curve_key(row) for _, row in curves.iterrows()))
    colors = {key: _COLORS[index % len(_COLORS)] for index, key in enumerate(keys)}
    for ax, metric in zip(axes, metrics):
        rows_of_metric = curves[curves["metric"] == metric]
        ax.axhspan(rows_of_metric["n_min"].min(), rows_of_metric["n_max"].max(), color="0.9", zorder=0)
        for key in dict.fromkeys(_curve_key(row) for _, row in rows_of_metric.iterrows()):
            rows = rows_of_metric[(rows_of_metric["arm"] == key[0]) & (rows_of_metric["group"] == key[1])].sort_values("epsilon")
            color = colors[key]
            eps = rows["epsilon"].to_numpy(float)
            interpolated = (rows["status"] == "interpolated").to_numpy()
            below = (rows["status"] == "at_or_below_smallest_n").to_numpy()
            label = f"{key[0]} ({key[1]})" if len(set(curves["group"])) > 1 else key[0]
            law = rows["preferred_law"].iloc[0]
            if law:
                label += f"; AIC prefers {'power law' if law == 'power' else '1/log(n)^λ'}"
            beyond = (rows["status"] == "beyond_data").to_numpy()
            ax.plot(eps[interpolated], rows["n"].to_numpy(float)[interpolated], "o", color=color, markersize=5, label=label)
            ax.plot(eps[below], rows["n"].to_numpy(float)[below], "v", color=color, markersize=6, markerfacecolor="none")
            ax.plot(eps[beyond], np.full(beyond.sum(), rows["n_max"].iloc[0]), "^", color=color, markersize=6,
                    markerfacecolor="none")
            low, high = rows["n_low"].to_numpy(float), rows["n_high"].to_numpy(float)
            top = rows["n_max"].iloc[0] * 10
            band = np.isfinite(low)
            ax.fill_between(eps[band], low[band], np.minimum(high[band], top), color=color, alpha=0.15, linewidth=0)
            grid = np.geomspace(eps.min(), eps.max(), 60)
            for column, style in (("n_power_law", "--"), ("n_log_law", ":")):
                values = rows[column].to_numpy(float)
                finite = np.isfinite(values) & (values > 0)
                if finite.sum() >= 2:
                    # Both laws are straight lines in (log ε, log n) or (log ε, log log n): interpolate there.
                    if column == "n_power_law":
                        fitted = np.exp(np.interp(np.log(grid), np.log(eps[finite]), np.log(values[finite])))
                    else:
                        fitted = np.exp(np.exp(np.interp(np.log(grid), np.log(eps[finite]), np.log(np.log(values[finite])))))
                    shown = fitted < top * 1e3
                    ax.plot(grid[shown], fitted[shown], style, color=color, linewidth=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # The laws' n(ε) can run to absurd sizes far outside the data; show a few decades around it.
        ax.set_ylim(rows_of_metric["n_min"].min() / 10, rows_of_metric["n_max"].max() * 1e3)
        ax.invert_xaxis()
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        ax.set_xlabel("target ε (smaller to the right)")
        ax.set_ylabel(f"n(ε): samples until the {settings.statistic} stays ≤ ε")
        ax.set_title(f"sample complexity of {metric}", fontsize=10)
        ax.legend(fontsize=7.5, loc="upper left", title_fontsize=6.5,
                  title="dashed: power law · dotted: 1/log(n)^λ · grey: measured n\n"
                        "▽: already reached at the smallest n · △: not reached by the largest n")
    return figure


def _comparison_curves_figure(arms, tables, settings) -> Figure | None:
    """Each compared metric against n for every arm: the per-n statistic with the band between the
    replicates' quartiles, and the fitted power law over the measured range."""
    contrasts = tables.contrasts
    if contrasts.empty:
        return None
    metrics = list(dict.fromkeys(contrasts["metric"]))
    figure, axes = _panels(len(metrics), 4.6)
    by_label = {arm.label: arm for arm in arms}
    selectors = {selector.label(): selector for selector in settings.metrics}
    for ax, metric in zip(axes, metrics):
        rows = contrasts[contrasts["metric"] == metric]
        drawn = list(dict.fromkeys([(r.arm_a, r.group_a) for r in rows.itertuples()] + [(r.arm_b, r.group_b) for r in rows.itertuples()]))
        for index, (label, group_label) in enumerate(drawn):
            arm = by_label[label]
            group = next(g for g in arm.config.groups if g.label == group_label)
            found = series(arm, group, selectors[metric])
            if found is None:
                continue
            table, _ = found
            grid = table.pivot(index="n", columns="replicate", values="value").sort_index()
            n = grid.index.to_numpy(float)
            values = grid.to_numpy(float)
            statistic = reduce_statistic(values, settings.statistic)
            color = _COLORS[index % len(_COLORS)]
            shown = np.isfinite(statistic) & (statistic > 0)
            fit = np.polyfit(np.log(n[shown]), np.log(statistic[shown]), 1) if shown.sum() >= 2 else None
            name = f"{label} ({group_label})" if len({g for _, g in drawn}) > 1 else label
            steepening = _steepens(table, settings)
            if steepening is not None:
                # As in a run's own figures: no straight line through a curve still leaving a plateau.
                fit = None
                name += f": pre-asymptotic (slope steepens by {steepening:+.1f}); no rate"
            elif fit is not None:
                name += f": {_power_label(fit[1], fit[0])}"
            ax.plot(n[shown], statistic[shown], "os^vD"[index % 5], color=color, markersize=4, label=name,
                    markerfacecolor="none" if steepening is not None else color,
                    linestyle=":" if steepening is not None else "none", linewidth=0.8)
            quartiles = np.nanquantile(values, [0.25, 0.75], axis=1)
            band = np.all(np.isfinite(quartiles), axis=0) & np.all(quartiles > _ZERO_FLOOR, axis=0)
            ax.fill_between(n[band], quartiles[0][band], quartiles[1][band], color=color, alpha=0.15, linewidth=0)
            if fit is not None:
                line = np.geomspace(n[shown].min(), n[shown].max(), 50)
                ax.plot(line, np.exp(fit[1] + fit[0] * np.log(line)), "--", color=color, linewidth=1.2)
        _style(ax, f"{metric} against n", f"{metric}, {settings.statistic} over replicates")
        ax.legend(fontsize=7.5, loc="best", title="dashed: power law over the measured n · shaded: quartiles",
                  title_fontsize=6.5)
    return figure


def _steepens(table: pd.DataFrame, settings) -> float | None:
    """The slope change of a series whose log-log curve steepens significantly (else None)."""
    result = bend(table, settings)
    return result.slope_change if result is not None and result.shape == "steepening" else None


def comparison_figures(out_dir: str | Path, arms, tables, settings) -> list[Path]:
    """The figures of a comparison: ``sample_complexity`` and ``comparison`` (metric against n)."""
    return _save(Path(out_dir) / storage.FIGURES_DIR, {
        "sample_complexity": _sample_complexity_figure(tables, settings),
        "comparison": _comparison_curves_figure(arms, tables, settings),
    })
