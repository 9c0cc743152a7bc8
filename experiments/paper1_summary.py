"""Paper 1 across its three studies: the authors' numbers and the initialisation caveat.

Nguyen, Nguyen & Ho (NeurIPS 2023, arXiv 2305.03288) fit a softmax-gated Gaussian MoE with k* = 2
from a start near the truth whose noise shrinks like n^{-α}. This script reads the committed runs
of ``configs/paper1_exact.yaml``, ``paper1_overfit.yaml``, ``paper1_overfit_k4.yaml``,
``paper1_overfit_converged.yaml``, ``paper1_overfit_converged_k4.yaml`` and ``paper1_init.yaml`` (the latest run folder of each) and writes into ``results/paper1_summary/``:

* ``authors_d1.csv``: the exact-fitted loss D₁ (mean, median, quartiles, maximum over replicates)
  with and without the translation infimum, against both of the authors' saved exact-fit runs (one
  start, and the best of 5 starts; ``authors_exact_d1.csv`` in the same folder, read, not written),
  each source at its own size nearest 1e2, 1e3, 1e4 and 1e5; the log-log slopes of the mean and the
  median over all n and decade by decade; and the ratio of each authors' run to ours per range
  (see ``authors_table``);
* ``converged.csv``: for ``paper1_overfit_converged`` (k = 3, a cell of size 2) and
  ``paper1_overfit_converged_k4`` (k = 4, a cell of size 3), the slopes of the mean and of the median
  of D₂, the density distances and every cell's parameter errors, with their CIs and half-widths,
  the theory's slope, the medians at the ends and the converged share;
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
import jax.numpy as jnp
import numpy as np
import pandas as pd

import moe_theory as mt
from moe_theory import storage
from moe_theory.losses import parameter_errors
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


PAPER1_TRUTH = {"gate": {"beta0": [-8.0, 0.0], "beta1": [[25.0], [0.0]]},
                "expert": {"a": [[-20.0], [20.0]], "b": [15.0, -5.0], "nu": [0.09, 0.16]}}
"""The true parameters of every paper-1 study (configs/paper1_*.yaml)."""
SLOW_CELL_EXPONENTS = {2: {"beta1": 1 / 8, "b": 1 / 8, "a": 1 / 4, "nu": 1 / 4},
                       3: {"beta1": 1 / 12, "b": 1 / 12, "a": 1 / 6, "nu": 1 / 6}}
"""[1, Thm 2]: the rate exponents of a Voronoi cell of size 2 and of size 3."""


def mass_weighted_errors(fits: pd.DataFrame, cell_size: int) -> pd.DataFrame:
    """Per fit and block, the error of the reference atom's cell that [1, Thm 2] bounds:
    (Σ_{i∈A} w_i |Δ_i|^r / Σ_{i∈A} w_i)^{1/r}, w_i = exp(β̂0_i), r the cell's exponent of D₂
    (r̄(m) for β₁ and b, r̄(m)/2 for a and ν), so that its rate is the table's n^{-1/(2r)}.

    D₂ weights each atom by its mass, so an atom whose mass vanishes need not converge; the worst
    atom of the cell (``err_*_atom1``) counts it all the same. The cells are those of the run's
    per-parameter errors (``mass`` translation: t₁ = 0, so β̂₁ in its canonical frame)."""
    num_experts = sum(column.startswith("hat_b_") for column in fits.columns)
    family = mt.make_family("softmax", "gaussian", num_experts, 1)
    truth = mt.make_params(mt.make_family("softmax", "gaussian", 2, 1), PAPER1_TRUTH)
    fitted = mt.MoEParams(
        {"beta0": jnp.asarray(fits[[f"hat_beta0_{i}" for i in range(num_experts)]].to_numpy()),
         "beta1": jnp.asarray(fits[[f"hat_beta1_{i}_0" for i in range(num_experts)]].to_numpy())[..., None]},
        {"a": jnp.asarray(fits[[f"hat_a_{i}_0" for i in range(num_experts)]].to_numpy())[..., None],
         "b": jnp.asarray(fits[[f"hat_b_{i}" for i in range(num_experts)]].to_numpy()),
         "nu": jnp.asarray(fits[[f"hat_nu_{i}" for i in range(num_experts)]].to_numpy())},
    )
    reference = 1  # the reference expert, whose cell is split
    in_cell = np.asarray(parameter_errors(family, fitted, truth, translation="mass").assignment) == reference
    weights = np.where(in_cell, np.exp(np.asarray(fitted.gate["beta0"])), 0.0)
    fitted_blocks = {"beta1": np.asarray(fitted.gate["beta1"])[..., 0], "b": np.asarray(fitted.expert["b"]),
                     "a": np.asarray(fitted.expert["a"])[..., 0], "nu": np.asarray(fitted.expert["nu"])}
    true_blocks = {"beta1": PAPER1_TRUTH["gate"]["beta1"][reference][0], "b": PAPER1_TRUTH["expert"]["b"][reference],
                   "a": PAPER1_TRUTH["expert"]["a"][reference][0], "nu": PAPER1_TRUTH["expert"]["nu"][reference]}
    r_bar = {2: 4, 3: 6}[cell_size]
    out = {}
    for block, fitted_block in fitted_blocks.items():
        r = r_bar if block in ("beta1", "b") else r_bar / 2
        powered = np.abs(fitted_block - true_blocks[block]) ** r
        out[f"weighted_err_{block}_atom1"] = (np.sum(weights * powered, axis=1) / np.sum(weights, axis=1)) ** (1 / r)
    return pd.DataFrame(out, index=fits.index)


def converged_table(runs: dict[str, Path]) -> pd.DataFrame:
    """Slopes of the mean and of the median of every metric of the runs to convergence (k = 3, a cell
    of size 2; k = 4, a cell of size 3), with the theory's exponent, the CI half-widths and the
    converged share.

    ``weighted_err_*_atom1`` are the mass-weighted errors of :func:`mass_weighted_errors`, the
    theorem's quantity. The mean of an over-fitted cell's errors is dominated by a few fits whose
    split gate slope is far out (β₁ of 10³ and beyond), so the median is the robust summary. The
    slow cell's rows use
    the fits whose cell has the theorem's size (the modal one; ``excluded`` counts the others, in
    which extra atoms left the cell and the reference atom's β₁ error is exactly 0, and, among them
    ``excluded_zero``, the fits whose weighted error is 0 because the cell's other atoms have mass 0).
    """
    rows = []
    for study, run in runs.items():
        fits = storage.read_table(run)
        converged_share = float(fits["converged"].mean())
        fits = fits[fits["finite"]]
        cell_size = int(fits["cell_size_atom1"].mode().iloc[0])
        theory = {"D2": 0.5, "hellinger": 0.5, "tv": 0.5}
        theory.update({f"err_{block}_atom0": 0.5 for block in CELL_BLOCKS})
        for prefix in ("err", "weighted_err"):
            theory.update({f"{prefix}_{block}_atom1": exponent for block, exponent in SLOW_CELL_EXPONENTS[cell_size].items()})
        fits = pd.concat([fits, mass_weighted_errors(fits, cell_size)], axis=1)
        in_cell = fits[fits["cell_size_atom1"] == cell_size]
        for metric, exponent in theory.items():
            rows_used = in_cell if metric.endswith("atom1") else fits
            # A weighted error is exactly 0 when every other atom of the cell has underflowed to mass 0
            # (NaN when all of them have).
            zero = ~(rows_used[metric] > 0) if metric.startswith("weighted") else np.zeros(len(rows_used), bool)
            rows_used = rows_used[~zero]
            table = rows_used[["n", "replicate"]].assign(value=rows_used[metric])
            row = {"study": study, "metric": metric, "cell_size": cell_size if metric.endswith("atom1") else 1,
                   "theory_slope": -exponent, "converged_share": converged_share,
                   "excluded": len(fits) - len(rows_used), "excluded_zero": int(zero.sum())}
            for statistic in ("mean", "median"):
                try:
                    rate = fit_rate(table, statistic=statistic, n_boot=1000)
                except ValueError as error:  # zeros in the mean's log scale: no fit
                    row[f"slope_{statistic}"], row[f"ci_{statistic}"] = math.nan, str(error).split(":")[0]
                    continue
                row[f"slope_{statistic}"] = rate.slope
                row[f"ci_{statistic}"] = f"[{rate.ci_low:.2f}, {rate.ci_high:.2f}]"
                row[f"half_width_{statistic}"] = (rate.ci_high - rate.ci_low) / 2
                if statistic == "median":
                    row["median_at_smallest_n"], row["median_at_largest_n"] = rate.statistic_values[0], rate.statistic_values[-1]
            rows.append(row)
    return pd.DataFrame(rows)


def start_label(row: pd.Series, source: str) -> str:
    if row["init"] == "random":
        return "random (k-means++), best of 5"
    if source == "paper1_overfit_converged":
        return "near truth, noise 1 (α = 0), SQUAREM to tol 1e-10"
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
        "paper1_exact", "paper1_overfit", "paper1_overfit_k4", "paper1_overfit_converged", "paper1_overfit_converged_k4",
        "paper1_init")
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
    converged_slopes = converged_table({name: runs[name] for name in ("paper1_overfit_converged", "paper1_overfit_converged_k4")})
    converged_slopes.to_csv(out / "converged.csv", index=False)
    # The k = 4 run has no k = 2 or k = 3 group to set against the others' starts.
    summary, fits = starts_table({name: run for name, run in runs.items()
                                  if name not in ("paper1_overfit_k4", "paper1_overfit_converged_k4")})
    summary.to_csv(out / "starts.csv", index=False)
    starts_figure(fits, out / "starts.png")
    print(large_n.to_string(index=False))
    print(summary[summary["metric"].isin(["D1", "D2", "err_beta1_atom1", "err_a_atom1", "err_b_atom1", "err_nu_atom1"])]
          .to_string(index=False, max_colwidth=36))
    print(converged_slopes.to_string(index=False))
    print(f"wrote {out}/authors_d1.csv, overfit_large_n.csv, converged.csv, starts.csv, starts.png")


if __name__ == "__main__":
    main()
