"""Hierarchical mixtures of experts (HMoE): two levels of gates over one registry of experts
(``docs/hierarchical.md``).

With G groups of J experts each, an outer gate π_i(x) chooses a group and an inner gate π_{j|i}(x),
one per group, chooses an expert inside it:

    p(y | x) = Σ_{i=1}^G π_i(x) Σ_{j=1}^J π_{j|i}(x) f(y | x; η_ij).

Both gates are any registered :class:`~moe_theory.gates.Gate` (softmax, Laplace, sigmoid, with
temperature, ...) and f any registered :class:`~moe_theory.experts.Expert`. Each group has its own
inner-gate parameters, so the inner parameters carry a leading group axis: an inner field of shape
(k, d) is stored as (G, J, d), and the expert parameters as (G, J, ...).

**EM with nested responsibilities** [9]. The joint posterior of (group, expert) is

    r_{n,ij} = π_i(x_n) π_{j|i}(x_n) f(y_n | x_n; η_ij) / p(y_n | x_n),

and, since log(π_i π_{j|i} f_ij) = log π_i + log π_{j|i} + log f_ij, the expected complete-data
log-likelihood splits into three independent maximisations:

* outer gate:  Σ_n Σ_i r_{n,i·} log π_i(x_n),       with r_{n,i·} = Σ_j r_{n,ij} (the group posterior);
* inner gate of group i:  Σ_n Σ_j r_{n,ij} log π_{j|i}(x_n);
* experts:  Σ_n Σ_{ij} r_{n,ij} log f(y_n | x_n; η_ij), one term per expert.

Each is the M-step of a flat MoE (:mod:`moe_theory.fit.em`): the outer one with the group
posteriors as responsibilities, each inner one with responsibilities whose rows sum to r_{n,i·}
rather than 1 (the gate M-step handles any non-negative weights), and the experts' with all G·J
leaves side by side. Every M-step never decreases its term, so the log-likelihood never decreases.
The inner M-steps are vmapped over groups.

**Identifiability.** A softmax outer gate is invariant to a common translation of the outer
parameters, and each softmax inner gate to a translation within its group; the canonical form puts
the last group and the last expert of every group at zero (:func:`canonicalize`). Permuting groups,
or experts within a group, gives the same density, which the nested Voronoi cells of
:func:`hierarchical_errors` absorb.

**Nested Voronoi cells and expert errors.** Cells are formed by the expert parameters, which no
gate translation moves (a softmax gate's slopes are defined only up to a common shift, so which
group or expert sits at the canonical zero depends on the labelling): fitted group i belongs to the
cell of the true group i* minimising Σ_l min_m ‖η̂_il − η*_{i*m}‖², and fitted expert (i, l) to the
cell of the nearest true expert (i*, m) of that group. For each true expert the expert estimation
error is the worst over its cell of E_x |E[y | x; η̂] − E[y | x; η*]| (the total-variation distance
of the class probabilities for classifiers), the quantity in which [7] and [9] state their results.
Per-block parameter errors are the worst over the cell of ‖η̂ − η*‖ for every expert field and
every non-offset inner-gate field; a translatable gate slope is compared after removing the common
shift that fits best (the mean difference over the level's experts). All of this is invariant
under relabelling groups, or experts within a group.

[7] Nguyen, Pham, Cao, Dinh, Nguyen, Ho, Rinaldo, "A Statistical Theory of Gated Attention through
the Lens of Hierarchical Mixture of Experts", arXiv 2602.01468.
[9] Nguyen, Han, Harris, Saria, Ho, "On Expert Estimation in Hierarchical Mixture of Experts: Beyond
Softmax Gating Functions", arXiv 2410.02935.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .experts import Expert, make_expert
from .fit.em import expert_mstep, gate_mstep
from .fit.settings import EMConfig
from .fit.solver import FitResult, all_finite
from .gates import SCORES, Gate, canonical_gate, log_gate_weights, make_gate
from .models import Family, inert_padding, reduce_log_likelihood, weighted_sum
from .params import ParameterError, to_jax, validate_group
from .sampling import InputDistribution, UniformInputs


class HMoEParams(NamedTuple):
    """Parameters of a hierarchical MoE: outer gate (leaves (G, ...)), inner gates (leaves (G, J, ...))
    and experts (leaves (G, J, ...)). A JAX pytree; batch axes may lead every leaf."""

    outer: dict[str, Any]
    inner: dict[str, Any]
    expert: dict[str, Any]


@dataclass(frozen=True)
class HierarchicalFamily:
    """Static description of an HMoE: outer gate × inner gate × expert, G groups of J experts, input dim d."""

    outer_gate: Gate
    inner_gate: Gate
    expert: Expert
    num_groups: int
    experts_per_group: int
    dim: int
    num_classes: int | None = None

    def __post_init__(self) -> None:
        # Building the flat families validates counts, top-K bounds and classes, with their messages.
        _ = (self.outer, self.inner, self.leaves)

    @property
    def outer(self) -> Family:
        """The flat family of the outer level: G 'experts', one per group (its expert is unused)."""
        return Family(self.outer_gate, self.expert, self.num_groups, self.dim, self.num_classes)

    @property
    def inner(self) -> Family:
        """The flat family of one group: inner gate × expert, J experts."""
        return Family(self.inner_gate, self.expert, self.experts_per_group, self.dim, self.num_classes)

    @property
    def leaves(self) -> Family:
        """All G·J experts side by side (group-major), as one flat family; its gate is unused."""
        return Family(self.inner_gate, self.expert, self.num_groups * self.experts_per_group, self.dim, self.num_classes)

    def describe(self) -> str:
        return (
            f"HMoE: {self.outer_gate.name} outer gate × {self.inner_gate.name} inner gate × {self.expert.name} experts, "
            f"G = {self.num_groups} groups of J = {self.experts_per_group}, d = {self.dim}"
        )


def make_hierarchical_family(
    outer_gate: str | Gate | Mapping[str, Any] = "softmax",
    inner_gate: str | Gate | Mapping[str, Any] = "softmax",
    expert: str | Expert | Mapping[str, Any] = "gaussian",
    num_groups: int = 2,
    experts_per_group: int = 2,
    dim: int = 1,
    num_classes: int | None = None,
) -> HierarchicalFamily:
    """Build a :class:`HierarchicalFamily` from names or dicts, e.g.
    ``make_hierarchical_family("laplace_softmax", "softmax", "gaussian", 2, 2, dim=2)``."""
    return HierarchicalFamily(
        make_gate(outer_gate), make_gate(inner_gate), make_expert(expert), num_groups, experts_per_group, dim, num_classes
    )


def _per_group(
    group: str, fields, values: Any, family: HierarchicalFamily
) -> dict[str, np.ndarray]:
    """Validate a (G, J, ...) group of per-group parameters, group by group (messages name the group)."""
    if not isinstance(values, Mapping):
        raise ParameterError(f"{group}: expected a mapping of parameter names to arrays, got {type(values).__name__}")
    arrays = {}
    for name, value in values.items():
        try:
            arrays[name] = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ParameterError(f"{group}.{name}: expected a numeric array, got {value!r} ({error})") from None
        if arrays[name].ndim == 0 or arrays[name].shape[0] != family.num_groups:
            raise ParameterError(
                f"{group}.{name}: expected a leading axis of G = {family.num_groups} groups, got shape {arrays[name].shape}"
            )
    checked = [
        validate_group(
            f"{group}[{i}]", fields, {name: value[i] for name, value in arrays.items()},
            family.experts_per_group, family.dim, family.num_classes,
        )
        for i in range(family.num_groups)
    ]
    return {field.name: np.stack([one[field.name] for one in checked]) for field in fields}


def make_hmoe_params(family: HierarchicalFamily, values: Mapping[str, Any], dtype=None) -> HMoEParams:
    """Validated parameters from ``{"outer": {...}, "inner": {...}, "expert": {...}}``.

    ``outer`` holds the outer gate's fields with k = G; ``inner`` and ``expert`` hold each field with a
    leading group axis, e.g. the inner softmax's β₁ as (G, J, d). Errors name the level, the group
    and the field (``inner[1].beta1: expected shape (2, 1) ...``).
    """
    if not isinstance(values, Mapping) or set(values) != {"outer", "inner", "expert"}:
        got = sorted(values) if isinstance(values, Mapping) else type(values).__name__
        raise ParameterError(f"params: expected exactly the keys ['expert', 'inner', 'outer'], got {got}")
    dtype = dtype or jnp.zeros(()).dtype
    outer = validate_group(
        "outer", family.outer_gate.fields, values["outer"], family.num_groups, family.dim, family.num_classes
    )
    inner = _per_group("inner", family.inner_gate.fields, values["inner"], family)
    expert = _per_group("expert", family.expert.fields, values["expert"], family)
    return HMoEParams(to_jax(outer, dtype), to_jax(inner, dtype), to_jax(expert, dtype))


def flat_experts(params: HMoEParams) -> dict[str, jnp.ndarray]:
    """The expert parameters with the (G, J) axes merged into one leaf axis (group-major)."""
    return {name: value.reshape((-1,) + value.shape[2:]) for name, value in params.expert.items()}


def _grouped(family: HierarchicalFamily, flat: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    return {
        name: value.reshape((family.num_groups, family.experts_per_group) + value.shape[1:])
        for name, value in flat.items()
    }


def outer_log_weights(family: HierarchicalFamily, params: HMoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """log π_i(x_n), (n, G)."""
    return log_gate_weights(family.outer_gate, params.outer, x)


def inner_log_weights(family: HierarchicalFamily, params: HMoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """log π_{j|i}(x_n), (n, G, J)."""
    return jax.vmap(lambda group: log_gate_weights(family.inner_gate, group, x), out_axes=1)(params.inner)


def leaf_log_weights(family: HierarchicalFamily, params: HMoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """log [π_i(x_n) π_{j|i}(x_n)], (n, G, J): the weight of each expert in the flattened mixture."""
    return outer_log_weights(family, params, x)[:, :, None] + inner_log_weights(family, params, x)


def expert_log_prob(family: HierarchicalFamily, params: HMoEParams, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """log f(y_n | x_n; η_ij), (n, G, J)."""
    flat = family.expert.log_prob(flat_experts(params), x, y)
    return flat.reshape(flat.shape[0], family.num_groups, family.experts_per_group)


def joint_log_prob(family: HierarchicalFamily, params: HMoEParams, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """log π_i + log π_{j|i} + log f_ij, (n, G, J)."""
    return leaf_log_weights(family, params, x) + expert_log_prob(family, params, x, y)


@partial(jax.jit, static_argnames=("family", "reduce"))
def log_likelihood(family: HierarchicalFamily, params: HMoEParams, x, y, weights=None, reduce: str = "mean"):
    """log p(y | x) of the HMoE; ``weights`` and ``reduce`` as in :func:`moe_theory.models.log_likelihood`
    (``"none"`` gives the unweighted per-sample values, whatever the weights)."""
    def per_sample(x, y):
        joint = joint_log_prob(family, params, x, y)
        return jax.nn.logsumexp(joint.reshape(joint.shape[0], -1), axis=-1)

    if reduce == "none":
        return per_sample(x, y)
    return reduce_log_likelihood(per_sample(*inert_padding(x, y, weights)), weights, reduce)


@partial(jax.jit, static_argnames=("family",))
def responsibilities(family: HierarchicalFamily, params: HMoEParams, x, y) -> jnp.ndarray:
    """The nested posteriors r_{n,ij}, (n, G, J); each row sums to 1 over (i, j)."""
    joint = joint_log_prob(family, params, x, y)
    return jax.nn.softmax(joint.reshape(joint.shape[0], -1), axis=-1).reshape(joint.shape)


@partial(jax.jit, static_argnames=("family",))
def mean_function(family: HierarchicalFamily, params: HMoEParams, x) -> jnp.ndarray:
    """E[y | x] = Σ_i π_i(x) Σ_j π_{j|i}(x) h_ij(x): (n,) for regression experts, (n, C) for classifiers.

    This is also the regression form y = f_G(x) + ε that least squares fits."""
    weights = jnp.exp(leaf_log_weights(family, params, x)).reshape(x.shape[0], -1)
    means = family.expert.mean(flat_experts(params), x)
    if means.ndim == 3:
        return jnp.einsum("nk,nkc->nc", weights, means)
    return jnp.sum(weights * means, axis=-1)


@partial(jax.jit, static_argnames=("family", "n", "inputs"))
def sample(key: jax.Array, family: HierarchicalFamily, params: HMoEParams, n: int,
           inputs: InputDistribution = UniformInputs()) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Draw (x, y, labels): x ~ inputs, then group i ~ π(x), expert j ~ π_{·|i}(x), y ~ f(·|x; η_ij).

    Drawing the leaf (i, j) from the product weights π_i π_{j|i} is the same two-stage draw.
    ``labels`` are the leaf indices i·J + j, (n,) int32. The input distribution must not depend on
    the gate's parameters (a Gaussian-mixture input that reads a flat gate is not defined here).
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    input_key, label_key, response_key = jax.random.split(key, 3)
    x = inputs.draw(input_key, n, family.dim, dtype, None)
    log_weights = leaf_log_weights(family, params, x).reshape(n, -1)
    labels = jax.random.categorical(label_key, log_weights, axis=-1).astype(jnp.int32)
    return x, family.expert.sample(response_key, flat_experts(params), x, labels), labels


def canonicalize(family: HierarchicalFamily, params: HMoEParams) -> HMoEParams:
    """Canonical form: the outer gate's and every inner gate's reference at zero where softmax-type."""
    inner = jax.vmap(lambda group: canonical_gate(family.inner_gate, group))(params.inner)
    return HMoEParams(canonical_gate(family.outer_gate, params.outer), inner, dict(params.expert))


# ----------------------------------------------------------------------------------------------
# EM with nested responsibilities, as a solver of moe_theory.fit.solver.


class HMoEData(NamedTuple):
    x: jnp.ndarray
    y: jnp.ndarray
    weights: jnp.ndarray
    total: jnp.ndarray


class HMoEState(NamedTuple):
    params: HMoEParams
    log_likelihood: jnp.ndarray
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray


def _e_step(family: HierarchicalFamily, params: HMoEParams, data: HMoEData):
    """Average log-likelihood, ω_{n,ij} = w_n r_{n,ij} (n, G, J), and the gates' log-weights log π_i
    (n, G) and log π_{j|i} (n, G, J), which the gate M-steps take as their starting values."""
    log_outer = outer_log_weights(family, params, data.x)
    log_inner = inner_log_weights(family, params, data.x)
    joint = log_outer[:, :, None] + log_inner + expert_log_prob(family, params, data.x, data.y)
    flat = joint.reshape(joint.shape[0], -1)
    per_sample = jax.nn.logsumexp(flat, axis=-1)
    value = weighted_sum(per_sample, data.weights) / data.total
    omega = jnp.where(data.weights[:, None] > 0, data.weights[:, None] * jnp.exp(flat - per_sample[:, None]), 0.0)
    return value, omega.reshape(joint.shape), log_outer, log_inner


@dataclass(frozen=True)
class HierarchicalEM:
    """EM for an HMoE (module docstring), with the flat M-steps of :mod:`moe_theory.fit.em` and the
    settings of :class:`~moe_theory.fit.settings.EMConfig` (conditional likelihood only)."""

    family: HierarchicalFamily
    config: EMConfig

    def __post_init__(self) -> None:
        if self.config.likelihood != "conditional":
            raise ValueError("likelihood: an HMoE is fitted by its conditional likelihood; expected 'conditional'")

    @property
    def max_iter(self) -> int:
        return self.config.max_iter

    def init(self, params0: HMoEParams, x, y, weights):
        dtype = jax.tree_util.tree_leaves(params0)[0].dtype
        weights = jnp.ones(x.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
        x, y = inert_padding(x, y, weights)
        data = HMoEData(x.astype(dtype), y, weights, jnp.sum(weights))
        nan = jnp.asarray(jnp.nan, dtype)
        params0 = canonicalize(self.family, params0)
        return data, HMoEState(params0, nan, nan, jnp.asarray(0), all_finite(params0))

    def step(self, data: HMoEData, state: HMoEState, active) -> HMoEState:
        del active
        family, config, params = self.family, self.config, state.params
        value, omega, log_outer, log_inner = _e_step(family, params, data)
        n = omega.shape[0]
        experts = expert_mstep(
            family.leaves, config, _FlatParams({}, flat_experts(params)), data.x, data.y, omega.reshape(n, -1), data.total
        )
        outer, _ = gate_mstep(
            family.outer, config, _FlatParams(params.outer, {}), log_outer, data.x, jnp.sum(omega, axis=-1), data.total
        )

        def inner_step(group_params, group_log_pi, group_omega):
            return gate_mstep(family.inner, config, _FlatParams(group_params, {}), group_log_pi, data.x, group_omega,
                              data.total)[0]

        inner = jax.vmap(inner_step, in_axes=(0, 1, 1))(params.inner, log_inner, omega)
        new = HMoEParams(outer, inner, _grouped(family, experts))
        return HMoEState(new, value, state.log_likelihood, state.iteration + 1, jnp.isfinite(value) & all_finite(new))

    def finish(self, data: HMoEData, state: HMoEState, converged) -> FitResult:
        value = _e_step(self.family, state.params, data)[0]
        finite = state.finite & jnp.isfinite(value) & all_finite(state.params)
        return FitResult(canonicalize(self.family, state.params), value, state.iteration, converged & finite, finite)


class _FlatParams(NamedTuple):
    """The (gate, expert) pair the flat M-steps read; one of the two is left empty where unused."""

    gate: dict
    expert: dict


def perturbed_start(key: jax.Array, family: HierarchicalFamily, truth: HMoEParams, scale: float,
                    extra_experts: int = 0) -> HMoEParams:
    """A start near the truth: every real coordinate plus N(0, scale²), every positive one times
    exp(N(0, scale²)); with ``extra_experts`` > 0 each group gains that many experts, copies of its
    last true expert (perturbed), so the fit is over-specified inside every group.

    Over-specified starts split a true expert, the regime in which [9]'s slow rates arise.
    """
    def grow(tree, fields):
        # Only fields with an expert axis grow; a per-group temperature τ, (G,), has none.
        return {
            field.name: jnp.concatenate([tree[field.name]] + [tree[field.name][:, -1:]] * extra_experts, axis=1)
            if extra_experts and field.shape[:1] == ("k",) else tree[field.name]
            for field in fields
        }

    def perturb(tree, fields, level_key):
        out = {}
        for field, field_key in zip(fields, jax.random.split(level_key, len(fields))):
            value = tree[field.name]
            noise = scale * jax.random.normal(field_key, value.shape, value.dtype)
            if field.constraint == "positive":
                value = value * jnp.exp(noise)
            elif field.constraint == "real":
                value = value + noise
            out[field.name] = value
        return out

    outer_key, inner_key, expert_key = jax.random.split(key, 3)
    return HMoEParams(
        perturb(truth.outer, family.outer_gate.fields, outer_key),
        perturb(grow(truth.inner, family.inner_gate.fields), family.inner_gate.fields, inner_key),
        perturb(grow(truth.expert, family.expert.fields), family.expert.fields, expert_key),
    )


def grown_family(family: HierarchicalFamily, extra_experts: int) -> HierarchicalFamily:
    """The same family with ``extra_experts`` more experts per group (the over-specified fit)."""
    return HierarchicalFamily(
        family.outer_gate, family.inner_gate, family.expert, family.num_groups,
        family.experts_per_group + extra_experts, family.dim, family.num_classes,
    )


# ----------------------------------------------------------------------------------------------
# Nested Voronoi cells, parameter and expert errors.


class HierarchicalErrors(NamedTuple):
    """Result of :func:`hierarchical_errors` (leading batch axes of ``fitted`` on every field).

    Attributes:
        expert_error: (G*·J*,) worst E_x distance of the fitted experts in each true expert's cell.
        block_error: dict block name → (G*·J*,) worst ‖η̂ − η*‖ over the cell, per parameter block
            (the inner gate's non-offset fields, then the expert's).
        outer_error: (G*,) worst ‖θ̂ − θ*‖ of the outer gate's non-offset fields over each true group's cell.
        cell_size: (G*·J*,) number of fitted experts in each true expert's cell.
        group_of: (G,) true group of each fitted group; leaf_of: (G·J,) true expert of each fitted one.
    """

    expert_error: jnp.ndarray
    block_error: dict
    outer_error: jnp.ndarray
    cell_size: jnp.ndarray
    group_of: jnp.ndarray
    leaf_of: jnp.ndarray


def _gate_blocks(gate: Gate, tree: Mapping[str, jnp.ndarray], leading: int) -> dict[str, jnp.ndarray]:
    """The gate's fields other than its offset and temperature, flattened to (leading axes..., p)."""
    offset = SCORES[gate.score].offset_field.name
    return {
        field.name: tree[field.name].reshape(tree[field.name].shape[:leading] + (-1,))
        for field in gate.fields if field.name != offset and field.role != "temperature"
    }


def _translated_gaps(gate: Gate, fitted: dict, true_matched: dict) -> dict[str, jnp.ndarray]:
    """‖θ̂_i − θ*_{a(i)}‖ per gate block for the items of one softmax level, (m,) each, after removing
    the common translation of a translatable slope (the mean difference over the level's items,
    which minimises the summed squared gap): the gate cannot tell those parameters apart."""
    gaps = {}
    for name, value in fitted.items():
        difference = value - true_matched[name]
        if gate.slope_translatable and name == gate.slope_field.name:
            difference = difference - jnp.mean(difference, axis=0, keepdims=True)
        gaps[name] = jnp.linalg.norm(difference, axis=-1)
    return gaps


def _errors_one(family: HierarchicalFamily, fitted: HMoEParams, truth: HMoEParams, x: jnp.ndarray) -> HierarchicalErrors:
    some = next(iter(fitted.expert))
    G, J = fitted.expert[some].shape[:2]
    G_true, J_true = truth.expert[some].shape[:2]
    fitted_experts = jnp.concatenate([v.reshape(G, J, -1) for _, v in sorted(fitted.expert.items())], axis=-1)
    true_experts = jnp.concatenate([v.reshape(G_true, J_true, -1) for _, v in sorted(truth.expert.items())], axis=-1)
    # ‖η̂_il − η*_jm‖², (G, J, G*, J*).
    expert_gap = jnp.sum((fitted_experts[:, :, None, None] - true_experts[None, None]) ** 2, axis=-1)
    # Cells by expert parameters, which no gate translation can move: fitted group i goes to the true
    # group whose experts are nearest to its own (Σ_l min_m), then each of its experts to the nearest
    # true expert of that group.
    group_of = jnp.argmin(jnp.sum(jnp.min(expert_gap, axis=3), axis=1), axis=1)  # (G,)
    inner_choice = jnp.argmin(jnp.take_along_axis(expert_gap, group_of[:, None, None, None], axis=2)[:, :, 0], axis=-1)
    leaf_of = (group_of[:, None] * J_true + inner_choice).reshape(-1)

    block_gap = {}
    for name, value in fitted.expert.items():
        true_value = truth.expert[name].reshape(G_true * J_true, -1)[leaf_of]
        block_gap[name] = jnp.linalg.norm(value.reshape(G * J, -1) - true_value, axis=-1)
    fitted_inner = _gate_blocks(family.inner_gate, fitted.inner, 2)
    true_inner = {k: v.reshape(G_true * J_true, -1)[leaf_of].reshape(G, J, -1)
                  for k, v in _gate_blocks(family.inner_gate, truth.inner, 2).items()}
    inner_gaps = jax.vmap(lambda f, t: _translated_gaps(family.inner_gate, f, t))(fitted_inner, true_inner)
    block_gap.update({name: value.reshape(-1) for name, value in inner_gaps.items()})
    outer_blocks = _gate_blocks(family.outer_gate, fitted.outer, 1)
    outer_true = {k: v[group_of] for k, v in _gate_blocks(family.outer_gate, truth.outer, 1).items()}
    outer_gaps = _translated_gaps(family.outer_gate, outer_blocks, outer_true)
    outer_distance = jnp.sqrt(sum(gap**2 for gap in outer_gaps.values()))

    distance = losses.expert_distances(family.expert, flat_experts(fitted), flat_experts(truth), leaf_of, x)

    def worst(values, assignment, num_true):
        return losses.cell_statistics(values, assignment, num_true)[0]

    leaves = G_true * J_true
    return HierarchicalErrors(
        expert_error=worst(distance, leaf_of, leaves),
        block_error={name: worst(value, leaf_of, leaves) for name, value in block_gap.items()},
        outer_error=worst(outer_distance, group_of, G_true),
        cell_size=jnp.sum(leaf_of[:, None] == jnp.arange(leaves)[None, :], axis=0),
        group_of=group_of,
        leaf_of=leaf_of,
    )


def hierarchical_errors(
    key: jax.Array,
    family: HierarchicalFamily,
    fitted: HMoEParams,
    truth: HMoEParams,
    inputs: InputDistribution = UniformInputs(),
    num_inputs: int = 2000,
) -> HierarchicalErrors:
    """Nested-Voronoi expert and parameter errors of ``fitted`` (any leading batch axes) against an
    unbatched ``truth`` (module docstring). Both are put in canonical form first; E_x uses
    ``num_inputs`` draws of ``inputs`` from ``key``, the same for every replicate."""
    dtype = jax.tree_util.tree_leaves(truth)[0].dtype
    x = inputs.draw(key, num_inputs, family.dim, dtype, None)
    truth = canonicalize(family, truth)
    reference_field = family.outer_gate.fields[0]
    batch = fitted.outer[reference_field.name].ndim - len(family.outer.field_shape(reference_field))

    def one(params):
        return _errors_one(family, canonicalize(family, params), truth, x)

    for _ in range(batch):
        one = jax.vmap(one)
    return one(fitted)
