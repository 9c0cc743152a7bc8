"""Paper 3 side by side: power law versus 1/log(n)^λ for the parameter errors of both gates.

Nguyen, Akbarian & Ho (ICML 2024, arXiv 2401.13875) prove that with the temperature softmax gate
the parameters converge slower than any polynomial (possibly like 1/log n), and that the activation
gate tanh(β1·x)/τ restores polynomial rates. configs/paper3_temperature.yaml and
configs/paper3_activation.yaml run the two gates on the same truth; this script reads their stored
results (fits.parquet and the resolved config, nothing is refitted) and, for each gate and each
parameter error, fits

    power law   log m(n) = c + α log n            (moe_theory.rates.fit_rate, bootstrap CI)
    log model   log m(n) = c − λ log log n        (moe_theory.rates.compare_power_vs_log)

to the per-n statistic of the run's config (the mean), and reports both AICs and the model AIC
prefers (|ΔAIC| < 2 is marked as weak evidence). Over two decades of n the two curves are close:
C/log(n)^λ has the local log-log slope −λ/log n, so a power law n^α is mimicked by λ ≈ −α·log n
(``log_local_slope_mid`` reports −λ/log n at the middle of the range). A decaying error therefore
shows as a large λ; the slope and its bootstrap CI carry most of the evidence.

Besides the stored errors it adds the identified ratio of the temperature gate: the plain gate sees
β1 only through β1/τ, so `err_ratio_atom<j>` = max over the fitted atoms in true atom j's cell of
|β̂1/τ̂ − β*1/τ*| is the error of what the data determine. For the activation gate the same number
is computed for comparison (CSV only; it is not an identified combination of special interest
there). Fitted atoms are matched to true atoms by their expert parameters
(a, b, ν), which both gates identify at n^{-1/2}.

Usage (from the repository root, with the package installed: ``pip install -e .``):

    python experiments/paper3_power_vs_log.py                      # newest run of each config
    python experiments/paper3_power_vs_log.py --temperature RUN_DIR --activation RUN_DIR

Writes results/paper3/power_vs_log.csv and results/paper3/power_vs_log.png (``--out`` to change).
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import moe_theory as mt  # noqa: E402
from moe_theory import storage  # noqa: E402
from moe_theory.rates import asymptotic_slope, compare_power_vs_log, fit_rate  # noqa: E402
from moe_theory.report import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"temperature": "paper3_temperature", "activation": "paper3_activation"}
WEAK_AIC = 2.0
# Columns shown in the figure, with their labels.
FIGURE_METRICS = {
    "err_beta1_atom0": "β1 (expert 1)",
    "err_tau": "τ",
    "err_ratio_atom0": "β1/τ (expert 1)",
    "err_a_atom0": "a (expert 1)",
}


def newest_run(study: str) -> Path:
    run = storage.latest_run(ROOT / "results", study)
    if run is None:
        raise SystemExit(f"no finished run of {study} under results/{study}/; run `moe-theory run configs/{study}.yaml`")
    return run


def atom_values(table: pd.DataFrame, field: str, atom: int) -> np.ndarray:
    """Fitted values of one expert's field, (rows, size): columns hat_<field>_<atom>[_<index>...]."""
    columns = [c for c in table.columns if re.fullmatch(rf"hat_{field}_{atom}(_\d+)*", c)]
    return table[columns].to_numpy(dtype=float)


def add_ratio_errors(config, table: pd.DataFrame) -> pd.DataFrame:
    """Append err_ratio_atom<j> = max_{i in cell j} |β̂1_i/τ̂ − β*1_j/τ*| (d = 1)."""
    truth = mt.canonicalize(config.true_family, config.truth)
    true_ratio = np.ravel(np.asarray(truth.gate["beta1"])) / float(truth.gate["tau"])
    true_expert = np.stack([np.ravel(np.asarray(truth.expert[name])) for name in ("a", "b", "nu")], axis=1)
    k = config.fitted_family(config.groups[0]).num_experts
    fitted_ratio = np.stack([table[f"hat_beta1_{i}_0"].to_numpy() for i in range(k)], axis=1) / table["hat_tau"].to_numpy()[:, None]
    fitted_expert = np.stack(
        [np.concatenate([atom_values(table, name, i) for name in ("a", "b", "nu")], axis=1) for i in range(k)], axis=1
    )  # (rows, k, 3) for d = 1
    distance = np.linalg.norm(fitted_expert[:, :, None, :] - true_expert[None, None, :, :], axis=-1)  # (rows, k, k*)
    cell = np.argmin(distance, axis=-1)  # fitted atom -> true atom
    table = table.copy()
    for j, ratio in enumerate(true_ratio):
        error = np.where(cell == j, np.abs(fitted_ratio - ratio), -np.inf).max(axis=1)
        table[f"err_ratio_atom{j}"] = np.where(np.isfinite(error), error, np.nan)  # empty cell: NaN
    return table


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Parameter errors (not identically zero), the ratio errors and D1."""
    columns = [c for c in table.columns if re.fullmatch(r"(err_.+|mass_err_atom\d+|D1)", c)]
    ordered = sorted(columns, key=lambda c: (c != "D1", not c.startswith("err_beta1"), c != "err_tau",
                                             not c.startswith("err_ratio"), c))
    return [c for c in ordered if np.nanmax(np.abs(table[c].to_numpy(dtype=float))) > 1e-12]


def analyse(gate: str, run_dir: Path) -> tuple[list[dict], pd.DataFrame]:
    config, table = load_run(run_dir)
    table = add_ratio_errors(config, table[table["finite"].astype(bool)])
    statistic, rates = config.rates.statistic, config.rates
    records = []
    for metric in metric_columns(table):
        data = table[["n", "replicate", metric]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            power = fit_rate(data, metric, statistic, rates.n_boot, rates.ci, seed=0)
            comparison = compare_power_vs_log(data, metric, statistic)
            window = max(3, math.ceil(len(power.n_values) / 2))
            tail = asymptotic_slope(data, metric, window, statistic)
        difference = comparison.aic_difference
        records.append({
            "gate": gate,
            "run": f"{STUDIES[gate]}/{run_dir.name}",
            "metric": metric,
            "statistic": statistic,
            "n_min": int(min(power.n_values)),
            "n_max": int(max(power.n_values)),
            "num_sizes": len(power.n_values),
            "power_slope": power.slope,
            "ci_low": power.ci_low,
            "ci_high": power.ci_high,
            "tail_slope": tail,
            "power_aic": comparison.power_aic,
            "log_lambda": comparison.log_exponent,
            "log_aic": comparison.log_aic,
            # the log model's local slope d log m / d log n = −λ / log n at the geometric middle n
            "log_local_slope_mid": -comparison.log_exponent / math.log(math.sqrt(min(power.n_values) * max(power.n_values))),
            "aic_power_minus_log": difference,
            "preferred": comparison.preferred,
            "evidence": "weak" if abs(difference) < WEAK_AIC else "clear",
            "converged_fraction": float(table["converged"].mean()),
        })
    return records, table


def draw(axis, gate: str, table: pd.DataFrame, results: pd.DataFrame, statistic: str) -> None:
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    grid = np.geomspace(table["n"].min(), table["n"].max(), 100)
    for colour, (metric, label) in zip(colours, FIGURE_METRICS.items()):
        if metric not in table.columns or (metric.startswith("err_ratio") and gate != "temperature"):
            continue  # β1/τ is the identified combination of the plain temperature gate only
        row = results[(results["gate"] == gate) & (results["metric"] == metric)]
        if row.empty:
            continue
        row = row.iloc[0]
        per_n = table.groupby("n")[metric].agg(statistic)
        axis.loglog(per_n.index, per_n.to_numpy(), "o", color=colour, ms=4,
                    label=f"{label}: n^{{{row.power_slope:.2f}}} [{row.ci_low:.2f}, {row.ci_high:.2f}]; "
                          f"λ = {row.log_lambda:.2f}; AIC prefers {row.preferred} (Δ = {row.aic_power_minus_log:+.1f})")
        data = table[["n", "replicate", metric]]
        comparison = compare_power_vs_log(data, metric, statistic)
        axis.loglog(grid, np.exp(comparison.power_intercept + comparison.power_exponent * np.log(grid)), "-", color=colour, lw=1)
        axis.loglog(grid, np.exp(comparison.log_intercept - comparison.log_exponent * np.log(np.log(grid))), ":", color=colour, lw=1.5)
    axis.set_title(f"{gate} gate", fontsize=10)
    axis.set_xlabel("n")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=6, loc="lower left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=Path, help="run folder of configs/paper3_temperature.yaml (default: newest)")
    parser.add_argument("--activation", type=Path, help="run folder of configs/paper3_activation.yaml (default: newest)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "paper3", help="output folder")
    args = parser.parse_args()
    runs = {gate: getattr(args, gate) or newest_run(study) for gate, study in STUDIES.items()}

    records, tables, statistic = [], {}, "mean"
    for gate, run_dir in runs.items():
        gate_records, tables[gate] = analyse(gate, run_dir)
        records += gate_records
        statistic = gate_records[0]["statistic"]
    results = pd.DataFrame.from_records(records)
    args.out.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out / "power_vs_log.csv", index=False, float_format="%.6g")

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for axis, gate in zip(axes, runs):
        draw(axis, gate, tables[gate], results, statistic)
    axes[0].set_ylabel(f"{statistic} error")
    figure.suptitle("Paper 3: parameter errors, power law (solid) vs C/log(n)^λ (dotted); "
                    "Δ = AIC(power) − AIC(log), |Δ| < 2 is weak evidence", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out / "power_vs_log.png", dpi=130)

    shown = results[["gate", "metric", "power_slope", "ci_low", "ci_high", "tail_slope", "log_lambda",
                      "log_local_slope_mid", "aic_power_minus_log", "preferred", "evidence"]]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(shown.round(3).to_string(index=False))
    print(f"\nwrote {args.out / 'power_vs_log.csv'} and {args.out / 'power_vs_log.png'}")


if __name__ == "__main__":
    main()
