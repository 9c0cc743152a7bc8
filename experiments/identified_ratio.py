"""The error of the identified ratio β1/τ of a temperature gate, next to the errors of β1 and τ.

A temperature gate whose score is affine in β1, act-free (softmax(β1·x/τ + β0) of paper 3, Nguyen,
Akbarian & Ho, ICML 2024, arXiv 2401.13875; σ(β1·x/τ + β0) normalised, of paper 6, Pham et al., arXiv
2602.01466; docs/studies/paper3_temperature.md, docs/studies/paper6_multinomial.md), sees (β1, τ) only
through β1/τ, so the likelihood is exactly flat along (β1, τ) → (cβ1, cτ) and the errors of β1 and τ
need not fall at all; what the data identify is the ratio. This script adds, to each arm of a
committed run (read from its fits.parquet, nothing refitted),

    err_ratio_atom<j> = max over the fitted atoms in true atom j's cell of ‖β̂1_i/τ̂ − β*1_j/τ*‖,

with fitted atoms matched to true atoms by their expert parameters (every expert field), which the
gates of both studies identify; and fits its rate, power law against 1/log(n)^λ, and, for
comparison, the same for the errors of β1 and τ. For a gate that identifies β1 and τ separately
(activation, Euclidean score) the ratio is computed the same way, as a control. Everything else
(contrasts, sample complexity, the laws of every metric) is in the run's own report.

    python experiments/identified_ratio.py --study paper3_temperature_vs_activation [--run RUN_DIR]
    python experiments/identified_ratio.py --study paper6_temperature_vs_euclidean [--run RUN_DIR]

It also measures the flatness itself: the largest change of the true conditional log-density over
5,000 draws from the truth when (β1, τ) moves to (cβ1, cτ), c = 1/2 and 2 (0 to rounding on a flat
curve); and whether the gate *function* is estimated where its parameters are not: for every fit
at the smallest and largest n, the gate-function error E_x|π̂(x) − π*(x)| (over 4,000 draws, the
worse of the two ways to match the fitted experts with the true ones, k = k* = 2) and the excess
ℓ(θ̂) − ℓ(θ*) of the fit's mean log-likelihood over the truth's on the fit's own data, regenerated
with the sweep's keys. Writes ratio_error.csv, flatness.csv and gate_function.csv to results/paper3/
or results/paper6/ (default: the newest run).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import jax
import numpy as np
import pandas as pd

import moe_theory as mt
from moe_theory import arms, storage
from moe_theory.rates import compare_power_vs_log, fit_rate
from moe_theory.sweep import DATA_STREAM, fitted_params_from_table, sample_padded

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"paper3_temperature_vs_activation": "paper3", "paper6_temperature_vs_euclidean": "paper6"}
"""Study -> folder under results/ of its ratio_error.csv."""


def _expert_vectors(config, table: pd.DataFrame, num_experts: int) -> np.ndarray:
    """(rows, k, q): every expert field of each fitted expert, from the ``hat_<field>_<i>…`` columns."""
    vectors = []
    for i in range(num_experts):
        columns = [column for field in config.true_family.expert.fields for column in table.columns
                   if column == f"hat_{field.name}_{i}" or column.startswith(f"hat_{field.name}_{i}_")]
        vectors.append(table[columns].to_numpy())
    return np.stack(vectors, axis=1)


def ratio_errors(config, table: pd.DataFrame) -> pd.DataFrame:
    """(n, replicate, atom, value) of ‖β̂1/τ̂ − β*1/τ*‖ in each true atom's cell (k = k*)."""
    truth = mt.canonicalize(config.true_family, config.truth)
    true_ratio = np.asarray(truth.gate["beta1"]) / float(truth.gate["tau"])  # (k*, d)
    true_expert = np.stack([np.concatenate([np.ravel(np.asarray(truth.expert[field.name][j]))
                                            for field in config.true_family.expert.fields])
                            for j in range(config.num_true)])  # (k*, q)
    k = config.fitted_family(config.groups[0]).num_experts
    dim = true_ratio.shape[1]
    fitted_ratio = np.stack([np.stack([table[f"hat_beta1_{i}_{l}"] for l in range(dim)], axis=1) for i in range(k)],
                            axis=1) / table["hat_tau"].to_numpy()[:, None, None]  # (rows, k, d)
    fitted_expert = _expert_vectors(config, table, k)
    cell = np.argmin(np.linalg.norm(fitted_expert[:, :, None, :] - true_expert[None, None], axis=-1), axis=-1)
    frames = []
    for atom, ratio in enumerate(true_ratio):
        distance = np.linalg.norm(fitted_ratio - ratio, axis=-1)
        error = np.where(cell == atom, distance, -np.inf).max(axis=1)
        frames.append(pd.DataFrame({"n": table["n"], "replicate": table["replicate"], "atom": atom,
                                    "value": np.where(np.isfinite(error), error, np.nan)}))
    return pd.concat(frames, ignore_index=True)


FLATNESS_SCALES = (0.5, 2.0)
FLATNESS_DRAWS = 5000


def flatness(label: str, config) -> list[dict]:
    """max_j |log p(y_j | x_j; θ*) − log p(y_j | x_j; θ*_c)| over (x_j, y_j) drawn from the truth, where
    θ*_c moves (β1, τ) to (cβ1, cτ): 0 to rounding when the likelihood is flat along that curve."""
    family, truth = config.true_family, mt.canonicalize(config.true_family, config.truth)
    x, y, _ = mt.sample(jax.random.key(0), family, truth, FLATNESS_DRAWS, config.inputs)
    base = mt.log_likelihood(family, truth, x, y, reduce="none")
    rows = []
    for scale in FLATNESS_SCALES:
        moved = mt.MoEParams({**truth.gate, "beta1": scale * truth.gate["beta1"], "tau": scale * truth.gate["tau"]}, truth.expert)
        change = np.max(np.abs(np.asarray(mt.log_likelihood(family, moved, x, y, reduce="none") - base)))
        rows.append({"arm": label, "scale_c": scale, "max_abs_log_density_change": float(change)})
    return rows


GATE_DRAWS = 4000


def gate_function(label: str, config, table: pd.DataFrame) -> list[dict]:
    """Per fit at the smallest and largest n: the gate-function error and ℓ(θ̂) − ℓ(θ*) (module docstring)."""
    family = config.fitted_family(config.groups[0])
    truth = mt.canonicalize(config.true_family, config.truth)
    x = config.inputs.draw(jax.random.key(GATE_DRAWS), GATE_DRAWS, family.dim, np.float64, truth)
    true_weights = np.asarray(mt.gate_weights(config.true_family, truth, x))
    data_key = jax.random.fold_in(jax.random.key(config.seed), DATA_STREAM)
    rows = []
    for n in (table["n"].min(), table["n"].max()):
        cells = table[table["n"] == n]
        fitted = fitted_params_from_table(family, cells)
        for position, replicate in enumerate(cells["replicate"].to_numpy()):
            one = jax.tree_util.tree_map(lambda value: value[position], fitted)
            weights = np.asarray(mt.gate_weights(family, one, x))
            error = min(np.mean(np.abs(weights - true_weights)[:, 0]), np.mean(np.abs(weights[:, ::-1] - true_weights)[:, 0]))
            xs, ys, _ = sample_padded(jax.random.fold_in(jax.random.fold_in(data_key, int(n)), int(replicate)),
                                      config.true_family, config.truth, int(n), int(n), config.inputs)
            excess = float(mt.log_likelihood(family, one, xs, ys) - mt.log_likelihood(config.true_family, truth, xs, ys))
            rows.append({"arm": label, "n": int(n), "replicate": int(replicate), "gate_function_error": error,
                         "log_likelihood_excess": excess, "tau_hat": float(one.gate["tau"])})
    return rows


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
    parser.add_argument("--study", choices=sorted(OUTPUTS), required=True, help="the study whose run to read")
    parser.add_argument("--run", type=Path, help="a run folder of configs/STUDY.yaml (default: the newest)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/paper3 or results/paper6)")
    args = parser.parse_args()
    study_name = args.study
    out = args.out or ROOT / "results" / OUTPUTS[study_name]
    run_dir = args.run or storage.latest_run(ROOT / "results", study_name)
    if run_dir is None or not arms.is_arms_run(run_dir):
        raise SystemExit(f"no run of {study_name} under results/{study_name}/; run `moe-theory run configs/{study_name}.yaml`")
    study, members = arms.load_arms(run_dir)
    records, flat, gates = [], [], []
    for member in members:
        flat += flatness(member.label, member.config)
        table = storage.read_table(member.run_dir)
        table = table[table["finite"].astype(bool)]
        gates += gate_function(member.label, member.config, table)
        errors = ratio_errors(member.config, table)
        for atom, series in errors.groupby("atom"):
            if np.nanmax(series["value"]) > 1e-12:  # the reference atom's ratio is 0 by construction
                records.append(describe(member.label, f"beta1/tau, atom {atom}", series.drop(columns="atom"), member.config))
        slope_columns = [(f"err_beta1_atom{j}", f"beta1, atom {j}") for j in range(member.config.num_true)]
        for column, quantity in slope_columns + [("err_tau", "tau")]:
            series = table[["n", "replicate", column]].rename(columns={column: "value"})
            if np.nanmax(series["value"]) > 1e-12:  # a reference slope held at 0 has no error to fit
                records.append(describe(member.label, quantity, series, member.config))
    results = pd.DataFrame.from_records(records)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ratio_error.csv"
    results.to_csv(path, index=False, float_format="%.6g")
    with pd.option_context("display.width", 200):
        print(results.round(3).to_string(index=False))
    flat_path = out / "flatness.csv"
    pd.DataFrame.from_records(flat).to_csv(flat_path, index=False, float_format="%.3g")
    print(pd.DataFrame.from_records(flat).to_string(index=False))
    gate_path = out / "gate_function.csv"
    gate_table = pd.DataFrame.from_records(gates)
    gate_table.to_csv(gate_path, index=False, float_format="%.6g")
    print(gate_table.groupby(["arm", "n"])[["gate_function_error", "log_likelihood_excess", "tau_hat"]].median().round(4))
    print(f"\nwrote {path}, {flat_path} and {gate_path} (run {run_dir})")


if __name__ == "__main__":
    main()
