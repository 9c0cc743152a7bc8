"""Gated mixture-of-experts families and their likelihoods (``docs/estimators.md``).

A family is a gate × an expert × k experts on d-dimensional inputs. Its conditional density is

    p(y | x) = Σ_{i=1}^k π_i(x; θ_gate) f(y | x; η_i),

computed in log space as log p(y | x) = logsumexp_i [log π_i(x) + log f(y | x; η_i)], which stays
finite for extreme scores, tiny variances and the exact zeros of top-K gates. The E-step
responsibilities are the posterior expert probabilities

    r_{ji} = π_i(x_j) f(y_j | x_j; η_i) / p(y_j | x_j).

Sample weights w_j ≥ 0 give the weighted average log-likelihood Σ_j w_j log p(y_j|x_j) / Σ_j w_j.
A sample of weight 0 contributes exactly nothing, even when its log-density is −inf or NaN, which is
how fitters pad datasets of different n to one shape.

The canonical form (see :mod:`moe_theory.gates`) puts the last expert, the reference, at zero for
softmax-type gates: β₀ = 0 and, for the linear score without activation, β₁ = 0.

Paper: [1] Nguyen, Nguyen, Ho, "Demystifying Softmax Gating Function in Gaussian Mixture of
Experts", NeurIPS 2023, arXiv 2305.03288.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .experts import Expert, make_expert
from .gates import Gate, canonical_gate, log_gate_weights, make_gate
from .params import Field, MoEParams, ParameterError, to_jax, validate_group


@dataclass(frozen=True)
class Family:
    """Static, hashable description of a model: gate × expert × number of experts × input dim.

    Pass it as a static argument to ``jax.jit``. Build each family once and reuse it. ``dim = 0``
    is allowed: with no inputs, a mixture of Gaussian experts is a plain Gaussian mixture.
    """

    gate: Gate
    expert: Expert
    num_experts: int
    dim: int
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name, smallest in (("num_experts", 1), ("dim", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
                raise ValueError(f"{name}: expected an integer ≥ {smallest}, got {value!r}")
        if self.gate.top_k is not None and self.gate.top_k > self.num_experts:
            raise ValueError(
                f"gate.top_k: K = {self.gate.top_k} exceeds the number of experts k = {self.num_experts}; expected K ≤ k"
            )
        if self.expert.is_classifier:
            if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 2:
                raise ValueError(f"num_classes: a {self.expert.name} expert needs an integer C ≥ 2, got {self.num_classes!r}")
        elif self.num_classes is not None:
            raise ValueError(f"num_classes: only classifier experts take classes, got {self.num_classes!r}")

    @property
    def fields(self) -> dict[str, tuple[Field, ...]]:
        return {"gate": self.gate.fields, "expert": self.expert.fields}

    def field_shape(self, field: Field) -> tuple[int, ...]:
        return field.resolve_shape(self.num_experts, self.dim, self.num_classes)

    def describe(self) -> str:
        classes = f", C = {self.num_classes}" if self.num_classes else ""
        return f"{self.gate.name} gate ({self.gate.describe()}) × {self.expert.name} experts, k = {self.num_experts}, d = {self.dim}{classes}"


def make_family(
    gate: str | Gate | Mapping[str, Any] = "softmax",
    expert: str | Expert | Mapping[str, Any] = "gaussian",
    num_experts: int = 2,
    dim: int = 1,
    num_classes: int | None = None,
) -> Family:
    """Build a :class:`Family` from names or dicts, e.g. ``make_family("topk_softmax", "gaussian", 4)``
    or ``make_family({"name": "topk_softmax", "top_k": 2}, {"name": "nonlinear", "activation": "relu"}, 3)``."""
    return Family(make_gate(gate), make_expert(expert), num_experts, dim, num_classes)


def make_params(family: Family, values: Mapping[str, Any], dtype=None) -> MoEParams:
    """Validated parameters from a nested dict ``{"gate": {...}, "expert": {...}}`` of lists/arrays.

    Every field is checked for presence, shape (for d = 1 a flat list may stand for a (k, 1)
    field), finiteness and its constraint (variances and τ > 0, covariances positive definite);
    errors name the field, e.g. ``expert.nu[1] = -0.1: expected > 0``. ``dtype`` defaults to
    JAX's default float (float64 with moe_theory's x64 setting).
    """
    if not isinstance(values, Mapping):
        raise ParameterError(f"params: expected a mapping with keys 'gate' and 'expert', got {type(values).__name__}")
    unknown = sorted(set(values) - {"gate", "expert"})
    if unknown or set(values) != {"gate", "expert"}:
        raise ParameterError(f"params: expected exactly the keys ['expert', 'gate'], got {sorted(values)}")
    dtype = dtype or jnp.zeros(()).dtype
    groups = {
        group: to_jax(
            validate_group(group, family.fields[group], values[group], family.num_experts, family.dim, family.num_classes),
            dtype,
        )
        for group in ("gate", "expert")
    }
    return MoEParams(**groups)


def validate_params(family: Family, params: MoEParams) -> None:
    """Raise :class:`ParameterError` if concrete ``params`` do not fit ``family``. Host-side check."""
    for group in ("gate", "expert"):
        validate_group(
            group,
            family.fields[group],
            {k: np.asarray(v) for k, v in getattr(params, group).items()},
            family.num_experts,
            family.dim,
            family.num_classes,
        )


def gate_log_weights(family: Family, params: MoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """log π_i(x_j), shape (n, k); rows logsumexp to 0, top-K zeros are −inf."""
    return log_gate_weights(family.gate, params.gate, x)


def gate_weights(family: Family, params: MoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """π_i(x_j), shape (n, k); rows sum to 1."""
    return jnp.exp(gate_log_weights(family, params, x))


def expert_log_prob(family: Family, params: MoEParams, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """log f(y_j | x_j; η_i), shape (n, k)."""
    return family.expert.log_prob(params.expert, x, y)


def joint_log_prob(family: Family, params: MoEParams, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """log π_i(x_j) + log f(y_j | x_j; η_i), shape (n, k)."""
    return gate_log_weights(family, params, x) + expert_log_prob(family, params, x, y)


def weighted_sum(values: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
    """Σ_j w_j v_j, in which a zero weight removes v_j exactly, even if v_j is ±inf or NaN."""
    if weights is None:
        return jnp.sum(values)
    # Masking the values (not the product) also keeps the gradient finite: 0 · inf would give NaN.
    return jnp.sum(weights * jnp.where(weights > 0, values, 0.0))


@partial(jax.jit, static_argnames=("family", "reduce"))
def log_likelihood(
    family: Family,
    params: MoEParams,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    reduce: str = "mean",
) -> jnp.ndarray:
    """Log-likelihood of y given x: ``log p(y_j | x_j) = logsumexp_i [log π_i(x_j) + log f(y_j | x_j; η_i)]``.

    Args:
        family: the model family (static).
        params: its parameters.
        x: inputs, (n, d).
        y: responses, (n,): floats for regression experts, integer classes for classifiers.
        weights: optional sample weights (n,), ≥ 0; a zero weight removes the sample exactly.
        reduce: ``"mean"`` (the weighted average Σ w_j ℓ_j / Σ w_j, the default), ``"sum"``
            (Σ w_j ℓ_j) or ``"none"`` (the per-sample log-densities ℓ_j, (n,), unweighted).
    """
    if reduce == "none":
        return jax.nn.logsumexp(joint_log_prob(family, params, x, y), axis=-1)
    x, y = inert_padding(x, y, weights)
    return reduce_log_likelihood(jax.nn.logsumexp(joint_log_prob(family, params, x, y), axis=-1), weights, reduce)


def inert_padding(x: jnp.ndarray, y: jnp.ndarray, weights: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x and y with the rows of weight 0 replaced by 0.

    Masking ℓ_j alone is not enough: a NaN/inf x_j or y_j in a padded row still sends NaN back
    through the gradient (0 · NaN = NaN in every backward step). Replacing the inputs of zero-weight
    rows by 0, a valid point for every gate and expert, makes them inert.
    """
    if weights is None:
        return x, y
    keep = weights > 0
    return jnp.where(keep[:, None], x, jnp.zeros_like(x)), jnp.where(keep, y, jnp.zeros_like(y))


def reduce_log_likelihood(per_sample: jnp.ndarray, weights: jnp.ndarray | None, reduce: str) -> jnp.ndarray:
    """Σ_j w_j ℓ_j (``"sum"``) or its weighted average (``"mean"``) from the per-sample ℓ_j."""
    total = weighted_sum(per_sample, weights)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / (per_sample.shape[0] if weights is None else jnp.sum(weights))
    raise ValueError(f"reduce: expected 'mean', 'sum' or 'none', got {reduce!r}")


@partial(jax.jit, static_argnames=("family",))
def responsibilities(family: Family, params: MoEParams, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """E-step posterior expert probabilities r_{ji} = π_i(x_j) f(y_j|x_j; η_i) / p(y_j|x_j), (n, k).

    Rows sum to 1; experts outside a top-K selection get exactly 0.
    """
    return jax.nn.softmax(joint_log_prob(family, params, x, y), axis=-1)


@partial(jax.jit, static_argnames=("family",))
def mean_function(family: Family, params: MoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """E[y | x] = Σ_i π_i(x) h_i(x), (n,) for regression experts; class probabilities (n, C) for
    multinomial-logistic experts."""
    weights = gate_weights(family, params, x)
    expert_means = family.expert.mean(params.expert, x)
    if expert_means.ndim == 3:
        return jnp.einsum("nk,nkc->nc", weights, expert_means)
    return jnp.sum(weights * expert_means, axis=-1)


def canonicalize(family: Family, params: MoEParams) -> MoEParams:
    """The canonical representative of ``params`` under the gate's translation invariance."""
    return MoEParams(canonical_gate(family.gate, params.gate), dict(params.expert))


def model_from_dict(spec: Mapping[str, Any], dtype=None) -> tuple[Family, MoEParams]:
    """A (family, params) pair from the layout a YAML config uses::

        {"gate": "softmax" | {...}, "expert": "gaussian" | {...},
         "num_experts": 2,            # optional: inferred from the parameters
         "dim": 1,                    # optional: inferred from the parameters, else 1
         "num_classes": None,         # multinomial-logistic experts only
         "params": {"gate": {...}, "expert": {...}}}
    """
    allowed = {"gate", "expert", "num_experts", "dim", "num_classes", "params"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    if "params" not in spec:
        raise ValueError("model.params: missing; expected {'gate': {...}, 'expert': {...}}")
    values = spec["params"]
    gate, expert = make_gate(spec.get("gate", "softmax")), make_expert(spec.get("expert", "gaussian"))
    num_experts, dim = spec.get("num_experts"), spec.get("dim")
    for group, fields in (("gate", gate.fields), ("expert", expert.fields)):
        for field in fields:
            given = values.get(group, {}).get(field.name) if isinstance(values.get(group), Mapping) else None
            if given is None:
                continue
            shape = np.shape(given)
            if num_experts is None and field.shape[:1] == ("k",) and shape:
                num_experts = shape[0]
            if dim is None and field.shape == ("k", "d") and len(shape) == 2:
                dim = shape[1]
    if num_experts is None:
        raise ValueError("model.num_experts: not given and not inferable from the parameters")
    family = Family(gate, expert, int(num_experts), int(dim or 1), spec.get("num_classes"))
    return family, make_params(family, values, dtype)
