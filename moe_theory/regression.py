"""Regression mixtures of experts fitted by least squares [5, 10] (``docs/regression.md``).

The model is a regression function, not a density:

    y = f_G(x) + ε,    ε ~ N(0, σ²) independent of x,    f_G(x) = Σ_{i=1}^k w_i(x) h(x; η_i),

with gate weights w_i(x) built from any registered score s_i(x) (``linear`` β_{1i}ᵀx + β_{0i},
``euclidean``, ``laplace``; :mod:`moe_theory.gates`):

* ``softmax``  w_i = exp(s_i) / Σ_l exp(s_l)                           [10];
* ``sigmoid``  w_i = σ(s_i), **not normalised**: the weights need not sum to one [5].

Experts are mean functions h(x; η) with no noise parameter (:data:`REGRESSION_EXPERTS`):

* ridge experts h = act(η_1ᵀx + η_0), act ∈ {identity (``linear``), ``relu``, ``gelu``, ``sigmoid``,
  ``tanh``}: the feed-forward experts of [5] (ReLU, GELU) and [10] (sigmoid, tanh);
* ``polynomial`` of degree p: h = (η_1ᵀx + η_0)^p, the polynomial experts of [10] (p = 1 is linear);
* ``constant``: h = η_0, an input-independent expert.

The estimator is least squares, Ĝ = argmin Σ_j (y_j − f_G(x_j))², computed by Levenberg–Marquardt
(:mod:`moe_theory.fit.least_squares`) through :class:`RegressionMean`.

**Identifiability.** The softmax weights are unchanged when a common (t₀, t₁) is added to every
(β_{0i}, β_{1i}) (linear score), so softmax parameters are compared in the canonical form or at the
best translation (:mod:`moe_theory.losses`). The unnormalised sigmoid has no such invariance: its
parameters are identified as they stand.

**Errors against the truth** (:func:`regression_errors`). A fit with k ≥ k* experts is the mixing
measure Σ_i w_i δ_{(β_{1i}, η_i)}, weighted by exp(β_{0i}) (softmax [10]) or σ(β_{0i}) (sigmoid
[ours], :data:`moe_theory.losses.WEIGHT_RULES`). Voronoi cells, per-parameter errors and the Voronoi
loss are those of :mod:`moe_theory.losses`, with the exponent table :func:`exponent_table` gives:
first order for exact fits, exponent 2 in multi-atom cells where a paper proves strong
identifiability, and *unknown* (loss NaN, never guessed) elsewhere. The **expert error** of true
expert j is the worst over its cell of E_x|ĥ_i(x) − h*_j(x)|. When the fitted gate differs from the
truth's (a softmax MoE fitted to sigmoid-generated data), gate parameters mean different things,
so the cells are formed from the expert parameters alone and gate errors and the loss are NaN.

The worst atom of a cell need not be one the fit uses: an over-specified fit may switch an extra
atom off (its gate weight → 0 on the inputs) and leave its expert anywhere, which the Voronoi loss
discounts through the atom's weight but the worst-atom error does not. So each cell also gets the
**used expert error** Σ_{i∈A_j} u_i d_i / Σ_{i∈A_j} u_i with u_i = E_x[w_i(x)], the atom's average gate
weight on the inputs (invariant under the softmax translation) [ours]. An atom can also be switched
off through its expert (η = 0 makes a linear, ReLU, GELU, tanh or polynomial expert vanish); that
atom keeps its use u_i, so neither expert error discounts it.

[5] Nguyen, Ho, Rinaldo, "Sigmoid Gating is More Sample Efficient than Softmax Gating in Mixture of
Experts", NeurIPS 2024, arXiv 2405.13997. [10] Nguyen, Ho, Rinaldo, "On Least Square Estimation in
Softmax Gating Mixture of Experts", ICML 2024, arXiv 2402.02952.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .experts import Expert, build_expert
from .gates import ACTIVATIONS, SCORES, Gate, gate_scores, log_gate_weights, make_gate
from .models import Family, canonicalize, make_params
from .params import Field, MoEParams
from .sampling import InputDistribution, UniformInputs

GATE_TYPES = ("softmax", "sigmoid")
RIDGE_ACTIVATIONS = ("identity", "relu", "gelu", "sigmoid", "tanh")
_RIDGE_FIELDS = (
    Field("eta0", ("k",), "real", "expert intercepts η₀"),
    Field("eta1", ("k", "d"), "real", "expert slopes η₁"),
)


class MeanExpert(Expert):
    """An expert given by its mean function alone: least squares fits it, and it has no density
    (``log_prob`` and ``sample`` stay unimplemented, so a likelihood fitter refuses it)."""

    label: ClassVar[str] = "mean"


@dataclass(frozen=True)
class RidgeExpert(MeanExpert):
    """h(x; η_i) = act(η_{1i}ᵀx + η_{0i})."""

    activation: str = "identity"
    name: ClassVar[str] = "ridge"
    fields: ClassVar[tuple[Field, ...]] = _RIDGE_FIELDS

    def __post_init__(self) -> None:
        if self.activation not in RIDGE_ACTIVATIONS:
            raise ValueError(f"expert.activation: expected one of {RIDGE_ACTIVATIONS}, got {self.activation!r}")

    @property
    def label(self) -> str:
        return "linear" if self.activation == "identity" else self.activation

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        return ACTIVATIONS[self.activation](x @ expert["eta1"].T + expert["eta0"][None, :])


@dataclass(frozen=True)
class PolynomialExpert(MeanExpert):
    """h(x; η_i) = (η_{1i}ᵀx + η_{0i})^p with p = ``degree`` ≥ 1."""

    degree: int = 2
    name: ClassVar[str] = "polynomial"
    fields: ClassVar[tuple[Field, ...]] = _RIDGE_FIELDS

    def __post_init__(self) -> None:
        if not isinstance(self.degree, int) or isinstance(self.degree, bool) or self.degree < 1:
            raise ValueError(f"expert.degree: expected an integer ≥ 1, got {self.degree!r}")

    @property
    def label(self) -> str:
        return f"polynomial{self.degree}"

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        return (x @ expert["eta1"].T + expert["eta0"][None, :]) ** self.degree


@dataclass(frozen=True)
class ConstantExpert(MeanExpert):
    """h(x; η_i) = η_{0i}, independent of the input."""

    name: ClassVar[str] = "constant"
    label: ClassVar[str] = "constant"
    fields: ClassVar[tuple[Field, ...]] = (Field("eta0", ("k",), "real", "expert constants η₀"),)

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        return jnp.broadcast_to(expert["eta0"][None, :], (x.shape[0], expert["eta0"].shape[0]))


REGRESSION_EXPERTS: dict[str, Any] = {
    "linear": lambda: RidgeExpert("identity"),
    "relu": lambda: RidgeExpert("relu"),
    "gelu": lambda: RidgeExpert("gelu"),
    "sigmoid": lambda: RidgeExpert("sigmoid"),
    "tanh": lambda: RidgeExpert("tanh"),
    "polynomial": PolynomialExpert,
    "constant": ConstantExpert,
}
"""Regression experts by name; ``polynomial`` takes the option ``degree``."""


def make_regression_expert(spec: str | MeanExpert | Mapping[str, Any]) -> MeanExpert:
    """An expert from a name (``"relu"``), an instance, or ``{"name": "polynomial", "degree": 3}``."""
    return build_expert(spec, REGRESSION_EXPERTS, MeanExpert, "regression expert", {})


@dataclass(frozen=True)
class RegressionFamily:
    """Static, hashable description of a regression MoE: gate type × score × expert × k × d."""

    gate_type: str
    expert: MeanExpert
    num_experts: int
    dim: int
    score: str = "linear"

    def __post_init__(self) -> None:
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate: expected one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.score not in SCORES or SCORES[self.score].log_offset:
            usable = sorted(name for name, score in SCORES.items() if not score.log_offset)
            raise ValueError(f"score: expected one of {usable}, got {self.score!r}")
        for name in ("num_experts", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

    @property
    def gate(self) -> Gate:
        """The registered gate whose fields and scores the weights use (normalised for bookkeeping only:
        :func:`gate_weights` applies the unnormalised sigmoid itself)."""
        return make_gate({"score": self.score, "normaliser": self.gate_type})

    @property
    def moe_family(self) -> Family:
        """The same gate and expert as a :class:`~moe_theory.models.Family`, for parameter validation,
        the canonical form and the losses of :mod:`moe_theory.losses`."""
        return Family(self.gate, self.expert, self.num_experts, self.dim)

    def with_experts(self, num_experts: int) -> "RegressionFamily":
        return RegressionFamily(self.gate_type, self.expert, num_experts, self.dim, self.score)

    def describe(self) -> str:
        weights = "softmax" if self.gate_type == "softmax" else "unnormalised sigmoid"
        return f"{weights} gate ({self.score} score) × {self.expert.label} experts, k = {self.num_experts}, d = {self.dim}"


def make_regression_family(gate: str, expert: str | MeanExpert | Mapping[str, Any], num_experts: int, dim: int = 1,
                           score: str = "linear") -> RegressionFamily:
    return RegressionFamily(gate, make_regression_expert(expert), num_experts, dim, score)


def make_regression_params(family: RegressionFamily, values: Mapping[str, Any], dtype=None) -> MoEParams:
    """Validated parameters from ``{"gate": {"beta0": ..., "beta1": ...}, "expert": {...}}``; errors name
    the field, e.g. ``expert.eta1: expected shape (2, 1)``."""
    return make_params(family.moe_family, values, dtype)


def gate_weights(family: RegressionFamily, params: MoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """w_i(x_j), (n, k): softmax weights, or unnormalised sigmoids σ(s_i(x_j))."""
    if family.gate_type == "softmax":
        return jnp.exp(log_gate_weights(family.gate, params.gate, x))
    return jax.nn.sigmoid(gate_scores(family.gate, params.gate, x)[1])


def mean_function(family: RegressionFamily, params: MoEParams, x: jnp.ndarray) -> jnp.ndarray:
    """f_G(x_j) = Σ_i w_i(x_j) h(x_j; η_i), (n,)."""
    return jnp.sum(gate_weights(family, params, x) * family.expert.mean(params.expert, x), axis=-1)


@dataclass(frozen=True)
class RegressionMean:
    """f_G as the hashable ``mean(params, x)`` that :class:`~moe_theory.fit.least_squares.LevenbergMarquardt` fits."""

    family: RegressionFamily

    def __call__(self, params: MoEParams, x: jnp.ndarray) -> jnp.ndarray:
        return mean_function(self.family, params, x)


def sample(key: jax.Array, family: RegressionFamily, params: MoEParams, n: int, noise: float,
           inputs: InputDistribution = UniformInputs()) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x, y): n inputs from ``inputs`` and y = f_G(x) + σε with σ = ``noise`` and ε ~ N(0, 1)."""
    input_key, noise_key = jax.random.split(key)
    dtype = params.gate["beta0"].dtype
    x = inputs.draw(input_key, n, family.dim, dtype, params)
    y = mean_function(family, params, x) + noise * jax.random.normal(noise_key, (n,), dtype)
    return x, y


def split_start(key: jax.Array, family: RegressionFamily, truth: MoEParams, extra: int, scale: float) -> MoEParams:
    """A start for k* + ``extra`` experts: the last true expert copied ``extra + 1`` times, then every
    coordinate + ``scale``·N(0, 1).

    The copies share the last expert's weight: a softmax offset drops by log(extra + 1), which leaves
    f_G unchanged; an unnormalised sigmoid gets the offset whose σ is σ(β₀)/(extra + 1), which leaves
    f_G unchanged only where the slope part vanishes (no split of a sigmoid expert with β₁ ≠ 0
    represents it exactly; the least-squares fit then decides how the copies share it).
    """
    copies = extra + 1
    offset = truth.gate["beta0"]
    if family.gate_type == "softmax":
        last = offset[-1] - jnp.log(copies)
    else:
        share = jax.nn.sigmoid(offset[-1]) / copies
        last = jnp.log(share) - jnp.log1p(-share)
    offset = offset.at[-1].set(last)

    def grow(leaf):
        return jnp.concatenate([leaf] + [leaf[-1:]] * extra, axis=0) if extra else leaf

    gate = {name: grow(offset if name == "beta0" else value) for name, value in truth.gate.items()}
    expert = {name: grow(value) for name, value in truth.expert.items()}
    start = MoEParams(gate, expert)
    leaves, treedef = jax.tree_util.tree_flatten(start)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    )


def random_start(key: jax.Array, family: RegressionFamily, x: jnp.ndarray, y: jnp.ndarray) -> MoEParams:
    """A data-scaled random start for a user's dataset: gate slopes N(0, 1/sd(x)²) (locations at
    random data points for distance scores), offsets 0; expert slopes N(0, 1/(4 sd(x)²)); expert
    intercepts at random quantiles of y for constant, linear and polynomial experts, and N(0, 1) for
    ReLU, GELU, sigmoid and tanh, whose intercept places the activation's bend, not the level."""
    k, d = family.num_experts, family.dim
    dtype = x.dtype
    keys = jax.random.split(key, 4)
    spread = jnp.maximum(jnp.std(x, axis=0), 1e-12)
    if family.score == "linear":
        beta1 = jax.random.normal(keys[0], (k, d), dtype) / spread
    else:
        beta1 = x[jax.random.randint(keys[0], (k,), 0, x.shape[0])]
    gate = {"beta0": jnp.zeros((k,), dtype), "beta1": beta1}
    levels = jnp.quantile(y, jax.random.uniform(keys[1], (k,), dtype, 0.1, 0.9))
    expert = {"eta0": levels}
    if "eta1" in {f.name for f in family.expert.fields}:
        expert["eta1"] = 0.5 * jax.random.normal(keys[2], (k, d), dtype) / spread
        if isinstance(family.expert, RidgeExpert) and family.expert.activation in ("sigmoid", "tanh", "relu", "gelu"):
            expert["eta0"] = jax.random.normal(keys[3], (k,), dtype)
    return MoEParams(gate, expert)


# ----------------------------------------------------------------------------------------------
# Errors against the truth.


STRONGLY_IDENTIFIABLE_EXPERTS = {
    "softmax": ("sigmoid", "tanh"),
    "sigmoid": ("relu", "gelu"),
}
"""Ridge experts for which a paper proves strong identifiability under the gate (linear score):
sigmoid/tanh feed-forward experts under the softmax gate [10]; ReLU/GELU feed-forward experts under
the sigmoid gate [5]. Their over-specified atoms get exponent 2 (the n^{-1/4} rate)."""


def exponent_table(family: RegressionFamily, overspecified: bool) -> losses.ExponentTable:
    """The Voronoi loss's exponents: first order for exact fits; exponent 2 in multi-atom cells where
    :data:`STRONGLY_IDENTIFIABLE_EXPERTS` lists the expert; otherwise unknown (the loss is NaN)."""
    if not overspecified:
        return losses.FIRST_ORDER
    if family.score == "linear" and family.expert.label in STRONGLY_IDENTIFIABLE_EXPERTS[family.gate_type]:
        return losses.STRONGLY_IDENTIFIABLE
    return losses.UNKNOWN_MULTI_ATOM


def represents(fitted_family: RegressionFamily, true_family: RegressionFamily) -> bool:
    """Whether every regression function of ``true_family`` is one of ``fitted_family``'s (same expert).

    Same gate and score with at least as many experts: yes. An unnormalised sigmoid gate fitted to a
    softmax truth of k* = 2 experts with the linear score: yes, since softmax weights of two experts are
    σ(Δs) and σ(−Δs), the sigmoid pair with parameters (Δβ, −Δβ) (extra atoms switched off by a very
    negative offset). Otherwise we do not claim it (a softmax gate cannot give weights that do not
    sum to one)."""
    if fitted_family.expert != true_family.expert or fitted_family.num_experts < true_family.num_experts:
        return False
    if (fitted_family.gate_type, fitted_family.score) == (true_family.gate_type, true_family.score):
        return True
    return (fitted_family.gate_type, true_family.gate_type, true_family.score, true_family.num_experts) == (
        "sigmoid", "softmax", "linear", 2)


def expectation(true_family: RegressionFamily, fitted_family: RegressionFamily) -> str:
    """What [5] and [10] say about the expert error of this (data, fit) pair, in one sentence; it
    never claims more than the papers prove, and says when a statement is ours."""
    if (fitted_family.gate_type, fitted_family.score) != (true_family.gate_type, true_family.score):
        if represents(fitted_family, true_family):
            return ("the other gate, but well-specified: two softmax weights are the sigmoid pair σ(Δs), σ(−Δs), so the "
                    "fit contains the truth, in another parametrisation (gate errors are not comparable); no theorem "
                    "gives this pair a rate [ours]")
        return ("misspecified gate: the fitted gate's weights cannot reproduce the truth's (softmax weights sum to one, "
                "unnormalised sigmoids need not), so the fit cannot represent the data's regression function and its "
                "error has a floor; no theorem covers this pair")
    label, gate = true_family.expert.label, true_family.gate_type
    if fitted_family.num_experts == true_family.num_experts:
        return ("exact fit (k = k*): n^{-1/2} for every expert, the parametric rate ([10]'s and [5]'s theorems for "
                "strongly identifiable experts; for other experts our expectation, k = k* making the fit regular)")
    if true_family.score == "linear" and label in STRONGLY_IDENTIFIABLE_EXPERTS[gate]:
        paper = "[10]" if gate == "softmax" else "[5]"
        return (f"over-specified, strongly identifiable {label} experts under the {gate} gate {paper}: n^{{-1/2}} in cells "
                "of one atom, n^{-1/4} in cells of several (exponent 2 of the Voronoi loss)")
    if gate == "softmax" and (label == "linear" or label.startswith("polynomial")):
        return ("over-specified polynomial experts under the softmax gate [10]: slower than any polynomial rate in cells "
                "of several atoms (1/log(n)^λ), through the interaction of gate and expert parameters")
    if gate == "sigmoid":
        return (f"over-specified {label} experts under the sigmoid gate [5]: faster than under the softmax gate for the "
                "same experts; exponents not transcribed here (they depend on whether a split expert's true gate slope "
                "is 0, [5]'s two regimes)")
    return "over-specified: no rate transcribed for this gate and expert"


class RegressionErrors(NamedTuple):
    """Per true expert j (arrays (k*,), with the fitted parameters' batch axes in front)."""

    expert_error: jnp.ndarray  # max over the cell of E_x|ĥ_i − h*_j|
    used_expert_error: jnp.ndarray  # its mean over the cell weighted by each atom's use E_x[w_i(x)]
    block_error: dict[str, jnp.ndarray]  # block -> max over the cell of ‖Δ‖ (gate blocks NaN across gates)
    mass_error: jnp.ndarray  # |Σ_{i∈A_j} w_i − w*_j| (NaN across gates)
    cell_size: jnp.ndarray  # |A_j|
    loss: jnp.ndarray  # () the Voronoi loss (NaN when its exponents are unknown, or across gates)
    function_error: jnp.ndarray  # () E_x|f_Ĝ(x) − f_G*(x)|


def _expert_only_cells(family: Family, fitted: MoEParams, truth: MoEParams) -> jnp.ndarray:
    """(k,) the true expert nearest to each fitted one in Σ_b ‖η_ib − η*_jb‖ over expert blocks alone."""
    distance = 0.0
    for field in family.expert.fields:
        k, k_true = fitted.expert[field.name].shape[0], truth.expert[field.name].shape[0]
        gap = fitted.expert[field.name].reshape(k, 1, -1) - truth.expert[field.name].reshape(1, k_true, -1)
        distance = distance + jnp.sqrt(jnp.sum(gap**2, axis=-1))
    return jnp.argmin(distance, axis=1)  # ties go to the lowest true index


def regression_errors(key: jax.Array, fitted_family: RegressionFamily, fitted: MoEParams, true_family: RegressionFamily,
                      truth: MoEParams, inputs: InputDistribution = UniformInputs(), num_inputs: int = 4096
                      ) -> RegressionErrors:
    """Errors of one fit (unbatched) against the truth; vmap it over replicates. See the module docstring."""
    if fitted_family.expert != true_family.expert or fitted_family.dim != true_family.dim:
        raise ValueError("regression_errors: the fitted and the true family must share the expert and the input dimension")
    x = inputs.draw(key, num_inputs, true_family.dim, truth.gate["beta0"].dtype, truth)
    num_true = true_family.num_experts
    same_gate = (fitted_family.gate_type, fitted_family.score) == (true_family.gate_type, true_family.score)
    family = fitted_family.moe_family
    if same_gate:
        table = exponent_table(true_family, fitted_family.num_experts > num_true)
        loss, cells = losses.voronoi_analysis(family, fitted, truth, exponents=table)
        assignment = cells.assignment
        block_error = dict(cells.max_error)
        mass_error, total = cells.mass_error, loss.loss
    else:
        assignment = _expert_only_cells(family, fitted, truth)
        nan = jnp.full((num_true,), jnp.nan, x.dtype)
        block_error = {field.name: nan for field in family.gate.fields if field.role != "offset"}
        for field in family.expert.fields:
            k = fitted.expert[field.name].shape[0]
            gap = jnp.sqrt(jnp.sum((fitted.expert[field.name].reshape(k, -1)
                                    - truth.expert[field.name].reshape(num_true, -1)[assignment]) ** 2, axis=-1))
            block_error[field.name] = losses.cell_statistics(gap, assignment, num_true)[0]
        mass_error, total = nan, jnp.asarray(jnp.nan, x.dtype)
    distance = losses.expert_distances(family.expert, fitted.expert, truth.expert, assignment, x)
    worst, _ = losses.cell_statistics(distance, assignment, num_true)
    use = jnp.mean(gate_weights(fitted_family, fitted, x), axis=0)  # (k,) E_x[w_i(x)], translation-free
    membership = assignment[:, None] == jnp.arange(num_true)[None, :]
    cell_use = jnp.sum(jnp.where(membership, use[:, None], 0.0), axis=0)
    used = jnp.sum(jnp.where(membership, (use * distance)[:, None], 0.0), axis=0) / cell_use
    used = jnp.where(jnp.any(membership, axis=0), used, jnp.nan)
    sizes = jnp.sum(membership, axis=0)
    function_error = jnp.mean(jnp.abs(mean_function(fitted_family, fitted, x) - mean_function(true_family, truth, x)))
    return RegressionErrors(worst, used, block_error, mass_error, sizes, total, function_error)


def canonical(family: RegressionFamily, params: MoEParams) -> MoEParams:
    """The canonical representative under the softmax translation (unchanged for the sigmoid gate)."""
    return canonicalize(family.moe_family, params)


def as_numpy(params: MoEParams) -> dict:
    """Nested dict of lists, for JSON output."""
    return {group: {name: np.asarray(value).tolist() for name, value in getattr(params, group).items()}
            for group in ("gate", "expert")}
