"""Input distributions and the MoE sampler.

A sample of size n from a family with parameters θ is drawn in three independent streams:

    x_j ~ P_X                      (the input distribution),
    z_j | x_j ~ Categorical(π(x_j)) (the latent expert label; top-K zeros are never drawn),
    y_j | x_j, z_j ~ f(· | x_j; η_{z_j}).

Input distributions (static, hashable records, so they can be ``jit`` arguments) form an open
registry, like gates and experts: subclass :class:`InputDistribution`, implement ``draw`` (and
``draw_padded`` if the first n of ``size`` draws are not the n-point sample, as for the grid), and
add the class to :data:`INPUTS`. The registered ones:

* ``uniform``  -- uniform on the box [low, high]^d (bounds scalar or per coordinate);
* ``normal``   -- N(mean, std²) independently per coordinate;
* ``grid``     -- the deterministic grid linspace(low, high, n), d = 1, used by paper [1]'s code;
* ``gaussian_mixture`` -- Σ_i p_i N(m_i, S_i), the inputs of paper [8]. With ``from_gate=True``
  the mixture is the Gaussian gate's own (w/Σw, c, Γ); then drawing x from it and z from the gate
  is the same as drawing z ~ Cat(w/Σw) first and x ~ N(c_z, Γ_z), which is [8]'s generative model.

Everything is jit- and vmap-clean: replicates come from one ``jax.vmap`` over keys. The models are
described in ``docs/gates.md`` and ``docs/experts.md``.

Papers: [1] arXiv 2305.03288, [8] arXiv 2305.07572.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import linalg
from .gates import SCORES
from .models import Family, gate_log_weights
from .params import MoEParams


def _as_tuple(value: Any) -> Any:
    """Nested lists to nested tuples, so that an input record stays hashable."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_as_tuple(v) for v in value)
    return float(value)


def _gate_mixture(params: MoEParams) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(log w, c, Γ) of the Gaussian gate π_i ∝ w_i N(x | c_i, Γ_i): its score's fields with roles
    weight, location and covariance."""
    names = {field.role: field.name for field in SCORES["gaussian"].fields}
    if not all(name in params.gate for name in names.values()):
        raise ValueError("inputs: from_gate=True needs the Gaussian gate (weights, centres and covariances)")
    return jnp.log(params.gate[names["weight"]]), params.gate[names["location"]], params.gate[names["covariance"]]


@dataclass(frozen=True)
class InputDistribution:
    """Base of every input distribution P_X: a static, hashable record with a registry ``name``."""

    name: ClassVar[str] = "inputs"

    def draw(self, key: jax.Array, n: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        """n inputs, (n, d). ``params`` are the true parameters (for inputs that depend on the gate)."""
        raise NotImplementedError

    def draw_padded(self, key: jax.Array, n: jnp.ndarray, size: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        """(size, d) inputs whose first n rows equal ``draw(key, n, ...)``, for a traced n ≤ size.

        The default draws ``size`` points: with JAX's partitionable Threefry bits, independent draws
        of a longer array start with the same values, so this holds for every i.i.d. distribution.
        """
        return self.draw(key, size, dim, dtype, params)


@dataclass(frozen=True)
class UniformInputs(InputDistribution):
    """x ~ Uniform([low, high]^d); ``low``/``high`` are scalars or length-d tuples."""

    low: Any = 0.0
    high: Any = 1.0
    name: ClassVar[str] = "uniform"

    def draw(self, key: jax.Array, n: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        low = jnp.broadcast_to(jnp.asarray(self.low, dtype), (dim,))
        high = jnp.broadcast_to(jnp.asarray(self.high, dtype), (dim,))
        return jax.random.uniform(key, (n, dim), dtype=dtype, minval=low, maxval=high)


@dataclass(frozen=True)
class NormalInputs(InputDistribution):
    """x ~ N(mean, std²) independently per coordinate."""

    mean: Any = 0.0
    std: Any = 1.0
    name: ClassVar[str] = "normal"

    def draw(self, key: jax.Array, n: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        mean = jnp.broadcast_to(jnp.asarray(self.mean, dtype), (dim,))
        std = jnp.broadcast_to(jnp.asarray(self.std, dtype), (dim,))
        return mean + std * jax.random.normal(key, (n, dim), dtype=dtype)


@dataclass(frozen=True)
class GridInputs(InputDistribution):
    """The deterministic grid x_j = linspace(low, high, n)_j (d = 1 only), as in paper [1]'s code."""

    low: float = 0.0
    high: float = 1.0
    name: ClassVar[str] = "grid"

    def draw(self, key: jax.Array, n: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        if dim != 1:
            raise ValueError(f"inputs: the grid input distribution needs d = 1, got d = {dim}")
        return jnp.linspace(self.low, self.high, n, dtype=dtype)[:, None]

    def draw_padded(self, key: jax.Array, n: jnp.ndarray, size: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        """linspace(low, high, n) in the first n of ``size`` rows, with ``jnp.linspace``'s arithmetic
        (low·(1 − t) + high·t with t = j/(n − 1), and the last point set to high)."""
        if dim != 1:
            raise ValueError(f"inputs: the grid input distribution needs d = 1, got d = {dim}")
        index = jax.lax.iota(dtype, size)
        step = index / jnp.asarray(n - 1, dtype)
        low, high = jnp.asarray(self.low, dtype), jnp.asarray(self.high, dtype)
        grid = low * (1 - step) + high * step
        return jnp.where(jnp.arange(size) == n - 1, high, grid)[:, None]


@dataclass(frozen=True)
class GaussianMixtureInputs(InputDistribution):
    """x ~ Σ_i p_i N(m_i, S_i), or the Gaussian gate's own mixture with ``from_gate=True``."""

    weights: tuple | None = None
    means: tuple | None = None
    covariances: tuple | None = None
    from_gate: bool = False
    name: ClassVar[str] = "gaussian_mixture"

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.weights, self.means, self.covariances)]
        if self.from_gate and any(given):
            raise ValueError("inputs: give either from_gate=True or weights/means/covariances, not both")
        if not self.from_gate and not all(given):
            raise ValueError("inputs: a gaussian_mixture needs weights, means and covariances (or from_gate: true)")
        if not self.from_gate:
            weights = np.asarray(self.weights)
            if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
                raise ValueError(f"inputs.weights: expected non-negative weights summing to 1, got {list(weights)}")

    def draw(self, key: jax.Array, n: int, dim: int, dtype, params: MoEParams) -> jnp.ndarray:
        if self.from_gate:
            log_weights, means, covariances = _gate_mixture(params)
        else:
            log_weights = jnp.log(jnp.asarray(self.weights, dtype))
            means = jnp.asarray(self.means, dtype).reshape(-1, dim)
            covariances = jnp.asarray(self.covariances, dtype).reshape(-1, dim, dim)
        component_key, noise_key = jax.random.split(key)
        components = jax.random.categorical(component_key, log_weights, shape=(n,))
        noise = jax.random.normal(noise_key, (n, dim), dtype=dtype)
        cholesky = linalg.cholesky(covariances)[components]  # (n, d, d)
        return means[components] + jnp.einsum("nij,nj->ni", cholesky, noise)


INPUTS: dict[str, type[InputDistribution]] = {
    cls.name: cls for cls in (UniformInputs, NormalInputs, GridInputs, GaussianMixtureInputs)
}
"""Registered input distributions by name; add an :class:`InputDistribution` subclass to extend."""


def make_inputs(spec: str | InputDistribution | Mapping[str, Any]) -> InputDistribution:
    """An input distribution from a name (``"uniform"``), a record, or ``{"name": ..., **options}``."""
    if isinstance(spec, InputDistribution):
        return spec
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        spec = options.pop("name", None)
    if spec not in INPUTS:
        raise ValueError(f"inputs: unknown input distribution {spec!r}; expected one of {sorted(INPUTS)}")
    options = {key: value if isinstance(value, bool) else _as_tuple(value) for key, value in options.items()}
    try:
        return INPUTS[spec](**options)
    except TypeError:
        raise ValueError(f"inputs {spec!r}: unknown option(s) {sorted(options)}") from None


@partial(jax.jit, static_argnames=("family", "n", "inputs"))
def sample(
    key: jax.Array, family: Family, params: MoEParams, n: int, inputs: InputDistribution = UniformInputs()
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Draw n samples (x, y, labels) from the mixture of experts.

    Args:
        key: a JAX PRNG key; the same key gives the same data.
        family: the model family (static).
        params: its parameters (from :func:`moe_theory.make_params`).
        n: sample size (static).
        inputs: the input distribution (static); see :func:`make_inputs`.

    Returns:
        x: (n, d) inputs; y: (n,) responses (int32 classes for classifier experts);
        labels: (n,) int32 latent expert indices z_j ~ Categorical(π(x_j)).

    Replicates: ``jax.vmap(lambda k: sample(k, family, params, n, inputs))(keys)``.
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    input_key, label_key, response_key = jax.random.split(key, 3)
    x = inputs.draw(input_key, n, family.dim, dtype, params)
    labels = jax.random.categorical(label_key, gate_log_weights(family, params, x), axis=-1).astype(jnp.int32)
    y = family.expert.sample(response_key, params.expert, x, labels)
    return x, y, labels


def bucket_size(n: int, growth: float) -> int:
    """The padded size N(n): the smallest ⌈growth^i⌉ ≥ n, or n itself when growth = 1. A sweep pads
    every sample of size n to N(n) rows (:mod:`moe_theory.sweep`, "Buckets"), so that sizes of one
    bucket share a compiled program."""
    if growth <= 1.0:
        return int(n)
    power = 0
    while True:
        # Rounding before the ceiling keeps exact powers (2^i) exact despite floating error.
        size = math.ceil(round(growth**power, 9))
        if size >= n:
            return size
        power += 1
