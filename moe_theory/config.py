"""Study configs: YAML files that describe a rate study, validated into frozen dataclasses.

A config names a true model, an input distribution, the sample sizes, the number of replicates,
how to fit (the fitted k and the estimator) and what to measure. :func:`load_config` reads one,
applies ``--set key.path=value`` overrides, fills in defaults and checks everything before any
work starts. Every error is a :class:`ConfigError` whose message names the file, the line where
the YAML has one, the key path (``model.params.expert.nu``) and what was expected, e.g.::

    configs/quickstart.yaml:17: model.params.expert.nu: expected shape (2,) (k), got (3,) ...

Conventions
-----------
* **Unknown keys are errors**, in every section; so are duplicated keys in the YAML, YAML aliases
  (``*name``, which can expand a small file without bound) and a file that is not UTF-8.
* **Limits.** Values no study needs are refused here, before any work: n above 1e8, more than
  10,000 sample sizes (checked before a ``linspace`` is expanded), more than 1e6 replicates, a
  ``sweep.bucket_growth`` above 100, seeds of 2^63 or more, names over 100 characters, other
  integers beyond int32, and inputs that are constant (:mod:`moe_theory.resources` holds the caps
  and the memory plan ``moe-theory run`` checks next).
* **Grid axes.** ``fit.num_experts``, ``fit.method``, ``fit.init``, ``fit.n_init`` and
  ``fit.gate_steps`` accept a value or a list; the lists expand to the Cartesian product of
  *fit groups* (:class:`FitGroup`). Every group is fitted at every sample size, for every replicate.
* **Sample sizes** are an explicit list of numbers, a spec ``{linspace: [start, stop, num]}`` or
  ``{geomspace: [start, stop, num]}`` (NumPy's meaning, endpoints included), or a list mixing
  both, concatenated in order (paper 1 uses ``[{linspace: [100, 900, 5]}, {linspace: [1000, 1e5,
  195]}]``). Each value is rounded to the nearest integer, halves rounded up; repeated integers
  are kept once; the result is sorted ascending. Each n must be ≥ 2.
* **Numbers.** PyYAML reads ``1e-6`` (no dot) as a string; any field that expects a number accepts
  such strings. An integer field accepts an integral float (``1e5``).
* **Validation of the model** uses :func:`moe_theory.model_from_dict`, whose messages name the
  parameter; they are re-rooted under ``model.`` here. Every fitted k must be ≥ k*.
* **Metrics.** Losses are named Voronoi losses (docs/losses.md, :mod:`moe_theory.losses`):
  ``D1`` (exact-fitted, every exponent 1, only for groups with k = k*), ``D2`` (over-fitted, the
  family's default exponent table), or a custom name with ``exponents:`` naming a table of
  :data:`moe_theory.losses.EXPONENT_TABLES`. Each loss can be computed under several translations
  (``infimum``, ``mass``, ``none``); the column for ``metrics.translation`` (default ``infimum``) is
  the loss's plain name (``D2``), any other translation gets a suffix (``D2_none``).
* **Top-K fits.** ``fit.top_k`` sets the number K̄ of active experts of the fitted top-K gate when it
  differs from the true K (an over-specified fit whose K̄ covers the true top-K cells [2]); the
  density distances then compare the two gates as they are. ``fit.selection_schedule`` (decreasing
  temperatures) fits a top-K gate by the dense-to-sparse continuation of docs/estimators.md.
* **A compact parameter set.** ``fit.bound: B`` fits the MLE over the box of unconstrained
  coordinates in [−B, B] (docs/estimators.md), for experts fitted by Newton steps and the methods
  ``em``, ``squarem`` and ``em_newton``; the box must hold the truth.
* **Per-parameter errors** (``metrics.parameter_errors``) are measured at the ``mass``
  translation by default, whatever the losses use: t₁ = 0 keeps the gate slopes in the canonical
  frame (reference expert at 0) in which they are identified, and t₀ matches the total mass so that
  over-fitted cell masses are comparable. The ``infimum`` translation is a poor frame for them: its
  t₁ minimises a weighted sum of slope norms, whose minimiser puts one fitted slope exactly on a
  true one, so all the slope error lands on the other atoms (and zero errors cannot be fitted on a
  log scale).
* **Theory.** ``rates.theory`` names a family of :func:`moe_theory.rates.theoretical_rate`'s
  registry; ``rates.compare`` pins explicit (setting, quantity) keys for given metrics.

* **Arms.** A config may list ``arms:``, named variants of the study that compare two or more
  models or fits (the sigmoid against the softmax gate, a fitted temperature against none). Each
  arm overrides some of the base keys ``description``, ``model``, ``inputs``, ``fit``, ``metrics``
  and ``rates``; mappings merge key by key, except a gate or expert spec, a parameter group
  (``model.params.gate``) and ``inputs``, which an arm replaces whole. Arms share ``name``,
  ``seed``, ``sample_sizes``, ``replicates`` and ``sweep``; an arm that sets one of them is an
  error. Since the data keys depend on the seed, n and the replicate alone, arms with the same true
  model and inputs see the same datasets (common random numbers), and their contrasts are
  measured paired. The optional ``comparison:`` section says what to compare (see
  :class:`ComparisonSettings`). :func:`load_config` then returns an :class:`ArmsStudy`.

The resolved config (:meth:`StudyConfig.to_dict`) has every default filled in and the sample sizes
expanded; loading it again gives an equal config, which is how ``--resume`` checks that a run is
continued with the settings it started with.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from .experts import GaussianLinear
from .fit.em import check_bound, check_joint_likelihood
from .fit.settings import EM_DEFAULTS, FIT_DEFAULTS, LIKELIHOODS, METHODS
from .gates import GATES, Gate
from .init import NearTruthNoise
from .losses import EXPONENT_TABLES, TRANSLATIONS, atom_spec
from .metrics import metric_specs
from .models import Family, canonicalize, model_from_dict
from .params import MoEParams, ParameterError, unconstrain
from .rates import UnknownTheoreticalRateError, list_theoretical_rates, theoretical_rate
from .resources import (
    MAX_BUCKET_GROWTH,
    MAX_CONFIG_BYTES,
    MAX_COUNT,
    MAX_NAME_LENGTH,
    MAX_REPLICATES,
    MAX_SAMPLE_SIZE,
    MAX_SAMPLE_SIZE_COUNT,
    MAX_SEED,
)
from .sampling import GridInputs, InputDistribution, NormalInputs, UniformInputs, make_inputs

__all__ = [
    "ArmsStudy",
    "ComparisonSettings",
    "ConfigError",
    "DensitySpec",
    "FitGroup",
    "FitSettings",
    "LossSpec",
    "MetricSelector",
    "MetricsConfig",
    "RatesConfig",
    "StudyConfig",
    "SweepSettings",
    "TheoryComparison",
    "apply_overrides",
    "expand_sample_sizes",
    "load_config",
    "parse_config",
    "read_yaml",
]

GRID_AXES = ("num_experts", "method", "init", "n_init", "gate_steps")
"""Keys of ``fit`` that may be lists; their product is the set of fit groups."""

INITS = ("near_truth", "random")
DTYPES = ("float64", "float32")
DISTANCES = ("hellinger", "tv")
STATISTICS = ("mean", "median")
EXPERT_ERROR_INPUTS = 200
"""Default number of x draws of the expert estimation errors (``metrics.expert_errors: true``)."""
PARAMETER_TRANSLATION = "mass"
"""Default translation of per-parameter errors (see the module docstring)."""
BUILTIN_LOSSES = {"D1": "first_order", "D2": None}
"""Built-in loss names and their exponent table (None: the family's default over-fitted table)."""

_RESERVED_COLUMNS = frozenset(DISTANCES + GRID_AXES + ("group", "n", "replicate", "bucket", "converged", "finite"))
"""Names a custom loss cannot take, because the results table already has such a column."""

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A config is invalid. The message names the file, line, key path and what was expected."""


# ----------------------------------------------------------------------------------------------
# Reading YAML with the line of every key.


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``).

    An alias makes a small file stand for an unbounded document: nine nested anchors of ten aliases
    each ("billion laughs") expand to 10⁹ values when the config is walked, copied or validated, and
    an alias inside its own anchor makes a cyclic value (RecursionError). No config needs one, so
    the first alias is refused with its line, before anything is expanded."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"line {event.start_mark.line + 1}: YAML alias *{event.anchor} is not allowed in a config "
                "(aliases can expand a small file without bound); write the value out instead"
            )
        return super().compose_node(parent, index)


def read_yaml(text: str) -> Any:
    """Parse YAML ``text`` with the safe loader, refusing aliases (see :class:`_NoAliasLoader`).

    Raises :class:`ConfigError` (``line N: ...``) for an alias or a document nested too deeply to
    parse, and ``yaml.YAMLError`` for text that is not YAML."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply to read") from None


def _key_lines(text: str) -> dict[str, int]:
    """Map every key path in a YAML document to its 1-based line; raise on duplicated keys."""
    lines: dict[str, int] = {}
    root = yaml.compose(text, Loader=_NoAliasLoader)

    def walk(node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child = f"{path}.{key}" if path else key
                if key in seen:
                    raise ConfigError(f"line {key_node.start_mark.line + 1}: {child}: duplicated key")
                seen.add(key)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = f"{path}[{index}]"
                lines[child] = item.start_mark.line + 1
                walk(item, child)

    if root is not None:
        walk(root, "")
    return lines


class _Context:
    """Where a config came from, to put file, line and override into every error message."""

    def __init__(self, source: str, lines: Mapping[str, int] | None = None, overridden: Sequence[str] = ()):
        self.source = source
        self.lines = dict(lines or {})
        self.overridden = tuple(overridden)

    def error(self, path: str, message: str) -> ConfigError:
        """An error about the value at ``path``, e.g. ``file.yaml:12: fit.tol: expected a number``."""
        return self.error_text(path, f"{path or '<top level>'}: {message}")

    def error_text(self, path: str, text: str) -> ConfigError:
        """An error whose text already names the key; ``path`` only locates the line."""
        for override in self.overridden:
            if path == override or path.startswith((override + ".", override + "[")):
                return ConfigError(f"{self.source} (set by --set {override}): {text}")
        probe = path
        while probe and probe not in self.lines:
            probe = _parent_path(probe)
        line = f":{self.lines[probe]}" if probe else ""
        return ConfigError(f"{self.source}{line}: {text}")


def _parent_path(path: str) -> str:
    """``a.b[2]`` -> ``a.b`` -> ``a`` -> ``''``."""
    match = re.search(r"(\.[^.\[]+|\[\d+\])$", path)
    return path[: match.start()] if match else ""


# ----------------------------------------------------------------------------------------------
# Typed getters.


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _mapping(ctx: _Context, value: Any, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise ctx.error(path, f"expected a mapping of keys to values, got {_describe(value)}")
    return dict(value)


def _check_keys(ctx: _Context, mapping: Mapping, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ctx.error(where, f"unknown key; expected one of {sorted(allowed)}")
    for key in required:
        if key not in mapping:
            where = f"{path}.{key}" if path else key
            raise ctx.error(where, "missing required key")


def _number(ctx: _Context, value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise ctx.error(path, f"expected a number, got {_describe(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # PyYAML reads "1e-6" as a string
        except ValueError:
            pass
    raise ctx.error(path, f"expected a number, got {_describe(value)}")


def _float(ctx: _Context, value: Any, path: str, minimum: float | None = None, strict: bool = False,
           maximum: float | None = None) -> float:
    number = _number(ctx, value, path)
    if not math.isfinite(number):
        raise ctx.error(path, f"expected a finite number, got {value!r}")
    if minimum is not None and (number < minimum or (strict and number == minimum)):
        raise ctx.error(path, f"expected a number {'>' if strict else '≥'} {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ctx.error(path, f"expected a number ≤ {maximum:g}, got {value!r}")
    return number


def _int(ctx: _Context, value: Any, path: str, minimum: int | None = None, maximum: int | None = MAX_COUNT) -> int:
    """An integer in [minimum, maximum] (None: no bound). The default ceiling is JAX's int32 range,
    in which the programs count iterations, starts and draws; keys with a lower cap pass their own."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value  # exact, however large (a float would round seeds beyond 2^53)
    else:
        real = _number(ctx, value, path)
        if not math.isfinite(real) or real != int(real):
            raise ctx.error(path, f"expected an integer, got {_describe(value)}")
        number = int(real)
    if minimum is not None and number < minimum:
        raise ctx.error(path, f"expected an integer ≥ {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ctx.error(path, f"expected an integer ≤ {maximum}, got {value!r}")
    return number


def _bool(ctx: _Context, value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(path, f"expected true or false, got {_describe(value)}")
    return value


def _choice(ctx: _Context, value: Any, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ctx.error(path, f"expected one of {list(choices)}, got {_describe(value)}")
    return value


def _one_or_many(ctx: _Context, value: Any, path: str, parse: Callable[[Any, str], Any]) -> tuple:
    """A scalar or a non-empty list of distinct values, each parsed by ``parse(value, path)``."""
    if isinstance(value, list):
        if not value:
            raise ctx.error(path, "expected a value or a non-empty list, got []")
        parsed = tuple(parse(item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(set(parsed)) != len(parsed):
            raise ctx.error(path, f"expected distinct values, got {value!r}")
        return parsed
    return (parse(value, path),)


# ----------------------------------------------------------------------------------------------
# Sample sizes.


def expand_sample_sizes(spec: Any, ctx: _Context | None = None, path: str = "sample_sizes") -> tuple[int, ...]:
    """Expand a sample-size spec (see the module docstring) into sorted distinct integers ≥ 2."""
    ctx = ctx or _Context("<sample_sizes>")
    values: list[float] = []

    def expand_one(item: Any, where: str) -> None:
        if isinstance(item, Mapping):
            _check_keys(ctx, item, where, ("linspace", "geomspace"))
            if len(item) != 1:
                raise ctx.error(where, "expected exactly one of 'linspace' or 'geomspace'")
            (kind, arguments), = item.items()
            where = f"{where}.{kind}"
            if not isinstance(arguments, list) or len(arguments) != 3:
                raise ctx.error(where, f"expected [start, stop, num], got {_describe(arguments)}")
            start = _float(ctx, arguments[0], f"{where}[0]", minimum=0, strict=kind == "geomspace", maximum=MAX_SAMPLE_SIZE)
            stop = _float(ctx, arguments[1], f"{where}[1]", minimum=0, strict=kind == "geomspace", maximum=MAX_SAMPLE_SIZE)
            # Checked before expanding: a count of 1e8 would exhaust memory in np.linspace itself.
            num = _int(ctx, arguments[2], f"{where}[2]", minimum=1, maximum=MAX_SAMPLE_SIZE_COUNT)
            if len(values) + num > MAX_SAMPLE_SIZE_COUNT:
                raise ctx.error(path, f"expands to more than {MAX_SAMPLE_SIZE_COUNT} sample sizes")
            spaced = np.linspace(start, stop, num) if kind == "linspace" else np.geomspace(start, stop, num)
            values.extend(float(v) for v in spaced)
        else:
            values.append(_float(ctx, item, where, minimum=0, maximum=MAX_SAMPLE_SIZE))
            if len(values) > MAX_SAMPLE_SIZE_COUNT:
                raise ctx.error(path, f"expected at most {MAX_SAMPLE_SIZE_COUNT} sample sizes")

    if isinstance(spec, list):
        if not spec:
            raise ctx.error(path, "expected at least one sample size")
        if len(spec) > MAX_SAMPLE_SIZE_COUNT:
            raise ctx.error(path, f"expected at most {MAX_SAMPLE_SIZE_COUNT} sample sizes, got a list of {len(spec)}")
        for index, item in enumerate(spec):
            expand_one(item, f"{path}[{index}]")
    else:
        expand_one(spec, path)
    rounded = [int(math.floor(v + 0.5)) for v in values]
    small = [n for n in rounded if n < 2]
    if small:
        raise ctx.error(path, f"expected sample sizes ≥ 2 after rounding, got {small[:5]}")
    return tuple(sorted(dict.fromkeys(rounded)))


# ----------------------------------------------------------------------------------------------
# The dataclasses.


@dataclass(frozen=True)
class LossSpec:
    """One Voronoi loss. ``exponents`` is a table name (None: the family's over-fitted default)."""

    name: str
    exponents: str | None
    translations: tuple[str, ...]
    exact_only: bool

    def columns(self, default_translation: str) -> tuple[tuple[str, str], ...]:
        """(column name, translation) pairs; the default translation gets the plain name."""
        return tuple(
            (self.name if translation == default_translation else f"{self.name}_{translation}", translation)
            for translation in self.translations
        )


@dataclass(frozen=True)
class DensitySpec:
    """Density distances E_x[H], E_x[TV] of :func:`moe_theory.losses.density_distances`."""

    distances: tuple[str, ...] = DISTANCES
    num_inputs: int = 200
    grid_size: int = 16
    num_quadrature: int = 6


@dataclass(frozen=True)
class MetricsConfig:
    losses: tuple[LossSpec, ...]
    translation: str
    parameter_errors: bool
    parameter_translation: str
    density: DensitySpec | None
    expert_errors: int | None = None
    """Number of x draws of the expert estimation errors (:func:`moe_theory.losses.expert_errors`), or None."""

    def loss_columns(self, exact: bool) -> tuple[tuple[LossSpec, str, str], ...]:
        """(loss, column, translation) of every loss that applies to a group (``exact``: k = k*)."""
        return tuple(
            (loss, column, translation)
            for loss in self.losses
            if exact or not loss.exact_only
            for column, translation in loss.columns(self.translation)
        )


@dataclass(frozen=True)
class FitSettings:
    """Estimator settings shared by every fit group (the grid axes live in the groups)."""

    num_experts: tuple[int, ...]
    method: tuple[str, ...]
    init: tuple[str, ...]
    n_init: tuple[int, ...]
    gate_steps: tuple[int, ...]
    near_truth: NearTruthNoise
    assignment: tuple[int, ...] | None  # true atom of each fitted atom in near-truth starts (None: the default)
    tol: float
    max_iter: int
    expert_steps: int
    inner_tol: float
    max_halvings: int
    variance_floor: float
    likelihood: str
    top_k: int | None
    selection_schedule: tuple[float, ...]
    bound: float | None  # the compact parameter set [−B, B] of EMConfig.bound (None: unbounded)
    dtype: str


@dataclass(frozen=True)
class FitGroup:
    """One point of the grid of fit settings.

    ``group_id`` and ``init_id`` are stable 32-bit integers (CRC-32 of canonical JSON), used as
    ``fold_in`` data: ``init_id`` depends only on what changes the starting points (k, init
    protocol, n_init), so for example EM and MLE groups start from the same points.
    """

    index: int
    num_experts: int
    method: str
    init: str
    n_init: int
    gate_steps: int
    label: str

    def axes(self) -> dict[str, Any]:
        return {axis: getattr(self, axis) for axis in GRID_AXES}

    @property
    def group_id(self) -> int:
        return zlib.crc32(json.dumps(self.axes(), sort_keys=True).encode())

    @property
    def init_id(self) -> int:
        spec = {"num_experts": self.num_experts, "init": self.init, "n_init": self.n_init}
        return zlib.crc32(json.dumps(spec, sort_keys=True).encode())


@dataclass(frozen=True)
class TheoryComparison:
    """Compare ``metric`` (a column name or glob) with the registry entry (family, setting, quantity)."""

    metric: str
    num_experts: int | None
    family: str
    setting: str
    quantity: str


@dataclass(frozen=True)
class RatesConfig:
    theory: str | None
    statistic: str
    n_boot: int
    ci: float
    tolerance: float
    min_n: int
    metrics: tuple[str, ...] | None
    compare: tuple[TheoryComparison, ...]


@dataclass(frozen=True)
class SweepSettings:
    """Execution settings. ``batch_size`` replicates go through one program call; results are
    bit-reproducible for a fixed ``batch_size``. ``bucket_growth`` is the ratio of the padded
    sample-size ladder (1 = no padding, one program per n)."""

    batch_size: int = 8
    bucket_growth: float = 2.0


@dataclass(frozen=True)
class StudyConfig:
    name: str
    description: str
    seed: int
    model: dict = field(compare=False)
    inputs_spec: Any = field(compare=False)
    inputs: InputDistribution
    sample_sizes: tuple[int, ...]
    replicates: int
    fit: FitSettings
    metrics: MetricsConfig
    rates: RatesConfig
    sweep: SweepSettings
    true_family: Family
    truth: MoEParams = field(compare=False)
    source: str = field(default="<dict>", compare=False)

    @property
    def num_true(self) -> int:
        return self.true_family.num_experts

    @property
    def groups(self) -> tuple[FitGroup, ...]:
        fit = self.fit
        values = [getattr(fit, axis) for axis in GRID_AXES]
        varying = [axis for axis, options in zip(GRID_AXES, values) if len(options) > 1]
        groups = []
        for index, combination in enumerate(itertools.product(*values)):
            axes = dict(zip(GRID_AXES, combination))
            shown = ["k=%d" % axes["num_experts"]] + [f"{a}={axes[a]}" for a in varying if a != "num_experts"]
            groups.append(FitGroup(index=index, label=" · ".join(shown), **axes))
        return tuple(groups)

    def fitted_family(self, group: FitGroup) -> Family:
        """The family a group fits: the true one with k experts, and K̄ = ``fit.top_k`` active ones if set."""
        family = dataclasses.replace(self.true_family, num_experts=group.num_experts)
        if self.fit.top_k is not None:
            family = dataclasses.replace(family, gate=dataclasses.replace(family.gate, top_k=self.fit.top_k))
        return family

    def is_exact(self, group: FitGroup) -> bool:
        return group.num_experts == self.num_true

    def atom_blocks(self) -> tuple[str, ...]:
        """Names of the atom blocks of the mixing measure (β₁, a, b, ν for the softmax Gaussian MoE)."""
        return atom_spec(self.true_family).block_names

    def shared_blocks(self) -> tuple[str, ...]:
        """Parameters shared by all experts (τ), which get one error column each."""
        return tuple(block.name for block in atom_spec(self.true_family).shared)

    def metric_columns(self, group: FitGroup) -> list[str]:
        """Table columns a convergence rate can be fitted to, for one group (see :mod:`moe_theory.metrics`)."""
        return [spec.column for spec in metric_specs(self, group)]

    def to_dict(self) -> dict:
        """The resolved config as plain YAML-able data (defaults filled, sample sizes expanded)."""
        fit = self.fit

        def axis(values: tuple) -> Any:
            return list(values) if len(values) > 1 else values[0]

        metrics = self.metrics
        losses = []
        for loss in metrics.losses:
            entry: dict[str, Any] = {"name": loss.name, "translation": list(loss.translations)}
            if loss.name not in BUILTIN_LOSSES:
                entry["exponents"] = loss.exponents
            losses.append(entry)
        density = False if metrics.density is None else {
            "distances": list(metrics.density.distances),
            "num_inputs": metrics.density.num_inputs,
            "grid_size": metrics.density.grid_size,
            "num_quadrature": metrics.density.num_quadrature,
        }
        rates = self.rates
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "model": _plain(self.model),
            "inputs": _plain(self.inputs_spec),
            "sample_sizes": list(self.sample_sizes),
            "replicates": self.replicates,
            "fit": {
                **{a: axis(getattr(fit, a)) for a in GRID_AXES},
                "near_truth": dataclasses.asdict(fit.near_truth),
                **({} if fit.assignment is None else {"assignment": list(fit.assignment)}),
                "tol": fit.tol,
                "max_iter": fit.max_iter,
                "expert_steps": fit.expert_steps,
                "inner_tol": fit.inner_tol,
                "max_halvings": fit.max_halvings,
                "variance_floor": fit.variance_floor,
                "likelihood": fit.likelihood,
                "top_k": fit.top_k,
                **({"selection_schedule": list(fit.selection_schedule)} if fit.selection_schedule else {}),
                **({} if fit.bound is None else {"bound": fit.bound}),
                "dtype": fit.dtype,
            },
            "metrics": {
                "losses": losses,
                "translation": metrics.translation,
                "parameter_errors": (
                    {"translation": metrics.parameter_translation} if metrics.parameter_errors else False
                ),
                "density": density,
                "expert_errors": False if metrics.expert_errors is None else {"num_inputs": metrics.expert_errors},
            },
            "rates": {
                "theory": rates.theory,
                "statistic": rates.statistic,
                "n_boot": rates.n_boot,
                "ci": rates.ci,
                "tolerance": rates.tolerance,
                "min_n": rates.min_n,
                "metrics": None if rates.metrics is None else list(rates.metrics),
                "compare": [
                    {"metric": c.metric, "num_experts": c.num_experts, "family": c.family, "setting": c.setting,
                     "quantity": c.quantity}
                    for c in rates.compare
                ],
            },
            "sweep": dataclasses.asdict(self.sweep),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Nested containers of YAML-safe scalars (NumPy numbers and tuples converted)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------
# Sections.

_TOP_KEYS = ("name", "description", "seed", "model", "inputs", "sample_sizes", "replicates", "fit", "metrics", "rates", "sweep")
_FIT_KEYS = GRID_AXES + ("near_truth", "assignment", "tol", "max_iter", "expert_steps", "inner_tol", "max_halvings", "variance_floor",
                             "likelihood", "top_k", "selection_schedule", "bound", "dtype")


_MODEL_ERROR_PATH = re.compile(r"^(?:model\.)?([A-Za-z_][A-Za-z0-9_.]*(?:\[\d+\])*)")


def _parse_model(ctx: _Context, raw: Any, dtype: str) -> tuple[dict, Family, MoEParams]:
    model = _mapping(ctx, raw, "model")
    # model_from_dict casts these with int() (2.7 -> 2, true -> 1) and reads a dim of 0 as "not
    # given" (-> 1); a study needs exact positive integers, so they are checked here first.
    for key in ("num_experts", "dim"):
        if model.get(key) is not None:
            model[key] = _int(ctx, model[key], f"model.{key}", minimum=1)
    params = model.get("params")
    if params is not None:
        params = _mapping(ctx, params, "model.params")
        for group in ("gate", "expert"):
            if group in params:
                _mapping(ctx, params[group], f"model.params.{group}")
    try:
        family, truth = model_from_dict(model, dtype=dtype)
    except ParameterError as error:
        # Messages name the field relative to the parameter dict ("expert.nu[1] = -0.1: ...").
        message = str(error)
        root = "model." if message.startswith("params") else "model.params."
        match = _MODEL_ERROR_PATH.match(message)
        raise ctx.error_text(root + (match.group(1) if match else ""), root + message) from None
    except (ValueError, TypeError) as error:
        # Messages name the field relative to the model ("gate.top_k: ...", "num_classes: ...").
        message = str(error)
        if message.startswith("model: "):
            raise ctx.error_text("model", message) from None
        message = message.removeprefix("model.")
        match = _MODEL_ERROR_PATH.match(message)
        raise ctx.error_text("model." + (match.group(1) if match else ""), "model." + message) from None
    return model, family, truth


INPUT_PROBE_DRAWS = 16
"""Inputs drawn at parse time to check that a distribution is usable (finite, not constant)."""


def _parse_inputs(ctx: _Context, raw: Any, family: Family, truth: MoEParams) -> InputDistribution:
    try:
        inputs = make_inputs(raw)
    except (ValueError, TypeError) as error:
        raise ctx.error_text("inputs", _inputs_message(error)) from None
    if isinstance(inputs, GridInputs) and family.dim != 1:
        raise ctx.error("inputs", f"the grid input distribution needs d = 1; the model has d = {family.dim}")
    _check_input_spread(ctx, inputs)
    try:
        # A small draw catches errors that only show with the model (e.g. from_gate without a
        # Gaussian gate, or mixture means of the wrong dimension) before any compilation.
        import jax

        dtype = jax.tree_util.tree_leaves(truth)[0].dtype
        draws = inputs.draw(jax.random.key(0), INPUT_PROBE_DRAWS, family.dim, dtype, truth)
    except (ValueError, TypeError, KeyError) as error:
        raise ctx.error_text("inputs", _inputs_message(error)) from None
    draws = np.asarray(draws)
    if not np.all(np.isfinite(draws)):
        raise ctx.error("inputs", f"the {inputs.name} input distribution draws non-finite x; check its parameters")
    constant = [index + 1 for index in range(draws.shape[1]) if np.ptp(draws[:, index]) == 0]
    if constant:
        raise ctx.error("inputs", f"the {inputs.name} input distribution draws a constant x{constant[0]}: the gate "
                        "and the expert slopes cannot be estimated from constant inputs; expected a spread")
    return inputs


def _check_input_spread(ctx: _Context, inputs: InputDistribution) -> None:
    """Refuse the parameters of a registered distribution that make every x the same point (a zero
    standard deviation, a box or grid with low = high), naming the key; other degenerate
    distributions are caught by the spread of a probe draw (:func:`_parse_inputs`)."""
    if isinstance(inputs, NormalInputs):
        if np.any(np.asarray(inputs.std) <= 0):
            raise ctx.error("inputs.std",
                            f"expected a standard deviation > 0 in every coordinate, got {_plain(inputs.std)!r}")
    elif isinstance(inputs, (UniformInputs, GridInputs)):
        try:
            equal = np.any(np.asarray(inputs.low) == np.asarray(inputs.high))
        except ValueError:
            return  # bounds of different lengths: the probe draw reports the shape
        if equal:
            raise ctx.error("inputs.high", f"expected high ≠ low in every coordinate, got low = {_plain(inputs.low)!r} "
                            f"and high = {_plain(inputs.high)!r}")


def _inputs_message(error: Exception) -> str:
    message = str(error)
    return message if message.startswith("inputs") else f"inputs: {message}"


def _parse_fit(ctx: _Context, raw: Any, num_true: int) -> FitSettings:
    fit = _mapping(ctx, raw if raw is not None else {}, "fit")
    _check_keys(ctx, fit, "fit", _FIT_KEYS, required=("num_experts",))

    def k_value(value: Any, path: str) -> int:
        k = _int(ctx, value, path, minimum=1)
        if k < num_true:
            raise ctx.error(path, f"the fitted k = {k} is smaller than the true k* = {num_true}; expected k ≥ {num_true}")
        return k

    noise_raw = _mapping(ctx, fit.get("near_truth", {}) or {}, "fit.near_truth")
    noise_fields = [f.name for f in dataclasses.fields(NearTruthNoise)]
    _check_keys(ctx, noise_raw, "fit.near_truth", noise_fields)
    noise = NearTruthNoise(
        **{name: _float(ctx, value, f"fit.near_truth.{name}", minimum=0) for name, value in noise_raw.items()}
    )
    num_experts = _one_or_many(ctx, fit["num_experts"], "fit.num_experts", k_value)
    return FitSettings(
        num_experts=num_experts,
        method=_one_or_many(ctx, fit.get("method", FIT_DEFAULTS.method), "fit.method", lambda v, p: _choice(ctx, v, p, METHODS)),
        init=_one_or_many(ctx, fit.get("init", "near_truth"), "fit.init", lambda v, p: _choice(ctx, v, p, INITS)),
        n_init=_one_or_many(ctx, fit.get("n_init", FIT_DEFAULTS.n_init), "fit.n_init", lambda v, p: _int(ctx, v, p, minimum=1)),
        gate_steps=_one_or_many(ctx, fit.get("gate_steps", EM_DEFAULTS.gate_steps), "fit.gate_steps", lambda v, p: _int(ctx, v, p, minimum=0)),
        near_truth=noise,
        assignment=_parse_assignment(ctx, fit.get("assignment"), num_experts, num_true),
        tol=_float(ctx, fit.get("tol", FIT_DEFAULTS.tol), "fit.tol", minimum=0),
        max_iter=_int(ctx, fit.get("max_iter", EM_DEFAULTS.max_iter), "fit.max_iter", minimum=1),
        expert_steps=_int(ctx, fit.get("expert_steps", EM_DEFAULTS.expert_steps), "fit.expert_steps", minimum=0),
        inner_tol=_float(ctx, fit.get("inner_tol", EM_DEFAULTS.inner_tol), "fit.inner_tol", minimum=0),
        max_halvings=_int(ctx, fit.get("max_halvings", EM_DEFAULTS.max_halvings), "fit.max_halvings", minimum=0),
        variance_floor=_float(ctx, fit.get("variance_floor", EM_DEFAULTS.variance_floor), "fit.variance_floor", minimum=0),
        likelihood=_choice(ctx, fit.get("likelihood", EM_DEFAULTS.likelihood), "fit.likelihood", LIKELIHOODS),
        top_k=None if fit.get("top_k") is None else _int(ctx, fit["top_k"], "fit.top_k", minimum=1),
        selection_schedule=_parse_selection_schedule(ctx, fit.get("selection_schedule")),
        bound=None if fit.get("bound") is None else _float(ctx, fit["bound"], "fit.bound", minimum=0, strict=True),
        dtype=_choice(ctx, fit.get("dtype", "float64"), "fit.dtype", DTYPES),
    )


def _check_bound(ctx: _Context, fit: FitSettings, family: Family, truth: MoEParams) -> None:
    """``fit.bound`` B: the estimators and experts that keep a box, and a box that holds the truth
    (in the unconstrained coordinates EM moves, canonical form)."""
    try:
        check_bound(family, dataclasses.replace(EM_DEFAULTS, bound=fit.bound, likelihood=fit.likelihood))
    except ValueError as error:
        raise ctx.error("fit.bound", str(error)) from None
    if "mle" in fit.method:
        raise ctx.error("fit.bound", "method 'mle' (L-BFGS) has no box; use 'em', 'squarem' or 'em_newton'")
    canonical = canonicalize(family, truth)
    largest = max(
        float(np.max(np.abs(np.asarray(value)), initial=0.0))
        for fields, group in ((family.gate.fields, canonical.gate), (family.expert.fields, canonical.expert))
        for value in unconstrain(fields, group).values()
    )
    if largest >= fit.bound:
        raise ctx.error("fit.bound", f"the box [−{fit.bound:g}, {fit.bound:g}] excludes a true coordinate of size "
                        f"{largest:g}; expected a bound above it")


def _parse_selection_schedule(ctx: _Context, raw: Any) -> tuple[float, ...]:
    """``fit.selection_schedule``: strictly decreasing selection temperatures > 0 (empty: none)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ctx.error("fit.selection_schedule", f"expected a list of decreasing temperatures > 0, got {raw!r}")
    schedule = tuple(_float(ctx, value, f"fit.selection_schedule[{i}]", minimum=0, strict=True) for i, value in enumerate(raw))
    for i, value in enumerate(schedule):
        if i and value >= schedule[i - 1]:
            raise ctx.error(f"fit.selection_schedule[{i}]", f"expected a temperature below the previous {schedule[i - 1]:g}, got {value:g}")
    return schedule


def _parse_assignment(ctx: _Context, raw: Any, num_experts: tuple[int, ...], num_true: int) -> tuple[int, ...] | None:
    """``fit.assignment``: the true atom each fitted atom of a near-truth start copies, which fixes the
    Voronoi cell sizes (e.g. [0, 1, 1, 1] puts three fitted atoms on true atom 1)."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ctx.error("fit.assignment", f"expected a list of true-atom indices, one per fitted expert, got {raw!r}")
    if len(num_experts) != 1 or len(raw) != num_experts[0]:
        raise ctx.error(
            "fit.assignment",
            f"expected one index per fitted expert for a single fit.num_experts, got {len(raw)} indices for k = {list(num_experts)}",
        )
    indices = tuple(_int(ctx, value, f"fit.assignment[{i}]", minimum=0) for i, value in enumerate(raw))
    for i, index in enumerate(indices):
        if index >= num_true:
            raise ctx.error(f"fit.assignment[{i}]", f"expected a true atom index in [0, {num_true}), got {index}")
    missing = sorted(set(range(num_true)) - set(indices))
    if missing:
        raise ctx.error("fit.assignment", f"every true atom needs a fitted atom; none is assigned to {missing}")
    return indices


def _parse_translations(ctx: _Context, value: Any, path: str) -> tuple[str, ...]:
    return _one_or_many(ctx, value, path, lambda v, p: _choice(ctx, v, p, TRANSLATIONS))


def _parse_metrics(ctx: _Context, raw: Any, fit: FitSettings, num_true: int) -> MetricsConfig:
    metrics = _mapping(ctx, raw if raw is not None else {}, "metrics")
    _check_keys(ctx, metrics, "metrics", ("losses", "translation", "parameter_errors", "density", "expert_errors"))
    default_translation = _choice(ctx, metrics.get("translation", "infimum"), "metrics.translation", TRANSLATIONS)
    losses_raw = metrics.get("losses", ["D1", "D2"] if num_true in fit.num_experts else ["D2"])
    if not isinstance(losses_raw, list):
        losses_raw = [losses_raw]
    losses: list[LossSpec] = []
    for index, entry in enumerate(losses_raw):
        path = f"metrics.losses[{index}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        entry = _mapping(ctx, entry, path)
        _check_keys(ctx, entry, path, ("name", "translation", "exponents"), required=("name",))
        name = entry["name"]
        if not isinstance(name, str) or not re.match(r"^[A-Za-z][A-Za-z0-9]*$", name):
            raise ctx.error(
                f"{path}.name", f"expected a loss name made of letters and digits (D1, D2, ...), got {_describe(name)}"
            )
        if name in _RESERVED_COLUMNS:
            raise ctx.error(f"{path}.name", f"{name!r} is a column of the results table already; choose another name")
        if name in BUILTIN_LOSSES:
            if "exponents" in entry:
                raise ctx.error(f"{path}.exponents", f"{name} has fixed exponents; give a custom loss name to choose a table")
            exponents = BUILTIN_LOSSES[name]
        else:
            if "exponents" not in entry:
                raise ctx.error(
                    f"{path}.exponents",
                    f"missing: a custom loss {name!r} needs an exponent table, one of {sorted(EXPONENT_TABLES)} "
                    "(or use D1 / D2)",
                )
            exponents = _choice(ctx, entry["exponents"], f"{path}.exponents", sorted(EXPONENT_TABLES))
        translations = _parse_translations(ctx, entry.get("translation", default_translation), f"{path}.translation")
        exact_only = name == "D1"
        if exact_only and num_true not in fit.num_experts:
            raise ctx.error(
                path,
                f"D1 (the exact-fitted loss) needs a fitted k equal to k* = {num_true}; fit.num_experts is "
                f"{list(fit.num_experts)} (use D2 for over-fitted k)",
            )
        losses.append(LossSpec(name, exponents, translations, exact_only))
    if len({loss.name for loss in losses}) != len(losses):
        raise ctx.error("metrics.losses", "expected distinct loss names")

    parameter_raw = metrics.get("parameter_errors", True)
    parameter_translation = PARAMETER_TRANSLATION
    if isinstance(parameter_raw, Mapping):
        _check_keys(ctx, parameter_raw, "metrics.parameter_errors", ("translation",))
        parameter_translation = _choice(
            ctx, parameter_raw.get("translation", PARAMETER_TRANSLATION), "metrics.parameter_errors.translation",
            TRANSLATIONS,
        )
        parameter_errors = True
    else:
        parameter_errors = _bool(ctx, parameter_raw, "metrics.parameter_errors")

    density_raw = metrics.get("density", False)
    density = None
    if density_raw is True:
        density = DensitySpec()
    elif isinstance(density_raw, Mapping):
        path = "metrics.density"
        _check_keys(ctx, density_raw, path, ("distances", "num_inputs", "grid_size", "num_quadrature"))
        density = DensitySpec(
            distances=_one_or_many(ctx, density_raw.get("distances", list(DISTANCES)), f"{path}.distances",
                                   lambda v, p: _choice(ctx, v, p, DISTANCES)),
            num_inputs=_int(ctx, density_raw.get("num_inputs", 200), f"{path}.num_inputs", minimum=1),
            grid_size=_int(ctx, density_raw.get("grid_size", 16), f"{path}.grid_size", minimum=2),
            num_quadrature=_int(ctx, density_raw.get("num_quadrature", 6), f"{path}.num_quadrature", minimum=1),
        )
    elif density_raw is not False and density_raw is not None:
        raise ctx.error("metrics.density", f"expected true, false or a mapping, got {_describe(density_raw)}")
    expert_raw = metrics.get("expert_errors", False)
    expert_errors = None
    if expert_raw is True:
        expert_errors = EXPERT_ERROR_INPUTS
    elif isinstance(expert_raw, Mapping):
        _check_keys(ctx, expert_raw, "metrics.expert_errors", ("num_inputs",))
        expert_errors = _int(ctx, expert_raw.get("num_inputs", EXPERT_ERROR_INPUTS), "metrics.expert_errors.num_inputs", minimum=1)
    elif expert_raw is not False and expert_raw is not None:
        raise ctx.error("metrics.expert_errors", f"expected true, false or {{num_inputs: N}}, got {_describe(expert_raw)}")
    return MetricsConfig(tuple(losses), default_translation, parameter_errors, parameter_translation, density, expert_errors)


def infer_theory_family(family: Family) -> str | None:
    """The registry family of :mod:`moe_theory.rates` that matches a model, or None."""
    if isinstance(family.expert, GaussianLinear):
        for preset, registry_name in (
            ("softmax", "softmax_gaussian"),
            ("gaussian", "gaussian_gated_gaussian"),
            ("temperature_softmax", "temperature_softmax_gaussian"),
            ("activation_temperature_softmax", "activation_temperature_softmax_gaussian"),
        ):
            if family.gate == GATES[preset]:
                return registry_name
        if family.gate == Gate(top_k=family.gate.top_k) and family.gate.top_k is not None:
            return "topk_softmax_gaussian"
    return None


def _parse_rates(ctx: _Context, raw: Any, family: Family) -> RatesConfig:
    rates = _mapping(ctx, raw if raw is not None else {}, "rates")
    keys = ("theory", "statistic", "n_boot", "ci", "tolerance", "min_n", "metrics", "compare")
    _check_keys(ctx, rates, "rates", keys)
    registry_families = sorted(set(list_theoretical_rates()["family"]))
    theory = rates.get("theory", "auto")
    if theory == "auto":
        theory = infer_theory_family(family)
    elif theory is not None:
        theory = _choice(ctx, theory, "rates.theory", registry_families + ["auto"])
    metrics_raw = rates.get("metrics")
    metrics = None
    if metrics_raw is not None:
        metrics = _one_or_many(ctx, metrics_raw, "rates.metrics", lambda v, p: _name(ctx, v, p))
    compare = []
    for index, entry in enumerate(rates.get("compare", []) or []):
        path = f"rates.compare[{index}]"
        entry = _mapping(ctx, entry, path)
        _check_keys(ctx, entry, path, ("metric", "num_experts", "family", "setting", "quantity"),
                    required=("metric", "setting", "quantity"))
        comparison_family = entry.get("family", theory)
        if comparison_family is None:
            raise ctx.error(f"{path}.family", "missing: rates.theory is null, so name the registry family here")
        for key in ("family", "setting", "quantity"):
            if key in entry:
                _string(ctx, entry[key], f"{path}.{key}")
        try:
            theoretical_rate(comparison_family, entry["setting"], entry["quantity"])
        except UnknownTheoreticalRateError:
            raise ctx.error(
                path,
                f"({comparison_family!r}, {entry['setting']!r}, {entry['quantity']!r}) is not in the theoretical-rate "
                "registry; see `moe-theory list --rates`",
            ) from None
        num_experts = entry.get("num_experts")
        compare.append(TheoryComparison(
            metric=_name(ctx, entry["metric"], f"{path}.metric"),
            num_experts=None if num_experts is None else _int(ctx, num_experts, f"{path}.num_experts", minimum=1),
            family=comparison_family,
            setting=entry["setting"],
            quantity=entry["quantity"],
        ))
    return RatesConfig(
        theory=theory,
        statistic=_choice(ctx, rates.get("statistic", "mean"), "rates.statistic", STATISTICS),
        n_boot=_int(ctx, rates.get("n_boot", 1000), "rates.n_boot", minimum=1),
        ci=_probability(ctx, rates.get("ci", 0.95), "rates.ci"),
        tolerance=_float(ctx, rates.get("tolerance", 0.1), "rates.tolerance", minimum=0),
        min_n=_int(ctx, rates.get("min_n", 0) or 0, "rates.min_n", minimum=0),
        metrics=metrics,
        compare=tuple(compare),
    )


def _probability(ctx: _Context, value: Any, path: str) -> float:
    number = _float(ctx, value, path)
    if not 0 < number < 1:
        raise ctx.error(path, f"expected a level strictly between 0 and 1, got {value!r}")
    return number


def _folder_name(ctx: _Context, value: Any, path: str, what: str) -> str:
    """A study or arm name, which names a results folder: letters, digits, '_', '-', '.', not
    starting with '.' or '-', at most :data:`MAX_NAME_LENGTH` characters (file systems refuse
    names beyond 255 bytes, and a run folder's path adds the results root and the run id)."""
    if not isinstance(value, str) or not _NAME_PATTERN.match(value):
        raise ctx.error(path, f"expected a folder-safe {what} (letters, digits, '_', '-', '.'), got {_describe(value)}")
    if len(value) > MAX_NAME_LENGTH:
        raise ctx.error(path, f"expected a {what} of at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    return value


def _seed(ctx: _Context, value: Any, path: str) -> int:
    """A seed for ``jax.random.key``, which takes a signed 64-bit integer (with x64 enabled)."""
    seed = _int(ctx, value, path, minimum=0, maximum=None)
    if seed > MAX_SEED:
        raise ctx.error(path, f"expected a seed below 2^63 (JAX's random key takes a signed 64-bit integer), got {value!r}")
    return seed


def _string(ctx: _Context, value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(path, f"expected a non-empty string, got {_describe(value)}")
    return value


def _name(ctx: _Context, value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(path, f"expected a column name or glob pattern, got {_describe(value)}")
    return value


def parse_config(data: Any, source: str = "<dict>", lines: Mapping[str, int] | None = None,
                 overridden: Sequence[str] = ()) -> StudyConfig | ArmsStudy:
    """Validate parsed YAML data into a :class:`StudyConfig`, or an :class:`ArmsStudy` when it
    lists ``arms:`` (see the module docstring)."""
    ctx = _Context(source, lines, overridden)
    top = _mapping(ctx, data, "")
    if "arms" in top:
        _check_keys(ctx, top, "", _TOP_KEYS + ("arms", "comparison"))
        return parse_arms(top, source, lines, overridden)
    if "comparison" in top:
        raise ctx.error("comparison", "a comparison needs arms: list the variants to compare under arms:")
    return _parse_study(ctx, top)


def _parse_study(ctx: _Context, top: dict) -> StudyConfig:
    """One study (one arm) from its merged top-level mapping."""
    source = ctx.source
    _check_keys(ctx, top, "", _TOP_KEYS, required=("name", "model", "sample_sizes", "replicates", "fit"))
    name = _folder_name(ctx, top["name"], "name", "name")
    description = top.get("description", "") or ""
    if not isinstance(description, str):
        raise ctx.error("description", f"expected a one-line string, got {_describe(description)}")
    seed = _seed(ctx, top.get("seed", 0), "seed")

    fit_raw = top.get("fit")
    dtype = "float64"
    if isinstance(fit_raw, Mapping) and "dtype" in fit_raw:
        dtype = _choice(ctx, fit_raw["dtype"], "fit.dtype", DTYPES)
    model, family, truth = _parse_model(ctx, top["model"], dtype)
    inputs_spec = top.get("inputs", "uniform")
    inputs = _parse_inputs(ctx, inputs_spec, family, truth)
    sample_sizes = expand_sample_sizes(top["sample_sizes"], ctx)
    replicates = _int(ctx, top["replicates"], "replicates", minimum=1, maximum=MAX_REPLICATES)
    fit = _parse_fit(ctx, fit_raw, family.num_experts)
    if fit.top_k is not None and family.gate.top_k is None:
        raise ctx.error("fit.top_k", f"the true gate ({family.gate.describe()}) is not a top-K gate; fit.top_k sets the "
                        "number K̄ of active experts of a fitted top-K gate")
    if fit.selection_schedule and family.gate.top_k is None:
        raise ctx.error("fit.selection_schedule", f"the gate ({family.gate.describe()}) is not a top-K gate; a selection "
                        "schedule anneals a top-K gate's soft selection")
    active = fit.top_k if fit.top_k is not None else family.gate.top_k
    dense = [k for k in fit.num_experts if active is not None and active >= k]
    if fit.selection_schedule and dense:
        raise ctx.error("fit.selection_schedule", f"with K̄ = {active} active experts of k = {dense[0]} the fitted gate is "
                        "dense: there is no selection to anneal")
    if family.gate.selection_temperature is not None:
        raise ctx.error("model.gate.selection_temperature", "a soft selection is a fitting device (fit.selection_schedule), "
                        "not a true model; expected a hard top-K gate")
    if fit.assignment is not None and "near_truth" not in fit.init:
        raise ctx.error("fit.assignment", f"an assignment places near-truth starts; fit.init is {list(fit.init)}")
    if fit.likelihood == "joint":
        try:
            check_joint_likelihood(family)
        except ValueError as error:
            raise ctx.error("fit.likelihood", str(error)) from None
        conditional_only = sorted(set(fit.method) - {"em"})
        if conditional_only:
            raise ctx.error("fit.method", f"{conditional_only} maximise the conditional likelihood; with fit.likelihood: joint use 'em'")
    if fit.bound is not None:
        _check_bound(ctx, fit, family, truth)
    metrics = _parse_metrics(ctx, top.get("metrics"), fit, family.num_experts)
    rates = _parse_rates(ctx, top.get("rates"), family)

    sweep_raw = _mapping(ctx, top.get("sweep", {}) or {}, "sweep")
    _check_keys(ctx, sweep_raw, "sweep", ("batch_size", "bucket_growth"))
    sweep = SweepSettings(
        batch_size=_int(ctx, sweep_raw.get("batch_size", 8), "sweep.batch_size", minimum=1, maximum=MAX_REPLICATES),
        bucket_growth=_float(ctx, sweep_raw.get("bucket_growth", 2.0), "sweep.bucket_growth", minimum=1,
                             maximum=MAX_BUCKET_GROWTH),
    )
    config = StudyConfig(
        name=name,
        description=description.strip(),
        seed=seed,
        model=model,
        inputs_spec=inputs_spec,
        inputs=inputs,
        sample_sizes=sample_sizes,
        replicates=replicates,
        fit=fit,
        metrics=metrics,
        rates=rates,
        sweep=sweep,
        true_family=family,
        truth=truth,
        source=source,
    )
    if rates.metrics is not None:
        columns = sorted({column for group in config.groups for column in config.metric_columns(group)})
        for index, pattern in enumerate(rates.metrics):
            if not select_columns([pattern], columns):
                path = "rates.metrics" + (f"[{index}]" if isinstance(top["rates"].get("metrics"), list) else "")
                raise ctx.error(path, f"{pattern!r} matches no metric column; the columns are {columns}")
    return config


# ----------------------------------------------------------------------------------------------
# Overrides and files.


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in path.split("."):
        match = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", piece)
        if not match:
            raise ConfigError(f"--set {path}: expected a dotted key path like fit.tol or metrics.losses[0].name")
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return parts


def apply_overrides(data: Any, overrides: Sequence[str]) -> tuple[dict, list[str]]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a copy of ``data``.

    Returns the new data and the overridden key paths (for error messages). Intermediate mappings
    are created as needed; list items are addressed as ``key[index]``.
    """
    data = copy.deepcopy(data) if data is not None else {}
    paths = []
    for override in overrides:
        path, equals, text = override.partition("=")
        path = path.strip()
        if not equals or not path:
            raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. fit.tol=1e-8")
        try:
            value = read_yaml(text)
        except ConfigError as error:
            raise ConfigError(f"--set {override!r}: {str(error).split(': ', 1)[-1]}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: the value is not valid YAML ({error})") from None
        parts = _split_path(path)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = path if depth == len(parts) - 2 else ".".join(str(p) for p in parts[: depth + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"--set {override!r}: {where} has no item {part}")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: cannot set a key inside a non-mapping at {where}")
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(f"--set {override!r}: there is no list item {last} to replace")
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: cannot set a key inside a non-mapping")
        node[last] = value
        paths.append(re.sub(r"\.(\d+)", r"[\1]", ".".join(str(p) for p in parts)).replace(".[", "["))
    return data, paths


def read_config_text(path: str | Path) -> str:
    """The text of a config file: UTF-8, at most :data:`MAX_CONFIG_BYTES`. Raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; expected a YAML config of at most {MAX_CONFIG_BYTES} bytes")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                          "expected a YAML config") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config ({error.strerror})") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig | ArmsStudy:
    """Read, override and validate a YAML config. Raises :class:`ConfigError`."""
    path = Path(path)
    text = read_config_text(path)
    try:
        lines = _key_lines(text)
        data = read_yaml(text)
    except ConfigError as error:
        message = str(error)  # "line N: ..." where the YAML has a line
        located = f"{path}:{message.removeprefix('line ')}" if message.startswith("line ") else f"{path}: {message}"
        raise ConfigError(located) from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply to read") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    data, overridden = apply_overrides(data, overrides)
    return parse_config(data, str(path), lines, overridden)


def select_columns(patterns: Sequence[str], columns: Sequence[str]) -> list[str]:
    """The columns matching any of the glob ``patterns``, in column order."""
    return [column for column in columns if any(fnmatch.fnmatchcase(column, p) for p in patterns)]


# ----------------------------------------------------------------------------------------------
# Arms: several variants of one study, compared.

ARM_KEYS = ("description", "model", "inputs", "fit", "metrics", "rates")
"""Top-level keys an arm may override."""

SHARED_KEYS = ("name", "seed", "sample_sizes", "replicates", "sweep")
"""Keys every arm shares: an arm that sets one is refused."""

_REPLACED_WHOLE = ("model.gate", "model.expert", "model.params.gate", "model.params.expert", "inputs")
"""Paths an arm replaces whole rather than merging into: a gate spec, a parameter group and an
input spec only make sense as a whole (another gate has other parameters)."""

SELECTOR_KEYS = ("metric", "block", "atom", "translation")
MAIN_LOSS = "main_loss"
"""The default comparison metric: D1 for an exact fit (k = k*), D2 otherwise, at the config's translation."""


@dataclass(frozen=True)
class MetricSelector:
    """Which rows of the long metrics table (:mod:`moe_theory.metrics`) to compare: a metric and,
    where it has them, its block, atom and translation. ``metric = "main_loss"`` means each fit
    group's headline loss."""

    metric: str
    block: str | None = None
    atom: int | None = None
    translation: str | None = None

    def label(self) -> str:
        parts = [self.metric] + [f"{key}={value}" for key, value in (("block", self.block), ("atom", self.atom),
                                                                      ("translation", self.translation)) if value is not None]
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class ComparisonSettings:
    """What an arms study compares (the ``comparison:`` section).

    Attributes:
        metrics: the metrics to compare between arms (default: each group's main loss).
        epsilons: targets ε of the sample-complexity curves n(ε); None chooses six spanning the
            reference arm's smallest to largest per-n statistic.
        statistic: ``mean``, ``median`` or a quantile level in (0, 1), over replicates at each n.
        reference: the arm the others are compared with (default: the first arm).
        n_boot, ci: bootstrap resamples and interval level of the contrasts and bands.
    """

    metrics: tuple[MetricSelector, ...] = (MetricSelector(MAIN_LOSS),)
    epsilons: tuple[float, ...] | None = None
    statistic: Any = "mean"
    reference: str | None = None
    n_boot: int = 1000
    ci: float = 0.95

    def to_dict(self) -> dict:
        return {
            "metrics": [selector.to_dict() for selector in self.metrics],
            "epsilons": None if self.epsilons is None else list(self.epsilons),
            "statistic": self.statistic,
            "reference": self.reference,
            "n_boot": self.n_boot,
            "ci": self.ci,
        }


@dataclass(frozen=True)
class ArmsStudy:
    """A study of several arms: one :class:`StudyConfig` per arm, and what to compare."""

    name: str
    description: str
    arms: tuple[tuple[str, StudyConfig], ...]
    comparison: ComparisonSettings
    data: dict = field(compare=False)
    source: str = field(default="<dict>", compare=False)

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.arms)

    def arm(self, name: str) -> StudyConfig:
        for arm_name, config in self.arms:
            if arm_name == name:
                return config
        raise KeyError(f"no arm {name!r}; the arms are {list(self.arm_names)}")

    @property
    def reference(self) -> str:
        return self.comparison.reference or self.arms[0][0]

    def to_dict(self) -> dict:
        """The config as plain data: the base keys, every arm's overrides and the comparison; each
        arm's resolved config is written into its own run folder."""
        return {**{key: value for key, value in self.data.items() if key not in ("arms", "comparison")},
                "arms": self.data["arms"], "comparison": self.comparison.to_dict()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100, allow_unicode=True)


class _ArmContext(_Context):
    """Errors inside one arm name the arm's own key and line where the arm set the value, and the
    base key (with the arm named) where the arm inherited it."""

    def __init__(self, base: _Context, arm: str, arm_paths: set[str]):
        super().__init__(base.source, base.lines, base.overridden)
        self.arm, self.arm_paths = arm, arm_paths

    def _set_by_arm(self, path: str) -> bool:
        probe = path
        while probe:
            if probe in self.arm_paths:
                return True
            probe = _parent_path(probe)
        return False

    def error(self, path: str, message: str) -> ConfigError:
        if self._set_by_arm(path):
            where = f"arms.{self.arm}.{path}"
            return super().error_text(where, f"{where}: {message}")
        return super().error_text(path, f"{path or '<top level>'} (in arm {self.arm!r}): {message}")

    def error_text(self, path: str, text: str) -> ConfigError:
        if self._set_by_arm(path):
            where = f"arms.{self.arm}.{path}"
            return super().error_text(where, f"arms.{self.arm}.{text}" if text.startswith(path) else f"arm {self.arm!r}: {text}")
        return super().error_text(path, f"arm {self.arm!r}: {text}")


def _replaced_paths(overrides: Any, prefix: str = "") -> set[str]:
    """The key paths whose values an arm's overrides replace (see :func:`_merge`): their leaves,
    and the mappings replaced whole; a mapping merged key by key is not itself replaced."""
    paths = set()
    for key, value in overrides.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and path not in _REPLACED_WHOLE:
            paths |= _replaced_paths(value, path)
        else:
            paths.add(path)
    return paths


def _merge(base: Any, override: Any, path: str = "") -> Any:
    """``override`` merged into ``base``: mappings key by key (except :data:`_REPLACED_WHOLE`)."""
    if isinstance(base, Mapping) and isinstance(override, Mapping) and path not in _REPLACED_WHOLE:
        merged = copy.deepcopy(dict(base))
        for key, value in override.items():
            child = f"{path}.{key}" if path else str(key)
            merged[key] = _merge(base[key], value, child) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _parse_selector(ctx: _Context, raw: Any, path: str) -> MetricSelector:
    if isinstance(raw, str):
        raw = {"metric": raw}
    raw = _mapping(ctx, raw, path)
    _check_keys(ctx, raw, path, SELECTOR_KEYS, required=("metric",))
    metric = _name(ctx, raw["metric"], f"{path}.metric")
    block = None if raw.get("block") is None else _name(ctx, raw["block"], f"{path}.block")
    atom = None if raw.get("atom") is None else _int(ctx, raw["atom"], f"{path}.atom", minimum=0)
    translation = None if raw.get("translation") is None else _choice(ctx, raw["translation"], f"{path}.translation", TRANSLATIONS)
    return MetricSelector(metric, block, atom, translation)


def _parse_comparison(ctx: _Context, raw: Any, arm_names: Sequence[str]) -> ComparisonSettings:
    section = _mapping(ctx, raw if raw is not None else {}, "comparison")
    _check_keys(ctx, section, "comparison", ("metrics", "epsilons", "statistic", "reference", "n_boot", "ci"))
    defaults = ComparisonSettings()
    metrics = defaults.metrics
    if section.get("metrics") is not None:
        entries = section["metrics"] if isinstance(section["metrics"], list) else [section["metrics"]]
        if not entries:
            raise ctx.error("comparison.metrics", "expected at least one metric")
        metrics = tuple(_parse_selector(ctx, entry, f"comparison.metrics[{i}]") for i, entry in enumerate(entries))
    epsilons = None
    if section.get("epsilons") is not None:
        values = section["epsilons"] if isinstance(section["epsilons"], list) else [section["epsilons"]]
        if not values:
            raise ctx.error("comparison.epsilons", "expected at least one target ε > 0")
        epsilons = tuple(sorted(_float(ctx, v, f"comparison.epsilons[{i}]", minimum=0, strict=True)
                                for i, v in enumerate(values)))
    statistic = section.get("statistic", defaults.statistic)
    if statistic not in STATISTICS:
        quantile = _float(ctx, statistic, "comparison.statistic", minimum=0, strict=True)
        if quantile >= 1:
            raise ctx.error("comparison.statistic", f"expected 'mean', 'median' or a quantile level in (0, 1), got {statistic!r}")
        statistic = quantile
    reference = section.get("reference")
    if reference is not None and reference not in arm_names:
        raise ctx.error("comparison.reference", f"expected one of the arms {list(arm_names)}, got {_describe(reference)}")
    ci = _float(ctx, section.get("ci", defaults.ci), "comparison.ci", minimum=0, strict=True)
    if ci >= 1:
        raise ctx.error("comparison.ci", f"expected a level in (0, 1), got {ci!r}")
    return ComparisonSettings(
        metrics=metrics, epsilons=epsilons, statistic=statistic, reference=reference,
        n_boot=_int(ctx, section.get("n_boot", defaults.n_boot), "comparison.n_boot", minimum=1), ci=ci,
    )


def parse_arms(data: Any, source: str = "<dict>", lines: Mapping[str, int] | None = None,
               overridden: Sequence[str] = ()) -> ArmsStudy:
    """Validate a config with ``arms:`` into an :class:`ArmsStudy` (see the module docstring)."""
    ctx = _Context(source, lines, overridden)
    top = _mapping(ctx, data, "")
    arms_raw = _mapping(ctx, top["arms"], "arms")
    if len(arms_raw) < 2:
        raise ctx.error("arms", f"expected at least two named arms to compare, got {sorted(arms_raw)}")
    base = {key: value for key, value in top.items() if key not in ("arms", "comparison")}
    arms = []
    for arm_name, overrides in arms_raw.items():
        path = f"arms.{arm_name}"
        _folder_name(ctx, arm_name, path, "arm name")
        overrides = _mapping(ctx, overrides if overrides is not None else {}, path)
        for key in overrides:
            if key in SHARED_KEYS:
                raise ctx.error(f"{path}.{key}", f"arms share {', '.join(SHARED_KEYS)}; set {key} at the top level")
        _check_keys(ctx, overrides, path, ARM_KEYS)
        arm_ctx = _ArmContext(ctx, arm_name, _replaced_paths(overrides))
        arms.append((arm_name, _parse_study(arm_ctx, _merge(base, overrides))))
    comparison = _parse_comparison(ctx, top.get("comparison"), [name for name, _ in arms])
    for index, selector in enumerate(comparison.metrics):
        if selector.metric == MAIN_LOSS:
            continue
        known = {spec.metric for _, config in arms for group in config.groups for spec in metric_specs(config, group)}
        if selector.metric not in known:
            raise ctx.error(f"comparison.metrics[{index}].metric",
                            f"{selector.metric!r} is measured by no arm; the metrics are {sorted(known)}")
    name, description = arms[0][1].name, top.get("description", "") or ""
    return ArmsStudy(name, str(description).strip(), tuple(arms), comparison, copy.deepcopy(dict(top)), source)
