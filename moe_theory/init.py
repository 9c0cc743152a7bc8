"""Starting points for the fitters, all driven by explicit PRNG keys.

**Near-truth initialisation** (the papers' protocol, ``docs/estimators.md``, [1]). Each of the k fitted atoms is
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

**Random initialisation** (needs no truth, k-means++ then one M-step) is
:func:`moe_theory.fit.starts.random_init`, re-exported here: it runs EM's M-steps, so it lives with
the fitters, and this module imports it from there (``moe_theory.fit`` never imports this module).

[1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import jax
import jax.numpy as jnp

from .fit.starts import random_init
from .models import Family, canonicalize
from .params import MoEParams

__all__ = ["NearTruthNoise", "default_assignment", "near_truth_init", "random_init"]


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
