r"""Convergence-rate estimation from a results table, and the registry of theoretical rates.

A rate study measures an error quantity v (a Voronoi loss, a parameter error, a density distance)
for replicates r = 1..R_j at distinct sample sizes n_1 < ... < n_N, and asks for the exponent α
in m(n) ≈ C·n^α. Everything here works on a tidy table with columns ``n``, ``replicate`` and a
value column, so rates are computed from stored results alone and never refit a model.

Mathematics
-----------
**Per-n statistic.** m̂_j = mean_r v_{j,r} (the papers' protocol) or median_r v_{j,r} (the robust
variant: a few divergent fits with huge losses at some n move the mean but not the median).
Non-finite values (NaN, ±inf, e.g. from fits that diverged) are excluded from m̂_j, counted, and the
count is reported as ``n_nonfinite``; they are never dropped silently. Logs are taken, so every
finite value must be strictly positive.

**Log-log OLS** [1, 8]. With x_j = log n_j and y_j = log m̂_j,

    α̂ = Σ_j (x_j − x̄)(y_j − ȳ) / Σ_j (x_j − x̄)²,    ĉ = ȳ − α̂ x̄,

and the fitted curve is Ĉ·n^α̂ with Ĉ = exp(ĉ). Each distinct n has weight one, however many
replicates it has, as in the authors' code for papers 1 and 8.

**Percentile bootstrap over replicates.** For b = 1..B and each n_j independently, draw R_j
replicates of that n with replacement, recompute m̂*_{b,j} and refit α*_b. The interval is the
((1 − ci)/2, (1 + ci)/2) empirical quantiles of α*_1..α*_B. Resampling *within* each n keeps the
design (the set of sample sizes) fixed, as it is in a sweep, and uses only the independence of
replicates. With few replicates per n the bootstrap variance of a mean is (R − 1)/R times the
true one, so the interval is slightly narrow; ten or more replicates per n make this negligible.

**Sliding-window slope.** α̂ over every window of w consecutive distinct n. Pre-asymptotic
effects (initialisation far from the truth, a tiny n that cannot resolve the atoms) bend the curve
at small n; the asymptotic regime starts where the window slopes stop drifting. The slope of the
last window (the largest n) is ``asymptotic_slope``.

**Power law versus 1/log(n)^λ.** "Slower than any polynomial" [3, 4, 6, 7] shows on a log-log
plot as a local slope d log m / d log n = −λ / log n that keeps flattening towards 0, while a
power law has a constant slope. Two models are fitted by OLS to the same points (y_j = log m̂_j):

    power:  y = c + α log n                  (m = C·n^α)
    log:    y = c − λ log log n              (m = C / (log n)^λ; needs n > 1)

Each has p = 2 parameters and residual sum of squares RSS; the Gaussian-residual AIC is
N log(RSS/N) + 2p. Since p is equal, ΔAIC = AIC_power − AIC_log = N log(RSS_power / RSS_log): the
comparison is a likelihood ratio between two non-nested curves. |ΔAIC| < 2 is weak evidence, and
over a narrow range of n the two curves are nearly indistinguishable.

**Sample complexity.** For the fitted curve Ĉ·n^α̂ and a target ε > 0, the sample complexity is
the smallest n₀ with Ĉ·n^α̂ ≤ ε for every n ≥ n₀: n₀ = (ε/Ĉ)^{1/α̂} when α̂ < 0 (exact
inversion, so Ĉ·n₀^α̂ = ε); when α̂ ≥ 0 the curve never falls below a level it exceeds, so
n₀ = ∞ (or 0 when α̂ = 0 and Ĉ ≤ ε). Values outside the fitted range of n are extrapolations.

**Theoretical rates.** ``TheoreticalRate`` entries transcribe the rates the papers prove (up to
log factors), with citations. ``exponent=None`` means "slower than any polynomial" (e.g. the
temperature softmax gate [3]). Results that the papers state only qualitatively, with no exponent
("polynomial" for the modified-softmax multinomial logistic MoE [4], the Euclidean-score sigmoid
multinomial logistic MoE [6] and gated attention [7]; "sigmoid needs fewer samples" [5]; the
over-fitted top-K parameters [2]; cells of size ≥ 4 in [1], where only r̄ ≥ 7 is known) are not
given a made-up number and are absent from the registry.

**Verdict.** ``verdict`` compares a fitted slope with a theoretical exponent using the bootstrap
interval widened by a tolerance (see its docstring). Measured slopes can beat theory for reasons
that are part of the protocol: in [1] the near-truth initialisation noise shrinks with n, which
gives slopes near −0.64 for an n^{-1/2} rate.

References (numbering of docs/README.md#papers)
--------------------------------------
[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288.
[2] Nguyen, Akbarian, Yan, Ho, ICLR 2024, arXiv 2309.13850.
[3] Nguyen, Akbarian, Ho, ICML 2024, arXiv 2401.13875.
[4] Nguyen, Akbarian, Nguyen, Ho, ICML 2024, arXiv 2310.14188.
[5] Nguyen, Ho, Rinaldo, NeurIPS 2024, arXiv 2405.13997.
[6] Pham, Cao, Nguyen, Nguyen, Ho, Rinaldo, arXiv 2602.01466.
[7] Nguyen, Pham, Cao, Dinh, Nguyen, Ho, Rinaldo, arXiv 2602.01468.
[8] Nguyen, Nguyen, Nguyen, Ho, AISTATS 2024, arXiv 2305.07572.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from fractions import Fraction
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "RateFit",
    "ModelComparison",
    "TheoreticalRate",
    "UnknownTheoreticalRateError",
    "fit_rate",
    "sliding_window_slopes",
    "asymptotic_slope",
    "Curvature",
    "curvature",
    "compare_power_vs_log",
    "sample_complexity",
    "theoretical_rate",
    "list_theoretical_rates",
    "verdict",
    "PAPERS",
]

Statistic = Literal["mean", "median"]

SAMPLE_SIZE_COLUMN = "n"
REPLICATE_COLUMN = "replicate"

_REDUCERS = {"mean": np.mean, "median": np.median}


# ---------------------------------------------------------------------------------------------
# Table preparation
# ---------------------------------------------------------------------------------------------


class _PerSizeData(NamedTuple):
    """Finite values grouped by distinct sample size, sorted by n."""

    sample_sizes: np.ndarray  # (N,) distinct n, ascending
    values_by_size: list[np.ndarray]  # N arrays of finite, positive values
    statistic_values: np.ndarray  # (N,) mean or median per n
    n_nonfinite: int


def _prepare(table: pd.DataFrame, value: str, statistic: str) -> _PerSizeData:
    """Validate the table and reduce it to one statistic per distinct n."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    if statistic not in _REDUCERS:
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    required = [SAMPLE_SIZE_COLUMN, REPLICATE_COLUMN, value]
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(
            f"table is missing column(s) {missing}; it has columns {list(table.columns)}"
        )

    # A repeated (n, replicate) pair almost always means several grid cells (families, k, ...)
    # were left in the table; pooling them would silently mix different rates.
    duplicated = table.duplicated(subset=[SAMPLE_SIZE_COLUMN, REPLICATE_COLUMN])
    if duplicated.any():
        example = table.loc[duplicated, [SAMPLE_SIZE_COLUMN, REPLICATE_COLUMN]].iloc[0]
        raise ValueError(
            f"table has {int(duplicated.sum())} repeated (n, replicate) rows, e.g. "
            f"n={example[SAMPLE_SIZE_COLUMN]}, replicate={example[REPLICATE_COLUMN]}; "
            "filter it to a single grid cell before fitting a rate"
        )

    try:
        sample_sizes = pd.to_numeric(table[SAMPLE_SIZE_COLUMN]).to_numpy(dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"column 'n' must be numeric: {error}") from None
    if not np.all(np.isfinite(sample_sizes)) or np.any(sample_sizes <= 0):
        bad = np.unique(sample_sizes[~(np.isfinite(sample_sizes) & (sample_sizes > 0))])
        raise ValueError(f"column 'n' must hold finite positive sample sizes; found {bad.tolist()}")
    try:
        values = pd.to_numeric(table[value]).to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError) as error:
        raise ValueError(f"value column {value!r} must be numeric: {error}") from None

    finite = np.isfinite(values)
    n_nonfinite = int(np.count_nonzero(~finite))
    if n_nonfinite:
        affected = np.unique(sample_sizes[~finite])
        warnings.warn(
            f"{n_nonfinite} of {values.size} values in column {value!r} are non-finite "
            f"(at n = {_format_sizes(affected)}); they are excluded from the fit and counted "
            "in n_nonfinite",
            RuntimeWarning,
            stacklevel=3,
        )
    sample_sizes, values = sample_sizes[finite], values[finite]

    non_positive = values <= 0
    if non_positive.any():
        raise ValueError(
            f"value column {value!r} must be > 0 because rates are fitted on log scale; "
            f"{int(non_positive.sum())} non-positive value(s) at n = "
            f"{_format_sizes(np.unique(sample_sizes[non_positive]))}"
        )

    distinct_sizes = np.unique(sample_sizes)
    if distinct_sizes.size < 3:
        raise ValueError(
            "need at least 3 distinct n with finite values to fit a rate; got "
            f"{distinct_sizes.size} (n = {_format_sizes(distinct_sizes)})"
        )

    order = np.argsort(sample_sizes, kind="stable")
    sorted_sizes, sorted_values = sample_sizes[order], values[order]
    boundaries = np.searchsorted(sorted_sizes, distinct_sizes[1:])
    values_by_size = np.split(sorted_values, boundaries)
    reduce = _REDUCERS[statistic]
    statistic_values = np.array([reduce(group) for group in values_by_size])
    return _PerSizeData(distinct_sizes, values_by_size, statistic_values, n_nonfinite)


def _format_sizes(sizes: np.ndarray) -> str:
    return "[" + ", ".join(f"{size:g}" for size in sizes) + "]"


def ols(regressor: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept of response ≈ intercept + slope·regressor along the last axis.

    ``response`` may carry leading batch axes (bootstrap draws, windows), so a whole bootstrap
    refits in one matrix product.
    """
    centred_regressor = regressor - regressor.mean()
    response_mean = response.mean(axis=-1)
    slope = (response - response_mean[..., None]) @ centred_regressor / (
        centred_regressor @ centred_regressor
    )
    intercept = response_mean - slope * regressor.mean()
    return slope, intercept


def _residual_sum_of_squares(
    regressor: np.ndarray, response: np.ndarray, slope: float, intercept: float
) -> float:
    residuals = response - (intercept + slope * regressor)
    return float(residuals @ residuals)


# ---------------------------------------------------------------------------------------------
# Slope fitting with a bootstrap interval
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RateFit:
    """A fitted power law statistic(n) ≈ constant·n^slope with a bootstrap interval for the slope.

    Attributes:
        slope: OLS slope α̂ of log statistic on log n.
        intercept: OLS intercept ĉ, so the curve is exp(intercept)·n^slope.
        ci_low, ci_high: percentile-bootstrap interval for the slope at level ``ci_level``.
        ci_level: the interval's nominal coverage, e.g. 0.95.
        n_values: the distinct sample sizes used, ascending.
        statistic_values: the per-n statistic (mean or median of the finite values), aligned with
            ``n_values``.
        n_boot: number of bootstrap resamples.
        statistic: "mean" or "median".
        r_squared: coefficient of determination of the log-log fit (NaN if the statistic is
            constant in n).
        n_nonfinite: number of non-finite values excluded from the fit.
        value_column: name of the value column that was fitted.
    """

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    ci_level: float
    n_values: tuple[float, ...]
    statistic_values: tuple[float, ...]
    n_boot: int
    statistic: str
    r_squared: float
    n_nonfinite: int
    value_column: str = "value"

    @property
    def constant(self) -> float:
        """C = exp(intercept) in the fitted curve C·n^slope (inf if it overflows a float)."""
        return math.exp(self.intercept) if self.intercept < 709.0 else math.inf

    def predict(self, sample_size):
        """The fitted curve C·n^slope at ``sample_size`` (scalar or array), computed in log space."""
        return np.exp(self.intercept + self.slope * np.log(sample_size))

    def label(self) -> str:
        """Short plot label, e.g. ``"3.5·n^{-0.64}"``; a constant beyond float range is written as 10^x."""
        if self.intercept < 709.0:
            return f"{self.constant:.2g}·n^{{{self.slope:.2f}}}"
        return f"10^{{{self.intercept / math.log(10):.0f}}}·n^{{{self.slope:.2f}}}"


def _bootstrap_log_statistic(data: _PerSizeData, statistic: str, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) log statistics of replicates resampled with replacement within each n.

    One vectorised draw of all resamples per n; the loop runs over distinct n only.
    """
    rng = np.random.default_rng(seed)
    reduce = _REDUCERS[statistic]
    boot = np.empty((n_boot, data.sample_sizes.size))
    for column, replicate_values in enumerate(data.values_by_size):
        draws = rng.integers(0, replicate_values.size, size=(n_boot, replicate_values.size))
        boot[:, column] = np.log(reduce(replicate_values[draws], axis=1))
    return boot


def fit_rate(
    table: pd.DataFrame,
    value: str = "value",
    statistic: Statistic = "mean",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> RateFit:
    """Fit log(statistic of ``value`` at each n) = intercept + slope·log n, with a bootstrap CI.

    Args:
        table: tidy table with columns ``n``, ``replicate`` and ``value``, one row per
            (n, replicate) of a single grid cell.
        value: name of the value column (the error quantity; must be > 0 where finite).
        statistic: "mean" (the papers' protocol) or "median" (robust to a few divergent fits).
        n_boot: number of bootstrap resamples of replicates within each n.
        ci: nominal level of the percentile interval, in (0, 1).
        seed: seed of the bootstrap's ``numpy.random.default_rng``; equal seeds give equal fits.

    Returns:
        A ``RateFit``.

    Raises:
        ValueError: missing column, repeated (n, replicate) rows, fewer than 3 distinct n with
            finite values, non-positive values (the message lists the n), bad ``n_boot``/``ci``.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci!r}")
    data = _prepare(table, value, statistic)

    log_sizes = np.log(data.sample_sizes)
    log_statistic = np.log(data.statistic_values)
    slope, intercept = ols(log_sizes, log_statistic)
    residual_sum = _residual_sum_of_squares(log_sizes, log_statistic, slope, intercept)
    total_sum = float(np.sum((log_statistic - log_statistic.mean()) ** 2))
    r_squared = 1.0 - residual_sum / total_sum if total_sum > 0 else float("nan")

    boot_slopes, _ = ols(log_sizes, _bootstrap_log_statistic(data, statistic, n_boot, seed))
    tail = (1.0 - ci) / 2.0
    ci_low, ci_high = np.quantile(boot_slopes, [tail, 1.0 - tail])

    return RateFit(
        slope=float(slope),
        intercept=float(intercept),
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        ci_level=float(ci),
        n_values=tuple(float(size) for size in data.sample_sizes),
        statistic_values=tuple(float(stat) for stat in data.statistic_values),
        n_boot=int(n_boot),
        statistic=statistic,
        r_squared=float(r_squared),
        n_nonfinite=data.n_nonfinite,
        value_column=value,
    )


# ---------------------------------------------------------------------------------------------
# Where does the asymptotic regime start?
# ---------------------------------------------------------------------------------------------


def sliding_window_slopes(
    table: pd.DataFrame,
    value: str = "value",
    window: int = 5,
    statistic: Statistic = "mean",
) -> pd.DataFrame:
    """OLS log-log slope over each run of ``window`` consecutive distinct n.

    Returns:
        DataFrame with columns ``n_min``, ``n_max``, ``slope``, one row per window, sorted by n.
        Slopes that stop drifting mark the asymptotic regime.

    Raises:
        ValueError: as ``fit_rate``, or ``window`` not in [2, number of distinct n].
    """
    data = _prepare(table, value, statistic)
    num_sizes = data.sample_sizes.size
    if not isinstance(window, (int, np.integer)) or not 2 <= window <= num_sizes:
        raise ValueError(
            f"window must be an integer between 2 and the number of distinct n ({num_sizes}), "
            f"got {window!r}"
        )
    log_sizes = np.log(data.sample_sizes)
    log_statistic = np.log(data.statistic_values)
    rows = []
    for start in range(num_sizes - window + 1):
        stop = start + window
        slope, _ = ols(log_sizes[start:stop], log_statistic[start:stop])
        rows.append(
            {
                "n_min": data.sample_sizes[start],
                "n_max": data.sample_sizes[stop - 1],
                "slope": float(slope),
            }
        )
    return pd.DataFrame(rows, columns=["n_min", "n_max", "slope"])


def asymptotic_slope(
    table: pd.DataFrame,
    value: str = "value",
    window: int = 5,
    statistic: Statistic = "mean",
) -> float:
    """The log-log slope over the window of the ``window`` largest distinct n."""
    slopes = sliding_window_slopes(table, value=value, window=window, statistic=statistic)
    return float(slopes["slope"].iloc[-1])


@dataclasses.dataclass(frozen=True)
class Curvature:
    """Bending of a log-log curve: log m = c + α x + γ (x − x̄)², x = log n.

    Attributes:
        gamma: the quadratic coefficient γ̂; the local slope changes by ``slope_change`` =
            2γ̂ (x_max − x_min) from the smallest to the largest n.
        ci_low, ci_high: percentile-bootstrap interval of ``slope_change`` (replicates resampled
            within each n, as for the slope).
        shape: ``"straight"`` unless the interval excludes 0 and the change exceeds ``tolerance``;
            then ``"steepening"`` (the curve falls faster at large n: it is still leaving a
            pre-asymptotic plateau) or ``"flattening"`` (it falls slower: a floor, or a rate slower
            than any polynomial).
    """

    gamma: float
    slope_change: float
    ci_low: float
    ci_high: float
    shape: str


def curvature(
    table: pd.DataFrame,
    value: str = "value",
    statistic: Statistic = "mean",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    tolerance: float = 0.1,
) -> Curvature:
    """Whether the log-log curve of the per-n statistic bends (see :class:`Curvature`).

    A straight line is what a power law predicts, so a bend says the measured range is not (yet) in
    one power-law regime. Needs at least 4 distinct n.
    """
    data = _prepare(table, value, statistic)
    if data.sample_sizes.size < 4:
        raise ValueError(f"curvature needs at least 4 distinct n, got {data.sample_sizes.size}")
    log_sizes = np.log(data.sample_sizes)
    centred = log_sizes - log_sizes.mean()
    design = np.stack([np.ones_like(centred), centred, centred**2], axis=1)
    projection = np.linalg.pinv(design)[2]  # row giving γ̂ from the responses
    span = 2.0 * (log_sizes.max() - log_sizes.min())
    gamma = float(projection @ np.log(data.statistic_values))
    boot = _bootstrap_log_statistic(data, statistic, n_boot, seed)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(span * (boot @ projection), [tail, 1.0 - tail])
    change = span * gamma
    shape = "straight"
    if (low > 0 or high < 0) and abs(change) > tolerance:
        shape = "flattening" if change > 0 else "steepening"
    return Curvature(gamma, float(change), float(low), float(high), shape)


# ---------------------------------------------------------------------------------------------
# Power law versus 1/log(n)^λ
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """Power law C·n^α versus C/(log n)^λ, both fitted by OLS on log statistic.

    Attributes:
        power_exponent: α in m = C·n^α.
        power_intercept: log C of the power law.
        power_rss, power_aic: residual sum of squares (log domain) and AIC of the power law.
        log_exponent: λ in m = C/(log n)^λ (positive for a decaying curve).
        log_intercept: log C of the log model.
        log_rss, log_aic: residual sum of squares (log domain) and AIC of the log model.
        aic_difference: power_aic − log_aic; positive favours the 1/log(n)^λ model.
        preferred: "log" if log_aic < power_aic, otherwise "power".
        num_points: number of distinct n (N in the AIC).
        statistic: "mean" or "median".
        n_nonfinite: number of non-finite values excluded.
    """

    power_exponent: float
    power_intercept: float
    power_rss: float
    power_aic: float
    log_exponent: float
    log_intercept: float
    log_rss: float
    log_aic: float
    aic_difference: float
    preferred: str
    num_points: int
    statistic: str
    n_nonfinite: int


_NUM_PARAMETERS_PER_MODEL = 2


def _gaussian_aic(residual_sum: float, num_points: int, num_parameters: int) -> float:
    # An exact fit has RSS = 0 and log(0) = -inf; flooring keeps the comparison finite.
    residual_sum = max(residual_sum, np.finfo(float).tiny)
    return num_points * math.log(residual_sum / num_points) + 2 * num_parameters


def compare_power_vs_log(
    table: pd.DataFrame,
    value: str = "value",
    statistic: Statistic = "mean",
) -> ModelComparison:
    """Tell a slow power law from a "slower than any polynomial" 1/log(n)^λ decay by AIC.

    Model A: log m(n) = c + α log n. Model B: log m(n) = c − λ log log n. Both are fitted by OLS
    on the per-n statistic; AIC = N log(RSS/N) + 2p with p = 2 for both.

    Raises:
        ValueError: as ``fit_rate``, or any n ≤ 1 (log log n is undefined there).
    """
    data = _prepare(table, value, statistic)
    if np.any(data.sample_sizes <= 1):
        raise ValueError(
            "compare_power_vs_log needs every n > 1 because the log model uses log(log n); "
            f"found n = {_format_sizes(data.sample_sizes[data.sample_sizes <= 1])}"
        )
    num_points = data.sample_sizes.size
    log_sizes = np.log(data.sample_sizes)
    log_log_sizes = np.log(log_sizes)
    log_statistic = np.log(data.statistic_values)

    power_slope, power_intercept = ols(log_sizes, log_statistic)
    power_rss = _residual_sum_of_squares(log_sizes, log_statistic, power_slope, power_intercept)
    log_slope, log_intercept = ols(log_log_sizes, log_statistic)
    log_rss = _residual_sum_of_squares(log_log_sizes, log_statistic, log_slope, log_intercept)

    power_aic = _gaussian_aic(power_rss, num_points, _NUM_PARAMETERS_PER_MODEL)
    log_aic = _gaussian_aic(log_rss, num_points, _NUM_PARAMETERS_PER_MODEL)
    return ModelComparison(
        power_exponent=float(power_slope),
        power_intercept=float(power_intercept),
        power_rss=power_rss,
        power_aic=power_aic,
        log_exponent=float(-log_slope),
        log_intercept=float(log_intercept),
        log_rss=log_rss,
        log_aic=log_aic,
        aic_difference=power_aic - log_aic,
        preferred="log" if log_aic < power_aic else "power",
        num_points=num_points,
        statistic=statistic,
        n_nonfinite=data.n_nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# Sample complexity
# ---------------------------------------------------------------------------------------------


def sample_complexity(rate_fit: RateFit, epsilon: float) -> float:
    """Smallest n₀ such that the fitted curve C·n^slope is ≤ ε for every n ≥ n₀.

    For slope < 0 this is the exact inversion n₀ = (ε/C)^{1/slope}, so C·n₀^slope = ε (round up
    for an integer sample size; values outside the fitted n range are extrapolations). For
    slope > 0 the curve eventually exceeds any ε, so n₀ = inf. For slope = 0 the curve is the
    constant C: n₀ = 0.0 if C ≤ ε, else inf.

    Raises:
        ValueError: if ε is not a finite positive number.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite positive number, got {epsilon!r}")
    if rate_fit.slope < 0:
        # In logs to avoid overflow of (ε/C) ** (1/slope) for tiny slopes.
        return math.exp((math.log(epsilon) - rate_fit.intercept) / rate_fit.slope)
    if rate_fit.slope == 0 and rate_fit.constant <= epsilon:
        return 0.0
    return math.inf


# ---------------------------------------------------------------------------------------------
# Theoretical-rate registry
# ---------------------------------------------------------------------------------------------

PAPERS: dict[int, str] = {
    1: "[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288",
    2: "[2] Nguyen, Akbarian, Yan, Ho, ICLR 2024, arXiv 2309.13850",
    3: "[3] Nguyen, Akbarian, Ho, ICML 2024, arXiv 2401.13875",
    4: "[4] Nguyen, Akbarian, Nguyen, Ho, ICML 2024, arXiv 2310.14188",
    5: "[5] Nguyen, Ho, Rinaldo, NeurIPS 2024, arXiv 2405.13997",
    6: "[6] Pham, Cao, Nguyen, Nguyen, Ho, Rinaldo, arXiv 2602.01466",
    7: "[7] Nguyen, Pham, Cao, Dinh, Nguyen, Ho, Rinaldo, arXiv 2602.01468",
    8: "[8] Nguyen, Nguyen, Nguyen, Ho, AISTATS 2024, arXiv 2305.07572",
    9: "[9] Nguyen, Han, Harris, Saria, Ho, arXiv 2410.02935",
    10: "[10] Nguyen, Ho, Rinaldo, ICML 2024, arXiv 2402.02952",
}


@dataclasses.dataclass(frozen=True)
class TheoreticalRate:
    """A proven convergence rate n^exponent (up to log factors) for one quantity.

    Attributes:
        family: model family, e.g. "softmax_gaussian".
        setting: fitting regime, e.g. "exact", "overfit", "overfit_cell2", or "any".
        quantity: the error quantity, e.g. "D1", "beta1", "hellinger".
        exponent: the rate exponent (e.g. -0.5, -1/8), or None for "slower than any polynomial".
        citation: the paper, numbered as in docs/README.md#papers.
        note: what the entry means and its conditions.
    """

    family: str
    setting: str
    quantity: str
    exponent: float | None
    citation: str
    note: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.family, self.setting, self.quantity)

    def rate_label(self) -> str:
        """Human-readable rate, e.g. ``"n^{-1/8}"`` or ``"slower than any polynomial"``."""
        if self.exponent is None:
            return "slower than any polynomial"
        fraction = Fraction(self.exponent).limit_denominator(1000)
        return f"n^{{{fraction}}}"


class UnknownTheoreticalRateError(KeyError):
    """Raised by ``theoretical_rate`` for a key absent from the registry."""

    def __str__(self) -> str:
        # KeyError's default __str__ shows the repr, which would escape the list's newlines.
        return str(self.args[0])


def _softmax_gaussian_rates() -> list[TheoreticalRate]:
    cite = PAPERS[1]
    rates = []
    exact_note = "exact fit (k = k*): every Voronoi cell has one atom"
    rates.append(TheoreticalRate("softmax_gaussian", "exact", "D1", -1 / 2, cite, exact_note))
    for quantity in ("beta1", "b", "a", "nu", "cell_mass"):
        rates.append(
            TheoreticalRate("softmax_gaussian", "exact", quantity, -1 / 2, cite, exact_note)
        )
    overfit_note = "over-fitted (k > k*); D2 uses exponents r̄(|A_j|) for β1, b and r̄/2 for a, ν"
    rates.append(TheoreticalRate("softmax_gaussian", "overfit", "D2", -1 / 2, cite, overfit_note))
    rates.append(
        TheoreticalRate(
            "softmax_gaussian", "overfit", "cell_mass", -1 / 2, cite,
            "over-fitted: total gate weight Σ_{i∈A_j} exp(β0i) of each Voronoi cell",
        )
    )
    for quantity in ("beta1", "b", "a", "nu"):
        rates.append(
            TheoreticalRate(
                "softmax_gaussian", "overfit_cell1", quantity, -1 / 2, cite,
                "over-fitted: parameters of atoms alone in their Voronoi cell",
            )
        )
    # Cell of size m: β1 and b converge at n^{-1/(2 r̄(m))}, a and ν at n^{-1/r̄(m)};
    # r̄(2) = 4 and r̄(3) = 6. For m ≥ 4 only r̄ ≥ 7 is known, so no entry is given.
    for cell_size, r_bar in ((2, 4), (3, 6)):
        setting = f"overfit_cell{cell_size}"
        note = f"over-fitted: atoms in a Voronoi cell of size {cell_size}, r̄({cell_size}) = {r_bar}"
        for quantity in ("beta1", "b"):
            rates.append(
                TheoreticalRate("softmax_gaussian", setting, quantity, -1 / (2 * r_bar), cite, note)
            )
        for quantity in ("a", "nu"):
            rates.append(
                TheoreticalRate("softmax_gaussian", setting, quantity, -1 / r_bar, cite, note)
            )
    for setting in ("exact", "overfit"):
        for quantity, name in (("hellinger", "Hellinger"), ("tv", "total-variation")):
            rates.append(
                TheoreticalRate(
                    "softmax_gaussian", setting, quantity, -1 / 2, cite,
                    f"expected conditional {name} distance between fitted and true densities",
                )
            )
    return rates


def _other_rates() -> list[TheoreticalRate]:
    density_citation = f"{PAPERS[1]}; the same density rate is proved in [2], [3], [4], [8]"
    return [
        TheoreticalRate(
            "density_moe", "any", "hellinger", -1 / 2, density_citation,
            "any density MoE fitted by maximum likelihood: conditional Hellinger distance",
        ),
        TheoreticalRate(
            "density_moe", "any", "tv", -1 / 2, density_citation,
            "any density MoE fitted by maximum likelihood: conditional total-variation distance",
        ),
        TheoreticalRate(
            "topk_softmax_gaussian", "exact", "D1", -1 / 2, PAPERS[2],
            "top-K sparse softmax gate, exact fit",
        ),
        TheoreticalRate(
            "topk_softmax_gaussian", "overfit", "hellinger", -1 / 2, PAPERS[2],
            "over-fitted with K̄ active experts: the density converges only if the K̄ active "
            "experts cover the true top-K cells; parameter rates are slow and not tabulated here",
        ),
        TheoreticalRate(
            "temperature_softmax_gaussian", "any", "parameters", None, PAPERS[3],
            "dense-to-sparse gate with temperature τ: interaction between τ and β1 makes "
            "parameter rates slower than any polynomial, possibly 1/log(n); "
            "use compare_power_vs_log",
        ),
        *(
            TheoreticalRate(
                "activation_temperature_softmax_gaussian", "exact", group, -1 / 2, PAPERS[3],
                "activation dense-to-sparse gate, exact fit (k = k*): the activation removes the τ-β1 "
                "interaction, so every parameter converges at the parametric rate",
            )
            for group in ("gate_parameters", "expert_parameters")
        ),
        TheoreticalRate(
            "activation_temperature_softmax_gaussian", "overfit", "gate_parameters", -1 / 2, PAPERS[3],
            "activation dense-to-sparse gate, over-specified fit: gate parameters at n^{-1/2}",
        ),
        TheoreticalRate(
            "activation_temperature_softmax_gaussian", "overfit", "expert_parameters", -1 / 4,
            PAPERS[3],
            "activation dense-to-sparse gate, over-specified fit: expert parameters converge at "
            "n^{-1/4} or n^{-1/2} depending on the parameter; the slower n^{-1/4} is listed",
        ),
        TheoreticalRate(
            "softmax_multinomial_logistic", "zero_expert_slope", "parameters", None, PAPERS[4],
            "softmax gate with some true expert slopes η*_1 = 0: slower than any polynomial",
        ),
        TheoreticalRate(
            "temperature_sigmoid_multinomial_logistic", "any", "parameters", None, PAPERS[6],
            "sigmoid gate with temperature: exponential sample complexity",
        ),
        TheoreticalRate(
            "multi_head_self_attention", "any", "expert_parameters", None, PAPERS[7],
            "multi-head self-attention viewed as a hierarchical MoE: exponential sample "
            "complexity (gated attention is polynomial, exponent not stated)",
        ),
        TheoreticalRate(
            "gated_attention", "any", "expert_parameters", None, PAPERS[7],
            "gated attention (sigmoid gate at the SDPA output or the value map) viewed as a hierarchical MoE: "
            "polynomial sample complexity for expert estimation, exponent not stated",
        ),
        TheoreticalRate(
            "hierarchical_softmax_softmax", "any", "expert_error", None, PAPERS[9],
            "two-level HMoE with softmax gates at both levels: the slower expert estimation that Laplace gates improve on "
            "(exponents not transcribed)",
        ),
        TheoreticalRate(
            "hierarchical_laplace", "any", "expert_error", None, PAPERS[9],
            "two-level HMoE with a Laplace gate at one or both levels: faster expert estimation than softmax–softmax "
            "(exponents not transcribed)",
        ),
        TheoreticalRate(
            "softmax_lse_strongly_identifiable", "exact", "expert_error", -1 / 2, PAPERS[10],
            "softmax-gated regression MoE by least squares, feed-forward experts h = act(aᵀx + b) with act = sigmoid "
            "or tanh (strongly identifiable), k = k*",
        ),
        TheoreticalRate(
            "softmax_lse_strongly_identifiable", "overfit_multi_atom", "expert_error", -1 / 4, PAPERS[10],
            "as above with k > k*: the atoms of a Voronoi cell of several atoms (exponent 2 of the loss); cells of "
            "one atom keep n^{-1/2}",
        ),
        TheoreticalRate(
            "softmax_lse_polynomial", "overfit_multi_atom", "expert_error", None, PAPERS[10],
            "softmax-gated regression MoE by least squares with polynomial experts (linear included), k > k*: slower "
            "than any polynomial, through the interaction of gate and expert parameters",
        ),
        TheoreticalRate(
            "sigmoid_lse_relu_gelu", "overfit_multi_atom", "expert_error", -1 / 4, PAPERS[5],
            "unnormalised-sigmoid-gated regression MoE by least squares with ReLU/GELU experts, k > k*: polynomial "
            "rate for the atoms of a multi-atom cell; fewer samples than the softmax gate needs for the same experts",
        ),
        TheoreticalRate(
            "gaussian_gated_gaussian", "any", "D", -1 / 2, PAPERS[8],
            "Gaussian-gated MoE, the paper's Voronoi loss; simulated slopes -0.502 to -0.517 "
            "with k* = 3 fitted by k = 4 and 5",
        ),
    ]


_REGISTRY: dict[tuple[str, str, str], TheoreticalRate] = {
    rate.key: rate for rate in _softmax_gaussian_rates() + _other_rates()
}


def theoretical_rate(family: str, setting: str, quantity: str) -> TheoreticalRate:
    """Look up the proven rate for (family, setting, quantity).

    Raises:
        UnknownTheoreticalRateError (a KeyError): the key is absent; the message lists every
            available (family, setting, quantity).
    """
    key = (family, setting, quantity)
    try:
        return _REGISTRY[key]
    except KeyError:
        available = "\n".join(f"  {entry}" for entry in sorted(_REGISTRY))
        raise UnknownTheoreticalRateError(
            f"no theoretical rate for {key}; available (family, setting, quantity):\n{available}"
        ) from None


def list_theoretical_rates() -> pd.DataFrame:
    """The registry as a DataFrame.

    Columns: family, setting, quantity, exponent (float; NaN means slower than any polynomial),
    rate (readable, e.g. "n^{-1/8}"), citation, note.
    """
    rows = [
        {
            "family": rate.family,
            "setting": rate.setting,
            "quantity": rate.quantity,
            "exponent": np.nan if rate.exponent is None else rate.exponent,
            "rate": rate.rate_label(),
            "citation": rate.citation,
            "note": rate.note,
        }
        for rate in _REGISTRY.values()
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Fitted slope versus theory
# ---------------------------------------------------------------------------------------------


def verdict(
    rate_fit: RateFit,
    theory_exponent: float | TheoreticalRate | None,
    tolerance: float = 0.1,
) -> str:
    """Compare a fitted slope with a theoretical exponent.

    Let [lo, hi] = [ci_low − tolerance, ci_high + tolerance]. The tolerance absorbs the log
    factors that the theory ignores and pre-asymptotic curvature. Returns:

    - "no polynomial rate predicted" if the exponent is None (slower than any polynomial; use
      ``compare_power_vs_log`` instead);
    - "consistent" if lo ≤ exponent ≤ hi;
    - "faster than theory" if hi < exponent (the error decays faster than predicted);
    - "slower than theory" if lo > exponent (the error decays slower than predicted).

    ``theory_exponent`` may be a float, None or a ``TheoreticalRate``.

    Raises:
        ValueError: if tolerance is negative or not finite.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite non-negative number, got {tolerance!r}")
    if isinstance(theory_exponent, TheoreticalRate):
        theory_exponent = theory_exponent.exponent
    if theory_exponent is None:
        return "no polynomial rate predicted"
    lower = rate_fit.ci_low - tolerance
    upper = rate_fit.ci_high + tolerance
    if upper < theory_exponent:
        return "faster than theory"
    if lower > theory_exponent:
        return "slower than theory"
    return "consistent"
