"""Random starting points for the fitters, driven by explicit PRNG keys (``docs/estimators.md``).

**Random initialisation** (needs no truth): k-means++ seeding [Arthur & Vassilvitskii, "k-means++:
the advantages of careful seeding", SODA 2007] on the standardised pairs (x, y) picks k data
points; each sample is assigned to its nearest seed, and the hard assignments, mixed with uniform
responsibilities, give ω. Then one M-step (:mod:`moe_theory.fit.em`) from ω gives the experts
(closed form, or Newton from a neutral start) and a few gate Newton steps give the gate. The
neutral start is read from each field's role (:data:`moe_theory.params.ROLES`), never its name:
a ``location`` (Euclidean and Laplace β₁, Gaussian-gate centres) starts at the cluster means, a
``covariance`` at the cluster covariances, a ``weight`` at the cluster masses, a ``temperature`` at
``tau``, an expert ``variance`` at the weighted variance of y, other positive expert fields at 1 and
every other field at 0 (the uniform gate for the linear score).

The near-truth start of the papers' protocol is :func:`moe_theory.init.near_truth_init`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp

from ..models import Family, canonicalize
from ..params import MoEParams, fields_with_role
from .em import expert_mstep, gate_mstep
from .settings import EM_DEFAULTS


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
        if field.role == "temperature":
            neutral_gate[field.name] = jnp.asarray(tau, dtype)
        elif field.role == "weight":
            neutral_gate[field.name] = cluster_mass / total
        elif field.role == "location":
            # Points in input space (Euclidean and Laplace locations, Gaussian-gate centres) start at
            # the cluster means; 0 can be a singular point of such a score.
            neutral_gate[field.name] = cluster_mean
        elif field.role == "covariance":
            residual = x[None, :, :] - cluster_mean[:, None, :]
            covariance = jnp.einsum("kn,kni,knj->kij", omega.T, residual, residual) / cluster_mass[:, None, None]
            neutral_gate[field.name] = covariance + 1e-3 * jnp.eye(family.dim, dtype=dtype)
        else:
            neutral_gate[field.name] = jnp.zeros(family.field_shape(field), dtype)
    neutral_expert = {
        field.name: (jnp.ones if field.constraint == "positive" else jnp.zeros)(family.field_shape(field), dtype)
        for field in family.expert.fields
    }
    variances = fields_with_role(family.expert.fields, "variance")
    if variances:
        # Weighted, so that zero-weight padding leaves the start unchanged.
        y_mean = jnp.sum(weights * y) / total
        response_variance = jnp.sum(weights * (y - y_mean) ** 2) / total
        for field in variances:
            neutral_expert[field.name] = neutral_expert[field.name] * response_variance
    start = MoEParams(neutral_gate, neutral_expert)
    config = replace(EM_DEFAULTS, gate_steps=gate_steps, expert_steps=expert_steps)
    expert = expert_mstep(family, config, start, x, y, omega, total)
    log_gate = jnp.zeros((n, k), dtype)
    # Fit the gate densely: a top-K gate at the all-zero start ties every expert, and ties would
    # leave the same K experts selected everywhere.
    dense = replace(family, gate=replace(family.gate, top_k=None))
    gate, _ = gate_mstep(dense, config, start, log_gate, x, omega, total)
    return canonicalize(family, MoEParams(gate, expert))
