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
from .config import FitGroup, StudyConfig
from .report import load_run, rate_table, summarise

__all__ = ["make_figures"]

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

    One legend entry per curve: its name, the fitted law and the theory rate.
    """
    n = rows["n"].to_numpy(dtype=float)
    values = rows[statistic].to_numpy(dtype=float)
    # Values at rounding level are zeros by construction (a cell mass matched by the translation).
    shown = values > _ZERO_FLOOR
    label = name
    if rate is not None and math.isfinite(rate["slope"]):
        label += f": {_power_label(rate['intercept'], rate['slope'])}"
        if rate.get("theory_rate"):
            label += f", {_theory_label(rate['theory_rate'])}"
    ax.plot(n[shown], values[shown], marker=marker, linestyle="none", color=color, markersize=4, label=label)
    band = rows[["band_low", "band_high"]].to_numpy(dtype=float)
    if np.isfinite(band).all() and (band > _ZERO_FLOOR).all():
        ax.fill_between(n, band[:, 0], band[:, 1], color=color, alpha=0.18, linewidth=0)
    if rate is None or not math.isfinite(rate["slope"]):
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
