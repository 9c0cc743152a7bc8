"""Starting points for the fitters, all driven by explicit PRNG keys.

**Near-truth initialisation** (the papers' protocol, THEORY.md §5, [1]). Each of the k fitted atoms is
assigned to one of the k* true atoms: fitted atom i < k − 1 goes to true atom i mod k*, and the last
fitted atom always goes to the last true atom, the reference expert of softmax-type gates. The
assigned true parameters are copied and perturbed with noise whose scale shrinks with n:

* gate fields that are real (β₀, β₁, Gaussian-gate centres): + N(0, (c_gate · n^{−α_gate})²);
* expert fields that are real (a, b, η): + N(0, (c_mean · n^{−α_mean})²);
* positive fields (variances ν, τ, Gaussian-gate weights) and covariance matrices (on the diagonal):
  + |N(0, (c_var · n^{−α_var})²)|, so they stay valid.

The paper-1 code uses (c, α) = (0.005, 0.083) on the gate, (0.05, 0.083) on the expert means and
(0.005, 0.25) on the variances [1]. Set α = 0 for an n-independent start. The truth is put in
canonical form first, so the fitted reference expert starts (and stays) at the reference.

**Random initialisation** (needs no truth): k-means++ seeding [Arthur & Vassilvitskii, k-means++: the advantages of careful seeding, SODA 2007] on the
standardised pairs (x, y) picks k data points; each sample is assigned to its nearest seed; then one
M-step from those hard responsibilities gives the experts (closed form, or Newton from a neutral
start) and a few gate Newton steps give the gate, starting from the uniform gate (β = 0) for the
linear score and from the cluster means for location-type scores and Gaussian-gate centres.

[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp

from .gates import SCORES
from .models import Family, canonicalize
from .params import MoEParams


@dataclass(frozen=True)
class NearTruthNoise:
    """Noise scales c·n^{−α} of the near-truth start (defaults: the paper-1 code [1])."""

    gate_scale: float = 0.005
    gate_exponent: float = 0.083
    mean_scale: float = 0.05
    mean_exponent: float = 0.083
    variance_scale: float = 0.005
    variance_exponent: float = 0.25


def default_assignment(num_fitted: int, num_true: int) -> tuple[int, ...]:
    """Fitted atom i → true atom i mod k*, and the last fitted atom → the last (reference) true atom."""
    if num_fitted < num_true:
        raise ValueError(f"num_experts: the fitted k = {num_fitted} is smaller than the true k* = {num_true}")
    return tuple(i % num_true for i in range(num_fitted - 1)) + (num_true - 1,)


def near_truth_init(
    key: jax.Array,
    family: Family,
    true_family: Family,
    true_params: MoEParams,
    sample_size: int | jnp.ndarray,
    noise: NearTruthNoise = NearTruthNoise(),
    assignment: Sequence[int] | None = None,
) -> MoEParams:
    """A start near the truth for a fitted family with k ≥ k* experts (see the module docstring)."""
    # A top-K fit may activate another number K̄ of experts than the truth [2]; the fields are the same.
    if (replace(family.gate, top_k=None), family.expert, family.dim, family.num_classes) != (
        replace(true_family.gate, top_k=None),
        true_family.expert,
        true_family.dim,
        true_family.num_classes,
    ):
        raise ValueError(
            "near_truth_init: the fitted and true families must differ only in the number of experts "
            "(and, for top-K gates, the number of active experts)"
        )
    assignment = tuple(assignment) if assignment is not None else default_assignment(family.num_experts, true_family.num_experts)
    if len(assignment) != family.num_experts or not all(0 <= a < true_family.num_experts for a in assignment):
        raise ValueError(
            f"assignment: expected {family.num_experts} indices in [0, {true_family.num_experts}), got {list(assignment)}"
        )
    index = jnp.asarray(assignment)
    truth = canonicalize(true_family, true_params)
    n = jnp.asarray(sample_size, dtype=jnp.result_type(float))
    scales = {
        "gate": noise.gate_scale * n ** (-noise.gate_exponent),
        "expert": noise.mean_scale * n ** (-noise.mean_exponent),
        "positive": noise.variance_scale * n ** (-noise.variance_exponent),
    }
    groups = {}
    for group_key, group in zip(jax.random.split(key, 2), ("gate", "expert")):
        fields = family.fields[group]
        out = {}
        for field_key, field in zip(jax.random.split(group_key, len(fields)), fields):
            value = getattr(truth, group)[field.name]
            if field.shape == ():
                copied = value
            else:
                copied = value[index]
            draw = jax.random.normal(field_key, copied.shape, dtype=copied.dtype)
            if field.constraint == "positive":
                copied = copied + jnp.abs(draw) * scales["positive"]
            elif field.constraint == "positive_definite":
                diagonal = jnp.abs(jnp.diagonal(draw, axis1=-2, axis2=-1)) * scales["positive"]
                copied = copied + jax.vmap(jnp.diag)(diagonal)
            else:
                copied = copied + draw * scales[group]
            out[field.name] = copied
        groups[group] = out
    return canonicalize(family, MoEParams(**groups))


def _kmeans_plus_plus_labels(key: jax.Array, features: jnp.ndarray, weights: jnp.ndarray, num_clusters: int) -> jnp.ndarray:
    """k-means++ seeding on ``features`` (n, m); returns each sample's nearest-seed index."""
    keys = jax.random.split(key, num_clusters)
    first = jax.random.categorical(keys[0], jnp.log(weights))
    nearest = jnp.sum((features - features[first]) ** 2, axis=-1)
    seeds = jnp.zeros((num_clusters, features.shape[1]), features.dtype).at[0].set(features[first])

    def add_seed(i, carry):
        seeds, nearest = carry
        # Pick the next seed with probability ∝ w_j · D_j², D_j the distance to the nearest seed.
        chosen = jax.random.categorical(keys[i], jnp.log(weights * nearest))
        distance = jnp.sum((features - features[chosen]) ** 2, axis=-1)
        return seeds.at[i].set(features[chosen]), jnp.minimum(nearest, distance)

    seeds, _ = jax.lax.fori_loop(1, num_clusters, add_seed, (seeds, nearest))
    distances = jnp.sum((features[:, None, :] - seeds[None]) ** 2, axis=-1)
    return jnp.argmin(distances, axis=-1)


@partial(jax.jit, static_argnames=("family", "gate_steps", "expert_steps"))
def random_init(
    key: jax.Array,
    family: Family,
    x: jnp.ndarray,
    y: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    smoothing: float = 0.05,
    gate_steps: int = 5,
    expert_steps: int = 10,
    tau: float = 1.0,
) -> MoEParams:
    """A data-driven start that needs no truth (see the module docstring).

    Hard k-means++ clusters of the standardised (x, y) become responsibilities, mixed with the
    uniform ones by ``smoothing`` so that no expert is left without data; then one expert M-step
    and ``gate_steps`` gate Newton steps. Temperature gates start at τ = ``tau``.
    """
    from .fit.em import EMConfig, expert_mstep, gate_mstep  # deferred: moe_theory.fit imports this module

    dtype = x.dtype
    n, k = x.shape[0], family.num_experts
    weights = jnp.ones(n, dtype) if weights is None else jnp.asarray(weights, dtype)
    response = jax.nn.one_hot(y, family.num_classes, dtype=dtype) if family.expert.is_classifier else y[:, None].astype(dtype)
    features = jnp.concatenate([x, response], axis=1)
    total = jnp.sum(weights)
    centre = jnp.sum(weights[:, None] * features, axis=0) / total
    spread = jnp.sqrt(jnp.sum(weights[:, None] * (features - centre) ** 2, axis=0) / total)
    standardised = (features - centre) / jnp.where(spread > 0, spread, 1.0)
    labels = _kmeans_plus_plus_labels(key, standardised, weights, k)
    responsibilities = (1.0 - smoothing) * jax.nn.one_hot(labels, k, dtype=dtype) + smoothing / k
    omega = weights[:, None] * responsibilities

    cluster_mass = jnp.sum(omega, axis=0)
    cluster_mean = (omega.T @ x) / cluster_mass[:, None]  # (k, d)
    neutral_gate = {}
    for field in family.gate.fields:
        if field.name == "tau":
            neutral_gate["tau"] = jnp.asarray(tau, dtype)
        elif field.name == "weight":
            neutral_gate["weight"] = cluster_mass / total
        elif field.name == "centre" or (field.name == "beta1" and not SCORES[family.gate.score].affine):
            # Locations (Euclidean, Laplace) or directions of a non-affine score start at the
            # cluster means; 0 can be a singular point of such a score.
            neutral_gate[field.name] = cluster_mean
        elif field.name == "covariance":
            residual = x[None, :, :] - cluster_mean[:, None, :]
            covariance = jnp.einsum("kn,kni,knj->kij", omega.T, residual, residual) / cluster_mass[:, None, None]
            neutral_gate["covariance"] = covariance + 1e-3 * jnp.eye(family.dim, dtype=dtype)
        else:
            neutral_gate[field.name] = jnp.zeros(family.field_shape(field), dtype)
    neutral_expert = {
        field.name: (jnp.ones if field.constraint == "positive" else jnp.zeros)(family.field_shape(field), dtype)
        for field in family.expert.fields
    }
    if "nu" in neutral_expert:
        # Weighted, so that zero-weight padding leaves the start unchanged.
        y_mean = jnp.sum(weights * y) / total
        neutral_expert["nu"] = neutral_expert["nu"] * jnp.sum(weights * (y - y_mean) ** 2) / total
    start = MoEParams(neutral_gate, neutral_expert)
    config = EMConfig(gate_steps=gate_steps, expert_steps=expert_steps)
    expert = expert_mstep(family, config, start, x, y, omega, total)
    log_gate = jnp.zeros((n, k), dtype)
    # Fit the gate densely: a top-K gate at the all-zero start ties every expert, and ties would
    # leave the same K experts selected everywhere.
    dense = replace(family, gate=replace(family.gate, top_k=None))
    gate, _ = gate_mstep(dense, config, start, log_gate, x, omega, total)
    return canonicalize(family, MoEParams(gate, expert))
