"""Paper 1 across its three studies: the authors' numbers and the initialisation caveat.

Nguyen, Nguyen & Ho (NeurIPS 2023, arXiv 2305.03288) fit a softmax-gated Gaussian MoE with k* = 2
from a start near the truth whose noise shrinks like n^{-α}. This script reads the committed runs
of ``configs/paper1_exact.yaml``, ``paper1_overfit.yaml``, ``paper1_overfit_k4.yaml``,
``paper1_overfit_converged.yaml`` and ``paper1_init.yaml`` (the latest run folder of each) and writes into ``results/paper1_summary/``:

* ``authors_d1.csv``: the exact-fitted loss D₁ (mean, median, quartiles, maximum over replicates)
  with and without the translation infimum, against both of the authors' saved exact-fit runs (one
  start, and the best of 5 starts; ``authors_exact_d1.csv`` in the same folder, read, not written),
  each source at its own size nearest 1e2, 1e3, 1e4 and 1e5; the log-log slopes of the mean and the
  median over all n and decade by decade; and the ratio of each authors' run to ours per range
  (see ``authors_table``);
* ``converged.csv``: for ``paper1_overfit_converged``, the slopes of the mean and of the median of
  D₂, the density distances and every cell's parameter errors, with the medians at the ends;
* ``starts.csv``: for k = 2 and k = 3, every loss and per-parameter slope (with its bootstrap CI)
  under the three starts, the n-dependent near-truth start of the papers, the same start with
  α = 0, and the random k-means++ start; plus each start's median EM iterations and converged share;
* ``overfit_large_n.csv``: the over-fitted losses' slopes (k = 3 and k = 4) over n ≥ 1e4 only, the
  range on which the authors fitted theirs, of the mean and of the median, next to the slopes over
  all n;
* ``starts.png``: the over-fitted (k = 3) errors in the reference expert's Voronoi cell of size 2
  against n under the three starts, with the theory's n^{-1/8} and n^{-1/4}.

Usage: ``python experiments/paper1_summary.py [--results results] [--only authors]``; with
``--only authors`` it reads ``paper1_exact`` alone and writes ``authors_d1.csv`` alone.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moe_theory import storage
from moe_theory.rates import fit_rate, ols

AUTHORS_FILE = "authors_exact_d1.csv"
"""The authors' two saved exact-fit runs, committed in ``results/paper1_summary/`` (provenance in
docs/studies/paper1_softmax_gaussian.md): D₁ without translation correction, per size, over 40
replicates (mean, median, quartiles, maximum), with one start (run ``sizes200_tries1``, their 200
sizes) and with the best of 5 starts (``sizes150_tries5``, 150 sizes)."""
AUTHORS_COLUMNS = ("run", "n_tries", "n", "replicates", "mean_D1", "median_D1", "q25", "q75", "max_D1")
TARGET_SIZES = (100, 1_000, 10_000, 100_000)
RANGES = (("all n", 0, math.inf), ("1e+02-1e+03", 100, 1_000), ("1e+03-1e+04", 1_000, 10_000),
          ("1e+04-1e+05", 10_000, 100_000))
OUR_LOSSES = {"ours, uncorrected": "D1_none", "ours, translation infimum": "D1"}
"""Our two D₁ columns in fits.parquet; the uncorrected one is the authors' loss."""
AUTHORS_OVERFIT_MIN_N = 10_000
"""The authors' over-fitted D₂ slope (−0.51) uses n from 1e4 to 1e5 only."""

CELL_BLOCKS = {"beta1": 1 / 8, "b": 1 / 8, "a": 1 / 4, "nu": 1 / 4}
"""Theory for the over-fitted cell of size 2: n^{-1/8} for β₁ and b, n^{-1/4} for a and ν [1, Thm 2]."""


def latest_run(results: Path, name: str) -> Path:
    run = storage.latest_run(results, name)
    if run is None:
        raise SystemExit(f"error: no finished run of {name} under {results / name}; run `moe-theory run configs/{name}.yaml`")
    return run


def read_authors(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (the authors' exact-fit D1, committed in results/paper1_summary/)")
    table = pd.read_csv(path)
    missing = [column for column in AUTHORS_COLUMNS if column not in table.columns]
    if missing:
        raise SystemExit(f"error: {path} lacks the columns {missing}")
    return table


def authors_label(n_tries: int) -> str:
    return "authors, 1 start" if n_tries == 1 else f"authors, best of {n_tries}"


def nearest_size(sizes: np.ndarray, target: float) -> int:
    """The size of ``sizes`` nearest ``target`` on a log scale."""
    return int(sizes[np.argmin(np.abs(np.log(sizes / target)))])


def in_range(n: pd.Series, low: float, high: float) -> pd.Series:
    return (n >= low * 0.95) & (n <= high * 1.05)


def bootstrap_interval(values: np.ndarray, reduce, n_boot: int = 1000, seed: int = 0) -> str:
    """95 % percentile interval of ``reduce`` over replicates resampled with replacement."""
    draws = np.random.default_rng(seed).integers(0, values.size, size=(n_boot, values.size))
    low, high = np.quantile(reduce(values[draws], axis=1), [0.025, 0.975])
    return f"[{low:.3f}, {high:.3f}]"


def authors_table(exact: Path, authors: pd.DataFrame) -> pd.DataFrame:
    """Our exact-fit D₁ against both of the authors' saved runs, in three kinds of rows.

    * Sizes (``target_n`` 1e2 to 1e5): each source at its own size nearest the target (``n``):
      mean, median, quartiles and maximum of D₁ over replicates; for us also the bootstrap CIs of
      the mean (``ci``) and of the median (``ci_median``) and the median EM iterations.
    * ``slope, <range>``: the OLS slope of log mean D₁ (in ``mean_D1``) and of log median D₁ (in
      ``median_D1``) on log n over the sizes in the range; ``n`` counts the sizes; our CIs are the
      replicate bootstrap's. With their linspace sizes, most sizes lie in the last decade, which
      therefore sets the slope over all n.
    * ``ratio to ours, <range>``: for each authors' run, the geometric mean over its sizes in the
      range of its mean (``mean_D1``) and median (``median_D1``) D₁ divided by ours (uncorrected, the
      same loss, interpolated log-log to their size); ``share_above`` is the share of those sizes
      where their mean exceeds ours.
    """
    fits = storage.read_table(exact)
    ours = fits.groupby("n")[list(OUR_LOSSES.values())].agg(["mean", "median"])
    our_sizes = ours.index.to_numpy(dtype=float)
    our_starts = ", ".join(str(value) for value in sorted(fits["n_init"].unique()))
    runs = {authors_label(int(tries)): group.sort_values("n") for tries, group in authors.groupby("n_tries")}
    run_names = {label: ", ".join(group["run"].unique()) for label, group in runs.items()}
    rows = []
    for target in TARGET_SIZES:
        for source, column in OUR_LOSSES.items():
            nearest = nearest_size(our_sizes, target)
            cell = fits[fits["n"] == nearest]
            values = cell[column].to_numpy()
            rows.append({
                "target_n": target, "source": source, "run": exact.name, "starts": our_starts, "n": nearest,
                "replicates": len(cell), "mean_D1": values.mean(), "median_D1": np.median(values),
                "q25_D1": np.quantile(values, 0.25), "q75_D1": np.quantile(values, 0.75), "max_D1": values.max(),
                "ci": bootstrap_interval(values, np.mean), "ci_median": bootstrap_interval(values, np.median),
                "median_em_iterations": cell["n_iter"].median(),
            })
        for source, run in runs.items():
            row = run[run["n"] == nearest_size(run["n"].to_numpy(), target)].iloc[0]
            rows.append({
                "target_n": target, "source": source, "run": row["run"], "starts": str(row["n_tries"]),
                "n": int(row["n"]), "replicates": int(row["replicates"]), "mean_D1": row["mean_D1"],
                "median_D1": row["median_D1"], "q25_D1": row["q25"], "q75_D1": row["q75"], "max_D1": row["max_D1"],
            })
    for label, low, high in RANGES:
        cell = fits[in_range(fits["n"], low, high)]
        for source, column in OUR_LOSSES.items():
            table = cell[["n", "replicate"]].assign(value=cell[column])
            mean, median = (fit_rate(table, statistic=statistic, n_boot=1000) for statistic in ("mean", "median"))
            rows.append({"target_n": f"slope, {label}", "source": source, "run": exact.name, "starts": our_starts,
                         "n": len(mean.n_values), "mean_D1": mean.slope, "median_D1": median.slope,
                         "ci": f"[{mean.ci_low:.2f}, {mean.ci_high:.2f}]",
                         "ci_median": f"[{median.ci_low:.2f}, {median.ci_high:.2f}]"})
        for source, run in runs.items():
            part = run[in_range(run["n"], low, high)]
            log_n = np.log(part["n"].to_numpy(dtype=float))
            slopes = {statistic: float(ols(log_n, np.log(part[statistic].to_numpy()))[0])
                      for statistic in ("mean_D1", "median_D1")}
            rows.append({"target_n": f"slope, {label}", "source": source, "run": run_names[source],
                         "starts": ", ".join(str(value) for value in part["n_tries"].unique()), "n": len(part), **slopes})
    for label, low, high in RANGES:
        for source, run in runs.items():
            part = run[in_range(run["n"], low, high)]
            log_n = np.log(part["n"].to_numpy(dtype=float))
            ratios = {}
            for statistic, ours_statistic in (("mean_D1", "mean"), ("median_D1", "median")):
                matched = np.exp(np.interp(log_n, np.log(our_sizes), np.log(ours[("D1_none", ours_statistic)].to_numpy())))
                ratios[statistic] = part[statistic].to_numpy() / matched
            rows.append({"target_n": f"ratio to ours, {label}", "source": source, "run": run_names[source],
                         "starts": ", ".join(str(value) for value in part["n_tries"].unique()), "n": len(part),
                         "mean_D1": float(np.exp(np.mean(np.log(ratios["mean_D1"])))),
                         "median_D1": float(np.exp(np.mean(np.log(ratios["median_D1"])))),
                         "share_above": float(np.mean(ratios["mean_D1"] > 1))})
    columns = ["target_n", "source", "run", "starts", "n", "replicates", "mean_D1", "median_D1", "q25_D1", "q75_D1",
               "max_D1", "ci", "ci_median", "share_above", "median_em_iterations"]
    return pd.DataFrame(rows).reindex(columns=columns).astype({"n": "Int64", "replicates": "Int64"})


def large_n_table(overfit: Path) -> pd.DataFrame:
    fits = storage.read_table(overfit)
    rates = pd.read_csv(overfit / "rates.csv")
    rows = []
    for (k, metric), _ in rates.groupby(["num_experts", "metric"]):
        if metric not in ("D2", "D2_none", "hellinger", "tv"):
            continue
        cell = fits[(fits["num_experts"] == k) & fits["finite"]]
        table = cell[["n", "replicate"]].assign(value=cell[metric])
        full = rates[(rates["num_experts"] == k) & (rates["metric"] == metric)].iloc[0]
        large = fit_rate(table[table["n"] >= AUTHORS_OVERFIT_MIN_N], n_boot=1000)
        large_median = fit_rate(table[table["n"] >= AUTHORS_OVERFIT_MIN_N], statistic="median", n_boot=1000)
        rows.append({"num_experts": k, "metric": metric, "slope_all_n": full["slope"],
                     "ci_all_n": f"[{full['ci_low']:.2f}, {full['ci_high']:.2f}]",
                     "slope_n_ge_1e4": large.slope, "ci_n_ge_1e4": f"[{large.ci_low:.2f}, {large.ci_high:.2f}]",
                     "median_slope_n_ge_1e4": large_median.slope,
                     "median_ci_n_ge_1e4": f"[{large_median.ci_low:.2f}, {large_median.ci_high:.2f}]",
                     "sizes_n_ge_1e4": len(large.n_values)})
    return pd.DataFrame(rows)


def converged_table(converged: Path) -> pd.DataFrame:
    """Slopes of the mean and of the median of every metric of the run to convergence.

    The mean of an over-fitted cell's errors is dominated by a few fits whose split gate slope is
    still far out (β₁ ≈ 1e3 at n = 1e3), so the median is the robust summary of this small study.
    """
    fits = storage.read_table(converged)
    fits = fits[fits["finite"]]
    rows = []
    for metric in ["D2", "hellinger", "tv"] + [f"err_{block}_atom{atom}" for atom in (0, 1) for block in CELL_BLOCKS]:
        table = fits[["n", "replicate"]].assign(value=fits[metric])
        mean, median = (fit_rate(table, statistic=statistic, n_boot=1000) for statistic in ("mean", "median"))
        rows.append({"metric": metric, "slope_mean": mean.slope, "ci_mean": f"[{mean.ci_low:.2f}, {mean.ci_high:.2f}]",
                     "slope_median": median.slope, "ci_median": f"[{median.ci_low:.2f}, {median.ci_high:.2f}]",
                     "median_at_smallest_n": median.statistic_values[0], "median_at_largest_n": median.statistic_values[-1]})
    return pd.DataFrame(rows)


def start_label(row: pd.Series, source: str) -> str:
    if row["init"] == "random":
        return "random (k-means++), best of 5"
    if source == "paper1_overfit_converged":
        return "near truth, noise 1 (α = 0), EM to tol 1e-10"
    return "near truth, noise c·n^-α (papers)" if source != "paper1_init" else "near truth, noise c (α = 0)"


def starts_table(runs: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rates, fits = [], []
    for source, run in runs.items():
        table = pd.read_csv(run / "rates.csv")
        table = table[table["num_experts"].isin([2, 3])]
        table["start"] = table.apply(start_label, axis=1, source=source)
        table["study"] = source
        rates.append(table)
        fit_table = storage.read_table(run)
        fit_table = fit_table[fit_table["num_experts"].isin([2, 3])].copy()
        fit_table["start"] = fit_table.apply(start_label, axis=1, source=source)
        fits.append(fit_table)
    rates, fits = pd.concat(rates, ignore_index=True), pd.concat(fits, ignore_index=True)
    effort = fits.groupby(["num_experts", "start"]).agg(
        median_em_iterations=("n_iter", "median"), converged_share=("converged", "mean"), finite_share=("finite", "mean")
    ).reset_index()
    columns = ["num_experts", "start", "study", "metric", "slope", "ci_low", "ci_high", "theory_rate", "verdict", "n_min", "n_max"]
    summary = rates[columns].merge(effort, on=["num_experts", "start"])
    return summary.sort_values(["num_experts", "metric", "start"]), fits


def starts_figure(fits: pd.DataFrame, path: Path) -> None:
    over = fits[fits["num_experts"] == 3]
    figure, axes = plt.subplots(1, len(CELL_BLOCKS), figsize=(4.2 * len(CELL_BLOCKS), 3.8), sharex=True)
    for axis, (block, exponent) in zip(axes, CELL_BLOCKS.items()):
        column = f"err_{block}_atom1"
        for start, group in over.groupby("start"):
            means = group.groupby("n")[column].mean()
            axis.loglog(means.index, means.values, "o-", markersize=3, label=start)
        sizes = np.sort(over["n"].unique())
        anchor = over[over["n"] == sizes[-1]][column].mean()
        axis.loglog(sizes, anchor * (sizes / sizes[-1]) ** -exponent, "k:", label=f"theory n^-{exponent:g}")
        axis.set_title(f"{block}: reference expert's cell, k = 3")
        axis.set_xlabel("sample size n")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean error over replicates")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--authors", type=Path, default=None,
                        help=f"the authors' exact-fit D1 (default: <results>/paper1_summary/{AUTHORS_FILE})")
    parser.add_argument("--only", choices=("all", "authors"), default="all",
                        help="'authors' writes authors_d1.csv alone, from paper1_exact and the authors' runs")
    args = parser.parse_args()
    out = args.results / "paper1_summary"
    out.mkdir(parents=True, exist_ok=True)
    names = ("paper1_exact",) if args.only == "authors" else (
        "paper1_exact", "paper1_overfit", "paper1_overfit_k4", "paper1_overfit_converged", "paper1_init")
    runs = {name: latest_run(args.results, name) for name in names}
    authors = authors_table(runs["paper1_exact"], read_authors(args.authors or out / AUTHORS_FILE))
    authors.to_csv(out / "authors_d1.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.4g}".format):
        print(authors.to_string(index=False))
    if args.only == "authors":
        print(f"wrote {out}/authors_d1.csv")
        return
    large_n = pd.concat([large_n_table(runs[name]) for name in ("paper1_overfit", "paper1_overfit_k4")], ignore_index=True)
    large_n.to_csv(out / "overfit_large_n.csv", index=False)
    converged_slopes = converged_table(runs["paper1_overfit_converged"])
    converged_slopes.to_csv(out / "converged.csv", index=False)
    # The k = 4 run has no k = 2 or k = 3 group to set against the others' starts.
    summary, fits = starts_table({name: run for name, run in runs.items() if name != "paper1_overfit_k4"})
    summary.to_csv(out / "starts.csv", index=False)
    starts_figure(fits, out / "starts.png")
    print(large_n.to_string(index=False))
    print(summary[summary["metric"].isin(["D1", "D2", "err_beta1_atom1", "err_a_atom1", "err_b_atom1", "err_nu_atom1"])]
          .to_string(index=False, max_colwidth=36))
    print(converged_slopes.to_string(index=False))
    print(f"wrote {out}/authors_d1.csv, overfit_large_n.csv, converged.csv, starts.csv, starts.png")


if __name__ == "__main__":
    main()
