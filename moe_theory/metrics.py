"""The long metrics table: every score of a study as one row, with what it measures as data.

``fits.parquet`` holds one row per fit and one column per score (``D2_none``, ``err_beta1_atom0``,
``mass_err_atom1``, ``hellinger``, …), convenient to read but awkward to select from. Rates,
reports, figures and cross-study comparisons instead select from ``metrics.parquet``, whose rows
are

    (arm, group, n, replicate, metric, block, atom, cell_size, translation, column, value, finite, converged)

* ``metric``: the score's kind: a loss name (``D1``, ``D2`` or a custom loss), ``error`` (the worst
  error of a parameter block over true atom j's Voronoi cell), ``mass_error`` (|cell mass − w*_j|),
  ``shared_error`` (|τ̂ − τ*| of a parameter shared by all experts), ``expert_error`` (the worst
  expert estimation error over true expert j's cell), ``used_expert_error`` (its mean over the cell
  weighted by each atom's use E_x[π̂_i(x)]), or a density distance (``hellinger``, ``tv``);
* ``block``: the parameter block (``beta1``, ``a``, …) for parameter errors, else empty;
* ``atom``: the true atom j for per-atom scores, else −1;
* ``cell_size``: |A_j| of that atom's Voronoi cell in this fit, else −1;
* ``translation``: the softmax translation the score was measured at (``infimum``, ``mass``,
  ``none``), empty where none applies;
* ``column``: the ``fits.parquet`` column the value comes from;
* ``finite``, ``converged``: the fit's flags, so that a consumer can leave failed fits out, or count
  them, without going back to ``fits.parquet``.

The keys are produced from the study's config (:func:`metric_specs`), the same knowledge that named
the columns, so nothing parses a column name back. The definitions of the scores are in
``docs/losses.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

LONG_COLUMNS = ("arm", "group", "n", "replicate", "metric", "block", "atom", "cell_size", "translation", "column", "value",
                "finite", "converged")
NO_ATOM = -1
PARAMETER_METRICS = ("error", "mass_error", "shared_error", "expert_error", "used_expert_error")
"""The metrics measured per parameter block or per true atom (reports list them apart from the losses)."""


class MetricSpec(NamedTuple):
    """What one ``fits.parquet`` column measures."""

    column: str
    metric: str
    block: str = ""
    atom: int = NO_ATOM
    translation: str = ""


def error_column(block: str, atom: int) -> str:
    return f"err_{block}_atom{atom}"


def mass_error_column(atom: int) -> str:
    return f"mass_err_atom{atom}"


def mass_column(atom: int) -> str:
    return f"mass_atom{atom}"


def cell_size_column(atom: int) -> str:
    return f"cell_size_atom{atom}"


def shared_error_column(block: str) -> str:
    return f"err_{block}"


def expert_error_column(atom: int) -> str:
    return f"expert_err_atom{atom}"


def used_expert_error_column(atom: int) -> str:
    return f"used_expert_err_atom{atom}"


def metric_specs(config, group) -> tuple[MetricSpec, ...]:
    """Every score column a fit of ``group`` (a :class:`moe_theory.config.FitGroup`) of ``config`` (a
    :class:`moe_theory.config.StudyConfig`, which builds on this module and so is not imported here)
    carries, with its keys (see the module docstring)."""
    metrics = config.metrics
    specs = [
        MetricSpec(column, loss.name, translation=translation)
        for loss, column, translation in metrics.loss_columns(config.is_exact(group))
    ]
    if metrics.density is not None:
        specs += [MetricSpec(distance, distance) for distance in metrics.density.distances]
    if metrics.parameter_errors:
        translation = metrics.parameter_translation
        for atom in range(config.num_true):
            specs += [MetricSpec(error_column(block, atom), "error", block, atom, translation) for block in config.atom_blocks()]
            specs.append(MetricSpec(mass_error_column(atom), "mass_error", atom=atom, translation=translation))
        specs += [MetricSpec(shared_error_column(block), "shared_error", block, translation=translation)
                  for block in config.shared_blocks()]
    if metrics.expert_errors is not None:
        specs += [MetricSpec(column(atom), metric, atom=atom, translation=metrics.parameter_translation)
                  for column, metric in ((expert_error_column, "expert_error"), (used_expert_error_column, "used_expert_error"))
                  for atom in range(config.num_true)]
    return tuple(specs)


def long_table(config, table: pd.DataFrame, arm: str = "") -> pd.DataFrame:
    """``fits.parquet`` of one run as the long metrics table (one row per fit and score).

    Fits whose estimator failed (``finite`` False) keep their rows, with whatever value the score
    has (usually NaN): a consumer filters them, they are never dropped here.
    """
    frames = []
    for group in config.groups:
        rows = table[table["group"] == group.label]
        if rows.empty:
            continue
        for spec in metric_specs(config, group):
            if spec.column not in rows.columns:
                continue
            cell_size = (
                rows[cell_size_column(spec.atom)].to_numpy(dtype=np.int64)
                if spec.atom != NO_ATOM and cell_size_column(spec.atom) in rows.columns
                else np.full(len(rows), NO_ATOM, dtype=np.int64)
            )
            frames.append(pd.DataFrame({
                "arm": arm,
                "group": group.label,
                "n": rows["n"].to_numpy(dtype=np.int64),
                "replicate": rows["replicate"].to_numpy(dtype=np.int64),
                "metric": spec.metric,
                "block": spec.block,
                "atom": np.int64(spec.atom),
                "cell_size": cell_size,
                "translation": spec.translation,
                "column": spec.column,
                "value": rows[spec.column].to_numpy(dtype=np.float64),
                "finite": rows["finite"].to_numpy(dtype=bool) if "finite" in rows else True,
                "converged": rows["converged"].to_numpy(dtype=bool) if "converged" in rows else True,
            }))
    if not frames:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in LONG_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(LONG_COLUMNS)]


def select(long: pd.DataFrame, **keys) -> pd.DataFrame:
    """Rows of the long table whose keys equal the given values, e.g.
    ``select(long, arm="sigmoid", metric="error", block="beta1", atom=0)``."""
    unknown = sorted(set(keys) - set(LONG_COLUMNS))
    if unknown:
        raise ValueError(f"select: unknown key(s) {unknown}; expected some of {list(LONG_COLUMNS)}")
    mask = np.ones(len(long), dtype=bool)
    for key, value in keys.items():
        mask &= (long[key] == value).to_numpy()
    return long[mask]
