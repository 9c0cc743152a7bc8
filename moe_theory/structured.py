"""Rate studies of structured models: hierarchical MoE (density, EM), attention entries and regression
MoE (least squares) (``docs/hierarchical.md``, ``docs/attention.md``, ``docs/regression.md``).

The flat sweep (:mod:`moe_theory.sweep`) runs studies of one gate × one expert; these models have
nested gates or tied parameters, so they get this runner, which keeps the sweep's guarantees:

* **Cells.** A cell is one arm at one sample size n. For replicate r its data come from the key
  root → DATA → n → r, and its start from root → START → r, the same at every n: starts do not
  depend on n, so a fit's error at n measures the estimator, not a start that tightens with n.
  Arms of one study share their datasets where they share a truth (common random numbers).
* **Stored at once, resumable.** Each finished cell is written atomically to ``parts/`` of the run
  folder; ``--resume RUN_DIR`` computes only the missing cells, and refuses a config that differs
  from the one the folder was started with (every setting that changes a number is in it).
* **Reproducible.** Replicates go through the fit program in chunks of ``batch_size``; a last
  partial chunk is filled with the next replicate ids (computed and dropped), so a row never depends
  on the number of replicates, and adding a size or a replicate leaves every stored row unchanged.
* **Nothing dropped.** Every fit is a row with ``converged``, ``finite`` and ``n_iter``; a
  non-finite fit has NaN errors, and the report gives the converged fraction per cell. Rates use the
  finite fits; the median makes them robust to a few bad ones.

The report (:func:`report`) writes ``cells.csv`` (converged and finite fractions, fits that lose a
true expert, fits whose objective on their own data reaches the truth's, iterations, seconds per
cell), ``rates.csv`` (per arm, for each true expert's error and
the worst of every error family: the log-log slope of the mean and of the median with bootstrap
CIs, and a power law against 1/log(n)^λ, :mod:`moe_theory.rates`), ``contrasts.csv`` (paired slope
differences against the compared arm), ``complexity.csv`` and ``complexity_ratios.csv`` (n(ε) per
arm, and each arm's n(ε) over its compared arm's with paired bootstrap CIs,
:mod:`moe_theory.complexity`), ``figures/expert_error.png`` and ``report.md``.

Configs are YAML; ``configs/paper7_gated_attention.yaml``, ``configs/paper9_laplace_hmoe.yaml``,
``configs/paper10_lse_softmax.yaml`` and ``configs/paper5_sigmoid_vs_softmax.yaml`` are the shipped
ones. Run: ``python -m moe_theory.structured CONFIG [--resume RUN_DIR]``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import yaml

from . import attention, hierarchical, regression, storage
from .complexity import sample_complexity_curve, sample_complexity_ratio, slope_difference
from .fit.least_squares import LeastSquaresConfig, LevenbergMarquardt, at_bound
from .fit.settings import EMConfig
from .fit.solver import run_solver
from .gates import SCORES
from .rates import compare_power_vs_log, fit_rate
from .sampling import make_inputs

DATA_STREAM, START_STREAM, ERROR_STREAM = 1, 2, 3
KINDS = ("attention", "hmoe", "regression")
ARM_KEYS = {
    "attention": {"name", "position", "heads", "compare_to"},
    "hmoe": {"name", "outer_gate", "inner_gate", "extra_experts", "compare_to"},
    "regression": {"name", "truth", "gate", "extra_experts", "compare_to"},
}
"""The keys an arm of each kind may set; ``compare_to`` names the arm its sample complexity is
divided by (default: the study's ``reference_arm``). A regression arm names one of the config's
``truths`` and may fit a ``gate`` other than the one that generated the data."""


TOP_KEYS = {"name", "description", "kind", "claim", "seed", "sample_sizes", "replicates", "batch_size", "error_draws",
            "reference_arm", "truth", "truths", "fit", "arms"}
FIT_KEYS = {"max_iter", "tol", "start_scale", "bound"}
TRUTH_KEYS = {"gate", "score", "expert", "noise", "inputs", "params"}
"""The keys of one regression truth in ``truths``."""
PROSE_KEYS = {"description", "claim"}
"""Keys that change no number: a resumed run may differ from its folder's config in these alone."""


class StudyConfigError(ValueError):
    """A structured-study config is malformed; the message names the file and the key."""


def _require(mapping: Mapping, key: str, where: str, path: Path, kind=None):
    if key not in mapping:
        raise StudyConfigError(f"{path}: {where}{key}: missing")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise StudyConfigError(f"{path}: {where}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _positive_int(mapping: Mapping, key: str, where: str, path: Path, default=None) -> int:
    value = mapping.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StudyConfigError(f"{path}: {where}{key}: expected a positive integer, got {value!r}")
    return value


@dataclass
class StudyConfig:
    path: Path
    raw: dict
    name: str
    kind: str
    claim: str
    seed: int
    sample_sizes: tuple[int, ...]
    replicates: int
    batch_size: int
    arms: tuple[dict, ...]
    reference: str
    error_draws: int


def load_config(path: str | Path) -> StudyConfig:
    """Read and check a structured-study config; every error names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise StudyConfigError(f"{path}: cannot read the config ({error})") from None
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise StudyConfigError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(TOP_KEYS)}")
    fit = raw.get("fit", {})
    if not isinstance(fit, dict) or set(fit) - FIT_KEYS:
        raise StudyConfigError(f"{path}: fit: expected a mapping with some of {sorted(FIT_KEYS)}, got {fit!r}")
    kind = _require(raw, "kind", "", path, str)
    if kind not in KINDS:
        raise StudyConfigError(f"{path}: kind: expected one of {KINDS}, got {kind!r}")
    sizes = _require(raw, "sample_sizes", "", path, list)
    if len(sizes) < 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 10 for n in sizes):
        raise StudyConfigError(f"{path}: sample_sizes: expected at least 3 integers ≥ 10, got {sizes!r}")
    if len(set(sizes)) != len(sizes):
        raise StudyConfigError(f"{path}: sample_sizes: repeated sizes in {sizes!r}")
    arms = _require(raw, "arms", "", path, list)
    if not arms:
        raise StudyConfigError(f"{path}: arms: expected at least one arm")
    names = []
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or not isinstance(arm.get("name"), str):
            raise StudyConfigError(f"{path}: arms[{i}]: expected a mapping with a string 'name'")
        names.append(arm["name"])
    if len(set(names)) != len(names):
        raise StudyConfigError(f"{path}: arms: repeated arm names {names}")
    reference = raw.get("reference_arm", names[0])
    if reference not in names:
        raise StudyConfigError(f"{path}: reference_arm: expected one of {names}, got {reference!r}")
    for arm in arms:
        unknown = sorted(set(arm) - ARM_KEYS[kind])
        if unknown:
            raise StudyConfigError(f"{path}: arms[{arm['name']}]: unknown key(s) {unknown}; expected some of {sorted(ARM_KEYS[kind])}")
        if arm.get("compare_to", reference) not in names:
            raise StudyConfigError(f"{path}: arms[{arm['name']}].compare_to: expected one of {names}, got {arm['compare_to']!r}")
    if kind == "regression" and "truth" in raw:
        raise StudyConfigError(f"{path}: truth: a regression study names its truths under 'truths' (name -> truth), "
                               "and each arm picks one with 'truth'")
    if kind != "regression" and "truths" in raw:
        raise StudyConfigError(f"{path}: truths: only regression studies take several truths; use 'truth'")
    if kind == "hmoe" and "bound" in fit:
        raise StudyConfigError(f"{path}: fit.bound: only least-squares fits (kinds attention, regression) take a box")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise StudyConfigError(f"{path}: seed: expected an integer in [0, 2^32), got {seed!r}")
    config = StudyConfig(
        path=path, raw=raw, name=_require(raw, "name", "", path, str), kind=kind,
        claim=str(raw.get("claim", "")).strip(), seed=seed, sample_sizes=tuple(sorted(sizes)),
        replicates=_positive_int(raw, "replicates", "", path), batch_size=_positive_int(raw, "batch_size", "", path, 10),
        arms=tuple(arms), reference=reference, error_draws=_positive_int(raw, "error_draws", "", path, 4096),
    )
    if kind == "regression":
        for name in _require(raw, "truths", "", path, dict):
            _regression_truth(config, name)  # every truth, including one that no arm names yet
    for arm in config.arms:
        _problem(config, arm)  # builds every arm once, so a bad truth or arm fails before any fit
    return config


# ----------------------------------------------------------------------------------------------
# Problems: what a cell samples, fits and scores, per kind.


@dataclass(frozen=True)
class AttentionMean:
    """The attention entry as the hashable mean function least squares fits."""

    model: attention.AttentionModel

    def __call__(self, params, X):
        return attention.entry(self.model, params, X)


@dataclass(frozen=True)
class AttentionProblem:
    """Attention entry with the gate at ``position``, truth with H* heads, fitted with ``heads`` heads."""

    true_model: attention.AttentionModel
    fitted_heads: int
    noise: float
    start_scale: float
    solver: LevenbergMarquardt
    tol: float = 1e-10
    error_draws: int = 4096

    def sample(self, key, truth, n):
        return attention.sample(key, self.true_model, truth, n, self.noise)

    def start(self, key, truth):
        """The truth, with the last head split into ``fitted_heads − H* + 1`` copies that share its
        value map (u/copies each, so the function is unchanged), then every coordinate + N(0, scale²)."""
        extra = self.fitted_heads - self.true_model.heads
        copies = extra + 1
        value = truth.value.at[-1].divide(copies)
        grow = lambda a: jnp.concatenate([a] + [a[-1:]] * extra, axis=0) if extra else a  # noqa: E731
        gate = grow(truth.gate) if self.true_model.position in ("sdpa", "value") else truth.gate
        start = attention.AttentionParams(grow(truth.score), grow(value), gate)
        leaves, treedef = jax.tree_util.tree_flatten(start)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef, [leaf + self.start_scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
        )

    def fit(self, params0, data):
        X, y = data
        return run_solver(self.solver, params0, X, y, None, self.tol)

    def truth_objective(self, truth, data):
        X, y = data
        return -jnp.mean((y - attention.entry(self.true_model, truth, X)) ** 2)

    def error_inputs(self, key, truth):
        return attention.sample(key, self.true_model, truth, self.error_draws, 0.0)[0]

    def score(self, fitted, truth, X) -> dict[str, jnp.ndarray]:
        errors = attention.attention_errors(self.true_model, fitted, truth, X)
        return {"expert_error": errors.expert_error, "score_error": errors.score_error,
                "value_error": errors.value_error, "cell_size": errors.cell_size}


@dataclass(frozen=True)
class HMoEProblem:
    """HMoE with G* groups of J* experts, fitted with ``extra`` more experts per group."""

    true_family: hierarchical.HierarchicalFamily
    extra: int
    inputs: Any
    start_scale: float
    solver: hierarchical.HierarchicalEM
    tol: float = 1e-10
    error_draws: int = 4096

    def sample(self, key, truth, n):
        x, y, _ = hierarchical.sample(key, self.true_family, truth, n, self.inputs)
        return x, y

    def start(self, key, truth):
        """The truth with the last expert of every group split into ``extra + 1`` copies of equal
        inner weight (offsets − log(extra + 1): the density is unchanged), then perturbed
        (:func:`moe_theory.hierarchical.perturbed_start`)."""
        inner = dict(truth.inner)
        if self.extra:
            offset = SCORES[self.true_family.inner_gate.score].offset_field.name
            inner[offset] = inner[offset].at[:, -1].add(-jnp.log(self.extra + 1.0))
        split = hierarchical.HMoEParams(truth.outer, inner, truth.expert)
        return hierarchical.perturbed_start(key, self.true_family, split, self.start_scale, self.extra)

    def fit(self, params0, data):
        x, y = data
        return run_solver(self.solver, params0, x, y, None, self.tol)

    def truth_objective(self, truth, data):
        x, y = data
        return hierarchical.log_likelihood(self.true_family, truth, x, y)

    def error_inputs(self, key, truth):
        return key

    def score(self, fitted, truth, key) -> dict[str, jnp.ndarray]:
        errors = hierarchical.hierarchical_errors(key, self.true_family, fitted, truth, self.inputs, self.error_draws)
        out = {"expert_error": errors.expert_error, "cell_size": errors.cell_size}
        out.update({f"{name}_error": value for name, value in errors.block_error.items()})
        return out


@dataclass(frozen=True)
class RegressionProblem:
    """A regression MoE generated by ``true_family`` (k* experts), fitted by least squares with
    ``fitted_family`` (its gate may differ; ``extra`` more experts)."""

    true_family: regression.RegressionFamily
    fitted_family: regression.RegressionFamily
    extra: int
    noise: float
    inputs: Any
    start_scale: float
    solver: LevenbergMarquardt
    tol: float = 1e-10
    error_draws: int = 4096

    @property
    def truth_in_model(self) -> bool:
        return regression.represents(self.fitted_family, self.true_family)

    def sample(self, key, truth, n):
        return regression.sample(key, self.true_family, truth, n, self.noise, self.inputs)

    def start(self, key, truth):
        """:func:`moe_theory.regression.split_start` of the truth; a fit with another gate reads the same
        numbers in its own parametrisation, so paired arms start from the same point."""
        return regression.split_start(key, self.true_family, truth, self.extra, self.start_scale)

    def fit(self, params0, data):
        x, y = data
        return run_solver(self.solver, params0, x, y, None, self.tol)

    def truth_objective(self, truth, data):
        x, y = data
        return -jnp.mean((y - regression.mean_function(self.true_family, truth, x)) ** 2)

    def error_inputs(self, key, truth):
        return key

    def score(self, fitted, truth, key) -> dict[str, jnp.ndarray]:
        errors = jax.vmap(lambda one: regression.regression_errors(
            key, self.fitted_family, one, self.true_family, truth, self.inputs, self.error_draws))(fitted)
        out = {"expert_error": errors.expert_error, "used_expert_error": errors.used_expert_error,
               "cell_size": errors.cell_size, "mass_error": errors.mass_error,
               "voronoi_loss": errors.loss[:, None], "function_error": errors.function_error[:, None],
               "at_bound": jax.vmap(lambda one: at_bound(one, self.solver.config.bound))(fitted)[:, None].astype(jnp.float64)}
        out.update({f"{name}_error": value for name, value in errors.block_error.items()})
        return out


def _number(mapping: Mapping, key: str, where: str, path: Path, default: float, positive: bool = False) -> float:
    """A finite real number ≥ 0 (> 0 with ``positive``) at ``key``; booleans and strings are refused."""
    value = mapping.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and (
        value > 0 if positive else value >= 0)
    if not ok:
        raise StudyConfigError(f"{path}: {where}{key}: expected a finite number {'> 0' if positive else '≥ 0'}, got {value!r}")
    return float(value)


def _least_squares_settings(config: StudyConfig, truth) -> tuple[LeastSquaresConfig, float, float]:
    """(solver settings, start scale, tol) from ``fit``; a box must contain every true parameter."""
    fit, path = config.raw.get("fit", {}), config.path
    bound = None if fit.get("bound") is None else _number(fit, "bound", "fit.", path, 0.0, positive=True)
    settings = LeastSquaresConfig(max_iter=_positive_int(fit, "max_iter", "fit.", path, 1000), bound=bound)
    largest = float(np.max(np.abs(np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(truth)]))))
    if bound is not None and largest > bound:
        raise StudyConfigError(f"{path}: fit.bound: {bound:g} excludes a true parameter of size {largest:g}; "
                               "the box must contain the truth")
    return settings, _number(fit, "start_scale", "fit.", path, 0.1), _number(fit, "tol", "fit.", path, 1e-10)


def _regression_truth(config: StudyConfig, name: str):
    """(family, params, noise, inputs) of ``truths.<name>``; errors name the file and the key."""
    path = config.path
    at = f"truths.{name}."
    spec = _require(config.raw, "truths", "", path, dict)[name]
    if not isinstance(spec, dict):
        raise StudyConfigError(f"{path}: truths.{name}: expected a mapping with some of {sorted(TRUTH_KEYS)}")
    unknown = sorted(set(spec) - TRUTH_KEYS)
    if unknown:
        raise StudyConfigError(f"{path}: truths.{name}: unknown key(s) {unknown}; expected some of {sorted(TRUTH_KEYS)}")
    values = _require(spec, "params", at, path, dict)
    gate_values = _require(values, "gate", f"{at}params.", path, dict)
    gate, expert = _require(spec, "gate", at, path, str), _require(spec, "expert", at, path)
    try:
        beta0 = np.asarray(_require(gate_values, "beta0", f"{at}params.gate.", path), dtype=float)
        beta1 = np.asarray(gate_values.get("beta1", [[0.0]] * max(beta0.size, 1)), dtype=float)
        if beta0.ndim != 1 or beta0.size < 1:
            raise ValueError(f"params.gate.beta0: expected a list with one entry per expert, got {beta0.tolist()!r}")
        family = regression.make_regression_family(gate, expert, int(beta0.size), int(beta1.shape[1]) if beta1.ndim == 2 else 1,
                                                   spec.get("score", "linear"))
        truth = regression.make_regression_params(family, values)
        inputs = make_inputs(spec.get("inputs", "uniform"))
    except StudyConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise StudyConfigError(f"{path}: truths.{name}: {error}") from None
    return family, truth, _number(spec, "noise", at, path, 0.1), inputs


def _regression_problem(config: StudyConfig, arm: Mapping[str, Any], where: str):
    path = config.path
    truths = _require(config.raw, "truths", "", path, dict)
    name = _require(arm, "truth", where, path, str)
    if name not in truths:
        raise StudyConfigError(f"{path}: {where}truth: expected one of {sorted(truths)}, got {name!r}")
    true_family, truth, noise, inputs = _regression_truth(config, name)
    extra = arm.get("extra_experts", 0)
    if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
        raise StudyConfigError(f"{path}: {where}extra_experts: expected a non-negative integer, got {extra!r}")
    gate = arm.get("gate", true_family.gate_type)
    if gate not in regression.GATE_TYPES:
        raise StudyConfigError(f"{path}: {where}gate: expected one of {regression.GATE_TYPES}, got {gate!r}")
    fitted_family = regression.RegressionFamily(gate, true_family.expert, true_family.num_experts + extra,
                                                true_family.dim, true_family.score)
    settings, start_scale, tol = _least_squares_settings(config, truth)
    problem = RegressionProblem(true_family, fitted_family, extra, noise, inputs, start_scale,
                                LevenbergMarquardt(regression.RegressionMean(fitted_family), settings), tol,
                                config.error_draws)
    return problem, truth


def _problem(config: StudyConfig, arm: Mapping[str, Any]):
    """(problem, truth) of one arm; errors name the file and the key."""
    raw, path = config.raw, config.path
    where = f"arms[{arm['name']}]."
    fit = raw.get("fit", {})
    if config.kind == "regression":
        return _regression_problem(config, arm, where)
    truth_spec = _require(raw, "truth", "", path, dict)
    try:
        if config.kind == "attention":
            position = arm.get("position")
            true_model = attention.AttentionModel(
                position, _positive_int(truth_spec, "heads", "truth.", path), _positive_int(truth_spec, "dim", "truth.", path),
                _positive_int(truth_spec, "tokens", "truth.", path), truth_spec.get("query", 0),
            )
            values = {"score": truth_spec.get("score"), "value": truth_spec.get("value")}
            if position is not None:
                values["gate"] = _require(truth_spec.get("gates", {}), position, "truth.gates.", path)
            truth = attention.make_attention_params(true_model, values)
            heads = _positive_int(arm, "heads", where, path, true_model.heads)
            if heads < true_model.heads:
                raise StudyConfigError(f"{path}: {where}heads: expected ≥ the true {true_model.heads} heads, got {heads}")
            settings, start_scale, tol = _least_squares_settings(config, truth)
            solver = LevenbergMarquardt(AttentionMean(true_model.with_heads(heads)), settings)
            problem = AttentionProblem(true_model, heads, _number(truth_spec, "noise", "truth.", path, 0.1),
                                       start_scale, solver, tol, config.error_draws)
            return problem, truth
        family = hierarchical.make_hierarchical_family(
            _require(arm, "outer_gate", where, path), _require(arm, "inner_gate", where, path),
            truth_spec.get("expert", "gaussian"), _positive_int(truth_spec, "groups", "truth.", path),
            _positive_int(truth_spec, "experts_per_group", "truth.", path), _positive_int(truth_spec, "dim", "truth.", path),
        )
        truth = hierarchical.make_hmoe_params(family, _require(truth_spec, "params", "truth.", path, dict))
        extra = arm.get("extra_experts", 0)
        if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
            raise StudyConfigError(f"{path}: {where}extra_experts: expected a non-negative integer, got {extra!r}")
        inner = family.inner_gate
        if extra and (inner.normaliser != "softmax" or SCORES[inner.score].log_offset):
            raise StudyConfigError(
                f"{path}: {where}extra_experts: the split start lowers the split expert's inner offset by log(J + 1), "
                f"which keeps the density only for a softmax-normalised inner gate with an additive offset; got {inner.name!r}"
            )
        fitted_family = hierarchical.grown_family(family, extra)
        solver = hierarchical.HierarchicalEM(fitted_family, EMConfig(max_iter=_positive_int(fit, "max_iter", "fit.", path, 1000)))
        problem = HMoEProblem(family, extra, make_inputs(truth_spec.get("inputs", "uniform")),
                              _number(fit, "start_scale", "fit.", path, 0.1), solver, _number(fit, "tol", "fit.", path, 1e-10),
                              config.error_draws)
        return problem, truth
    except StudyConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise StudyConfigError(f"{path}: {where.rstrip('.')}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Running cells.


_PROGRAMS: dict = {}
"""Compiled cell programs by (kind, problem, n, seed, truth bytes): a repeated or resumed run in the
same process compiles nothing again."""


def _fingerprint(tree) -> tuple:
    return tuple((leaf.shape, np.asarray(leaf).tobytes()) for leaf in jax.tree_util.tree_leaves(tree))


def _fit_program(problem, truth, seed: int, n: int):
    """Sample → start → fit of a chunk of replicate ids at size n, vmapped and jitted, with the truth
    and the root key as constants of the program."""
    cache_key = ("fit", problem, n, seed, _fingerprint(truth))
    if cache_key not in _PROGRAMS:
        root = jax.random.key(seed)

        def one(replicate):
            start_key = jax.random.fold_in(jax.random.fold_in(root, START_STREAM), replicate)
            return problem.fit(problem.start(start_key, truth), problem.sample(_data_key(root, n, replicate), truth, n))

        _PROGRAMS[cache_key] = jax.jit(jax.vmap(one))
    return _PROGRAMS[cache_key]


def _data_key(root, n: int, replicate):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, DATA_STREAM), n), replicate)


def _truth_objective_program(problem, truth, seed: int, n: int):
    """The truth's objective on each replicate's dataset (the same draws as :func:`_fit_program`). A
    program of its own: inside the fit program it would change how XLA fuses the fit, and with it the
    last bits of committed results."""
    cache_key = ("truth_objective", problem, n, seed, _fingerprint(truth))
    if cache_key not in _PROGRAMS:
        root = jax.random.key(seed)
        _PROGRAMS[cache_key] = jax.jit(jax.vmap(
            lambda replicate: problem.truth_objective(truth, problem.sample(_data_key(root, n, replicate), truth, n))))
    return _PROGRAMS[cache_key]


def _score_program(problem, truth, seed: int):
    cache_key = ("score", problem, seed, _fingerprint(truth))
    if cache_key not in _PROGRAMS:
        error_inputs = problem.error_inputs(jax.random.fold_in(jax.random.key(seed), ERROR_STREAM), truth)
        _PROGRAMS[cache_key] = jax.jit(lambda fitted: problem.score(fitted, truth, error_inputs))
    return _PROGRAMS[cache_key]


def _run_cell(config: StudyConfig, arm: Mapping, n: int) -> pd.DataFrame:
    problem, truth = _problem(config, arm)
    program, score = _fit_program(problem, truth, config.seed, n), _score_program(problem, truth, config.seed)
    reference = _truth_objective_program(problem, truth, config.seed, n)
    rows = []
    started = time.perf_counter()
    for first in range(0, config.replicates, config.batch_size):
        ids = jnp.arange(first, first + config.batch_size)
        result = jax.block_until_ready(program(ids))
        truth_objective = np.asarray(reference(ids))
        scores = jax.tree_util.tree_map(np.asarray, score(result.params))
        for i, replicate in enumerate(np.asarray(ids)):
            if replicate >= config.replicates:
                continue
            row = {"arm": arm["name"], "n": n, "replicate": int(replicate),
                   "converged": bool(result.converged[i]), "finite": bool(result.finite[i]),
                   "n_iter": int(result.n_iter[i]), "objective": float(result.log_likelihood[i]),
                   "truth_objective": float(truth_objective[i])}
            for name, values in scores.items():
                for j, value in enumerate(values[i]):
                    row[f"{name}_{j}"] = float(value) if row["finite"] or name in ("cell_size", "at_bound") else np.nan
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame["cell_seconds"] = time.perf_counter() - started
    return frame


def _cell_name(arm: Mapping, n: int) -> str:
    return f"{arm['name']}__n{n}"


def _numeric(raw: dict) -> dict:
    return {key: value for key, value in raw.items() if key not in PROSE_KEYS}


def run(config_path: str | Path, results_root: str | Path = "results", resume: str | Path | None = None) -> Path:
    """Run (or resume) a structured study; returns the run folder, with ``fits.parquet`` and the report."""
    config = load_config(config_path)
    text = Path(config_path).read_text(encoding="utf-8")
    if resume is None:
        run_dir = Path(results_root) / config.name / storage.new_run_id()
        run_dir.mkdir(parents=True)
        storage.write_text(run_dir / storage.CONFIG_FILE, text)
    else:
        run_dir = Path(resume)
        stored = run_dir / storage.CONFIG_FILE
        if not stored.is_file():
            raise StudyConfigError(f"{run_dir}: not a run folder (no {storage.CONFIG_FILE})")
        stored_raw = yaml.safe_load(stored.read_text(encoding="utf-8"))
        if not isinstance(stored_raw, dict) or _numeric(stored_raw) != _numeric(config.raw):
            raise StudyConfigError(
                f"{run_dir}: its {storage.CONFIG_FILE} differs from {config_path}; a resumed run must use the same "
                "config (start a new run, or copy the stored config back)"
            )
    with storage.RunLock(run_dir):
        finished = storage.finished_parts(run_dir)
        if (run_dir / storage.TABLE_FILE).is_file():
            finished |= {_cell_name({"name": a}, n) for a, n in
                         pd.read_parquet(run_dir / storage.TABLE_FILE)[["arm", "n"]].drop_duplicates().itertuples(index=False)}
        pending = [(arm, n) for n in config.sample_sizes for arm in config.arms if _cell_name(arm, n) not in finished]
        if pending or storage.finished_parts(run_dir):
            _compute(config, run_dir, pending)
    report(run_dir)
    return run_dir


def _compute(config: StudyConfig, run_dir: Path, pending: list) -> None:
    """Run the pending cells (each stored as a part at once), then merge every part into the table.

    A session is recorded in ``meta.json`` with its cell count and seconds; sessions still marked
    running from an earlier process (killed or interrupted) are marked ``interrupted``.
    """
    meta = storage.read_meta(run_dir) or {"name": config.name, "sessions": [], "environment": storage.environment(),
                                           "git": storage.git_state()}
    for earlier in meta["sessions"]:
        if earlier.get("status", "running") == "running":
            earlier["status"] = "interrupted"
    session = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "running", "cells": 0, "seconds": 0.0}
    meta["sessions"].append(session)
    storage.write_meta(run_dir, meta)
    started = time.perf_counter()
    for arm, n in pending:
        name = _cell_name(arm, n)
        frame = _run_cell(config, arm, n)
        storage.write_part(run_dir, name, frame)
        session["cells"] += 1
        session["seconds"] = time.perf_counter() - started
        storage.write_meta(run_dir, meta)
        print(f"{name}: {frame['converged'].mean():.0%} converged, {frame['cell_seconds'].iloc[0]:.1f} s", flush=True)
    frames = [pd.read_parquet(run_dir / storage.TABLE_FILE)] if (run_dir / storage.TABLE_FILE).is_file() else []
    parts = storage.read_parts(run_dir)
    if parts is not None:
        frames.append(parts)
    # A crash between writing the table and removing the parts leaves a cell in both: keep one copy.
    table = pd.concat(frames, ignore_index=True).drop_duplicates(["arm", "n", "replicate"])
    table = table.sort_values(["arm", "n", "replicate"], kind="stable").reset_index(drop=True)
    storage.merge_table(run_dir, table)
    session["status"] = "finished"
    storage.write_meta(run_dir, meta)



# ----------------------------------------------------------------------------------------------
# The report.


def _comparable_blocks(config: StudyConfig, arm: Mapping, reference: Mapping) -> set[str]:
    """The parameter blocks whose errors mean the same in both arms: every expert or attention block,
    and a gate field only where both arms score with the same gate (a Laplace β₁ is a location, a
    softmax β₁ a slope)."""
    problem, _ = _problem(config, arm)
    other, _ = _problem(config, reference)
    if config.kind == "attention":
        return {"score", "value"}
    if config.kind == "regression":
        blocks = {field.name for field in problem.true_family.expert.fields} | {"used_expert", "function"}
        gates = {(p.fitted_family.gate_type, p.true_family.gate_type, p.true_family.score) for p in (problem, other)}
        if len(gates) == 1 and problem.fitted_family.gate_type == problem.true_family.gate_type:
            blocks |= {field.name for field in problem.fitted_family.gate.fields if field.role != "offset"}
        return blocks
    blocks = {field.name for field in problem.true_family.expert.fields}
    if problem.true_family.inner_gate.score == other.true_family.inner_gate.score:
        blocks |= {field.name for field in problem.true_family.inner_gate.fields}
    return blocks


def _series(table: pd.DataFrame, arm: str, column: str) -> pd.DataFrame:
    rows = table[(table["arm"] == arm) & table["finite"]]
    return rows[["n", "replicate", column]].rename(columns={column: "value"})


def report(run_dir: str | Path, n_boot: int = 1000) -> Path:
    """Write ``rates.csv``, ``cells.csv``, ``complexity.csv``, the figures and ``report.md`` of a run."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / storage.CONFIG_FILE)
    table = pd.read_parquet(run_dir / storage.TABLE_FILE)
    # Every error family (expert_error, score_error, a_error, ...) gets its worst over the true experts.
    families = sorted({c.rsplit("_", 1)[0] for c in table.columns if c.endswith(tuple("0123456789")) and "_error_" in c})
    for family in families:
        columns = [c for c in table.columns if c.rsplit("_", 1)[0] == family and c.rsplit("_", 1)[1].isdigit()]
        table[f"{family}_worst"] = table[columns].max(axis=1, skipna=False)
    error_columns = sorted(c for c in table.columns if c.startswith("expert_error_") and c != "expert_error_worst")
    measured = error_columns + [f"{family}_worst" for family in families]
    if "voronoi_loss_0" in table.columns:
        measured.append("voronoi_loss_0")
    arm_names = [arm["name"] for arm in config.arms]

    # A finite fit whose Voronoi cells leave a true expert empty has no worst error (NaN): it is left
    # out of the rates, and counted here so that the omission shows.
    table["lost_expert"] = table["finite"] & table["expert_error_worst"].isna()
    # A fit whose objective on its own data is below the truth's cannot be the global optimum: the
    # fraction at or above it says how much of the error is the estimator's, not the optimiser's.
    if "truth_objective" in table.columns:
        beats = table["finite"] & (table["objective"] >= table["truth_objective"])
        represented = {arm["name"]: getattr(_problem(config, arm)[0], "truth_in_model", True) for arm in config.arms}
        table["beats_truth"] = beats.astype(float).where(table["arm"].map(represented), np.nan)
    cells = table.groupby(["arm", "n"], sort=False).agg(
        fits=("converged", "size"), converged=("converged", "mean"), finite=("finite", "mean"),
        lost_expert=("lost_expert", "sum"),
        median_iterations=("n_iter", "median"), seconds=("cell_seconds", "first"),
        mean_worst_error=("expert_error_worst", "mean"), median_worst_error=("expert_error_worst", "median"),
        **({"beats_truth": ("beats_truth", "mean")} if "beats_truth" in table.columns else {}),
        **({"at_bound": ("at_bound_0", "mean")} if "at_bound_0" in table.columns else {}),
    ).reset_index()
    cells.to_csv(run_dir / "cells.csv", index=False)

    rates = []
    for arm in arm_names:
        for column in measured:
            series = _series(table, arm, column)
            row = {"arm": arm, "quantity": column, "preferred_law": "insufficient data", "aic_power_minus_log": np.nan,
                   **{f"{what}_{statistic}": np.nan for what in ("slope", "ci_low", "ci_high") for statistic in ("mean", "median")}}
            try:
                for statistic in ("mean", "median"):
                    fit = fit_rate(series, statistic=statistic, n_boot=n_boot)
                    row.update({f"slope_{statistic}": fit.slope, f"ci_low_{statistic}": fit.ci_low,
                                f"ci_high_{statistic}": fit.ci_high})
                laws = compare_power_vs_log(series, statistic="median")
                row.update({"preferred_law": laws.preferred, "aic_power_minus_log": laws.aic_difference,
                            "log_exponent": laws.log_exponent})
            except ValueError:
                pass  # fewer than 3 sizes with finite values: the row says "insufficient data"
            rates.append(row)
    rates = pd.DataFrame(rates)
    rates.to_csv(run_dir / "rates.csv", index=False)

    ratios, contrasts = [], []
    by_name = {arm["name"]: arm for arm in config.arms}
    for arm in config.arms:
        against = arm.get("compare_to", config.reference)
        if arm["name"] == against:
            continue
        reference = _series(table, against, "expert_error_worst")
        reference_median = reference.groupby("n")["value"].median()
        epsilons = np.geomspace(reference_median.min() * 1.05, reference_median.max() * 0.95, 4)
        try:
            ratio = sample_complexity_ratio(reference, _series(table, arm["name"], "expert_error_worst"), "value",
                                            epsilons, statistic="median", n_boot=n_boot)
        except ValueError:
            continue  # an arm without finite values at enough sizes has no curve to compare
        ratio.insert(0, "reference", against)
        ratio.insert(0, "arm", arm["name"])
        ratios.append(ratio)
        comparable = _comparable_blocks(config, arm, by_name[against])
        for quantity in ["expert_error_worst"] + [q for q in measured if q.endswith("_worst") and q != "expert_error_worst"
                                                  and q.removesuffix("_error_worst") in comparable]:
            try:
                contrast = slope_difference(_series(table, against, quantity), _series(table, arm["name"], quantity),
                                            "value", statistic="median", n_boot=n_boot)
            except ValueError:
                continue
            contrasts.append({"arm": arm["name"], "reference": against, "quantity": quantity,
                              "slope_reference": contrast.slope_a, "slope_arm": contrast.slope_b,
                              "difference": contrast.difference, "ci_low": contrast.ci_low, "ci_high": contrast.ci_high,
                              "paired": contrast.paired})
    ratios = pd.concat(ratios, ignore_index=True) if ratios else pd.DataFrame()
    ratios.to_csv(run_dir / "complexity_ratios.csv", index=False)
    contrasts = pd.DataFrame(contrasts)
    contrasts.to_csv(run_dir / "contrasts.csv", index=False)
    # One ε grid for every arm's curve, spanning all arms' median errors, so the curves share axes.
    medians = table[table["finite"]].groupby(["arm", "n"])["expert_error_worst"].median()
    epsilons = np.geomspace(medians.min() * 1.05, medians.max() * 0.95, 12)
    curves = []
    for arm in arm_names:
        curve = sample_complexity_curve(_series(table, arm, "expert_error_worst"), "value", epsilons, statistic="median", n_boot=n_boot)
        curves.append(pd.DataFrame({"arm": arm, "epsilon": curve.epsilon, "n": curve.n, "lower": curve.lower,
                                    "upper": curve.upper, "status": curve.status}))
    curves = pd.concat(curves, ignore_index=True)
    curves.to_csv(run_dir / "complexity.csv", index=False)
    _figures(run_dir, config, table, arm_names, curves)
    _write_report(run_dir, config, cells, rates, ratios, contrasts)
    return run_dir


def _figures(run_dir: Path, config: StudyConfig, table: pd.DataFrame, arm_names: Sequence[str], curves: pd.DataFrame) -> None:
    """``expert_error``: the median worst expert error against n per arm (IQR band); ``sample_complexity``:
    n(ε) per arm with its bootstrap band, where ε is reached inside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = run_dir / storage.FIGURES_DIR
    figures.mkdir(exist_ok=True)
    fig, (errors_ax, complexity_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in arm_names:
        series = _series(table, arm, "expert_error_worst").groupby("n")["value"]
        median, low, high = series.median(), series.quantile(0.25), series.quantile(0.75)
        line = errors_ax.loglog(median.index, median.values, marker="o", label=arm,
                                linestyle="--" if "over" in arm else "-")[0]
        errors_ax.fill_between(median.index, low.values, high.values, color=line.get_color(), alpha=0.12)
        curve = curves[(curves["arm"] == arm) & np.isfinite(curves["n"]) & (curves["status"] == "interpolated")]
        if len(curve):
            complexity_ax.loglog(curve["epsilon"], curve["n"], marker="o", color=line.get_color(), label=arm,
                                 linestyle=line.get_linestyle())
            upper = np.where(np.isfinite(curve["upper"]), curve["upper"], np.nan)
            complexity_ax.fill_between(curve["epsilon"], curve["lower"], upper, color=line.get_color(), alpha=0.12)
    errors_ax.set_xlabel("sample size n")
    errors_ax.set_ylabel("worst expert error (median, IQR band)")
    complexity_ax.set_xlabel("target ε (median worst expert error)")
    complexity_ax.set_ylabel("n(ε), 95% bootstrap band")
    for ax, title in ((errors_ax, config.name), (complexity_ax, "sample complexity")):
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "expert_error.png", dpi=130)
    # No creation date in the PDF, so a redrawn figure of the same table is the same file.
    fig.savefig(figures / "expert_error.pdf", metadata={"CreationDate": None})
    plt.close(fig)


DECISIVE_AIC = 2.0
"""|AIC(power) − AIC(log)| below which the report names neither law."""


def _law(rate) -> str:
    if not np.isfinite(rate["aic_power_minus_log"]):
        return rate["preferred_law"]  # "insufficient data"
    return rate["preferred_law"] if abs(rate["aic_power_minus_log"]) >= DECISIVE_AIC else "neither"


def _interval(low: float, high: float) -> str:
    return f"[{low:.2f}, {high:.2f}]"


def _write_report(run_dir: Path, config: StudyConfig, cells, rates, ratios, contrasts) -> None:
    meta = storage.read_meta(run_dir)
    worst_quantities = [q for q in rates["quantity"].unique()
                        if (q.endswith("_worst") and q != "expert_error_worst") or q == "voronoi_loss_0"]
    seconds = sum(session.get("seconds", 0.0) for session in meta.get("sessions", []))
    lines = [f"# {config.name}", "", config.claim, "",
             f"Sizes {list(config.sample_sizes)}, {config.replicates} replicates, seed {config.seed}; "
             f"compute {seconds / 60:.1f} min over {len(meta.get('sessions', []))} session(s).", "",
             "## Arms", "", "| arm | settings | converged | finite | slope (median) [95% CI] | slope (mean) [95% CI] | law (AIC) |",
             "|---|---|---|---|---|---|---|"]
    for arm in config.arms:
        name = arm["name"]
        settings = ", ".join(f"{k}={v}" for k, v in arm.items() if k != "name")
        arm_cells = cells[cells["arm"] == name]
        rate = rates[(rates["arm"] == name) & (rates["quantity"] == "expert_error_worst")].iloc[0]
        lines.append(
            f"| {name} | {settings} | {arm_cells['converged'].mean():.0%} | {arm_cells['finite'].mean():.0%} | "
            f"{rate['slope_median']:.3f} {_interval(rate['ci_low_median'], rate['ci_high_median'])} | "
            f"{rate['slope_mean']:.3f} {_interval(rate['ci_low_mean'], rate['ci_high_mean'])} | "
            f"{_law(rate)} ({rate['aic_power_minus_log']:+.1f}) |"
        )
    if config.kind == "regression":
        lines += ["", "## What the theory says per arm", "", "| arm | data → fit | expectation |", "|---|---|---|"]
        for arm in config.arms:
            problem, _ = _problem(config, arm)
            lines.append(f"| {arm['name']} | {problem.true_family.describe()} → {problem.fitted_family.describe()} | "
                         f"{regression.expectation(problem.true_family, problem.fitted_family)} |")
        if "at_bound" in cells.columns and config.raw.get("fit", {}).get("bound") is not None:
            lines += ["", f"Fits with a coordinate on the box |θ| = {config.raw.get('fit', {}).get('bound')}: "
                      f"{cells['at_bound'].mean():.0%} over all cells (per cell in the table below)."]
    if "beats_truth" in cells.columns:
        lines += ["", f"Fits whose objective on their own data is at least the truth's (`beats_truth`): "
                  f"{cells['beats_truth'].mean():.0%} over the cells of arms whose model contains the truth "
                  "(blank for the others, where the truth is out of reach). Such a fit below the truth has not "
                  "found the global optimum, so there part of the error is the optimiser's."]
    lines += ["", "Law: the AIC-preferred of a power law and 1/log(n)^λ for the median worst expert error "
              f"(AIC(power) − AIC(log) in brackets; positive favours the log law), 'neither' when |ΔAIC| < {DECISIVE_AIC:g}: "
              "both laws have two parameters, and over one or two decades of n they can fit equally well.", "",
              "## Parameter errors", "",
              "Slope of the median (over replicates) of the worst error over the true experts, with its 95% CI, "
              "and the AIC-preferred law.", "",
              "| arm | " + " | ".join(q.removesuffix("_worst").removesuffix("_0") for q in worst_quantities) + " |",
              "|---|" + "---|" * len(worst_quantities)]
    for arm in config.arms:
        cells_text = []
        for quantity in worst_quantities:
            rate = rates[(rates["arm"] == arm["name"]) & (rates["quantity"] == quantity)].iloc[0]
            cells_text.append(f"{rate['slope_median']:.2f} {_interval(rate['ci_low_median'], rate['ci_high_median'])} "
                              f"{_law(rate)}")
        lines.append(f"| {arm['name']} | " + " | ".join(cells_text) + " |")
    lines += ["",
              "## Sample complexity against the compared arm", "",
              "n(ε) is the smallest n from which the median worst expert error stays ≤ ε (interpolated on log "
              "scales); the ratio is n_arm(ε)/n_reference(ε), < 1 when the arm needs fewer samples.", "",
              "| arm | reference | ε | n(ε) reference | n(ε) arm | ratio [95% CI] | statuses |", "|---|---|---|---|---|---|---|"]
    for row in ratios.itertuples(index=False):
        lines.append(f"| {row.arm} | {row.reference} | {row.epsilon:.3g} | {row.n_a:.0f} | {row.n_b:.0f} | {row.ratio:.2f} "
                     f"{_interval(row.ratio_low, row.ratio_high)} | {row.status_a}/{row.status_b} |")
    lines += ["", "## Slope contrasts against the compared arm", "",
              "Δ = slope(arm) − slope(reference) of the median worst error, with a paired bootstrap 95% CI "
              "(the arms share their input and noise draws); Δ < 0 with a CI below 0 means the arm's error falls faster. "
              "Gate-parameter blocks are compared only between arms whose gates give them the same meaning "
              "(β₁ is a slope under a softmax score and a location under a Laplace score).", "",
              "| arm | reference | quantity | slope reference | slope arm | Δ [95% CI] |", "|---|---|---|---|---|---|"]
    for row in contrasts.itertuples(index=False):
        lines.append(f"| {row.arm} | {row.reference} | {row.quantity.removesuffix('_worst')} | {row.slope_reference:.2f} | "
                     f"{row.slope_arm:.2f} | {row.difference:+.2f} {_interval(row.ci_low, row.ci_high)} |")
    lines += ["", "## Cells", "", "| " + " | ".join(cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    for row in cells.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    lines.append("")
    storage.write_text(run_dir / storage.REPORT_FILE, "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_theory.structured", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a structured-study YAML config (configs/paper7_gated_attention.yaml, ...)")
    parser.add_argument("--resume", help="a run folder of this config to complete")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    args = parser.parse_args(argv)
    try:
        run_dir = run(args.config, args.results, args.resume)
    except (StudyConfigError, storage.RunFolderError) as error:
        print(f"error: {error}")
        return 2
    print(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
