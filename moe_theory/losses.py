r"""Voronoi losses between mixing measures, per-parameter errors, and density distances.

Mixing measures (docs/losses.md)
------------------------------
A model with k experts is the mixing measure G = Σ_i w_i δ_{θ_i}:

* the **weight** w_i comes from the gate's per-expert offset (a *weight rule*, :data:`WEIGHT_RULES`):
  ``"exp_offset"`` w_i = exp(β_{0i}) for softmax-type gates [1] (for the Gaussian gate of [8], whose
  offset is log w_i, this is the raw gate weight); ``"normalised"`` w_i = φ(o_i)/Σ_l φ(o_l), with φ
  the gate's normaliser and o the offsets, i.e. w_i/Σ_l w_l for the Gaussian gate [8];
  ``"sigmoid_offset"`` w_i = σ(β_{0i}) **[ours]**, the sigmoid-gate analogue of exp(β₀): the
  unnormalised gate value φ(s_i) at slope part 0, with φ = σ the sigmoid normaliser;
* the **atom** θ_i is every other per-expert parameter, split into named *blocks* (one per
  parameter field): for the softmax-gated Gaussian MoE [1] the blocks are β₁ (gate) and a, b, ν
  (expert); for the Gaussian gate [8] they are the centre c, the covariance Γ and a, b, ν;
* **shared** parameters (the temperature τ [3]) belong to no atom and add their own |τ̂ − τ*|.

The description is data (:class:`AtomSpec`, built from the family's field schema by
:func:`atom_spec`), so a new gate or expert gets a loss without new code here.

Voronoi loss
------------
Fitted atoms i = 1..k are compared with true atoms j = 1..k*; k may differ from k*. The
**Voronoi cell** A_j holds the fitted atoms whose nearest true atom is θ*_j, where the distance is
the sum of block norms Σ_b ‖θ_{ib} − θ*_{jb}‖ (Euclidean norm of each block's flattened difference,
Frobenius for matrices) [code of 1]; ties go to the lowest true index j. With Δ_{b,ij} = θ_{ib} − θ*_{jb},

    D(G, G*) = Σ_j | Σ_{i∈A_j} w_i − w*_j |                                    (mass term)
             + Σ_j Σ_{i∈A_j} w_i Σ_b ‖Δ_{b,ij}‖^{e_b(|A_j|)}                  (atom term)
             + Σ_shared |τ̂ − τ*|                                              (shared term)

An empty cell contributes only its mass term w*_j. The exponents e_b(m) form an
:class:`ExponentTable`, one per family, each with its citation (:data:`EXPONENT_TABLES`):

* ``"first_order"`` — every exponent 1: the exact-fitted loss D₁ of [1] (and of [2], [8]).
* ``"softmax_gaussian"`` — the over-fitted loss D₂ of [1] for the softmax-gated Gaussian MoE:
  exponent 1 in cells of size 1; in a cell of size m ≥ 2, β₁ and b get r̄(m) and a and ν get
  r̄(m)/2, with r̄(2) = 4 and r̄(3) = 6 [1]. For m ≥ 4 only r̄(m) ≥ 7 is known, so the exponent is
  **unknown**.
* ``"strongly_identifiable"`` — exponent 2 for every block in every multi-atom cell: the rate
  n^{-1/4} of over-fitted atoms in a second-order strongly identifiable family (Chen 1995; the
  classical result recalled in [1] §1). *Use it only for a family whose strong-identifiability
  condition a paper proves*, e.g. sigmoid gating with ReLU/GELU feed-forward experts [5], or the
  Euclidean-score sigmoid gate [6] and the non-softmax gates of the hierarchical MoE [9]. It is
  never chosen automatically.
* ``"unknown_multi_atom"`` — exponent 1 in cells of size 1 and unknown in every multi-atom cell:
  the default for every family without a transcribed over-fitted table (top-K [2], temperature
  gates [3] whose rates are slower than any polynomial, multinomial experts [4, 6], the Gaussian
  gate [8], sigmoid gates [5, 6]).

A non-empty cell whose exponent is unknown makes the loss NaN and sets ``undefined`` — the loss
is never computed with a guessed exponent. D₁ (:func:`exact_fitted_loss`, k = k*) and D₂
(:func:`over_fitted_loss`) are the loss with the ``"first_order"`` and the family's default table.

Translation (softmax-type gates)
--------------------------------
A softmax gate is unchanged by adding a common (t₀, t₁) to every (β_{0i}, β_{1i}) (t₁ only where the
slope part is translatable: the linear score without activation; :func:`moe_theory.gates.translate_gate`),
so the loss of [1] is an infimum over translations of the fitted gate. Three options:

* ``"infimum"`` (default): inf_{t₀, t₁} D(G_{t₀,t₁}, G*), with the Voronoi cells recomputed for every
  t₁. Method (jit-clean, fixed work):

  1. *t₀ exactly.* With u = e^{t₀} and the cells fixed (t₀ does not move atoms), D is
     Σ_j |u S_j − w*_j| + u K + const, with S_j = Σ_{i∈A_j} w_i and K = the atom term at u = 1: a convex
     piecewise-linear function of u ≥ 0, minimised exactly by evaluating it at its breakpoints
     u = w*_j / S_j and at u = 0. (u = 0, i.e. t₀ = −∞, wins only when shrinking all fitted mass
     beats every matching; the mass term is then Σ_j w*_j and the atom term 0. So the infimum
     never exceeds Σ_j w*_j (+ the shared term): it measures fits near the truth and saturates
     for fits far from it.)
  2. *t₁ by multi-start + damped Newton.* For fixed cells, only the β₁ block depends on t₁, through
     F(t₁) = Σ_i w_i ‖β_{1i} + t₁ − β*_{1,j(i)}‖^{e_i}, a convex function (e_i ≥ 1). The search
     starts from the best of the k·k* alignments t₁ = β*_{1j} − β_{1i} (every fitted slope onto
     every true slope; they contain every kink of F, where the minimum sits when all e_i = 1) and
     t₁ = 0 (so the infimum never exceeds the ``"mass"`` and ``"none"`` values), then
     runs ``search_steps`` Newton steps on the smoothed F_ε (‖r‖² + ε²)^{e/2}, ε shrinking
     geometrically from the largest residual by 10^{-12} over the steps, each followed by a line
     search over step lengths 2^0..2^{-29} and 0 that evaluates the *exact* profile loss (cells
     recomputed, t₀ exact). The value is therefore monotone along the search and always attained
     by a real translation: it is an upper bound on the infimum, equal to it when the optimal
     cells are found. Measured: never above a brute-force zoomed grid search over (t₀, t₁) (d = 1,
     144 random fits, k = 3, 4) and equal to it to 1e-7 relative (the grid's resolution); equal to
     multi-start Nelder–Mead to 1e-14 relative for d = 2. When translating changes the Voronoi
     cells the problem is non-convex and there is no global guarantee beyond the multi-start.
  Because every start is defined relative to the fitted slopes, the result does not depend (up to
  rounding) on how the fitted gate happens to be translated, nor on the order of the fitted experts.

* ``"mass"``: t₁ = 0 and t₀ = log(Σ_j w*_j / Σ_i w_i), so the fitted total mass equals the true one.
* ``"none"``: no translation: the authors' loss [code of 1], kept only to reproduce their figures;
  it stays near 1 whenever an extra fitted expert shares the cell of the fixed reference expert.

t₀ acts only on shift-invariant gates with the ``"exp_offset"`` weight rule (``"normalised"`` weights
do not change under t₀), t₁ only where the slope part is translatable; for gates without translation
invariance (the sigmoid normaliser) every option means ``"none"``. The true parameters are first put
in canonical form (:func:`moe_theory.models.canonicalize`: reference expert at 0, or Gaussian-gate
weights summing to 1), which fixes the scale in which the loss is measured.

Per-parameter errors
--------------------
:func:`parameter_errors` reports, at the translation chosen for the loss, for every true atom j and
block b: the **worst** error max_{i∈A_j} ‖Δ_{b,ij}‖ (the quantity whose rate the theorems bound: the
slowest fitted atom of a cell), the **mean** over the cell, the cell size |A_j|, the cell mass
Σ_{i∈A_j} w_i against w*_j, and |τ̂ − τ*|. Empty cells have NaN errors. Arrays are (k*,) so a study
can plot rates in cells of size 2 against cells of size 1.

Expert errors
-------------
The expert estimation error of [6] and [7] compares functions rather than parameters. For true
expert j and each fitted expert i in its Voronoi cell A_j (the cells of the per-parameter errors),

    d_i = E_x[ TV(f̂_i(·|x), f*_j(·|x)) ]      classifier experts: ½ Σ_c |P̂_i(c|x) − P*_j(c|x)|,
    d_i = E_x[ |ĥ_i(x) − h*_j(x)| ]            regression experts: their regression functions,

with x ~ the input distribution by Monte Carlo over ``num_inputs`` draws (the same draws for every
replicate). :func:`expert_errors` returns, per true expert, the worst d_i over its cell (the
quantity the rates bound) and the mean, NaN for an empty cell. It depends on the expert
parameters alone, so it is unaffected by the gate's translation; the cells are those of
:func:`parameter_errors` at the chosen translation.

In an over-fitted cell the worst d_i also counts an atom the gate hardly uses, whose expert the
data cannot pin down and which barely changes the density. The theorems' Voronoi losses weight each
atom by its mass for this reason. The **used** error weights each atom of the cell by its use
u_i = E_x[π̂_i(x)], the share of inputs the fitted gate routes to it (the same x draws):
Σ_{i∈A_j} u_i d_i / Σ_{i∈A_j} u_i. It applies to every gate, mass parameter or not.

Density distances
-----------------
With p̂ = p_Ĝ(·|x), p* = p_{G*}(·|x), H²(p̂, p*) = ½∫(√p̂ − √p*)² (so 0 ≤ H ≤ 1) and
TV = ½∫|p̂ − p*|. :func:`density_distances` returns E_x[H] and E_x[TV], x ~ the input distribution,
by Monte Carlo over ``num_inputs`` draws, with their Monte Carlo standard errors sd/√num_inputs.

* *Classification experts*: exact sums over classes.
* *Regression experts* (Gaussian noise of variance ν): deterministic quadrature in y, built from
  the components c of both mixtures (means μ_c(x), standard deviations σ_c = √ν_c):

  1. grid points μ_c + σ_c u, u = ``grid_size`` equispaced values in [−10, 10], merged and sorted
     over all k + k* components, so every component — however narrow or far from the others — is
     resolved on its own scale, and the mass outside the grid is < e^{-50};
  2. each grid segment where log p̂ − log p* changes sign is split at that root (20 bisections),
     putting every kink of |p̂ − p*| on a segment end; other segments are split at their midpoint;
  3. ``num_quadrature``-point Gauss–Legendre on every half segment, applied to
     ½(√p̂ − √p*)² = ½ M expm1(−|Δ|/2)² and ½|p̂ − p*| = −½ M expm1(−|Δ|), with M = max(p̂, p*) and
     Δ = log p̂ − log p* from :func:`moe_theory.models.expert_log_prob` and the gate's log-weights,
     which neither cancels when p̂ ≈ p* nor overflows when they differ by many orders of magnitude.

  Accuracy (defaults 16 points per component, 6 nodes): relative error ≲ 1e-10 for H² and TV
  against closed forms and adaptive quadrature (measured in the tests; two roots inside one grid
  segment, i.e. p̂ and p* crossing twice within ~1.3σ, would be missed, costing at most the tiny
  |p̂ − p*| mass between them). This is negligible next to the Monte Carlo standard error of
  E_x, ≈ sd_x/√num_inputs (typically 1–5 % relative for 1000 draws), which is the error to quote.

Papers (docs/README.md#papers): [1] Nguyen, Nguyen, Ho, NeurIPS 2023, arXiv 2305.03288; [2] arXiv 2309.13850;
[3] 2401.13875; [4] 2310.14188; [5] 2405.13997; [6] 2602.01466; [8] Nguyen, Nguyen, Nguyen, Ho,
AISTATS 2024, arXiv 2305.07572; [9] 2410.02935. J. Chen, "Optimal rate of convergence for finite
mixture models", Annals of Statistics 23(1), 1995.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import linalg
from .experts import Expert, GaussianLinear
from .gates import NORMALISERS, SCORES, Gate, translate_gate
from .models import Family, canonicalize, expert_log_prob, gate_log_weights, mean_function
from .params import MoEParams, field_with_role, fields_with_role
from .sampling import InputDistribution, UniformInputs

__all__ = [
    "AtomSpec",
    "Block",
    "DensityDistances",
    "EXPONENT_TABLES",
    "ExponentTable",
    "ParameterErrors",
    "TRANSLATIONS",
    "VoronoiLoss",
    "WEIGHT_RULES",
    "atom_spec",
    "default_exponent_table",
    "density_distances",
    "exact_fitted_loss",
    "cell_statistics",
    "expert_distances",
    "over_fitted_loss",
    "parameter_errors",
    "voronoi_analysis",
    "voronoi_loss",
]

# ----------------------------------------------------------------------------------------------
# Exponent tables.


@dataclass(frozen=True)
class ExponentTable:
    """Exponents e_b(m) of the atom term, per block b and Voronoi-cell size m.

    Cells of size 1 always get exponent 1. For a cell of size m ≥ 2, ``multi_atom`` lists per block
    the exponents for m = 2, 3, ... in order; blocks it does not name use ``default``; sizes past the
    listed ones use ``beyond`` for every block. ``None`` means *unknown*: the loss is then NaN and
    flagged ``undefined``, never guessed.
    """

    name: str
    citation: str
    multi_atom: tuple[tuple[str, tuple[float, ...]], ...] = ()
    default: tuple[float, ...] = ()
    beyond: float | None = None

    def exponent(self, block: str, cell_size: int) -> float | None:
        """e_block(cell_size), or None where the literature gives no value."""
        if cell_size <= 1:
            return 1.0
        listed = dict(self.multi_atom).get(block, self.default)
        position = cell_size - 2
        return float(listed[position]) if position < len(listed) else self.beyond

    def matrix(self, block_names: tuple[str, ...], max_cell_size: int) -> np.ndarray:
        """(max_cell_size + 1, num_blocks) float array; row m holds e_b(m), NaN where unknown.

        Row 0 (an empty cell, which has no atoms) is never read; it holds 1 to keep it finite.
        """
        rows = [[1.0] * len(block_names)]
        for size in range(1, max_cell_size + 1):
            values = (self.exponent(block, size) for block in block_names)
            rows.append([math.nan if value is None else value for value in values])
        return np.asarray(rows, dtype=np.float64)


FIRST_ORDER = ExponentTable(
    name="first_order",
    citation="[1] arXiv 2305.03288, exact-fitted loss D₁ (also [2] 2309.13850, [8] 2305.07572): every exponent 1.",
    beyond=1.0,
)

SOFTMAX_GAUSSIAN = ExponentTable(
    name="softmax_gaussian",
    citation=(
        "[1] arXiv 2305.03288, over-fitted loss D₂ of the softmax-gated Gaussian MoE: in a cell of size m ≥ 2, "
        "β₁ and b get r̄(m), a and ν get r̄(m)/2, with r̄(2) = 4 and r̄(3) = 6; for m ≥ 4 only r̄(m) ≥ 7 "
        "is known (unknown)."
    ),
    multi_atom=(("beta1", (4.0, 6.0)), ("b", (4.0, 6.0)), ("a", (2.0, 3.0)), ("nu", (2.0, 3.0))),
    beyond=None,
)

STRONGLY_IDENTIFIABLE = ExponentTable(
    name="strongly_identifiable",
    citation=(
        "Second-order strong identifiability (Chen 1995, Ann. Statist. 23(1); recalled in [1] §1): exponent 2 for every "
        "block in every multi-atom cell (over-fitted atoms at n^{-1/4}). Valid only for families whose strong "
        "identifiability a paper proves, e.g. sigmoid gating with ReLU/GELU experts [5] 2405.13997, the "
        "Euclidean-score sigmoid gate [6] 2602.01466, non-softmax HMoE gates [9] 2410.02935; check the theorem."
    ),
    beyond=2.0,
)

UNKNOWN_MULTI_ATOM = ExponentTable(
    name="unknown_multi_atom",
    citation=(
        "No over-fitted exponents transcribed for this family (e.g. top-K [2], temperature gates [3] with rates "
        "slower than any polynomial, multinomial experts [4, 6], the Gaussian gate [8]): exponent 1 in cells of size 1, "
        "unknown in every multi-atom cell."
    ),
    beyond=None,
)

EXPONENT_TABLES: dict[str, ExponentTable] = {
    table.name: table for table in (FIRST_ORDER, SOFTMAX_GAUSSIAN, STRONGLY_IDENTIFIABLE, UNKNOWN_MULTI_ATOM)
}
"""Registered exponent tables by name; pass a name or an :class:`ExponentTable` as ``exponents``."""


def default_exponent_table(family: Family) -> ExponentTable:
    """The over-fitted (D₂) table of a family: [1]'s for the plain softmax-gated Gaussian MoE,
    ``unknown_multi_atom`` for every other family (choose ``strongly_identifiable`` explicitly
    where a paper proves the condition)."""
    if family.gate == Gate() and isinstance(family.expert, GaussianLinear):
        return SOFTMAX_GAUSSIAN
    return UNKNOWN_MULTI_ATOM


def _resolve_table(exponents: str | ExponentTable) -> ExponentTable:
    if isinstance(exponents, ExponentTable):
        return exponents
    if exponents not in EXPONENT_TABLES:
        raise ValueError(
            f"exponents: unknown table {exponents!r}; expected one of {sorted(EXPONENT_TABLES)} or an ExponentTable"
        )
    return EXPONENT_TABLES[exponents]


# ----------------------------------------------------------------------------------------------
# Atom descriptions.

WEIGHT_RULES: dict[str, str] = {
    "exp_offset": "w_i = exp(offset_i): exp(β₀ᵢ) for softmax-type gates [1]; the raw weight w_i of the Gaussian gate.",
    "normalised": "w_i = φ(offset_i) / Σ_l φ(offset_l), φ the normaliser: w_i / Σ_l w_l for the Gaussian gate [8].",
    "sigmoid_offset": "w_i = σ(β₀ᵢ) [ours]: the sigmoid gate's unnormalised value at slope part 0, like exp(β₀).",
}

TRANSLATIONS = ("infimum", "mass", "none")
"""Translation options for softmax-type gates; see the module docstring."""


@dataclass(frozen=True)
class Block:
    """One block of an atom: the per-expert slice of the parameter ``group[name]`` (group is
    ``"gate"`` or ``"expert"``). Exponent tables refer to blocks by ``name``."""

    name: str
    group: str


@dataclass(frozen=True)
class AtomSpec:
    """How a family's parameters form a mixing measure: atom blocks, weight rule, shared blocks."""

    blocks: tuple[Block, ...]
    weight: str
    shared: tuple[Block, ...] = ()

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(block.name for block in self.blocks)


def default_weight_rule(gate: Gate) -> str:
    """``normalised`` for the Gaussian gate [8], ``sigmoid_offset`` for sigmoid normalisers [ours],
    ``exp_offset`` otherwise [1]."""
    if gate.score == "gaussian":
        return "normalised"
    if gate.normaliser == "sigmoid":
        return "sigmoid_offset"
    return "exp_offset"


def atom_spec(family: Family, weight: str | None = None) -> AtomSpec:
    """The atom description of ``family``, read from its field schema.

    Gate fields other than the offset (β₀, or the Gaussian gate's weight) and τ, and every expert
    field, are atom blocks; τ is shared. ``weight`` is a key of :data:`WEIGHT_RULES`
    (default :func:`default_weight_rule`).
    """
    gate = family.gate
    weight = weight or default_weight_rule(gate)
    if weight not in WEIGHT_RULES:
        raise ValueError(f"weight: unknown weight rule {weight!r}; expected one of {sorted(WEIGHT_RULES)}")
    # The offset field carries the weight; τ is shared. Everything else per expert is an atom block.
    offset = SCORES[gate.score].offset_field
    gate_blocks = tuple(Block(f.name, "gate") for f in gate.fields if f != offset and f.role != "temperature")
    expert_blocks = tuple(Block(f.name, "expert") for f in family.expert.fields)
    shared = tuple(Block(f.name, "gate") for f in fields_with_role(gate.fields, "temperature"))
    return AtomSpec(gate_blocks + expert_blocks, weight, shared)


class _Atoms(NamedTuple):
    weights: jnp.ndarray  # (k,)
    blocks: tuple[jnp.ndarray, ...]  # each (k, size of the block)
    shared: jnp.ndarray  # (total size of the shared blocks,)


def _extract_atoms(gate: Gate, spec: AtomSpec, gate_params: dict, expert_params: dict) -> _Atoms:
    groups = {"gate": gate_params, "expert": expert_params}
    offset = SCORES[gate.score].offset_of(gate_params)
    if spec.weight == "exp_offset":
        weights = jnp.exp(offset)
    elif spec.weight == "sigmoid_offset":
        weights = jax.nn.sigmoid(offset)
    else:
        weights = jax.nn.softmax(NORMALISERS[gate.normaliser].log_phi(offset))
    num_atoms = offset.shape[0]
    blocks = tuple(jnp.reshape(groups[b.group][b.name], (num_atoms, -1)) for b in spec.blocks)
    shared = [jnp.ravel(groups[b.group][b.name]) for b in spec.shared]
    shared_vector = jnp.concatenate(shared) if shared else jnp.zeros((0,), weights.dtype)
    return _Atoms(weights, blocks, shared_vector)


# ----------------------------------------------------------------------------------------------
# Results.


class VoronoiLoss(NamedTuple):
    """Result of :func:`voronoi_loss` (every field gains the leading batch axes of ``fitted``).

    Attributes:
        loss: D(G, G*) = mass + atom + shared; NaN when ``undefined``.
        mass: Σ_j |Σ_{i∈A_j} w_i − w*_j| (always finite for finite parameters).
        atom: Σ_j Σ_{i∈A_j} w_i Σ_b ‖Δ_{b,ij}‖^{e_b(|A_j|)}; NaN when ``undefined``.
        shared: Σ |τ̂ − τ*| over shared parameters (0 when there are none).
        cell_sizes: (k*,) int, |A_j|.
        undefined: bool, a non-empty cell has an unknown exponent.
        assignment: (k,) int, the true atom j whose cell holds fitted atom i.
        shift: t₀ applied to the fitted gate offsets (−inf when the infimum is the u → 0 limit).
        slope_shift: (d,) t₁ applied to the fitted gate slopes (zeros where not translatable).
    """

    loss: jnp.ndarray
    mass: jnp.ndarray
    atom: jnp.ndarray
    shared: jnp.ndarray
    cell_sizes: jnp.ndarray
    undefined: jnp.ndarray
    assignment: jnp.ndarray
    shift: jnp.ndarray
    slope_shift: jnp.ndarray


class ParameterErrors(NamedTuple):
    """Result of :func:`parameter_errors`: per true atom j, at the loss's translation.

    Attributes:
        max_error: block name -> (k*,) max_{i∈A_j} ‖Δ_{b,ij}‖ (NaN for an empty cell).
        mean_error: block name -> (k*,) mean_{i∈A_j} ‖Δ_{b,ij}‖ (NaN for an empty cell).
        cell_sizes: (k*,) int, |A_j|.
        cell_mass: (k*,) Σ_{i∈A_j} w_i (translated fitted weights).
        true_mass: (k*,) w*_j.
        mass_error: (k*,) |cell_mass − true_mass|.
        shared_error: shared block name -> () |τ̂ − τ*| (Euclidean norm for non-scalar blocks).
        assignment: (k,) int.
    """

    max_error: dict[str, jnp.ndarray]
    mean_error: dict[str, jnp.ndarray]
    cell_sizes: jnp.ndarray
    cell_mass: jnp.ndarray
    true_mass: jnp.ndarray
    mass_error: jnp.ndarray
    shared_error: dict[str, jnp.ndarray]
    assignment: jnp.ndarray


# ----------------------------------------------------------------------------------------------
# The loss at a fixed translation.


class _Cells(NamedTuple):
    assignment: jnp.ndarray  # (k,) int
    membership: jnp.ndarray  # (k, k*) float 0/1
    sizes: jnp.ndarray  # (k*,) int
    own_distances: jnp.ndarray  # (B, k) ‖Δ_{b, i, assignment_i}‖
    powered: jnp.ndarray  # (k,) Σ_b ‖Δ‖^e with unknown exponents replaced by 1
    atom_exponents: jnp.ndarray  # (k, B) e_b(|A_{j(i)}|), NaN where unknown
    undefined: jnp.ndarray  # () bool


def _voronoi_cells(fitted: _Atoms, true: _Atoms, exponents: np.ndarray) -> _Cells:
    num_true = true.weights.shape[0]
    distances = jnp.stack(
        [jnp.sqrt(jnp.sum((f[:, None, :] - t[None, :, :]) ** 2, axis=-1)) for f, t in zip(fitted.blocks, true.blocks)]
    )  # (B, k, k*)
    # argmin returns the first minimum, so ties go to the lowest true index.
    assignment = jnp.argmin(jnp.sum(distances, axis=0), axis=1)
    membership = (assignment[:, None] == jnp.arange(num_true)[None, :]).astype(fitted.weights.dtype)
    sizes = jnp.sum(assignment[:, None] == jnp.arange(num_true)[None, :], axis=0)
    own = jnp.take_along_axis(distances, assignment[None, :, None], axis=2)[..., 0]
    table = jnp.asarray(exponents, dtype=fitted.weights.dtype)
    atom_exponents = table[sizes[assignment]]
    undefined = jnp.any(jnp.isnan(table[sizes]).any(axis=1) & (sizes > 0))
    safe_exponents = jnp.where(jnp.isnan(atom_exponents), 1.0, atom_exponents)
    powered = jnp.sum(own.T**safe_exponents, axis=1)
    return _Cells(assignment, membership, sizes, own, powered, atom_exponents, undefined)


def _best_mass_scale(cell_mass: jnp.ndarray, atom_term: jnp.ndarray, true_weights: jnp.ndarray) -> jnp.ndarray:
    """argmin_{u ≥ 0} Σ_j |u S_j − w*_j| + u K: convex piecewise linear, so a breakpoint or u = 0."""
    occupied = cell_mass > 0
    breakpoints = jnp.where(occupied, true_weights / jnp.where(occupied, cell_mass, 1.0), 0.0)
    candidates = jnp.concatenate([jnp.zeros((1,), cell_mass.dtype), breakpoints])
    values = jnp.sum(jnp.abs(candidates[:, None] * cell_mass[None, :] - true_weights[None, :]), axis=1)
    values = values + candidates * atom_term
    return candidates[jnp.argmin(jnp.where(jnp.isnan(values), jnp.inf, values))]


# ----------------------------------------------------------------------------------------------
# Translation search.


@dataclass(frozen=True)
class _LossConfig:
    family: Family
    spec: AtomSpec
    table: ExponentTable
    translation: str
    canonical_truth: bool
    search_steps: int

    @property
    def shift_searchable(self) -> bool:
        # t₀ scales exp_offset weights by e^{t₀}; normalised or sigmoid weights do not scale.
        return self.family.gate.shift_invariant and self.spec.weight == "exp_offset" and self.translation != "none"

    @property
    def slope_searchable(self) -> bool:
        return self.family.gate.slope_translatable and self.translation == "infimum"


_LINE_SEARCH_STEPS = np.concatenate([2.0 ** -np.arange(30.0), np.zeros(1)])
_SMOOTHING_DECADES = 12.0


def _fitted_atoms_at(config: _LossConfig, fitted: MoEParams, slope_shift: jnp.ndarray) -> _Atoms:
    gate = config.family.gate
    gate_params = translate_gate(gate, fitted.gate, 0.0, slope_shift) if config.slope_searchable else fitted.gate
    return _extract_atoms(gate, config.spec, gate_params, fitted.expert)


def _profile(config: _LossConfig, fitted: MoEParams, true: _Atoms, exponents: np.ndarray, slope_shift: jnp.ndarray):
    """(value, u = e^{t₀}) of the loss at slope shift t₁, minimised over t₀ where t₀ is searchable
    (else u = 1); value = +inf when undefined or NaN, so the search never prefers such a point."""
    atoms = _fitted_atoms_at(config, fitted, slope_shift)
    cells = _voronoi_cells(atoms, true, exponents)
    cell_mass = cells.membership.T @ atoms.weights
    atom_term = jnp.sum(atoms.weights * cells.powered)
    if config.shift_searchable:
        scale = _best_mass_scale(cell_mass, atom_term, true.weights)
    else:
        scale = jnp.ones((), atom_term.dtype)
    value = jnp.sum(jnp.abs(scale * cell_mass - true.weights)) + scale * atom_term
    return jnp.where(cells.undefined | jnp.isnan(value), jnp.inf, value), scale


def _slope_block_index(config: _LossConfig) -> int:
    return config.spec.block_names.index(config.family.gate.slope_field.name)


def _newton_direction(config, fitted, true, exponents, slope_shift, smoothing) -> jnp.ndarray:
    """Newton step for the smoothed F_ε(t₁) = Σ_i w_i (‖β_{1i} + t₁ − β*_{1,j(i)}‖² + ε²)^{e_i/2}
    with the cells and exponents frozen at the current t₁."""
    block = _slope_block_index(config)
    atoms = _fitted_atoms_at(config, fitted, slope_shift)
    cells = _voronoi_cells(atoms, true, exponents)
    targets = true.blocks[block][cells.assignment]
    exponent = jnp.where(jnp.isnan(cells.atom_exponents[:, block]), 1.0, cells.atom_exponents[:, block])
    # Normalising the weights keeps F of order one; the Newton step is invariant to this scale.
    weights = atoms.weights / jnp.sum(atoms.weights)
    start = atoms.blocks[block]

    def smoothed(step):
        squared = jnp.sum((start + step - targets) ** 2, axis=1) + smoothing**2
        return jnp.sum(weights * squared ** (exponent / 2))

    zero = jnp.zeros_like(slope_shift)
    gradient, hessian = jax.grad(smoothed)(zero), jax.hessian(smoothed)(zero)
    return -linalg.solve_positive_definite(hessian, gradient)


def _search_slope_shift(config, fitted, true, exponents) -> jnp.ndarray:
    block = _slope_block_index(config)
    fitted_slopes = fitted.gate[config.family.gate.slope_field.name]
    true_slopes = true.blocks[block]
    dim = fitted_slopes.shape[-1]
    # Align every fitted slope onto every true slope: translation-equivariant starts that contain
    # every kink of F, so the search does not depend on how the fitted gate happens to be translated.
    # t₁ = 0 is a start too, so the result is never above the "mass" and "none" translations (both
    # at t₁ = 0, and t₀ is minimised exactly).
    starts = jnp.reshape(true_slopes[None, :, :] - fitted_slopes[:, None, :], (-1, dim))
    starts = jnp.concatenate([starts, jnp.zeros((1, dim), starts.dtype)])
    profile_values = jax.vmap(lambda t: _profile(config, fitted, true, exponents, t)[0])
    slope_shift = starts[jnp.argmin(profile_values(starts))]

    residuals = _fitted_atoms_at(config, fitted, slope_shift).blocks[block][:, None, :] - true_slopes[None, :, :]
    initial_smoothing = jnp.maximum(jnp.max(jnp.sqrt(jnp.sum(residuals**2, axis=-1))), 1e-8)
    steps = max(config.search_steps, 2)

    def refine(iteration, current):
        smoothing = initial_smoothing * 10.0 ** (-_SMOOTHING_DECADES * iteration / (steps - 1))
        direction = _newton_direction(config, fitted, true, exponents, current, smoothing)
        direction = jnp.where(jnp.all(jnp.isfinite(direction)), direction, 0.0)
        trials = current[None, :] + _LINE_SEARCH_STEPS[:, None] * direction[None, :]
        # The last trial is the current point (step 0), so the exact profile never increases.
        return trials[jnp.argmin(profile_values(trials))]

    return jax.lax.fori_loop(0, config.search_steps, refine, slope_shift)


def _choose_translation(config: _LossConfig, fitted: MoEParams, true: _Atoms, exponents: np.ndarray):
    dtype = true.weights.dtype
    dim = config.family.dim
    slope_shift = jnp.zeros((dim,), dtype)
    if config.slope_searchable:
        slope_shift = _search_slope_shift(config, fitted, true, exponents)
    if not config.shift_searchable:
        return jnp.zeros((), dtype), slope_shift
    if config.translation == "mass":
        fitted_weights = _fitted_atoms_at(config, fitted, slope_shift).weights
        return jnp.log(jnp.sum(true.weights) / jnp.sum(fitted_weights)), slope_shift
    _, scale = _profile(config, fitted, true, exponents, slope_shift)
    return jnp.log(scale), slope_shift


# ----------------------------------------------------------------------------------------------
# One replicate, then batching.


def _analyse_one(config: _LossConfig, fitted: MoEParams, truth: MoEParams) -> tuple[VoronoiLoss, ParameterErrors]:
    family, spec = config.family, config.spec
    gate = family.gate
    if config.canonical_truth:
        truth = canonicalize(family, truth)
    true = _extract_atoms(gate, spec, truth.gate, truth.expert)
    num_fitted = fitted.expert[family.expert.fields[0].name].shape[0]
    exponents = config.table.matrix(spec.block_names, num_fitted)

    shift, slope_shift = _choose_translation(config, fitted, true, exponents)
    fitted_gate = fitted.gate
    if gate.shift_invariant:
        fitted_gate = translate_gate(gate, fitted.gate, shift, slope_shift if gate.slope_translatable else None)
    atoms = _extract_atoms(gate, spec, fitted_gate, fitted.expert)
    cells = _voronoi_cells(atoms, true, exponents)

    cell_mass = cells.membership.T @ atoms.weights
    mass_error = jnp.abs(cell_mass - true.weights)
    mass = jnp.sum(mass_error)
    atom = jnp.where(cells.undefined, jnp.nan, jnp.sum(atoms.weights * cells.powered))
    shared = jnp.sum(jnp.abs(atoms.shared - true.shared))
    loss = VoronoiLoss(
        loss=mass + atom + shared,
        mass=mass,
        atom=atom,
        shared=shared,
        cell_sizes=cells.sizes,
        undefined=cells.undefined,
        assignment=cells.assignment,
        shift=shift,
        slope_shift=slope_shift,
    )

    occupied = cells.sizes > 0
    in_cell = cells.membership > 0  # (k, k*)
    max_error, mean_error = {}, {}
    for index, block in enumerate(spec.blocks):
        own = cells.own_distances[index][:, None]  # (k, 1)
        worst = jnp.max(jnp.where(in_cell, own, -jnp.inf), axis=0)
        total = jnp.sum(jnp.where(in_cell, own, 0.0), axis=0)
        max_error[block.name] = jnp.where(occupied, worst, jnp.nan)
        mean_error[block.name] = jnp.where(occupied, total / jnp.maximum(cells.sizes, 1), jnp.nan)
    shared_error = {
        b.name: jnp.sqrt(jnp.sum((fitted_gate[b.name] - truth.gate[b.name]) ** 2))
        if b.group == "gate"
        else jnp.sqrt(jnp.sum((fitted.expert[b.name] - truth.expert[b.name]) ** 2))
        for b in spec.shared
    }
    errors = ParameterErrors(
        max_error=max_error,
        mean_error=mean_error,
        cell_sizes=cells.sizes,
        cell_mass=cell_mass,
        true_mass=true.weights,
        mass_error=mass_error,
        shared_error=shared_error,
        assignment=cells.assignment,
    )
    return loss, errors


def _batch_ndim(family: Family, params: MoEParams, what: str) -> int:
    field = family.expert.fields[0]
    extra = jnp.ndim(params.expert[field.name]) - len(field.shape)
    if extra < 0:
        raise ValueError(
            f"{what}.expert.{field.name}: expected at least {len(field.shape)} axes, got {jnp.ndim(params.expert[field.name])}"
        )
    return extra


@partial(jax.jit, static_argnames=("config",))
def _analyse(config: _LossConfig, fitted: MoEParams, truth: MoEParams) -> tuple[VoronoiLoss, ParameterErrors]:
    analyse = partial(_analyse_one, config)
    for _ in range(_batch_ndim(config.family, fitted, "fitted")):
        analyse = jax.vmap(analyse, in_axes=(0, None))
    return analyse(fitted, truth)


def _make_config(family, fitted, truth, exponents, translation, weight, canonical_truth, search_steps) -> _LossConfig:
    if translation not in TRANSLATIONS:
        raise ValueError(f"translation: expected one of {TRANSLATIONS}, got {translation!r}")
    if not isinstance(search_steps, int) or search_steps < 0:
        raise ValueError(f"search_steps: expected a non-negative integer, got {search_steps!r}")
    if _batch_ndim(family, truth, "truth") != 0:
        raise ValueError("truth: expected unbatched true parameters (only the fitted parameters may carry batch axes)")
    _batch_ndim(family, fitted, "fitted")
    spec = atom_spec(family, weight)
    table = default_exponent_table(family) if exponents is None else _resolve_table(exponents)
    unknown_blocks = sorted(set(dict(table.multi_atom)) - set(spec.block_names))
    if unknown_blocks:
        raise ValueError(
            f"exponents: table {table.name!r} names block(s) {unknown_blocks} that the family has no atom block for; "
            f"its blocks are {list(spec.block_names)}"
        )
    return _LossConfig(family, spec, table, translation, bool(canonical_truth), search_steps)


def voronoi_loss(
    family: Family,
    fitted: MoEParams,
    truth: MoEParams,
    *,
    exponents: str | ExponentTable | None = None,
    translation: str = "infimum",
    weight: str | None = None,
    canonical_truth: bool = True,
    search_steps: int = 40,
) -> VoronoiLoss:
    """The Voronoi loss D(G, G*) of docs/losses.md (see the module docstring for the mathematics).

    Args:
        family: gate × expert (its ``num_experts`` is not used: k and k* are read from the arrays).
        fitted: fitted parameters with k experts; any leading batch axes (replicates, starts) are
            mapped over with ``vmap``.
        truth: true parameters with k* experts, unbatched.
        exponents: a name in :data:`EXPONENT_TABLES` or an :class:`ExponentTable`; default
            :func:`default_exponent_table` (the over-fitted D₂ table).
        translation: ``"infimum"`` (default), ``"mass"`` or ``"none"`` (softmax-type gates only).
        weight: weight rule, a key of :data:`WEIGHT_RULES`; default :func:`default_weight_rule`.
        canonical_truth: put the truth in canonical form first (:func:`moe_theory.models.canonicalize`).
        search_steps: Newton steps of the t₁ search of ``"infimum"`` (static).

    Returns:
        :class:`VoronoiLoss`. jit-compiled per (family, options, shapes); vmap-clean.
    """
    config = _make_config(family, fitted, truth, exponents, translation, weight, canonical_truth, search_steps)
    return _analyse(config, fitted, truth)[0]


def parameter_errors(
    family: Family,
    fitted: MoEParams,
    truth: MoEParams,
    *,
    exponents: str | ExponentTable | None = None,
    translation: str = "infimum",
    weight: str | None = None,
    canonical_truth: bool = True,
    search_steps: int = 40,
) -> ParameterErrors:
    """Per true atom and block: worst and mean error in its Voronoi cell, cell sizes and masses.

    Same arguments as :func:`voronoi_loss`; errors are measured at the translation that the loss
    chooses (so ``exponents`` matters only through the ``"infimum"`` translation).
    """
    config = _make_config(family, fitted, truth, exponents, translation, weight, canonical_truth, search_steps)
    return _analyse(config, fitted, truth)[1]


def voronoi_analysis(family: Family, fitted: MoEParams, truth: MoEParams, **options: Any) -> tuple[VoronoiLoss, ParameterErrors]:
    """:func:`voronoi_loss` and :func:`parameter_errors` from one computation (the same arguments);
    both come from the same cells and translation."""
    defaults = {"exponents": None, "translation": "infimum", "weight": None, "canonical_truth": True, "search_steps": 40}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"voronoi_analysis: unknown option(s) {unknown}")
    settings = {**defaults, **options}
    config = _make_config(family, fitted, truth, settings["exponents"], settings["translation"], settings["weight"],
                          settings["canonical_truth"], settings["search_steps"])
    return _analyse(config, fitted, truth)


def _num_atoms(family: Family, params: MoEParams) -> int:
    return params.expert[family.expert.fields[0].name].shape[-len(family.expert.fields[0].shape)]


def exact_fitted_loss(family: Family, fitted: MoEParams, truth: MoEParams, **options: Any) -> VoronoiLoss:
    """D₁ of [1]: the Voronoi loss with every exponent 1, for k = k*."""
    if _num_atoms(family, fitted) != _num_atoms(family, truth):
        raise ValueError(
            f"exact_fitted_loss: needs k = k*, got k = {_num_atoms(family, fitted)} fitted and "
            f"k* = {_num_atoms(family, truth)} true experts"
        )
    return voronoi_loss(family, fitted, truth, exponents=FIRST_ORDER, **options)


def over_fitted_loss(family: Family, fitted: MoEParams, truth: MoEParams, **options: Any) -> VoronoiLoss:
    """D₂: the Voronoi loss with the family's over-fitted table (:func:`default_exponent_table`)."""
    return voronoi_loss(family, fitted, truth, exponents=default_exponent_table(family), **options)


# ----------------------------------------------------------------------------------------------
# Expert errors (see the module docstring).


class ExpertErrors(NamedTuple):
    """Result of :func:`expert_errors`; every field gains the leading batch axes of ``fitted``.

    Attributes:
        max_error: (k*,) max over the fitted experts of true expert j's cell of d_i (NaN if empty).
        mean_error: (k*,) their mean (NaN if empty).
        used_error: (k*,) their mean weighted by each fitted expert's use E_x[π̂_i(x)] (NaN if empty
            or never used).
        distance: (k,) d_i of each fitted expert to the true expert whose cell holds it.
        usage: (k,) E_x[π̂_i(x)] of each fitted expert.
        assignment: (k,) int, that true expert.
    """

    max_error: jnp.ndarray
    mean_error: jnp.ndarray
    used_error: jnp.ndarray
    distance: jnp.ndarray
    usage: jnp.ndarray
    assignment: jnp.ndarray


def expert_distances(expert: Expert, fitted: Mapping[str, jnp.ndarray], truth: Mapping[str, jnp.ndarray], assignment,
                     x: jnp.ndarray) -> jnp.ndarray:
    """d_i of every fitted expert to its assigned true expert, (k,), for ONE fit: ``fitted`` and
    ``truth`` are expert parameter dicts (k and k* experts), E_x over the draws ``x``. Shared by
    every family whose cells are formed some other way than :func:`parameter_errors`."""
    fitted_means = expert.mean(fitted, x)  # (N, k) or class probabilities (N, k, C)
    true_means = expert.mean(truth, x)[:, assignment]  # the assigned true expert's, same shape
    gap = jnp.abs(fitted_means - true_means)
    if expert.is_classifier:
        gap = 0.5 * jnp.sum(gap, axis=-1)
    return jnp.mean(gap, axis=0)


def cell_statistics(distance: jnp.ndarray, assignment: jnp.ndarray, num_true: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(worst, mean) of per-atom values over each true atom's cell, (k*,) each; NaN for an empty cell."""
    membership = assignment[:, None] == jnp.arange(num_true)[None, :]  # (k, k*)
    count = jnp.sum(membership, axis=0)
    worst = jnp.max(jnp.where(membership, distance[:, None], -jnp.inf), axis=0)
    mean = jnp.sum(jnp.where(membership, distance[:, None], 0.0), axis=0) / jnp.maximum(count, 1)
    return jnp.where(count > 0, worst, jnp.nan), jnp.where(count > 0, mean, jnp.nan)


def _check_monte_carlo(family: Family, truth: MoEParams, num_inputs: int) -> None:
    """The arguments every E_x estimate shares: a positive number of x draws and an unbatched truth."""
    if not isinstance(num_inputs, int) or num_inputs < 1:
        raise ValueError(f"num_inputs: expected a positive integer, got {num_inputs!r}")
    if _batch_ndim(family, truth, "truth") != 0:
        raise ValueError("truth: expected unbatched true parameters (only the fitted parameters may carry batch axes)")


def expert_errors(
    key: jax.Array,
    family: Family,
    fitted: MoEParams,
    truth: MoEParams,
    inputs: InputDistribution = UniformInputs(),
    num_inputs: int = 1000,
    fitted_family: Family | None = None,
    **cell_options: Any,
) -> ExpertErrors:
    """The expert estimation error of each true expert (see the module docstring).

    Args:
        key: PRNG key of the x draws (the same draws for every replicate of a batch).
        family: gate × expert; ``fitted`` may have more experts than ``truth``.
        fitted: fitted parameters, with any leading batch axes.
        truth: true parameters, unbatched.
        inputs: the input distribution of the x draws (static).
        num_inputs: number of x draws (static).
        fitted_family: the fitted family, when its gate differs from ``family``'s (a top-K gate
            fitted with another K̄): the atoms' use E_x[π̂_i(x)] is computed with it.
        **cell_options: how the Voronoi cells are formed, as for :func:`parameter_errors`
            (``translation``, ``exponents``, ``weight``, ``canonical_truth``).
    """
    _check_monte_carlo(family, truth, num_inputs)
    cells = parameter_errors(family, fitted, truth, **cell_options)
    x = inputs.draw(key, num_inputs, family.dim, jax.tree_util.tree_leaves(truth)[0].dtype, truth)
    num_true = _num_atoms(family, truth)

    def one(fitted_one, assignment):
        distance = expert_distances(family.expert, fitted_one.expert, truth.expert, assignment, x)
        worst, mean = cell_statistics(distance, assignment, num_true)
        usage = jnp.mean(jnp.exp(gate_log_weights(fitted_family or family, fitted_one, x)), axis=0)
        membership = assignment[:, None] == jnp.arange(num_true)[None, :]  # (k, k*)
        cell_usage = jnp.sum(jnp.where(membership, usage[:, None], 0.0), axis=0)
        used = jnp.sum(jnp.where(membership, (usage * distance)[:, None], 0.0), axis=0) / jnp.where(cell_usage > 0, cell_usage, 1.0)
        # A cell none of whose atoms the gate ever routes to has no used error (not a perfect one).
        used = jnp.where(cell_usage > 0, used, jnp.nan)
        return ExpertErrors(worst, mean, used, distance, usage, assignment)

    for _ in range(_batch_ndim(family, fitted, "fitted")):
        one = jax.vmap(one)
    return one(fitted, cells.assignment)


# ----------------------------------------------------------------------------------------------
# Density distances.


class DensityDistances(NamedTuple):
    """E_x of the conditional Hellinger and total-variation distances, with Monte Carlo standard errors.

    Every field gains the leading batch axes of ``fitted``.
    """

    hellinger: jnp.ndarray
    hellinger_se: jnp.ndarray
    total_variation: jnp.ndarray
    total_variation_se: jnp.ndarray


# Quadrature in y (see the module docstring): per-component grid points μ_c + σ_c·u on
# u ∈ [−_GRID_HALF_WIDTH, _GRID_HALF_WIDTH], each grid segment split at its root of log p̂ − log p*
# (found by _ROOT_BISECTIONS bisections) and integrated by Gauss–Legendre.
_GRID_HALF_WIDTH = 10.0
_ROOT_BISECTIONS = 20
_INPUT_CHUNK = 64


def _log_mixture_density(
    family: Family, params: MoEParams, log_gate: jnp.ndarray, x: jnp.ndarray, y: jnp.ndarray
) -> jnp.ndarray:
    """log p(y_l | x) for one x (1, d) and many y (N,), with the gate log-weights computed once."""
    inputs = jnp.broadcast_to(x, (y.shape[0], x.shape[1]))
    return jax.nn.logsumexp(log_gate[None, :] + expert_log_prob(family, params, inputs, y), axis=1)


def _regression_distances_at(family, fitted_family, fitted, truth, grid_points, legendre, x):
    """(H², TV) between p̂(·|x) and p*(·|x) for a single x of shape (d,)."""
    x = x[None, :]
    log_gates = [gate_log_weights(f, params, x)[0] for f, params in ((fitted_family, fitted), (family, truth))]

    def log_densities(y):
        pairs = zip((fitted, truth), log_gates)
        return tuple(_log_mixture_density(family, params, log_gate, x, y) for params, log_gate in pairs)

    means = jnp.concatenate([family.expert.mean(fitted.expert, x)[0], family.expert.mean(truth.expert, x)[0]])
    variance = field_with_role(family.expert.fields, "variance").name
    deviations = jnp.sqrt(jnp.concatenate([fitted.expert[variance], truth.expert[variance]]))
    grid = jnp.sort(jnp.ravel(means[:, None] + deviations[:, None] * grid_points[None, :]))
    left, right = grid[:-1], grid[1:]

    def sign_of_difference(y):
        fitted_log, true_log = log_densities(y)
        return jnp.sign(jnp.nan_to_num(fitted_log - true_log))

    left_sign = sign_of_difference(left)
    has_root = left_sign * sign_of_difference(right) < 0

    def bisect(_, bracket):
        low, high = bracket
        middle = 0.5 * (low + high)
        same_side = sign_of_difference(middle) == left_sign
        return jnp.where(same_side, middle, low), jnp.where(same_side, high, middle)

    low, high = jax.lax.fori_loop(0, _ROOT_BISECTIONS, bisect, (left, right))
    # Splitting at the root puts the kink of |p̂ − p*| on a segment end; elsewhere split anywhere.
    split = jnp.where(has_root, 0.5 * (low + high), 0.5 * (left + right))
    starts = jnp.concatenate([left, split])
    half_lengths = 0.5 * (jnp.concatenate([split, right]) - starts)
    nodes, node_weights = legendre
    y = jnp.ravel(starts[:, None] + half_lengths[:, None] * (nodes[None, :] + 1.0))
    weights = jnp.ravel(half_lengths[:, None] * node_weights[None, :])

    fitted_log, true_log = log_densities(y)
    larger = jnp.maximum(fitted_log, true_log)
    gap = jnp.abs(fitted_log - true_log)
    present = jnp.isfinite(larger)
    scale = jnp.where(present, jnp.exp(jnp.where(present, larger, 0.0)), 0.0)
    gap = jnp.where(present & ~jnp.isnan(gap), gap, 0.0)
    # ½(√p̂ − √p*)² and ½|p̂ − p*| written with expm1 around the larger density: no cancellation
    # when p̂ ≈ p*, no overflow when they differ by many orders of magnitude.
    squared_hellinger = jnp.sum(weights * 0.5 * scale * jnp.expm1(-0.5 * gap) ** 2)
    total_variation = jnp.sum(weights * 0.5 * scale * -jnp.expm1(-gap))
    return squared_hellinger, total_variation


def _regression_distances(family, fitted_family, fitted, truth, x, grid_size, num_quadrature):
    if field_with_role(family.expert.fields, "variance") is None:
        raise ValueError(
            f"density_distances: the {family.expert.name} expert declares no field with role 'variance'; "
            "the quadrature grid of a regression expert is scaled by its noise variance"
        )
    grid_points = jnp.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, grid_size)
    legendre = tuple(jnp.asarray(a) for a in np.polynomial.legendre.leggauss(num_quadrature))
    at = partial(_regression_distances_at, family, fitted_family, fitted, truth, grid_points, legendre)
    # lax.map over chunks of inputs bounds the memory (nodes × experts per input) independently of num_inputs.
    return jax.lax.map(at, x, batch_size=min(_INPUT_CHUNK, x.shape[0]))


def _classification_distances(family, fitted_family, fitted, truth, x):
    fitted_probs = mean_function(fitted_family, fitted, x)
    true_probs = mean_function(family, truth, x)
    squared_hellinger = 0.5 * jnp.sum((jnp.sqrt(fitted_probs) - jnp.sqrt(true_probs)) ** 2, axis=-1)
    total_variation = 0.5 * jnp.sum(jnp.abs(fitted_probs - true_probs), axis=-1)
    return squared_hellinger, total_variation


def _mean_and_standard_error(values: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    count = values.shape[0]
    spread = jnp.std(values, ddof=1) if count > 1 else jnp.zeros((), values.dtype)
    return jnp.mean(values), spread / math.sqrt(count)


def _density_distances_one(family, fitted_family, grid_size, num_quadrature, x, fitted, truth) -> DensityDistances:
    if family.expert.is_classifier:
        squared_hellinger, total_variation = _classification_distances(family, fitted_family, fitted, truth, x)
    else:
        squared_hellinger, total_variation = _regression_distances(
            family, fitted_family, fitted, truth, x, grid_size, num_quadrature
        )
    hellinger = jnp.sqrt(jnp.clip(squared_hellinger, 0.0, 1.0))
    total_variation = jnp.clip(total_variation, 0.0, 1.0)
    return DensityDistances(*_mean_and_standard_error(hellinger), *_mean_and_standard_error(total_variation))


@partial(jax.jit, static_argnames=("family", "fitted_family", "inputs", "num_inputs", "grid_size", "num_quadrature"))
def _density_distances(
    key, family, fitted_family, fitted, truth, inputs, num_inputs, grid_size, num_quadrature
) -> DensityDistances:
    dtype = jax.tree_util.tree_leaves(truth)[0].dtype
    # One set of x draws for every replicate (common random numbers): differences between
    # replicates are then not blurred by independent Monte Carlo noise.
    x = inputs.draw(key, num_inputs, family.dim, dtype, truth)
    distances = partial(_density_distances_one, family, fitted_family, grid_size, num_quadrature, x)
    for _ in range(_batch_ndim(family, fitted, "fitted")):
        distances = jax.vmap(distances, in_axes=(0, None))
    return distances(fitted, truth)


def density_distances(
    key: jax.Array,
    family: Family,
    fitted: MoEParams,
    truth: MoEParams,
    inputs: InputDistribution = UniformInputs(),
    num_inputs: int = 1000,
    grid_size: int = 16,
    num_quadrature: int = 6,
    fitted_family: Family | None = None,
) -> DensityDistances:
    """E_x[H(p̂(·|x), p*(·|x))] and E_x[TV(p̂(·|x), p*(·|x))], x ~ ``inputs``, with MC standard errors.

    Args:
        key: PRNG key for the x draws (the same key gives the same draws; every replicate in a
            batch uses the same draws).
        family: gate × expert (k and k* are read from the arrays).
        fitted: fitted parameters; any leading batch axes are mapped over.
        truth: true parameters, unbatched; ``inputs`` that read the gate (``from_gate=True``) use them.
        inputs: the input distribution (static; see :func:`moe_theory.sampling.make_inputs`). With
            the deterministic ``grid`` the mean is a Riemann average and the standard error only
            indicates the spread over x.
        num_inputs: number of x draws (static).
        grid_size: grid points per mixture component over μ_c ± 10σ_c (regression experts; static).
        num_quadrature: Gauss–Legendre nodes per half grid segment (regression experts; static).
        fitted_family: the family of ``fitted`` where its gate differs from ``family``'s (a top-K
            fit with another number K̄ of active experts [2]); same expert and dimension. Default
            ``family``.

    Returns:
        :class:`DensityDistances`, every value in [0, 1]. H uses the ½ convention: H² = ½∫(√p̂ − √p*)².
    """
    _check_monte_carlo(family, truth, num_inputs)
    if not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size: expected an integer ≥ 2, got {grid_size!r}")
    if not isinstance(num_quadrature, int) or num_quadrature < 1:
        raise ValueError(f"num_quadrature: expected a positive integer, got {num_quadrature!r}")
    fitted_family = family if fitted_family is None else fitted_family
    if (fitted_family.expert, fitted_family.dim, fitted_family.num_classes) != (family.expert, family.dim, family.num_classes):
        raise ValueError("fitted_family: expected the same expert, dimension and classes as family; only the gate may differ")
    return _density_distances(key, family, fitted_family, fitted, truth, inputs, num_inputs, grid_size, num_quadrature)
