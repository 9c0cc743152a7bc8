"""Paper 3: the error of the identified ratio β1/τ of the temperature gate, next to β1 and τ.

Nguyen, Akbarian & Ho (ICML 2024, arXiv 2401.13875; docs/studies/paper3_temperature.md) prove that
with the temperature softmax gate softmax(β1·x/τ + β0) the parameters converge slower than any
polynomial. The gate sees (β1, τ) only through β1/τ, so the likelihood is exactly flat along
(β1, τ) → (cβ1, cτ) and the errors of β1 and τ need not fall at all; what the data identify is the
ratio. This script adds, to each arm of the committed run of
``configs/paper3_temperature_vs_activation.yaml`` (read from its fits.parquet, nothing refitted),

    err_ratio_atom<j> = max over the fitted atoms in true atom j's cell of |β̂1_i/τ̂ − β*1_j/τ*|,

with fitted atoms matched to true atoms by their expert parameters (a, b, ν), which both gates
identify at n^{-1/2}; and fits its rate, power law against 1/log(n)^λ, and, for comparison, the
same for the errors of β1 and τ. Everything else about the two gates (contrasts, sample
complexity, the laws of every metric) is in the run's own report (``moe-theory report RUN_DIR``).

    python experiments/paper3_ratio_error.py [--run RUN_DIR]      # default: the newest run

Writes results/paper3/ratio_error.csv.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import moe_theory as mt
from moe_theory import arms, storage
from moe_theory.rates import compare_power_vs_log, fit_rate

ROOT = Path(__file__).resolve().parents[1]
STUDY = "paper3_temperature_vs_activation"


def ratio_errors(config, table: pd.DataFrame) -> pd.DataFrame:
    """(n, replicate, atom, value) of |β̂1/τ̂ − β*1/τ*| in each true atom's cell (d = 1, k = k*)."""
    truth = mt.canonicalize(config.true_family, config.truth)
    true_ratio = np.ravel(np.asarray(truth.gate["beta1"])) / float(truth.gate["tau"])
    true_expert = np.stack([np.ravel(np.asarray(truth.expert[name])) for name in ("a", "b", "nu")], axis=1)
    k = config.fitted_family(config.groups[0]).num_experts
    fitted_ratio = np.stack([table[f"hat_beta1_{i}_0"] for i in range(k)], axis=1) / table["hat_tau"].to_numpy()[:, None]
    fitted_expert = np.stack(
        [np.stack([table["hat_a_%d_0" % i], table["hat_b_%d" % i], table["hat_nu_%d" % i]], axis=1) for i in range(k)],
        axis=1,
    )  # (rows, k, 3)
    cell = np.argmin(np.linalg.norm(fitted_expert[:, :, None, :] - true_expert[None, None], axis=-1), axis=-1)
    frames = []
    for atom, ratio in enumerate(true_ratio):
        error = np.where(cell == atom, np.abs(fitted_ratio - ratio), -np.inf).max(axis=1)
        frames.append(pd.DataFrame({"n": table["n"], "replicate": table["replicate"], "atom": atom,
                                    "value": np.where(np.isfinite(error), error, np.nan)}))
    return pd.concat(frames, ignore_index=True)


def describe(arm: str, quantity: str, series: pd.DataFrame, config) -> dict:
    rates = config.rates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty cells are counted in n_nonfinite
        power = fit_rate(series, "value", rates.statistic, rates.n_boot, rates.ci, seed=0)
        laws = compare_power_vs_log(series, "value", rates.statistic)
    return {"arm": arm, "quantity": quantity, "slope": power.slope, "ci_low": power.ci_low, "ci_high": power.ci_high,
            "lambda": laws.log_exponent, "aic_power_minus_log": laws.aic_difference, "preferred": laws.preferred,
            "nonfinite": power.n_nonfinite}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help=f"a run folder of configs/{STUDY}.yaml (default: the newest)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "paper3", help="output folder")
    args = parser.parse_args()
    run_dir = args.run or storage.latest_run(ROOT / "results", STUDY)
    if run_dir is None or not arms.is_arms_run(run_dir):
        raise SystemExit(f"no run of {STUDY} under results/{STUDY}/; run `moe-theory run configs/{STUDY}.yaml`")
    study, members = arms.load_arms(run_dir)
    records = []
    for member in members:
        table = storage.read_table(member.run_dir)
        table = table[table["finite"].astype(bool)]
        errors = ratio_errors(member.config, table)
        for atom, series in errors.groupby("atom"):
            if np.nanmax(series["value"]) > 1e-12:  # the reference atom's ratio is 0 by construction
                records.append(describe(member.label, f"beta1/tau, atom {atom}", series.drop(columns="atom"), member.config))
        for column, quantity in (("err_beta1_atom0", "beta1, atom 0"), ("err_tau", "tau")):
            series = table[["n", "replicate", column]].rename(columns={column: "value"})
            records.append(describe(member.label, quantity, series, member.config))
    results = pd.DataFrame.from_records(records)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ratio_error.csv"
    results.to_csv(path, index=False, float_format="%.6g")
    with pd.option_context("display.width", 200):
        print(results.round(3).to_string(index=False))
    print(f"\nwrote {path} (run {run_dir})")


if __name__ == "__main__":
    main()
