"""Time the paper-1 exact-fitted protocol end to end through ``moe-theory run``.

The protocol of Nguyen, Nguyen & Ho (NeurIPS 2023, arXiv 2305.03288; docs/studies/paper1_softmax_gaussian.md): the
softmax-gated Gaussian MoE with k = k* = 2, inputs linspace(0, 1, n), 200 sample sizes
(linspace(100, 900, 5) then linspace(1000, 1e5, 195)), 40 replicates, the authors' near-truth start,
EM with tol 1e-6 and at most 2000 iterations, float64, scored by D₁. The authors' run took 877 s on
8 cores. Target here: under 300 s on 2 cores.

``--fraction f`` runs every ⌈1/f⌉-th sample size only and extrapolates: the fitting time scales
with the number of sizes (each size costs about the same per replicate inside a bucket), while the
compile time scales with the number of compiled programs, which the full plan reports. Both the
measured fraction and the extrapolation are printed, with the share of time spent compiling.

    python benchmarks/bench_sweep.py                  # the full protocol
    python benchmarks/bench_sweep.py --fraction 0.25  # a quarter of the sizes, extrapolated
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from moe_theory.config import load_config
from moe_theory.sweep import plan

PROTOCOL = {
    "name": "bench_paper1_exact",
    "description": "Paper-1 exact-fitted protocol (benchmark).",
    "seed": 0,
    "model": {
        "gate": "softmax",
        "expert": "gaussian",
        "params": {
            "gate": {"beta0": [-8.0, 0.0], "beta1": [25.0, 0.0]},
            "expert": {"a": [-20.0, 20.0], "b": [15.0, -5.0], "nu": [0.09, 0.16]},
        },
    },
    "inputs": "grid",
    "sample_sizes": [{"linspace": [100, 900, 5]}, {"linspace": [1000, 100000, 195]}],
    "replicates": 40,
    "fit": {"num_experts": 2, "method": "em", "init": "near_truth", "tol": 1.0e-6, "max_iter": 2000},
    "metrics": {"losses": ["D1"], "parameter_errors": False, "density": False},
    "rates": {"theory": "softmax_gaussian"},
    "sweep": {"batch_size": 40, "bucket_growth": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the 200 sample sizes to run")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")

    with tempfile.TemporaryDirectory() as scratch:
        full_path = Path(scratch) / "full.yaml"
        full_path.write_text(yaml.safe_dump(PROTOCOL))
        full_config = load_config(full_path)
        all_sizes = list(full_config.sample_sizes)
        stride = math.ceil(1 / args.fraction)
        chosen = all_sizes[::stride]
        run_config = dict(PROTOCOL, sample_sizes=chosen)
        run_path = Path(scratch) / "run.yaml"
        run_path.write_text(yaml.safe_dump(run_config))
        full_plan, run_plan = plan(full_config), plan(load_config(run_path))

        command = [sys.executable, "-m", "moe_theory", "run", str(run_path), "--out", scratch,
                   "--no-compile-cache", "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        meta = json.loads(next(Path(scratch).glob("bench_paper1_exact/*/meta.json")).read_text())
        rates = next(Path(scratch).glob("bench_paper1_exact/*/rates.csv")).read_text()

    session = meta["sessions"][-1]
    wall, compile_seconds = session["wall_seconds"], session["compile_seconds"]
    overhead = session.get("tables_and_figures_seconds", 0.0)
    fitting = wall - compile_seconds - overhead
    programs_run = run_plan["fit_programs"] + run_plan["score_programs"]
    programs_full = full_plan["fit_programs"] + full_plan["score_programs"]
    compile_full = compile_seconds / programs_run * programs_full
    fitting_full = fitting * len(all_sizes) / len(chosen)
    total_full = fitting_full + compile_full + overhead

    print(f"paper-1 exact-fitted protocol: {len(all_sizes)} sizes x {PROTOCOL['replicates']} replicates, k = 2, float64")
    print(f"ran {len(chosen)} sizes (every {stride}th), {run_plan['fits']} fits, buckets {run_plan['buckets']}")
    print()
    print(f"{'':28s} {'measured':>10s} {'full (extrapolated)':>20s}")
    print(f"{'sample sizes':28s} {len(chosen):10d} {len(all_sizes):20d}")
    print(f"{'compiled programs':28s} {session['compile_count']:10d} {programs_full:20d}")
    print(f"{'compile seconds':28s} {compile_seconds:10.1f} {compile_full:20.1f}")
    print(f"{'fitting + scoring seconds':28s} {fitting:10.1f} {fitting_full:20.1f}")
    print(f"{'tables, figures, report (s)':28s} {overhead:10.1f} {overhead:20.1f}")
    print(f"{'wall seconds':28s} {wall:10.1f} {total_full:20.1f}")
    print(f"{'share compiling':28s} {compile_seconds / wall:10.0%} {compile_full / total_full:20.0%}")
    print()
    print(f"target: full protocol under 300 s on 2 cores; the authors' run: 877 s on 8 cores")
    cells = np.array(list(session["cell_seconds"].values()))
    print(f"per-cell seconds (including first-use compiles): median {np.median(cells):.2f}, max {cells.max():.2f}")
    print()
    print(rates)


if __name__ == "__main__":
    main()
