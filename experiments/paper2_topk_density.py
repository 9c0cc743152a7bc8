"""Paper 2 (top-K sparse softmax gating, arXiv 2309.13850): density distances of its fits on one figure.

Reads the committed runs of the paper-2 configs — ``paper2_topk_exact`` (k = k*) and the
over-specified ``paper2_topk_overfit_*`` fits, whichever have a run — from their ``summary.csv`` and
``rates.csv``, and draws E_x[Hellinger] and E_x[TV] against n for all of them on shared log-log axes,
with the n^{-1/2} reference of the theorems. The runs share the true model, the seed and hence the
datasets, so the curves differ only by the fitted model. Nothing is refitted.

    python experiments/paper2_topk_density.py                 # latest run of each config
    python experiments/paper2_topk_density.py --runs DIR ...  # explicit run folders

Writes ``results/paper2_topk/density.png``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from moe_theory import storage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
STUDIES = (  # (config name, legend label, colour)
    ("paper2_topk_exact", "exact fit, k = k* = 3 (K = 2)", "#1f77b4"),
    ("paper2_topk_overfit_cover", "over-specified, k = 4, K̄ = 3 covers (EM stays at its start's gate)", "#2ca02c"),
    ("paper2_topk_overfit_nocover", "over-specified, k = 4, K̄ = 2 does not cover", "#d62728"),
)
METRICS = (("hellinger", "E_x Hellinger distance"), ("tv", "E_x total variation"))
OUTPUT = RESULTS / "paper2_topk" / "density"


def load(run_dir: Path) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config["name"], pd.read_csv(run_dir / "summary.csv"), pd.read_csv(run_dir / "rates.csv")


def draw(runs: list[Path]) -> Figure:
    figure = Figure(figsize=(11, 6.4), layout="constrained")
    axes = figure.subplots(1, len(METRICS))
    styles = {name: (label, colour) for name, label, colour in STUDIES}
    for ax, (metric, ylabel) in zip(axes, METRICS):
        anchor = None
        for run_dir in runs:
            name, summary, rates = load(run_dir)
            label, colour = styles.get(name, (name, "#7f7f7f"))
            rows = summary[summary["metric"] == metric].sort_values("n")
            if rows.empty:
                continue
            n, mean = rows["n"].to_numpy(float), rows["mean"].to_numpy(float)
            ax.fill_between(n, rows["band_low"], rows["band_high"], color=colour, alpha=0.2, linewidth=0)
            rate = rates[rates["metric"] == metric]
            text = label
            if not rate.empty and math.isfinite(rate["slope"].iloc[0]):
                r = rate.iloc[0]
                text += f"\nslope {r['slope']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                ax.plot(n, np.exp(r["intercept"]) * n ** r["slope"], "--", color=colour, linewidth=1)
            ax.plot(n, mean, "o", color=colour, markersize=4, label=text)
            if name == "paper2_topk_exact":
                anchor = (n[0], mean[0])
        if anchor is not None:
            n_ref = np.geomspace(anchor[0], max(ax.get_xlim()[1], anchor[0] * 10), 50)
            ax.plot(n_ref, anchor[1] * (n_ref / anchor[0]) ** -0.5, ":", color="black", label=r"theory $n^{-1/2}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size n")
        ax.set_ylabel(f"{ylabel} (mean over replicates)")
        ax.grid(True, which="both", alpha=0.3)
        # below the axes: inside, the legend would hide the points of the lowest curve
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    figure.suptitle(
        "Top-K sparse softmax Gaussian MoE (paper 2): density distance of the fit to the truth\n"
        r"dashed: fitted power law · dotted: $n^{-1/2}$ · shaded: 95% bootstrap band of the mean",
        fontsize=10,
    )
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", type=Path, help="run folders (default: the latest run of each config)")
    args = parser.parse_args()
    runs = args.runs or [run for name, _, _ in STUDIES if (run := storage.latest_run(RESULTS, name)) is not None]
    if not runs:
        raise SystemExit("no paper-2 runs found under results/")
    figure = draw(runs)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUTPUT.with_suffix(".png"), dpi=150)
    print("\n".join(f"read {run.relative_to(ROOT) if run.is_relative_to(ROOT) else run}" for run in runs))
    print(f"wrote {OUTPUT.with_suffix('.png').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
