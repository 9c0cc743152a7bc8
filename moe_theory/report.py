"""Summaries, fitted rates against theory, and the Markdown report, all computed from ``fits.parquet``.

Nothing here refits a model: every number comes from the results table and the resolved config
of a run folder (:mod:`moe_theory.storage`), so ``moe-theory report RUN_DIR`` can be rerun at will.

**Exclusions** (stated in every output, never silent):

* rows whose fit is not finite (``finite = False``: a NaN or infinite parameter or log-likelihood)
  are excluded from every metric statistic and counted (``excluded_nonfinite_fit``);
* among the other rows, a metric value that is NaN or infinite (e.g. a loss whose exponent is
  unknown for a cell of size ≥ 4) is excluded and counted (``nonfinite_values``);
* rows that stopped at ``max_iter`` without meeting the tolerance are *kept*, as in the papers'
  protocol; the fraction converged is reported per (group, n).

**Summary** (``summary.csv``, long format): per (fit group, n, metric) the counts above, mean,
standard deviation, median, quartiles and a percentile-bootstrap band for the rate statistic
(``rates.statistic``, mean by default) over replicates. The diagnostics ``converged``, ``finite``
(fractions) and ``n_iter`` (mean) use every row.

**Rates** (``rates.csv``): per (fit group, metric) the log-log OLS slope of the per-n statistic with
its percentile-bootstrap CI (:func:`moe_theory.rates.fit_rate`; only n ≥ ``rates.min_n``), the slope
over the upper half of the n range (``tail_slope``, from ``tail_n_min`` on,
:func:`moe_theory.rates.asymptotic_slope`), the bend of the log-log curve (``slope_change`` with
its CI and ``shape``, :func:`moe_theory.rates.curvature`), the theoretical exponent and the verdict
(:func:`moe_theory.rates.verdict`). The theory key is, in order: an entry of ``rates.compare`` that
matches the metric and group; else, with ``rates.theory`` naming a registry family F,

(the metric's kind, block and atom come from :func:`moe_theory.metrics.metric_specs`, not from
its column name):

* ``D1`` (k = k*) → (F, exact, D1); ``D2`` (k > k*) → (F, overfit, D2);
* ``hellinger`` / ``tv`` → (F, exact|overfit, ·), falling back to (density_moe, any, ·);
* ``err_<block>_atom<j>`` → (F, exact, block) when k = k*, else (F, overfit_cell<m>, block) with
  m the most frequent size of the Voronoi cell of true atom j in that group (the share of rows
  with that size is reported: a cell whose size varies mixes rates);
* ``mass_err_atom<j>`` → (F, exact|overfit, cell_mass).

A curve that **steepens** significantly across the range (it is still leaving a plateau, as an
over-fitted loss does near its ceiling) gets no verdict: the slope of one straight line through it
measures no rate, and its figure draws it with hollow points and no fitted line. A curve that
flattens keeps its verdict, with the bend stated: that is what a floor, or a rate slower than any
polynomial, looks like.

A metric that is identically zero by construction (the reference expert's gate slope, fixed by the
softmax convention) or has exact zeros (a cell mass the translation matches exactly) cannot be fitted
on a log scale and is listed as not fitted, with the reason.
"""

from __future__ import annotations

import math
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import storage
from .comparison import report_lines
from .config import FitGroup, StudyConfig, load_config, select_columns
from .metrics import PARAMETER_METRICS, MetricSpec, cell_size_column, long_table, metric_specs
from .rates import (
    UnknownTheoreticalRateError,
    asymptotic_slope,
    curvature,
    fit_rate,
    theoretical_rate,
    verdict,
)

__all__ = ["load_run", "rate_table", "summarise", "write_report", "write_tables"]

DIAGNOSTICS = ("converged", "finite", "n_iter")
_ZERO_FLOOR = 1e-12
"""Values at or below this are treated as zero by construction (rounding of an exact 0)."""


def load_run(run_dir: str | Path) -> tuple[StudyConfig, pd.DataFrame]:
    """The resolved config and the results table of a run folder."""
    run_dir = storage.require_run_dir(run_dir, (storage.CONFIG_FILE, storage.TABLE_FILE))
    return load_config(run_dir / storage.CONFIG_FILE), storage.read_table(run_dir)


def _group_rows(config: StudyConfig, table: pd.DataFrame) -> list[tuple[FitGroup, pd.DataFrame]]:
    selected = []
    for group in config.groups:
        mask = np.ones(len(table), dtype=bool)
        for axis, value in group.axes().items():
            mask &= (table[axis] == value).to_numpy()
        rows = table.loc[mask]
        if len(rows):
            selected.append((group, rows))
    return selected


def _statistic(values: np.ndarray, statistic: str, axis: int | None = None) -> Any:
    return np.mean(values, axis=axis) if statistic == "mean" else np.median(values, axis=axis)


def _bootstrap_band(values: np.ndarray, statistic: str, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    if values.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, size=(n_boot, values.size))]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(_statistic(draws, statistic, axis=1), [tail, 1.0 - tail])
    return float(low), float(high)


def summarise(config: StudyConfig, table: pd.DataFrame) -> pd.DataFrame:
    """Per (group, n, metric) statistics, exclusions stated (see the module docstring)."""
    # Divergent fits can have losses near the float limit, whose squares overflow to inf in the
    # standard deviation; that inf is the honest answer, so the warning is not shown.
    with np.errstate(over="ignore", invalid="ignore"):
        return _summarise(config, table)


def _describe(values: np.ndarray, rates: Any, seed: int | None) -> dict[str, float]:
    """Mean, sd, median, quartiles and (with a seed) the bootstrap band of the rate statistic."""
    described = {
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan,
        "median": float(np.median(values)),
        "q25": float(np.quantile(values, 0.25)),
        "q75": float(np.quantile(values, 0.75)),
        "band_low": math.nan,
        "band_high": math.nan,
    }
    if seed is not None:
        described["band_low"], described["band_high"] = _bootstrap_band(values, rates.statistic, rates.n_boot, rates.ci, seed)
    return described


def _summarise(config: StudyConfig, table: pd.DataFrame) -> pd.DataFrame:
    records = []
    for group, rows in _group_rows(config, table):
        for n, at_n in rows.groupby("n", sort=True):
            finite_fit = at_n["finite"].to_numpy(dtype=bool)
            base = {"group": group.label, **group.axes(), "n": int(n), "rows": len(at_n)}
            for diagnostic in DIAGNOSTICS:
                values = at_n[diagnostic].to_numpy(dtype=float)
                records.append({**base, "metric": diagnostic, "used": values.size, "excluded_nonfinite_fit": 0,
                                "nonfinite_values": 0, **_describe(values, config.rates, None)})
            for metric in config.metric_columns(group):
                if metric not in at_n.columns:
                    continue
                values = at_n[metric].to_numpy(dtype=float)[finite_fit]
                usable = values[np.isfinite(values)]
                record = {**base, "metric": metric, "used": int(usable.size),
                          "excluded_nonfinite_fit": int((~finite_fit).sum()),
                          "nonfinite_values": int(values.size - usable.size)}
                if usable.size:
                    record.update(_describe(usable, config.rates, _stable_seed(group, int(n), metric)))
                records.append(record)
    return pd.DataFrame.from_records(records)


def _stable_seed(group: FitGroup, n: int, metric: str) -> int:
    """A bootstrap seed per (group, n, metric), so each band is reproducible on its own."""
    return zlib.crc32(f"{group.group_id}|{n}|{metric}".encode())


# ----------------------------------------------------------------------------------------------
# Theory keys.


def _modal_cell_size(rows: pd.DataFrame, atom: int) -> tuple[int | None, float]:
    column = cell_size_column(atom)
    if column not in rows.columns:
        return None, math.nan
    sizes = rows.loc[rows["finite"].astype(bool), column]
    if sizes.empty:
        return None, math.nan
    counts = sizes.value_counts()
    return int(counts.index[0]), float(counts.iloc[0] / counts.sum())


def _theory_key(config: StudyConfig, group: FitGroup, spec: MetricSpec, rows: pd.DataFrame) -> tuple[tuple[str, str, str] | None, dict]:
    """The registry key to compare the metric ``spec`` of ``group`` with, and facts about the choice."""
    facts: dict[str, Any] = {}
    for comparison in config.rates.compare:
        if select_columns([comparison.metric], [spec.column]) and comparison.num_experts in (None, group.num_experts):
            return (comparison.family, comparison.setting, comparison.quantity), facts
    family = config.rates.theory
    if family is None:
        return None, facts
    exact = config.is_exact(group)
    setting = "exact" if exact else "overfit"
    if spec.metric in {loss.name for loss in config.metrics.losses}:
        if spec.translation != "infimum":
            # The theorems bound the loss minimised over translations; other variants are diagnostics.
            return None, facts
        if (spec.metric, exact) in (("D1", True), ("D2", False)):
            return _first_known((family, setting, spec.metric), (family, "any", "D")), facts
        return None, facts
    if spec.metric in ("hellinger", "tv"):
        for key in ((family, setting, spec.metric), ("density_moe", "any", spec.metric)):
            if _known(key):
                return key, facts
        return None, facts
    if spec.metric == "error":
        size, share = _modal_cell_size(rows, spec.atom)
        facts.update(cell_size=size, cell_size_share=share)
        specific = (family, "exact", spec.block) if exact else (family, f"overfit_cell{size}", spec.block)
        # Families whose theorem states one rate per parameter group (papers 3, 4, 6, 7) list it by
        # group, gate parameters (τ included), expert parameters or all parameters: under the
        # setting where the theorem distinguishes exact from over-specified fits, else under "any".
        group_name = "gate_parameters" if spec.block in _gate_blocks(config) else "expert_parameters"
        key = _first_known(specific, *_group_keys(family, setting, spec.block, group_name))
        return key or specific, facts
    if spec.metric == "shared_error":
        # A shared gate parameter such as the temperature τ [3]: only group-wide rates apply.
        return _first_known(*_group_keys(family, setting, spec.block, "gate_parameters")), facts
    if spec.metric == "mass_error":
        # A family whose theorem separates exact from over-specified fits by parameter group ([3]'s
        # activation gate) states the cell masses' rate with its gate parameters.
        return _first_known((family, setting, "cell_mass"), (family, setting, "gate_parameters")) or (
            family, setting, "cell_mass"), facts
    return None, facts


def _group_keys(family: str, setting: str, block: str | None, group_name: str) -> list[tuple[str, str, str]]:
    """Registry keys of a parameter's group rate, most specific first: the block, then its group, then
    all parameters, each under ``setting`` before ``"any"``."""
    keys = []
    for where in (setting, "any"):
        keys += [(family, where, block)] if block is not None else []
        keys += [(family, where, group_name), (family, where, "parameters")]
    return keys


def _first_known(*keys: tuple[str, str, str]) -> tuple[str, str, str] | None:
    return next((key for key in keys if _known(key)), None)


def _gate_blocks(config: StudyConfig) -> set[str]:
    return {field.name for field in config.true_family.gate.fields}


def _known(key: tuple[str, str, str]) -> bool:
    try:
        theoretical_rate(*key)
    except UnknownTheoreticalRateError:
        return False
    return True


def rate_table(config: StudyConfig, table: pd.DataFrame) -> pd.DataFrame:
    """Per (group, metric) fitted slope, CI, theory and verdict (see the module docstring)."""
    records = []
    for group, rows in _group_rows(config, table):
        specs = {spec.column: spec for spec in metric_specs(config, group)}
        metrics = list(specs)
        if config.rates.metrics is not None:
            metrics = select_columns(config.rates.metrics, metrics)
        records += [_rate_record(config, group, specs[metric], rows) for metric in metrics if metric in rows.columns]
    return pd.DataFrame.from_records(records)


def _rate_record(config: StudyConfig, group: FitGroup, spec: MetricSpec, rows: pd.DataFrame) -> dict[str, Any]:
    """One row of ``rates.csv``: the fit of one metric of one group, its theory and verdict."""
    rates, metric = config.rates, spec.column
    finite_fit = rows["finite"].astype(bool)
    used = rows.loc[finite_fit & (rows["n"] >= rates.min_n), ["n", "replicate", metric]]
    key, facts = _theory_key(config, group, spec, rows)
    theory = None
    if key is not None:
        try:
            theory = theoretical_rate(*key)
        except UnknownTheoreticalRateError:
            key = None
    record: dict[str, Any] = {
        "group": group.label, **group.axes(), "metric": metric, "statistic": rates.statistic,
        "n_min": int(used["n"].min()) if len(used) else None,
        "n_max": int(used["n"].max()) if len(used) else None,
        "num_sizes": int(used["n"].nunique()),
        "rows_used": int(np.isfinite(used[metric].to_numpy(dtype=float)).sum()),
        "excluded_nonfinite_fit": int((~finite_fit).sum()),
        "excluded_below_min_n": int((rows["n"] < rates.min_n).sum()),
        "slope": math.nan, "intercept": math.nan, "ci_low": math.nan, "ci_high": math.nan, "ci_level": rates.ci,
        "constant": math.nan, "r_squared": math.nan, "tail_slope": math.nan, "tail_n_min": math.nan,
        "slope_change": math.nan, "slope_change_ci_low": math.nan, "slope_change_ci_high": math.nan, "shape": "",
        "label": "",
        "theory_key": "/".join(key) if key else "",
        "theory_exponent": math.nan if theory is None or theory.exponent is None else theory.exponent,
        "theory_rate": theory.rate_label() if theory is not None else "",
        "verdict": "", **facts,
    }
    values = used[metric].to_numpy(dtype=float)
    finite_values = values[np.isfinite(values)]
    if finite_values.size and np.all(np.abs(finite_values) <= _ZERO_FLOOR):
        record["verdict"] = "not fitted: identically 0 (fixed by the parametrisation or matched by the translation)"
        return record
    try:
        with warnings.catch_warnings():
            # fit_rate warns about the non-finite values it excludes; they are counted in the record.
            warnings.simplefilter("ignore", RuntimeWarning)
            fitted = fit_rate(used, metric, rates.statistic, rates.n_boot, rates.ci, seed=0)
            if len(fitted.n_values) >= 4:
                window = max(3, math.ceil(len(fitted.n_values) / 2))
                record["tail_slope"] = asymptotic_slope(used, metric, window, rates.statistic)
                record["tail_n_min"] = fitted.n_values[-window]
                bend = curvature(used, metric, rates.statistic, rates.n_boot, rates.ci, seed=0, tolerance=rates.tolerance)
                record.update(slope_change=bend.slope_change, slope_change_ci_low=bend.ci_low,
                              slope_change_ci_high=bend.ci_high, shape=bend.shape)
    except ValueError as error:
        record["verdict"] = f"not fitted: {_short_reason(error)}"
        return record
    try:
        constant, label = fitted.constant, fitted.label()
    except OverflowError:  # exp(intercept) beyond the float range: a divergent metric
        constant, label = math.inf, f"exp({fitted.intercept:.3g})·n^{{{fitted.slope:.2f}}}"
    record.update(slope=fitted.slope, intercept=fitted.intercept, ci_low=fitted.ci_low, ci_high=fitted.ci_high,
                  constant=constant, r_squared=fitted.r_squared, label=label, nonfinite_values=fitted.n_nonfinite)
    record["verdict"] = "no theory entry" if theory is None else verdict(fitted, theory, rates.tolerance)
    bend = (f"{record['slope_change']:+.2f} [{record['slope_change_ci_low']:+.2f}, {record['slope_change_ci_high']:+.2f}]"
            if record["shape"] in ("steepening", "flattening") else "")
    if record["shape"] == "steepening":
        # Still leaving a plateau: one straight line through the range measures no rate.
        record["verdict"] = (f"pre-asymptotic: the slope steepens by {bend} from the smallest to the largest n; "
                             "no verdict")
    elif record["shape"] == "flattening":
        record["verdict"] += f"; the slope flattens by {bend} across the range (see power law vs 1/log n)"
    return record


def _short_reason(error: Exception) -> str:
    text = str(error)
    if "must be > 0" in text:
        return "has values equal to 0 (e.g. a cell mass the translation matches exactly), so no log-scale fit"
    if "at least 3 distinct n" in text:
        return "fewer than 3 sample sizes with finite values"
    return text.split(";")[0]


# ----------------------------------------------------------------------------------------------
# Writing.


def write_tables(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Recompute ``metrics.parquet``, ``summary.csv`` and ``rates.csv`` of a run folder from its table.

    The long metrics table names its arm after the folder when the run is one arm of an arms study
    (``<arms run>/arms/<arm>/``), and leaves the arm empty otherwise.
    """
    run_dir = Path(run_dir)
    config, table = load_run(run_dir)
    arm = run_dir.name if run_dir.parent.name == "arms" else ""
    storage.write_frame(run_dir / storage.METRICS_FILE, long_table(config, table, arm=arm))
    summary, rates = summarise(config, table), rate_table(config, table)
    storage.write_frame(run_dir / storage.SUMMARY_FILE, summary)
    storage.write_frame(run_dir / storage.RATES_FILE, rates)
    return summary, rates


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table, numbers formatted for reading."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def rates_for_display(rates: pd.DataFrame) -> pd.DataFrame:
    """The columns of ``rates.csv`` a reader needs, with the slope and CI in one column."""
    shown = pd.DataFrame({
        "group": rates["group"],
        "metric": rates["metric"],
        "slope [CI]": [
            "—" if not math.isfinite(s) else f"{s:.2f} [{lo:.2f}, {hi:.2f}]"
            for s, lo, hi in zip(rates["slope"], rates["ci_low"], rates["ci_high"])
        ],
        "tail slope": rates["tail_slope"].astype(float),
        "fit": rates["label"],
        "theory": rates["theory_rate"].replace("", "—"),
        "verdict": rates["verdict"],
    })
    return shown


def _setup_lines(config: StudyConfig) -> list[str]:
    """The report's description of the study, one bullet per part of the config."""
    truth = {
        group: {name: np.asarray(value).round(6).tolist() for name, value in getattr(config.truth, group).items()}
        for group in ("gate", "expert")
    }
    sizes, fit, metrics, rates = config.sample_sizes, config.fit, config.metrics, config.rates
    losses = ", ".join(column for loss in metrics.losses for column, _ in loss.columns(metrics.translation))
    losses = f"losses {losses} (plain names use the `{metrics.translation}` translation); " if losses else "no Voronoi losses; "
    parameters = f"per-parameter errors (`{metrics.parameter_translation}` translation); " if metrics.parameter_errors else ""
    density = "density distances " + ", ".join(metrics.density.distances) if metrics.density else "no density distances"
    sizes_used = f"n ≥ {rates.min_n}" if rates.min_n else "all n"
    return [
        f"- **True model:** {config.true_family.describe()} (k* = {config.num_true}).",
        f"- **True parameters:** gate {truth['gate']}; experts {truth['expert']}.",
        f"- **Inputs:** `{config.inputs_spec}`.",
        f"- **Sample sizes:** {len(sizes)} values from {sizes[0]} to {sizes[-1]}; {config.replicates} replicates each.",
        f"- **Fits:** {', '.join(g.label for g in config.groups)}; method {'/'.join(fit.method)}, "
        f"init {'/'.join(fit.init)}, n_init {'/'.join(map(str, fit.n_init))}, tol {fit.tol:g}, "
        f"max_iter {fit.max_iter}, gate Newton steps {'/'.join(map(str, fit.gate_steps))}, {fit.likelihood} "
        f"likelihood{'' if fit.top_k is None else f', fitted top-K with K̄ = {fit.top_k} active experts'}, {fit.dtype}.",
        f"- **Metrics:** {losses}{parameters}{density}.",
        f"- **Rates:** log-log OLS of the per-n {rates.statistic}, {int(round(rates.ci * 100))}% percentile-bootstrap "
        f"CI ({rates.n_boot} resamples), {sizes_used}; verdict tolerance ±{rates.tolerance:g} around the CI; "
        f"theory family `{rates.theory}`.",
    ]


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` from the run folder's table, tables and figures."""
    run_dir = Path(run_dir)
    config, table = load_run(run_dir)
    summary_path, rates_path = run_dir / storage.SUMMARY_FILE, run_dir / storage.RATES_FILE
    if not (summary_path.is_file() and rates_path.is_file()):
        write_tables(run_dir)
    summary = pd.read_csv(summary_path)
    rates = pd.read_csv(rates_path, keep_default_na=False, na_values=[""])
    for column in ("label", "theory_rate", "verdict", "theory_key"):
        rates[column] = rates[column].astype(object).fillna("").astype(str)  # an all-empty column reads as float
    meta = storage.read_meta(run_dir)
    figures = sorted((run_dir / storage.FIGURES_DIR).glob("*.png"))

    lines = [f"# {config.name}: convergence rates against theory", ""]
    if config.description:
        lines += [config.description, ""]
    lines += [f"Run `{run_dir.name}` · {len(table)} fits · generated from `fits.parquet` by `moe-theory report`.", ""]

    lines += ["## Setup", "", *_setup_lines(config), ""]

    # The loss figure leads; a study without Voronoi losses leads with its other metrics.
    headline = [f for f in figures if f.stem == "losses"] or [f for f in figures if f.stem == "metrics"]
    if headline:
        lines += [f"![{headline[0].stem}]({storage.FIGURES_DIR}/{headline[0].name})", ""]

    lines += ["## Measured rates", ""]
    if len(rates):
        per_atom = {spec.column for group in config.groups for spec in metric_specs(config, group)
                    if spec.metric in PARAMETER_METRICS}
        main = rates[~rates["metric"].isin(per_atom)]
        parameters = rates[rates["metric"].isin(per_atom)]
        if len(main):
            lines += [markdown_table(rates_for_display(main)), ""]
        if len(parameters):
            lines += ["Per-parameter errors (worst atom of each true atom's Voronoi cell; the theory key for an "
                      "over-fitted cell uses its most frequent size):", "", markdown_table(rates_for_display(parameters)), ""]
    lines += [
        "Slopes are of log(statistic) on log n; *tail slope* fits the upper half of the n range only, so a "
        "difference from the slope shows pre-asymptotic bending. Theory rates hold up to log factors. "
        "A verdict compares the theory exponent with the CI widened by the tolerance.",
        "",
    ]

    lines += ["## Convergence and exclusions", ""]
    diagnostics = summary[summary["metric"].isin(DIAGNOSTICS)]
    for label, rows in diagnostics.groupby("group", sort=False):
        converged = rows[rows["metric"] == "converged"]
        finite = rows[rows["metric"] == "finite"]
        iterations = rows[rows["metric"] == "n_iter"]
        excluded = int(((1 - finite["mean"]) * finite["rows"]).round().sum())
        low, high = converged["mean"].min(), converged["mean"].max()
        share = f"{low:.0%} at every n" if low == high else f"{low:.0%}–{high:.0%} across n"
        lines.append(
            f"- **{label}:** converged {share} (mean iterations {iterations['mean'].min():.0f}–"
            f"{iterations['mean'].max():.0f}); {excluded} non-finite fit(s) excluded from every metric."
        )
    nonfinite = summary[(~summary["metric"].isin(DIAGNOSTICS)) & (summary["nonfinite_values"] > 0)]
    if len(nonfinite):
        counts = nonfinite.groupby(["group", "metric"], sort=False)["nonfinite_values"].sum()
        lines.append("- Non-finite metric values excluded: " + "; ".join(f"{g} {m}: {int(c)}" for (g, m), c in counts.items()) + ".")
    lines.append("- Fits that reached max_iter without meeting the tolerance are kept (the papers' protocol).")
    lines.append("")

    others = [f for f in figures if f not in headline]
    if others:
        lines += ["## Figures", ""]
        for figure in others:
            lines += [f"![{figure.stem}]({storage.FIGURES_DIR}/{figure.name})", ""]

    lines += ["## Reproducibility", ""]
    environment = meta.get("environment", {})
    if environment:
        lines.append(f"- moe_theory {environment.get('moe_theory')}, JAX {environment.get('jax')} on "
                     f"{environment.get('backend')} ({environment.get('device_kind')}), {environment.get('cpu_count')} CPU cores.")
    git = meta.get("git", {})
    if git.get("commit"):
        lines.append(f"- git commit `{git['commit'][:12]}`{' (with uncommitted changes)' if git.get('dirty') else ''}.")
    totals = meta.get("totals", {})
    if totals:
        lines.append(
            f"- Wall {totals.get('wall_seconds', 0):.0f} s over {totals.get('sessions', 1)} session(s), of which "
            f"{totals.get('compile_seconds', 0):.0f} s compiling {totals.get('compile_count', 0)} program(s) "
            f"({totals.get('compile_wait_seconds', 0):.0f} s of the wall time spent waiting for them)."
        )
    lines.append(f"- Rerun: `moe-theory run {run_dir / storage.CONFIG_FILE}`; redraw: `moe-theory plot {run_dir}`.")
    lines.append("")
    path = run_dir / storage.REPORT_FILE
    storage.write_text(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------
# Comparisons: an arms study, or separate runs compared by ``moe-theory compare``.


def _shown_path(path: Path, out_dir: Path) -> str:
    """``path`` relative to the report's folder where it lies inside it (an arm of an arms run)."""
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(path)


def _arm_lines(arms, out_dir: Path) -> list[str]:
    """One row per arm: what it fits, how many fits converged, and its compute time."""
    lines = ["| arm | model | fitted k | fits | converged | finite | wall time | run |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        config = arm.config
        table = storage.read_table(arm.run_dir) if arm.run_dir is not None else None
        converged = f"{table['converged'].mean():.1%}" if table is not None else "—"
        finite = f"{table['finite'].mean():.1%}" if table is not None else "—"
        count = len(table) if table is not None else 0
        meta = storage.read_meta(arm.run_dir) if arm.run_dir is not None else {}
        totals = meta.get("totals", {})
        wall = f"{totals.get('wall_seconds', 0):.0f} s" if totals else "—"
        ks = ", ".join(str(k) for k in config.fit.num_experts)
        run = f"`{_shown_path(arm.run_dir, out_dir)}`" if arm.run_dir is not None else ""
        lines.append(f"| {arm.label} | {config.true_family.gate.name} gate × {config.true_family.expert.name}, "
                     f"k* = {config.num_true} | {ks} | {count} | {converged} | {finite} | {wall} | {run} |")
    return lines + [""]


def _arm_rate_lines(arms) -> list[str]:
    """Each arm's fitted rates of its main metrics (its own rates.csv), with theory and verdict."""
    lines = ["| arm | group | metric | slope [CI] | tail slope | theory | verdict |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        path = None if arm.run_dir is None else arm.run_dir / storage.RATES_FILE
        if path is None or not path.is_file():
            continue
        rates = pd.read_csv(path, keep_default_na=False, na_values=[""])
        specs = {spec.column: spec for group in arm.config.groups for spec in metric_specs(arm.config, group)}
        for row in rates.itertuples():
            spec = specs.get(row.metric)
            if spec is None or spec.metric in PARAMETER_METRICS:
                continue
            lines.append(f"| {arm.label} | {row.group} | {row.metric} | {_fmt(row.slope)} [{_fmt(row.ci_low)}, {_fmt(row.ci_high)}] | "
                         f"{_fmt(row.tail_slope)} | {row.theory_rate if isinstance(row.theory_rate, str) else ''} | "
                         f"{row.verdict if isinstance(row.verdict, str) else ''} |")
    return lines + [""]


def comparison_report(title: str, preamble: list[str], arms, tables, settings, figures: list[Path],
                      out_dir: Path) -> Path:
    """Write ``report.md`` of a comparison: the arms, the figures, the contrasts and each arm's rates."""
    lines = [f"# {title}", "", *preamble, "## Arms", "", *_arm_lines(arms, out_dir)]
    lines += ["## Comparison", ""]
    for figure in figures:
        if figure.suffix == ".png":
            lines += [f"![{figure.stem}]({figure.relative_to(out_dir)})", ""]
    lines += report_lines(tables, settings)
    lines += ["## Each arm's rates", "", *_arm_rate_lines(arms)]
    path = out_dir / storage.REPORT_FILE
    storage.write_text(path, "\n".join(lines))
    return path


def write_arms_report(run_dir: Path, study, arms, tables, figures: list[Path]) -> Path:
    """``report.md`` of an arms run (:mod:`moe_theory.arms`)."""
    meta = storage.read_meta(run_dir)
    preamble = [study.description, ""] if study.description else []
    preamble += [f"Run `{run_dir.name}` · arms {', '.join(study.arm_names)} (reference `{study.reference}`) · "
                 "generated from the arms' tables by `moe-theory report`.", ""]
    sessions = meta.get("sessions", [])
    wall = sum(session.get("wall_seconds", 0) for session in sessions)
    if wall:
        preamble += [f"Compute: {wall:.0f} s wall over {len(sessions)} session(s), every arm included.", ""]
    return comparison_report(f"{study.name}: {' vs '.join(study.arm_names)}", preamble, arms, tables,
                             study.comparison, figures, Path(run_dir))
