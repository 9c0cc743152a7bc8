"""The used expert error of a committed multinomial-expert study, recomputed from its stored fits.

In an over-fitted Voronoi cell the worst expert error max_{i∈A_j} d_i (``expert_err_atom<j>``, the
sweep's column) also counts an atom the fitted gate hardly uses, whose expert the data cannot pin
down. The used error Σ_{i∈A_j} u_i d_i / Σ_{i∈A_j} u_i weights each atom by its use
u_i = E_x[π̂_i(x)] (docs/losses.md, :func:`moe_theory.losses.expert_errors`), as the theorems' Voronoi
losses weight atoms by their masses. Runs made before the sweep recorded it are rescored here from
their fitted parameters (the ``hat_…`` columns), nothing refitted; for newer runs the stored
``used_expert_err_atom<j>`` columns are checked against the rescoring too:

1. every arm's fits are scored again by :func:`moe_theory.losses.expert_errors` with the sweep's own
   x draws (root key → DENSITY_STREAM → EXPERT_ERROR_DRAWS, the same number of draws, cells and
   translation), and the recomputed worst errors must equal the stored column to 1e-9, which checks
   that the rescoring is the sweep's;
2. the used errors join each arm's long metrics table as ``metric = used_expert_error``, and the
   study's own comparison (:func:`moe_theory.comparison.compare_arms`: slopes, power law against
   1/log(n)^λ, contrasts with bootstrap CIs, sample-complexity ratios) runs on them with the study's
   reference arm;
3. a per-arm, per-n summary gives the median worst and used errors, the converged fraction and the
   share of fits on the box of ``fit.bound``.

    python experiments/used_expert_error.py --study paper4_modified_softmax [--run RUN_DIR]

Writes used_expert_error/ (summary.csv, contrasts.csv, sample_complexity*.csv, report.md) inside the
run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import numpy as np
import pandas as pd

import moe_theory as mt
from moe_theory import arms, comparison, storage
from moe_theory.config import MetricSelector
from moe_theory.losses import expert_errors
from moe_theory.metrics import used_expert_error_column
from moe_theory.report import markdown_table
from moe_theory.sweep import DENSITY_STREAM, EXPERT_ERROR_DRAWS, fitted_params_from_table

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("paper4_modified_softmax", "paper6_sigmoid_vs_softmax", "paper6_temperature_vs_euclidean")
USED = "used_expert_error"


def rescore(config, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``used_expert_err_atom<j>`` columns, after checking the recomputed worst errors."""
    table = table.copy()
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), DENSITY_STREAM), EXPERT_ERROR_DRAWS)
    for group in config.groups:
        rows = table["group"] == group.label
        family = config.fitted_family(group)
        scores = expert_errors(key, config.true_family, fitted_params_from_table(family, table[rows]),
                               mt.canonicalize(config.true_family, config.truth), config.inputs, config.metrics.expert_errors,
                               fitted_family=family, translation=config.metrics.parameter_translation,
                               exponents="first_order" if config.is_exact(group) else None)
        finite = table.loc[rows, "finite"].to_numpy(dtype=bool)
        for atom in range(config.num_true):
            stored = table.loc[rows, f"expert_err_atom{atom}"].to_numpy()
            worst = np.asarray(scores.max_error[:, atom])
            agree = np.isclose(worst, stored, rtol=1e-9, atol=1e-12, equal_nan=True) | ~finite
            if not agree.all():
                raise SystemExit(f"{group.label}, atom {atom}: the rescored worst expert errors differ from the stored "
                                 f"ones (largest gap {np.nanmax(np.abs(worst - stored)):.3g}); not the sweep's scoring")
            used = np.where(finite, np.asarray(scores.used_error[:, atom]), np.nan)
            column = used_expert_error_column(atom)
            stored_used = table.loc[rows, column].to_numpy() if column in table else used
            if not (np.isclose(stored_used, used, rtol=1e-9, atol=1e-12, equal_nan=True) | ~finite).all():
                raise SystemExit(f"{group.label}, atom {atom}: the rescored used expert errors differ from the stored ones")
            table.loc[rows, column] = used
    return table


def used_rows(arm: comparison.Arm, table: pd.DataFrame) -> pd.DataFrame:
    """The used errors as long-table rows (:mod:`moe_theory.metrics`) of ``arm``."""
    frames = []
    for atom in range(arm.config.num_true):
        column = used_expert_error_column(atom)
        frames.append(pd.DataFrame({
            "arm": arm.label, "group": table["group"].to_numpy(), "n": table["n"].to_numpy(dtype=np.int64),
            "replicate": table["replicate"].to_numpy(dtype=np.int64), "metric": USED, "block": "",
            "atom": np.int64(atom), "cell_size": table[f"cell_size_atom{atom}"].to_numpy(dtype=np.int64),
            "translation": arm.config.metrics.parameter_translation, "column": column,
            "value": table[column].to_numpy(dtype=np.float64), "finite": table["finite"].to_numpy(dtype=bool),
            "converged": table["converged"].to_numpy(dtype=bool),
        }))
    return pd.concat(frames, ignore_index=True)


def summary(label: str, config, table: pd.DataFrame) -> pd.DataFrame:
    aggregations = {"fits": ("replicate", "size"), "converged": ("converged", "mean"), "finite": ("finite", "mean"),
                    "median_cycles": ("n_iter", "median")}
    if "at_bound" in table:
        aggregations["on_box"] = ("at_bound", "mean")
    for atom in range(config.num_true):
        aggregations[f"worst_atom{atom}"] = (f"expert_err_atom{atom}", "median")
        aggregations[f"used_atom{atom}"] = (used_expert_error_column(atom), "median")
    frame = table.groupby(["group", "n"]).agg(**aggregations).reset_index()
    frame.insert(0, "arm", label)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=STUDIES, required=True, help="the study whose run to read")
    parser.add_argument("--run", type=Path, help="a run folder of configs/STUDY.yaml (default: the newest)")
    args = parser.parse_args()
    run_dir = args.run or storage.latest_run(ROOT / "results", args.study)
    if run_dir is None or not arms.is_arms_run(run_dir):
        raise SystemExit(f"no arms run of {args.study} under results/{args.study}/")
    study, members = arms.load_arms(run_dir)
    augmented, summaries = [], []
    for member in members:
        table = rescore(member.config, storage.read_table(member.run_dir))
        long = member.long
        if not (long["metric"] == USED).any():  # a run from before the sweep stored the used errors
            long = pd.concat([long, used_rows(member, table)], ignore_index=True)
        augmented.append(dataclasses.replace(member, long=long))
        summaries.append(summary(member.label, member.config, table))
    num_true = members[0].config.num_true
    settings = dataclasses.replace(study.comparison, metrics=tuple(MetricSelector(USED, atom=j) for j in range(num_true)))
    tables = comparison.compare_arms(augmented, settings)
    out = run_dir / "used_expert_error"
    out.mkdir(exist_ok=True)
    comparison.write_tables(out, tables)
    table = pd.concat(summaries, ignore_index=True)
    table.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    command = f"python experiments/used_expert_error.py --study {args.study} --run {run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir}"
    lines = [f"# Used expert errors of {study.name}", "", f"Rescored from the stored fits by `{command}`.", "",
             "## Per arm and n (medians)", "", markdown_table(table.round(4)), "",
             *comparison.report_lines(tables, settings)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(table.round(4).to_string(index=False))
        print(tables.contrasts.round(3).to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
