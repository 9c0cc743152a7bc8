r"""Sample-complexity curves and rate contrasts between two arms of a study.

Every comparison claim of the theory ("the sigmoid gate needs fewer samples than the softmax
gate", "a Euclidean score turns an exponential sample complexity into a polynomial one") is a
statement about two curves m_A(n), m_B(n) of an error statistic. This module measures them from
stored results alone: tidy tables with columns ``n``, ``replicate`` and a value column, one per arm.
The mathematics is described in ``docs/rates.md``.

Mathematics
-----------
**Per-n statistic.** m̂(n_j) is the mean, the median or a chosen quantile q of the finite values
at n_j (for the mean and the median, the reduction :func:`moe_theory.rates.fit_rate` uses).

**Empirical sample complexity.** For a target ε > 0,

    n(ε) = the smallest n such that m̂(n') ≤ ε at every measured n' ≥ n,

read from the data by linear interpolation on log scales between the last measured size j at
which m̂ exceeds ε and the next one:

    log n(ε) = log n_j + (log ε − log m̂_j) · (log n_{j+1} − log n_j) / (log m̂_{j+1} − log m̂_j).

"Every n' ≥ n" rather than the first crossing keeps a noisy dip below ε from counting as reached;
it is the same definition as the fitted-law inversion of :func:`moe_theory.rates.sample_complexity`.
Two cases lie outside the data and are reported as such, never extrapolated silently:
``at_or_below_smallest_n`` (m̂ ≤ ε already at the smallest n: n(ε) ≤ n_1, reported as n_1) and
``beyond_data`` (m̂ > ε at the largest n: n(ε) > n_N, reported as +inf).

**Bootstrap band.** Replicates are resampled with replacement within each n (the design of sample
sizes stays fixed, as in a sweep), m̂ is recomputed and n(ε) read again; the band is the
percentile interval of those draws, with ``reached`` the fraction of draws in which ε is reached
inside the data. A band whose upper end is +inf says the data cannot bound n(ε) from above.

**Fitted laws.** A power law m = C·n^α (α < 0) gives n(ε) = (ε/C)^{1/α}; the law
m = C/(log n)^λ (λ > 0) gives log log n(ε) = (log C − log ε)/λ, i.e. n(ε) = exp(exp((log C − log ε)/λ)),
which grows faster than any power of 1/ε: on log-log axes a polynomial sample complexity is a
straight line and this one bends upward. Both are extrapolations outside the measured n.

**Paired contrasts.** When two arms saw the same datasets (common random numbers: equal (n,
replicate) pairs), the bootstrap draws the *same* replicate indices for both arms in every
resample, so the CI of a difference (of slopes, of log n(ε)) reflects only the arms' difference
and not the datasets' shared noise. Otherwise the arms are resampled independently. The slope
difference is Δ = α̂_B − α̂_A; its percentile interval comes from the same resamples.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Union

import numpy as np
import pandas as pd

from .rates import REPLICATE_COLUMN, SAMPLE_SIZE_COLUMN, ols

Statistic = Union[str, float]
"""``"mean"``, ``"median"`` or a quantile level q ∈ (0, 1)."""

STATUSES = ("interpolated", "at_or_below_smallest_n", "beyond_data")


def reduce_statistic(values: np.ndarray, statistic: Statistic) -> np.ndarray:
    """The statistic over the last axis, ignoring NaN (non-finite values are stored as NaN); NaN
    where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: their NaN result is the answer
        if statistic == "mean":
            return np.nanmean(values, axis=-1)
        if statistic == "median":
            return np.nanmedian(values, axis=-1)
        return np.nanquantile(values, float(statistic), axis=-1)


def _check_statistic(statistic: Statistic) -> None:
    if statistic in ("mean", "median"):
        return
    if isinstance(statistic, (int, float)) and not isinstance(statistic, bool) and 0 < statistic < 1:
        return
    raise ValueError(f"statistic: expected 'mean', 'median' or a quantile level in (0, 1), got {statistic!r}")


def _check_bootstrap(n_boot: int, ci: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci: expected a level strictly between 0 and 1, got {ci!r}")


@dataclasses.dataclass(frozen=True)
class _Grid:
    """One arm's values on a (distinct n) × (replicate) grid.

    ``values`` is NaN where a fit was non-finite *or* the replicate is absent at that n; ``present``
    tells the two apart: a non-finite fit is a replicate that is drawn and then ignored by the
    statistic (as :func:`moe_theory.rates.fit_rate` ignores it), an absent one is never drawn.
    """

    sample_sizes: np.ndarray  # (N,)
    replicates: np.ndarray  # (R,) replicate labels
    values: np.ndarray  # (N, R)
    present: np.ndarray  # (N, R) bool


def _grid(table: pd.DataFrame, value: str) -> _Grid:
    missing = [c for c in (SAMPLE_SIZE_COLUMN, REPLICATE_COLUMN, value) if c not in table.columns]
    if missing:
        raise ValueError(f"table is missing column(s) {missing}; it has columns {list(table.columns)}")
    if table.duplicated(subset=[SAMPLE_SIZE_COLUMN, REPLICATE_COLUMN]).any():
        raise ValueError("table has repeated (n, replicate) rows; filter it to one arm and one grid cell first")
    values = pd.to_numeric(table[value]).to_numpy(dtype=float, na_value=np.nan)
    if np.any(values[np.isfinite(values)] <= 0):
        raise ValueError(f"value column {value!r} must be > 0 where finite: curves are read on log scales")
    long = pd.DataFrame(
        {"n": table[SAMPLE_SIZE_COLUMN].to_numpy(dtype=float), "replicate": table[REPLICATE_COLUMN].to_numpy(),
         "value": np.where(np.isfinite(values), values, np.nan), "present": True}
    )
    wide = long.pivot(index="n", columns="replicate", values="value").sort_index()
    present = long.pivot(index="n", columns="replicate", values="present").sort_index()
    if len(wide.index) < 2:
        raise ValueError(f"need at least 2 distinct n, got {list(wide.index)}")
    return _Grid(
        wide.index.to_numpy(dtype=float),
        wide.columns.to_numpy(),
        wide.to_numpy(dtype=float),
        present.fillna(False).to_numpy(dtype=bool),
    )


def _resample_indices(grid: _Grid, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, N, R) replicate indices drawn with replacement within each n among the replicates
    present there, as many as are present; the remaining slots point at index R, a NaN column that
    :func:`_draw` appends, so they count for nothing."""
    num_sizes, num_replicates = grid.values.shape
    indices = np.full((n_boot, num_sizes, num_replicates), num_replicates, dtype=np.int64)
    for row in range(num_sizes):
        available = np.flatnonzero(grid.present[row])
        indices[:, row, : available.size] = available[rng.integers(0, available.size, size=(n_boot, available.size))]
    return indices


def _draw(grid: _Grid, indices: np.ndarray) -> np.ndarray:
    """(n_boot, N, R) resampled values of ``grid`` at ``indices`` (index R is NaN)."""
    padded = np.concatenate([grid.values, np.full((grid.values.shape[0], 1), np.nan)], axis=1)
    rows = np.arange(grid.values.shape[0])[None, :, None]
    return padded[rows, indices]


def crossing_sizes(sample_sizes: np.ndarray, statistic_values: np.ndarray, epsilons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """n(ε) and its status code for every row of ``statistic_values`` (..., N) and every ε (E,).

    Returns ``(sizes, status)`` of shape (..., E): status 0 interpolated, 1 at or below the smallest
    n (size n_1), 2 beyond the data (size +inf). A NaN statistic at some n counts as above ε, so a
    size whose fits all failed is never taken as reached.
    """
    log_n = np.log(np.asarray(sample_sizes, dtype=float))
    log_m = np.log(np.asarray(statistic_values, dtype=float))[..., None, :]  # (..., 1, N)
    log_eps = np.log(np.asarray(epsilons, dtype=float))[:, None]  # (E, 1)
    above = ~(log_m <= log_eps)  # (..., E, N); NaN compares False, hence above
    num_sizes = log_n.size
    any_above = above.any(axis=-1)
    last_above = num_sizes - 1 - np.argmax(above[..., ::-1], axis=-1)
    last_above = np.where(any_above, last_above, -1)
    j = np.clip(last_above, 0, num_sizes - 2)
    log_m_j = np.take_along_axis(np.broadcast_to(log_m, above.shape), j[..., None], axis=-1)[..., 0]
    log_m_next = np.take_along_axis(np.broadcast_to(log_m, above.shape), (j + 1)[..., None], axis=-1)[..., 0]
    # Rows that are not interpolated (status 1 or 2) may divide by zero here; np.where drops them.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fraction = (log_eps[..., 0] - log_m_j) / (log_m_next - log_m_j)
        interpolated = np.exp(log_n[j] + fraction * (log_n[j + 1] - log_n[j]))
    status = np.where(last_above == -1, 1, np.where(last_above == num_sizes - 1, 2, 0))
    sizes = np.where(status == 1, np.exp(log_n[0]), np.where(status == 2, np.inf, interpolated))
    return sizes, status


@dataclasses.dataclass(frozen=True)
class SampleComplexityCurve:
    """n(ε) of one arm at each ε, with its bootstrap band (see the module docstring).

    Attributes:
        epsilon: (E,) targets, ascending.
        n: (E,) n(ε) from the data; n_1 where ``at_or_below_smallest_n``, +inf where ``beyond_data``.
        lower, upper: (E,) percentile band of the bootstrap draws at level ``ci``.
        status: (E,) one of :data:`STATUSES` for the point estimate.
        reached: (E,) fraction of bootstrap draws in which ε is reached within the data.
        statistic, ci, n_boot: the settings.
    """

    epsilon: np.ndarray
    n: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    status: tuple[str, ...]
    reached: np.ndarray
    statistic: Statistic
    ci: float
    n_boot: int

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"epsilon": self.epsilon, "n": self.n, "n_low": self.lower, "n_high": self.upper,
             "status": list(self.status), "reached": self.reached}
        )


def _percentile_band(draws: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis, ignoring NaN draws (NaN where every draw is NaN).

    Order statistics rather than interpolation: draws may be +inf, and inf − inf has no value.
    """
    tail = (1.0 - ci) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its NaN is the answer
        return (np.nanquantile(draws, tail, axis=0, method="lower"),
                np.nanquantile(draws, 1.0 - tail, axis=0, method="higher"))


def _epsilons(epsilons) -> np.ndarray:
    epsilons = np.sort(np.atleast_1d(np.asarray(epsilons, dtype=float)))
    if epsilons.size == 0 or not np.all(np.isfinite(epsilons) & (epsilons > 0)):
        raise ValueError(f"epsilons: expected finite positive targets, got {epsilons.tolist()}")
    return epsilons


def sample_complexity_curve(
    table: pd.DataFrame,
    value: str,
    epsilons,
    statistic: Statistic = "mean",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> SampleComplexityCurve:
    """n(ε) read from one arm's table by log-scale interpolation, with a bootstrap band."""
    _check_statistic(statistic)
    _check_bootstrap(n_boot, ci)
    epsilons = _epsilons(epsilons)
    grid = _grid(table, value)
    sizes, status = crossing_sizes(grid.sample_sizes, reduce_statistic(grid.values, statistic), epsilons)
    indices = _resample_indices(grid, n_boot, np.random.default_rng(seed))
    draws, draw_status = crossing_sizes(grid.sample_sizes, reduce_statistic(_draw(grid, indices), statistic), epsilons)
    lower, upper = _percentile_band(draws, ci)
    return SampleComplexityCurve(
        epsilon=epsilons,
        n=sizes,
        lower=lower,
        upper=upper,
        status=tuple(STATUSES[s] for s in status),
        reached=np.mean(draw_status != 2, axis=0),
        statistic=statistic,
        ci=float(ci),
        n_boot=int(n_boot),
    )


def power_law_sample_complexity(log_constant: float, exponent: float, epsilons) -> np.ndarray:
    """n(ε) of the law m = C·n^α: (ε/C)^{1/α} for α < 0, +inf for α ≥ 0 (unless C ≤ ε at α = 0)."""
    epsilons = _epsilons(epsilons)
    if exponent < 0:
        return np.exp((np.log(epsilons) - log_constant) / exponent)
    return np.where((exponent == 0) & (log_constant <= np.log(epsilons)), 0.0, np.inf)


def log_law_sample_complexity(log_constant: float, log_exponent: float, epsilons) -> np.ndarray:
    """n(ε) of the law m = C/(log n)^λ: exp(exp((log C − log ε)/λ)) for λ > 0, +inf otherwise
    (overflowing to +inf where n(ε) exceeds the float range)."""
    epsilons = _epsilons(epsilons)
    if log_exponent <= 0:
        return np.full(epsilons.shape, np.inf)
    with np.errstate(over="ignore"):
        return np.exp(np.exp((log_constant - np.log(epsilons)) / log_exponent))


def _aligned(grid_a: _Grid, grid_b: _Grid) -> bool:
    return (
        grid_a.values.shape == grid_b.values.shape
        and np.array_equal(grid_a.sample_sizes, grid_b.sample_sizes)
        and np.array_equal(grid_a.replicates, grid_b.replicates)
        and np.array_equal(grid_a.present, grid_b.present)
    )


def _paired_indices(grid_a: _Grid, grid_b: _Grid, paired: bool | None, n_boot: int, seed: int):
    """Bootstrap indices for both arms: the same draws when paired, independent ones otherwise."""
    aligned = _aligned(grid_a, grid_b)
    if paired is None:
        paired = aligned
    if paired and not aligned:
        raise ValueError("paired=True needs both arms to hold the same (n, replicate) pairs (common random numbers)")
    rng = np.random.default_rng(seed)
    indices_a = _resample_indices(grid_a, n_boot, rng)
    indices_b = indices_a if paired else _resample_indices(grid_b, n_boot, rng)
    return paired, indices_a, indices_b


@dataclasses.dataclass(frozen=True)
class SlopeContrast:
    """Δ = α̂_B − α̂_A of two arms' log-log slopes, with a (paired) percentile bootstrap CI."""

    slope_a: float
    slope_b: float
    difference: float
    ci_low: float
    ci_high: float
    ci: float
    paired: bool
    n_boot: int
    failed_draws: int

    def verdict(self, name_a: str, name_b: str) -> str:
        """E.g. ``"sigmoid faster than softmax: slope difference −0.21 [−0.30, −0.12]"``."""
        interval = f"slope difference {self.difference:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"
        if self.ci_high < 0:
            return f"{name_b} faster than {name_a}: {interval}"
        if self.ci_low > 0:
            return f"{name_b} slower than {name_a}: {interval}"
        return f"no slope difference resolved between {name_b} and {name_a}: {interval}"


def _log_log_slopes(grid: _Grid, values: np.ndarray, statistic: Statistic) -> np.ndarray:
    return ols(np.log(grid.sample_sizes), np.log(reduce_statistic(values, statistic)))[0]


def slope_difference(
    table_a: pd.DataFrame,
    table_b: pd.DataFrame,
    value: str,
    statistic: Statistic = "mean",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    paired: bool | None = None,
) -> SlopeContrast:
    """α̂_B − α̂_A with a percentile bootstrap CI; paired by default when the arms share datasets."""
    _check_statistic(statistic)
    _check_bootstrap(n_boot, ci)
    grid_a, grid_b = _grid(table_a, value), _grid(table_b, value)
    if grid_a.sample_sizes.size < 3 or grid_b.sample_sizes.size < 3:
        raise ValueError("slope_difference: each arm needs at least 3 distinct n")
    paired, indices_a, indices_b = _paired_indices(grid_a, grid_b, paired, n_boot, seed)
    slope_a = float(_log_log_slopes(grid_a, grid_a.values, statistic))
    slope_b = float(_log_log_slopes(grid_b, grid_b.values, statistic))
    draws = _log_log_slopes(grid_b, _draw(grid_b, indices_b), statistic) - _log_log_slopes(
        grid_a, _draw(grid_a, indices_a), statistic
    )
    finite = np.isfinite(draws)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(draws[finite], [tail, 1.0 - tail]) if finite.any() else (np.nan, np.nan)
    return SlopeContrast(
        slope_a=slope_a,
        slope_b=slope_b,
        difference=slope_b - slope_a,
        ci_low=float(low),
        ci_high=float(high),
        ci=float(ci),
        paired=paired,
        n_boot=int(n_boot),
        failed_draws=int(np.count_nonzero(~finite)),
    )


def sample_complexity_ratio(
    table_a: pd.DataFrame,
    table_b: pd.DataFrame,
    value: str,
    epsilons,
    statistic: Statistic = "mean",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    paired: bool | None = None,
) -> pd.DataFrame:
    """n_B(ε)/n_A(ε) at each ε with a (paired) percentile bootstrap CI.

    Columns: ``epsilon``, ``n_a``, ``n_b``, ``ratio``, ``ratio_low``, ``ratio_high``, ``status_a``,
    ``status_b``, ``defined`` (the fraction of bootstrap draws in which both arms reach ε within the
    data, the draws the interval is made of), ``paired``. A ratio is only a measurement where both statuses are
    ``interpolated``; elsewhere it is a bound (n_1 is an upper bound, +inf says "beyond the data"),
    and the statuses say which.
    """
    _check_statistic(statistic)
    _check_bootstrap(n_boot, ci)
    epsilons = _epsilons(epsilons)
    grid_a, grid_b = _grid(table_a, value), _grid(table_b, value)
    paired, indices_a, indices_b = _paired_indices(grid_a, grid_b, paired, n_boot, seed)
    n_a, status_a = crossing_sizes(grid_a.sample_sizes, reduce_statistic(grid_a.values, statistic), epsilons)
    n_b, status_b = crossing_sizes(grid_b.sample_sizes, reduce_statistic(grid_b.values, statistic), epsilons)
    draws_a, _ = crossing_sizes(grid_a.sample_sizes, reduce_statistic(_draw(grid_a, indices_a), statistic), epsilons)
    draws_b, _ = crossing_sizes(grid_b.sample_sizes, reduce_statistic(_draw(grid_b, indices_b), statistic), epsilons)
    with np.errstate(invalid="ignore"):
        ratio = n_b / n_a
    # A draw in which either arm does not reach ε within the data bounds the ratio on one side only;
    # it is left out of the band, and ``defined`` says in how many draws the ratio was measured.
    measured = np.isfinite(draws_a) & np.isfinite(draws_b)
    ratios = np.where(measured, draws_b / np.where(measured, draws_a, 1.0), np.nan)
    low, high = _percentile_band(ratios, ci)
    return pd.DataFrame(
        {
            "epsilon": epsilons,
            "n_a": n_a,
            "n_b": n_b,
            "ratio": ratio,
            "ratio_low": low,
            "ratio_high": high,
            "status_a": [STATUSES[s] for s in status_a],
            "status_b": [STATUSES[s] for s in status_b],
            "defined": np.mean(~np.isnan(ratios), axis=0),
            "paired": paired,
        }
    )
