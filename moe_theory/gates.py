"""Gating functions π_i(x), i = 1..k, composed from four small parts (docs/gates.md).

Every gate computes its log-weights in the same pipeline::

    z       = M(x)                                   input transform ("modified" gate [4]); M = id by default
    g_i     = slope_i(z)                             score's slope part
    s_i     = act(g_i) / τ + offset_i                activation and temperature, both optional [3]
    log π_i = log φ(s_i) − log Σ_{j ∈ S(x)} φ(s_j)   normaliser φ, over the selected experts S(x)

with these registered parts:

* **scores** (slope part g and offset):
  ``linear``    g_i = β_{1i}ᵀz,              offset β_{0i}        (softmax gate, [1]);
  ``euclidean`` g_i = −‖z − β_{1i}‖²,         offset β_{0i}        ([6], [9]);
  ``laplace``   g_i = −‖z − β_{1i}‖,          offset β_{0i}        ([9]);
  ``gaussian``  g_i = log N(z | c_i, Γ_i),    offset log w_i      (Gaussian gate of [8]:
  π_i ∝ w_i N(x | c_i, Γ_i)).
* **input transforms** M: ``tanh``, ``sigmoid`` applied coordinate-wise.
* **activations**: ``tanh``, ``sigmoid``, ``relu``, ``gelu``, ``softplus``, ``identity``.
* **normalisers** φ: ``softmax`` (φ = exp) and ``sigmoid`` (φ = σ, the normalised sigmoid gate
  π_i = σ(s_i)/Σ_j σ(s_j), a proper conditional density; consistent with [6]).
* **top-K sparsity** [2]: S(x) holds the K experts with the largest slope part g_i (β_{1i}ᵀx for the
  linear score, as in [2]) or, with ``top_k_on="score"``, the largest full score s_i. Ties are broken
  towards the lower expert index, so exactly k − K weights are exactly 0. Without top-K, S(x) is all
  experts.
* **soft selection** (``selection_temperature`` T > 0, a fitting device, not a model of the papers):
  the hard indicator of S(x) becomes σ((κ_i − m(x))/T), κ the selection key and m(x) the midpoint
  between its K-th and (K+1)-th largest entries, so log π_i = log φ(s_i) + log σ((κ_i − m)/T) − log Σ_j (…).
  Every expert keeps a positive weight, which lets EM move a selection boundary across data points;
  as T → 0 the weights tend to the hard top-K gate's. :mod:`moe_theory.fit.api` anneals T to 0
  (the dense-to-sparse continuation of ``EMConfig.selection_schedule``).

τ > 0 is one scalar shared by all experts. With ``temperature="fitted"`` a fitter estimates it;
with ``temperature="fixed"`` it stays at its given value.

**Adding a gate.** A new score is one function ``slope(gate_params, z) -> (n, k)`` plus one
:class:`Score` entry in :data:`SCORES` declaring its fields; a new normaliser is one function
``log φ`` plus one :class:`Normaliser` entry; a named preset is one :data:`GATES` entry.

**Translation and the canonical form** (docs/gates.md). A gate whose normaliser is softmax is
unchanged when the same t₀ is added to every offset; with the linear score and no activation it is
also unchanged when the same t₁ is added to every β_{1i} (the selection key of top-K shifts by the
common t₁ᵀx, so top-K keeps this invariance). The canonical form fixes the translation by putting
the **reference expert**, the last one (index k − 1, as in the authors' code [1]), at zero:
β_{0,k−1} = 0, and β_{1,k−1} = 0 where the slope part is translatable. For the Gaussian gate, whose
offset is log w, the canonical form instead scales the weights to sum to one, the parametrisation of
[8]. The normalised-sigmoid gate has no such invariance and is its own canonical form.

Papers: [1] arXiv 2305.03288, [2] 2309.13850, [3] 2401.13875, [4] 2310.14188, [6] 2602.01466,
[8] 2305.07572, [9] 2410.02935 (numbering of docs/README.md#papers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from . import linalg
from .params import Field, field_with_role, fields_with_role

# ----------------------------------------------------------------------------------------------
# Scores: the slope part g_i(z) and the per-expert offset.


def _safe_norm(squared: jnp.ndarray) -> jnp.ndarray:
    # sqrt has an infinite derivative at 0; the double `where` keeps gradients finite when z = β₁.
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _squared_distance(z: jnp.ndarray, centres: jnp.ndarray) -> jnp.ndarray:
    # Direct differences rather than ‖z‖² − 2zᵀβ + ‖β‖², which cancels catastrophically near β.
    return jnp.sum((z[:, None, :] - centres[None, :, :]) ** 2, axis=-1)


def _linear_slope(gate: Mapping[str, jnp.ndarray], z: jnp.ndarray) -> jnp.ndarray:
    return z @ gate["beta1"].T


def _euclidean_slope(gate: Mapping[str, jnp.ndarray], z: jnp.ndarray) -> jnp.ndarray:
    return -_squared_distance(z, gate["beta1"])


def _laplace_slope(gate: Mapping[str, jnp.ndarray], z: jnp.ndarray) -> jnp.ndarray:
    return -_safe_norm(_squared_distance(z, gate["beta1"]))


def _gaussian_log_density(gate: Mapping[str, jnp.ndarray], z: jnp.ndarray) -> jnp.ndarray:
    centres, covariances = gate["centre"], gate["covariance"]
    dim = z.shape[-1]
    factor = linalg.cholesky(covariances)  # (k, d, d)
    residual = z[:, None, :] - centres[None, :, :]  # (n, k, d)
    whitened = linalg.solve_lower(factor[None], residual)  # L_i⁻¹ (z − c_i)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(factor, axis1=-2, axis2=-1)), axis=-1)  # (k,)
    quadratic = jnp.sum(whitened**2, axis=-1)  # (n, k)
    return -0.5 * (quadratic + log_det[None, :] + dim * math.log(2.0 * math.pi))


BETA_FIELDS = (
    Field("beta0", ("k",), "real", "gate intercepts β₀", role="offset"),
    Field("beta1", ("k", "d"), "real", "gate slopes β₁", role="slope"),
)
"""Fields of a score with an offset β₀ ∈ R^k and a slope β₁ ∈ R^{k×d} multiplying the input."""

LOCATION_FIELDS = (
    Field("beta0", ("k",), "real", "gate intercepts β₀", role="offset"),
    Field("beta1", ("k", "d"), "real", "gate locations β₁ (points in input space)", role="location"),
)
"""Fields of a distance-type score: an offset β₀ ∈ R^k and a location β₁ ∈ R^{k×d} per expert."""


def beta0_offset(gate: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """The per-expert offset β₀ of scores with :data:`BETA_FIELDS` (kept for explicit registrations;
    a :class:`Score` without an ``offset`` function reads its offset from the field roles)."""
    return gate["beta0"]


@dataclass(frozen=True)
class Score:
    """A registered score: its fields and slope part; the offset comes from the field roles.

    The per-expert offset is the field with role ``offset`` (added to the score), or the log of the
    field with role ``weight`` (the Gaussian gate's log w); a score must declare exactly one of
    them. ``offset`` may override how it is computed. ``translatable_slope`` says whether adding a
    common t₁ to the field with role ``slope`` leaves a softmax gate unchanged, and ``affine``
    whether the score is affine in its parameters (both true for the linear score only; the
    fitters use ``affine`` to skip a Hessian term that is then zero).
    """

    fields: tuple[Field, ...]
    slope: Callable[[Mapping[str, jnp.ndarray], jnp.ndarray], jnp.ndarray]
    offset: Callable[[Mapping[str, jnp.ndarray]], jnp.ndarray] | None = None
    translatable_slope: bool = False
    affine: bool = False

    def __post_init__(self) -> None:
        carriers = fields_with_role(self.fields, "offset") + fields_with_role(self.fields, "weight")
        if len(carriers) != 1:
            raise ValueError(
                "Score: expected exactly one field with role 'offset' or 'weight' (the per-expert offset), "
                f"got {[field.name for field in carriers]}"
            )
        if self.translatable_slope and field_with_role(self.fields, "slope") is None:
            raise ValueError("Score: translatable_slope needs a field with role 'slope'")

    @property
    def offset_field(self) -> Field:
        """The field that carries the per-expert offset (translations and weights act on it)."""
        return (fields_with_role(self.fields, "offset") + fields_with_role(self.fields, "weight"))[0]

    @property
    def log_offset(self) -> bool:
        """True when the offset is the log of a weight field rather than the field itself."""
        return self.offset_field.role == "weight"

    def offset_of(self, gate: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """The per-expert offset, (k,)."""
        if self.offset is not None:
            return self.offset(gate)
        value = gate[self.offset_field.name]
        return jnp.log(value) if self.log_offset else value


SCORES: dict[str, Score] = {
    "linear": Score(BETA_FIELDS, _linear_slope, translatable_slope=True, affine=True),
    "euclidean": Score(LOCATION_FIELDS, _euclidean_slope),
    "laplace": Score(LOCATION_FIELDS, _laplace_slope),
    "gaussian": Score(
        (
            Field("weight", ("k",), "positive", "Gaussian-gate weights w (π_i ∝ w_i N(x | c_i, Γ_i))", role="weight"),
            Field("centre", ("k", "d"), "real", "Gaussian-gate centres c", role="location"),
            Field("covariance", ("k", "d", "d"), "positive_definite", "Gaussian-gate covariances Γ", role="covariance"),
        ),
        _gaussian_log_density,
    ),
}

TRANSFORMS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "identity": lambda u: u,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "gelu": lambda u: jax.nn.gelu(u, approximate=False),
    "softplus": jax.nn.softplus,
}


@dataclass(frozen=True)
class Normaliser:
    """π_i = φ(s_i) / Σ_j φ(s_j), given as ``log_phi``; ``shift_invariant`` when φ = exp."""

    log_phi: Callable[[jnp.ndarray], jnp.ndarray]
    shift_invariant: bool


NORMALISERS: dict[str, Normaliser] = {
    "softmax": Normaliser(lambda s: s, shift_invariant=True),
    "sigmoid": Normaliser(jax.nn.log_sigmoid, shift_invariant=False),
}

TEMPERATURE_MODES = (None, "fitted", "fixed")
TOP_K_KEYS = ("slope", "score")

TAU_FIELD = Field("tau", (), "positive", "shared temperature τ", role="temperature")

# ----------------------------------------------------------------------------------------------
# The gate record.


@dataclass(frozen=True)
class Gate:
    """A gate: static, hashable choice of score, transform, activation, temperature, normaliser, top-K.

    Attributes:
        score: key of :data:`SCORES`.
        normaliser: key of :data:`NORMALISERS`.
        transform: key of :data:`TRANSFORMS` or None (the "modified" gate of [4] uses ``"tanh"``).
        activation: key of :data:`ACTIVATIONS` or None; applied to the slope part.
        temperature: None, ``"fitted"`` or ``"fixed"``; when set, the parameter ``tau`` exists.
        top_k: number K of active experts, or None for a dense gate.
        top_k_on: ``"slope"`` (select on g_i, the default of [2]) or ``"score"`` (on s_i).
        selection_temperature: None (hard top-K) or T > 0: the soft selection of the module docstring.
    """

    score: str = "linear"
    normaliser: str = "softmax"
    transform: str | None = None
    activation: str | None = None
    temperature: str | None = None
    top_k: int | None = None
    top_k_on: str = "slope"
    selection_temperature: float | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for attribute, registry in (
            ("score", SCORES),
            ("normaliser", NORMALISERS),
            ("transform", TRANSFORMS),
            ("activation", ACTIVATIONS),
        ):
            value = getattr(self, attribute)
            if value is None and attribute in ("transform", "activation"):
                continue
            if value not in registry:
                raise ValueError(f"gate.{attribute}: unknown {attribute} {value!r}; expected one of {sorted(registry)}")
        if self.temperature not in TEMPERATURE_MODES:
            raise ValueError(f"gate.temperature: expected one of {TEMPERATURE_MODES}, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"gate.top_k: expected a positive integer K or None, got {self.top_k!r}")
        if self.top_k_on not in TOP_K_KEYS:
            raise ValueError(f"gate.top_k_on: expected one of {TOP_K_KEYS}, got {self.top_k_on!r}")
        if self.selection_temperature is not None:
            temperature = self.selection_temperature
            if self.top_k is None:
                raise ValueError("gate.selection_temperature: a soft selection needs a top-K gate (top_k)")
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
                raise ValueError(f"gate.selection_temperature: expected a number T > 0, got {temperature!r}")

    @property
    def fields(self) -> tuple[Field, ...]:
        base = SCORES[self.score].fields
        return base + (TAU_FIELD,) if self.temperature is not None else base

    @property
    def shift_invariant(self) -> bool:
        """True for softmax-type gates: a common shift of all offsets leaves π unchanged."""
        return NORMALISERS[self.normaliser].shift_invariant

    @property
    def slope_translatable(self) -> bool:
        """True when a common shift t₁ of every β₁ also leaves π unchanged."""
        return self.shift_invariant and SCORES[self.score].translatable_slope and self.activation is None

    @property
    def slope_field(self) -> Field | None:
        """The score's field with role ``slope`` (β₁ of the linear score), or None."""
        return field_with_role(SCORES[self.score].fields, "slope")

    @property
    def affine_in_parameters(self) -> bool:
        """True when every score s_i is affine in the gate parameters (as the fitter sees them)."""
        return SCORES[self.score].affine and self.activation is None and self.temperature is None

    def describe(self) -> str:
        parts = [f"{self.score} score", f"{self.normaliser} normaliser"]
        if self.transform:
            parts.append(f"{self.transform} input transform")
        if self.activation:
            parts.append(f"{self.activation} activation")
        if self.temperature:
            parts.append(f"{self.temperature} temperature")
        if self.top_k:
            soft = f", soft at T = {self.selection_temperature:g}" if self.selection_temperature else ""
            parts.append(f"top-{self.top_k} on {self.top_k_on}{soft}")
        return ", ".join(parts)


GATES: dict[str, Gate] = {
    "softmax": Gate(),
    "sigmoid": Gate(normaliser="sigmoid"),
    "topk_softmax": Gate(top_k=1),
    "temperature_softmax": Gate(temperature="fitted"),
    "activation_temperature_softmax": Gate(activation="tanh", temperature="fitted"),
    "modified_softmax": Gate(transform="tanh"),
    "euclidean_softmax": Gate(score="euclidean"),
    "euclidean_sigmoid": Gate(score="euclidean", normaliser="sigmoid"),
    "laplace_softmax": Gate(score="laplace"),
    "gaussian": Gate(score="gaussian"),
}
"""Named presets; any attribute of :class:`Gate` can be overridden, e.g. ``make_gate("topk_softmax", top_k=2)``."""


def make_gate(spec: str | Gate | Mapping[str, Any], **overrides: Any) -> Gate:
    """Build a gate from a preset name, a :class:`Gate`, or a dict ``{"name": ..., **attributes}``.

    A dict without ``name`` starts from the plain softmax gate. Overrides replace attributes.
    """
    if isinstance(spec, Gate):
        gate = spec
    elif isinstance(spec, str):
        if spec not in GATES:
            raise ValueError(f"gate: unknown gate {spec!r}; expected one of {sorted(GATES)} or a dict of attributes")
        gate = replace(GATES[spec], name=spec)
    elif isinstance(spec, Mapping):
        attributes = dict(spec)
        base = attributes.pop("name", "softmax")
        return make_gate(base, **attributes, **overrides)
    else:
        raise ValueError(f"gate: expected a preset name, a Gate or a dict, got {type(spec).__name__}")
    allowed = {f for f in Gate.__dataclass_fields__ if f != "name"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"gate: unknown option(s) {unknown}; expected some of {sorted(allowed)}")
    return replace(gate, **overrides) if overrides else gate


# ----------------------------------------------------------------------------------------------
# Evaluation.


def gate_slope(gate: Gate, gate_params: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
    """Slope part g(x), shape (n, k), after the input transform."""
    z = TRANSFORMS[gate.transform](x) if gate.transform else x
    return SCORES[gate.score].slope(gate_params, z)


def gate_scores(gate: Gate, gate_params: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Return (slope part g, full score s), both (n, k): s = act(g)/τ + offset."""
    slope = gate_slope(gate, gate_params, x)
    activated = ACTIVATIONS[gate.activation](slope) if gate.activation else slope
    if gate.temperature is not None:
        activated = activated / gate_params[TAU_FIELD.name]
    return slope, activated + SCORES[gate.score].offset_of(gate_params)[None, :]


def top_k_mask(selection_key: jnp.ndarray, top_k: int) -> jnp.ndarray:
    """Boolean (n, k) mask of the K largest entries per row; ties go to the lower index."""
    # lax.top_k is stable: among equal values the lower index comes first, so exactly K are chosen.
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(selection_key), top_k)
    return jnp.any(indices[..., :, None] == jnp.arange(selection_key.shape[-1]), axis=-2)


def selection_mask(gate: Gate, slope: jnp.ndarray, score: jnp.ndarray) -> jnp.ndarray | None:
    """The top-K selection S(x) as a boolean (n, k) mask, or None for a dense gate."""
    if gate.top_k is None or gate.top_k >= score.shape[-1]:
        return None
    return top_k_mask(slope if gate.top_k_on == "slope" else score, gate.top_k)


def soft_selection(selection_key: jnp.ndarray, top_k: int, temperature: float) -> jnp.ndarray:
    """log σ((κ_i − m)/T), (n, k): the soft top-K indicator, m the midpoint between the K-th and
    (K+1)-th largest keys of each row (K < k)."""
    largest, _ = jax.lax.top_k(selection_key, top_k + 1)
    midpoint = 0.5 * (largest[..., top_k - 1] + largest[..., top_k])
    return jax.nn.log_sigmoid((selection_key - midpoint[..., None]) / temperature)


def normalise(gate: Gate, score: jnp.ndarray, mask: jnp.ndarray | None, log_selection: jnp.ndarray | None = None) -> jnp.ndarray:
    """log π from full scores: log φ(s_i) − log Σ_{j∈S} φ(s_j), −inf outside the selection; with
    ``log_selection`` (a soft selection's log-indicator) added to every log φ(s_i) first."""
    log_phi = NORMALISERS[gate.normaliser].log_phi(score)
    if mask is not None:
        log_phi = jnp.where(mask, log_phi, -jnp.inf)
    if log_selection is not None:
        log_phi = log_phi + log_selection
    return log_phi - jax.nn.logsumexp(log_phi, axis=-1, keepdims=True)


def log_gate_weights(gate: Gate, gate_params: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
    """log π_i(x_j), shape (n, k). Unselected experts of a hard top-K gate get exactly −inf."""
    slope, score = gate_scores(gate, gate_params, x)
    if gate.selection_temperature is not None and gate.top_k < score.shape[-1]:
        key = slope if gate.top_k_on == "slope" else score
        return normalise(gate, score, None, soft_selection(key, gate.top_k, gate.selection_temperature))
    return normalise(gate, score, selection_mask(gate, slope, score))


def translate_gate(
    gate: Gate, gate_params: Mapping[str, jnp.ndarray], shift: jnp.ndarray, slope_shift: jnp.ndarray | None = None
) -> dict[str, jnp.ndarray]:
    """Apply the softmax translation (t₀, t₁): offsets += t₀ and, where translatable, β₁ += t₁.

    For a softmax-type gate the result defines the same π(x). ``slope_shift`` is ignored (must be
    None or zero) where the slope part is not translatable.
    """
    translated = dict(gate_params)
    score = SCORES[gate.score]
    offset = score.offset_field.name
    translated[offset] = gate_params[offset] * jnp.exp(shift) if score.log_offset else gate_params[offset] + shift
    if slope_shift is not None and gate.slope_translatable:
        slope = gate.slope_field.name
        translated[slope] = gate_params[slope] + slope_shift
    return translated


def canonical_gate(gate: Gate, gate_params: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """The canonical representative of the gate's translation class (see the module docstring)."""
    if not gate.shift_invariant:
        return dict(gate_params)
    score = SCORES[gate.score]
    offset = gate_params[score.offset_field.name]
    if score.log_offset:
        return translate_gate(gate, gate_params, -jnp.log(jnp.sum(offset)))
    reference_slope = gate_params[gate.slope_field.name][-1] if gate.slope_translatable else None
    return translate_gate(gate, gate_params, -offset[-1], None if reference_slope is None else -reference_slope)
