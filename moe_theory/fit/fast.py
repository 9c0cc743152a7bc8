"""A fast EM path for the softmax-gated mixture of Gaussian-linear experts (``docs/estimators.md``).

:func:`moe_theory.fit.fit_em`, :func:`~moe_theory.fit.fit_em_trace` and the batched fitters run its
solver :class:`FastEM` automatically when :func:`fast_path_applies`: the gate is the plain linear-score softmax (no
activation, temperature or top-K; an input transform z = M(x) is allowed), the experts are Gaussian
linear, 2 ≤ k ≤ :data:`MAX_EXPERTS`, d ≤ :data:`MAX_DIM`, ``gate_steps == 1`` and
``EMConfig.fast_path`` is True (False forces the generic path). It computes the *same* iteration as
the generic path: the same E-step, closed-form expert M-step and keep rule, damped Newton direction
for the gate, step-halving rule and stopping rule. Only the arithmetic is arranged
differently, so n_iter, converged, finite, the final log-likelihood and the parameters agree up to
rounding (see "Steps below rounding" and "What can differ" below).

**Notation.** Samples j with weights w_j; expert design D_j = (x_j, 1) ∈ R^{d+1}; gate features
G_j = (1, z_j) with z_j = M(x_j); free gate coordinates u_i = (β_{0i}, β_{1i}) for i < k − 1 (the
reference expert k − 1 has score 0, ``docs/gates.md``); scores s_ji = u_iᵀG_j, log Z_j = logsumexp_i s_ji,
π_ji = exp(s_ji − log Z_j); residuals e_ji = y_j − (a_i, b_i)ᵀD_j at the *current* expert
parameters; responsibilities r_ji and ω_ji = w_j r_ji, so that Σ_i ω_ji = w_j.

**Everything is a moment.** Besides ℓ, an EM iteration needs only these sums over samples:

* expert i: Γ_i = Σ_j ω_ji D_j D_jᵀ, c_i = Σ_j ω_ji e_ji D_j, q_i = Σ_j ω_ji e_ji². Weighted least
  squares of y on D equals the old coefficients plus the least-squares fit of the old residual, so
  the M-step is (a_i, b_i) ← (a_i, b_i) + Δ_i with Γ_i Δ_i = c_i, and because
  Σ_j ω_ji (e_ji − D_jᵀΔ_i)² = q_i − 2Δ_iᵀc_i + Δ_iᵀΓ_iΔ_i = q_i − Δ_iᵀc_i, the new variance is
  ν_i = (q_i − Δ_iᵀc_i) / Σ_j ω_ji. No second pass is needed, and the update is accurate: Δ → 0 at
  convergence (unlike Σ ω y² − (Σ ω y)² / Σ ω). The difference q_i − Δ_iᵀc_i cancels only when the
  new variance is tiny next to the old residual variance, i.e. an expert collapsing onto d + 1
  points; below ε^(1/3)·q_i the sum Σ_j ω_ji (e_ji − D_jᵀΔ_i)² is taken directly in a second pass,
  run only when some replicate needs it (see below).
* gate, with the generic path's objective Q(u) = Σ_j Σ_i ω_ji log π_ji(u) / Σ_j w_j:
  ∇_{u_i}Q = Σ_j (ω_ji − w_j π_ji) G_j / Σ w and
  −∇²_{u_i u_l}Q = Σ_j w_j (δ_il π_ji − π_ji π_jl) G_j G_jᵀ / Σ w, i.e. the moments Σ_j ω_ji G_j,
  Σ_j w_j π_ji G_j G_jᵀ and Σ_j w_j π_ji π_jl G_j G_jᵀ (i ≤ l < k − 1). The direction is the generic
  path's damped Newton step (:mod:`moe_theory.fit.newton`: ridge, else Gershgorin shift), computed
  by the same function from the same matrix in the same coordinate order.
* step halving: scores are linear in u and Σ_i ω_ji = w_j, so
  Q(u + αδ) − Q(u) = [α Σ_i δ_iᵀ Σ_j ω_ji G_j − (Σ_j w_j log Z_j(u + αδ) − Σ_j w_j log Z_j(u))] / Σ w.
  A trial step needs a single per-sample quantity, Σ_j w_j log Z_j; the first term (the "gain")
  is a moment already in hand.

All per-sample work of an iteration is thus one pass whose terms are reduced together in ONE
variadic ``lax.reduce`` (XLA on CPU otherwise emits one loop over the samples per sum). Experts and
design coordinates are unrolled in Python, so each term is an array over samples and reductions run
along the contiguous sample axis; the number of terms grows like k²d², which is why k and d are
bounded. Each exponential is computed once per sample and iteration: the gate's exp(s_i − max) give
both π_i and Z_j, and the E-step's exp(joint_i − max) both r_ji and ℓ_j.

**Σ log without n logarithms.** After subtracting maxima, the normalisers inside ℓ_j and log Z_j
lie in [1, k]. With unit weights (``weights=None``), Σ_j log v_j = Σ_c log Π_{j∈c} v_j over chunks c
of :data:`PRODUCT_CHUNK` samples (k^16 is far below the largest float for k ≤ MAX_EXPERTS), so a pass
takes n/8 logarithms instead of 2n. A boolean mask (padding, as :mod:`moe_theory.sweep` passes it)
is summed the same way, with v_j = 1 on the masked-out rows. Other weights need w_j log v_j sample
by sample, which is exact for any weights: those logarithms are summed by dot products with the
weights, which keeps them out of the variadic reduction (see :func:`_dot_weights`).

**One pass per iteration.** The generic iteration t (E-step at θ_t, expert M-step, gate Newton step
from u_t with trials u_t + αδ_t, α = 1, ½, …) evaluates the gate at u_t + δ_t for its first trial,
and iteration t + 1's E-step evaluates it again at the accepted point. Here iteration t stops after
computing δ_t and leaves the step *pending*; iteration t + 1's single pass is evaluated at the
full-step candidate u_t + δ_t with the new expert parameters. That pass yields Σ w log Z at the
candidate, which decides the pending trial exactly as the generic path does, and when α = 1 is
accepted (the usual case) it *is* iteration t + 1's E-step and holds the moments of its M-steps.
When α = 1 is rejected, the trials α = ½, ¼, … (gate-only passes) and a repeat of the full pass at
the accepted point run in ``while_loop``s, which under ``vmap`` take zero trips unless an active
replicate needs them (a ``lax.cond`` would become a select that always runs both branches; and an
optimisation barrier keeps XLA from hoisting the loop-invariant pass out of the loop, where it would
run every time). After the last iteration the pending step is settled the same way, together with
the final E-step. The accepted parameters, the log-likelihoods ℓ(θ_t), the iteration count and the stopping decisions are
therefore the generic path's; only the bookkeeping moved by half an iteration.

**Steps below rounding.** One rule is the fast path's own. The test Q(u + δ) ≥ Q(u) compares
α·gain with the change of Σ_j w_j log Z_j, two sums whose rounding error is about ε·Σ_j w_j log Z_j
(log Z_j ≥ 0 because the reference score is 0). A step whose predicted improvement ½·Σ w·∇Qᵀδ is
at most :data:`ROUNDING_MARGIN`·ε·Σ_j w_j log Z_j cannot be tested: rounding decides the outcome,
and a rejection costs up to ``max_halvings`` gate passes and a repeated full pass. Such a step is
taken untested (if its value is finite). On the concave softmax objective a Newton step this small
ascends, so Q never decreases beyond its rounding error. The generic path tests the step, and
rounding decides. In float64 the rule acts only once the gate has converged to rounding level (the
predicted gain is then below ~1e-14 per sample). In float32 it acts in most iterations after the
first few of a slowly converging fit, which it makes about 5× faster.

**What can differ.** Rounding: sums are formed in another order, the expert update is in residual
form, ℓ uses products of normalisers. Parameters typically agree to 1e-12–1e-10 relative. Where
either computation is ill-conditioned the agreement is what the conditioning allows: with a
saturated gate (π within ~1e-7 of 0 or 1 on many samples) ∇Q and ∇²Q are differences of nearly
equal sums in both paths (~1e-9), and after an expert collapses onto d + 1 points the likelihood is
unbounded and both hold rounding noise. A decision on a quantity that is zero up to rounding can go
either way in either path: a gate step whose gain is below the rounding noise of Q (taken untested
here, see above), which happens once the parameters have converged to ~1e-8 (with a negative
``tol``, or when EM converges superlinearly, faster than the stopping rule, which looks one
iteration back, can react), a relative change exactly at ``tol``, or a numerically singular Γ_i or
Hessian.

Padding and the canonical form are handled as in :mod:`moe_theory.fit.em` (its :func:`~moe_theory.fit.em.prepare`): the
start is canonicalised, zero-weight rows are zeroed so that they contribute exactly nothing, and the
reference expert's gate coordinates never move.

On a CPU, XLA's default fusion emitters generate the variadic reduction as scalar code; programs
that run this path are therefore compiled with their own XLA options
(:mod:`moe_theory.fit.compiling`), which make an iteration about 1.4× faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import linalg
from ..experts import GaussianLinear
from ..gates import TRANSFORMS
from ..models import Family, canonicalize
from ..params import MoEParams
from .em import prepare
from .newton import damped_newton_direction
from .settings import EMConfig
from .solver import FitResult, all_finite

MAX_DIM = 4
"""Largest input dimension d served by the fast path (the generic path runs above it)."""
MAX_EXPERTS = 6
"""Largest number of experts k served by the fast path."""
PRODUCT_CHUNK = 16
"""Samples per product in Σ log v (v ∈ [1, k], so a product is at most 6^16 < 3e12)."""
ROUNDING_MARGIN = 16
"""A gate step predicted to gain at most ROUNDING_MARGIN·ε·Σ_j w_j log Z_j is taken untested (the
rounding error of that sum measured ~1.5·ε·Σ_j w_j log Z_j in float32; see "Steps below rounding")."""

_LOG_2PI = math.log(2.0 * math.pi)


def fast_path_applies(family: Family, config: EMConfig) -> bool:
    """Whether :class:`FastEM` computes this family's EM iteration (see the module docstring)."""
    gate = family.gate
    dense = gate.top_k is None or gate.top_k >= family.num_experts
    return bool(
        config.fast_path
        and config.likelihood == "conditional"
        and config.gate_steps == 1
        and config.bound is None
        and gate.score == "linear"
        and gate.normaliser == "softmax"
        and gate.activation is None
        and gate.temperature is None
        and dense
        and isinstance(family.expert, GaussianLinear)
        and 2 <= family.num_experts <= MAX_EXPERTS
        and family.dim <= MAX_DIM
    )


# ----------------------------------------------------------------------------------------------
# Data layout and reductions: one array over samples per coordinate, so that every per-sample term
# is a plain (n,) array ((B, n) under vmap) and reductions run along the contiguous sample axis.


class _Data(NamedTuple):
    inputs: tuple  # x columns: the expert design without its constant
    gate_inputs: tuple  # z = M(x) columns (the very same arrays as ``inputs`` without a transform)
    responses: jnp.ndarray
    weights: jnp.ndarray | None  # None: unit weights
    mask: bool  # the weights are 0 or 1 (given as a boolean mask), so Σ w log v can use products


def _columns(x, y, weights, transform, mask: bool) -> _Data:
    inputs = tuple(x[:, c] for c in range(x.shape[1]))
    gate_inputs = tuple(TRANSFORMS[transform](column) for column in inputs) if transform else inputs
    return _Data(inputs, gate_inputs, y, weights, mask)


def _logs_by_products(data: _Data) -> bool:
    """Whether Σ_j w_j log v_j is taken as logs of products: unit weights, or a 0/1 mask."""
    return data.weights is None or data.mask


def _sum_log(values: jnp.ndarray) -> jnp.ndarray:
    """Σ_j log v_j for v_j ∈ [1, k], as logs of products over chunks of PRODUCT_CHUNK samples."""
    n = values.shape[0]
    chunked = n - n % PRODUCT_CHUNK
    total = jnp.zeros((), values.dtype)
    if chunked:
        products = jnp.prod(values[:chunked].reshape(PRODUCT_CHUNK, chunked // PRODUCT_CHUNK), axis=0)
        total = total + jnp.sum(jnp.log(products))
    if chunked < n:
        total = total + jnp.sum(jnp.log(values[chunked:]))
    return total


def _reduce(data: _Data, sums: dict, logs: dict) -> dict:
    """Σ_j t_j for every term t of ``sums`` in one variadic reduction, and Σ_j w_j log v_j for every
    v of ``logs`` (unit weights or a 0/1 mask only: masked-out samples enter as v = 1)."""
    shape = data.responses.shape
    leaves, tree = jax.tree_util.tree_flatten(sums)
    operands = tuple(jnp.broadcast_to(term, shape) for term in leaves)  # with d = 0 gate terms are scalars
    zeros = tuple(jnp.zeros((), term.dtype) for term in operands)
    totals = lax.reduce(operands, zeros, lambda left, right: tuple(a + b for a, b in zip(left, right)), (0,)) if operands else ()
    if data.weights is not None:
        logs = {name: jnp.where(data.weights > 0, term, 1.0) for name, term in logs.items()}
    logged = {name: _sum_log(jnp.broadcast_to(term, shape)) for name, term in logs.items()}
    return {**jax.tree_util.tree_unflatten(tree, list(totals)), **logged}


def _dot_weights(data: _Data, values: dict) -> dict:
    """Σ_j w_j v_j for general weights, as dot products. XLA fuses element-wise producers into a
    reduction, whose CPU code is scalar, but not into a dot: the logarithms inside v then run in
    vectorised loops (about 1.6× faster per iteration than inside the variadic reduction)."""
    shape = data.responses.shape  # with d = 0 the gate terms are scalars
    return {name: jnp.dot(data.weights, jnp.broadcast_to(value, shape)) for name, value in values.items()}


# ----------------------------------------------------------------------------------------------
# The per-sample passes.


def _gate_normaliser(data: _Data, gate):
    """Scores s_i (i < k − 1), top = max(0, s_i), exp(s_i − top) and Z' = Σ exp(· − top) ∈ [1, k].

    log Z = top + log Z'; the reference expert's score is 0, its exponential exp(−top).
    """
    num_free, num_features = gate.shape
    scores = []
    for i in range(num_free):
        score = gate[i, 0]
        for c in range(num_features - 1):
            score = score + gate[i, c + 1] * data.gate_inputs[c]
        scores.append(score)
    top = jnp.maximum(scores[0], 0.0)
    for score in scores[1:]:
        top = jnp.maximum(top, score)
    exponentials = [jnp.exp(score - top) for score in scores]
    normaliser = jnp.exp(-top)
    for term in exponentials:
        normaliser = normaliser + term
    return scores, top, exponentials, normaliser


def _weighted(data: _Data, value):
    return value if data.weights is None else data.weights * value


def _sum_log_normaliser(data: _Data, gate) -> jnp.ndarray:
    """Σ_j w_j log Z_j(gate): the only per-sample quantity a step-halving trial needs."""
    _, top, _, normaliser = _gate_normaliser(data, gate)
    if _logs_by_products(data):
        totals = _reduce(data, {"top": _weighted(data, top)}, {"normaliser": normaliser})
        return totals["top"] + totals["normaliser"]
    return _dot_weights(data, {"log_normaliser": top + jnp.log(normaliser)})["log_normaliser"]


def _pair_products(weight, features) -> list:
    """weight · f_a · f_b for a ≤ b (row-major upper triangle); a feature None stands for 1."""
    firsts = [weight if f is None else weight * f for f in features]
    return [first if g is None else first * g for a, first in enumerate(firsts) for g in features[a:]]


class _EStep(NamedTuple):
    """Per-sample E-step quantities at (gate, expert); ``scaled_i / total`` are the responsibilities."""

    top: jnp.ndarray
    exponentials: list  # exp(s_i − top), i < k − 1
    normaliser: jnp.ndarray  # Z' = Σ_i exp(s_i − top) ∈ [1, k]
    residuals: list  # e_i = y − a_iᵀx − b_i
    joint_max: jnp.ndarray
    scaled: list  # exp(joint_i − joint_max)
    total: jnp.ndarray  # Σ_i scaled_i ∈ [1, k]


def _e_step(data: _Data, gate, expert) -> _EStep:
    slopes, intercepts, variances = expert
    scores, top, exponentials, normaliser = _gate_normaliser(data, gate)
    # joint_i = s_i + log f_i = log π_i + log f_i + log Z, log f_i = −½ log(2πν_i) − e_i² / (2ν_i).
    constants = -0.5 * (_LOG_2PI + jnp.log(variances))
    curvatures = -0.5 / variances
    residuals, joints = [], []
    for i in range(intercepts.shape[0]):
        residual = data.responses - intercepts[i]
        for c, column in enumerate(data.inputs):
            residual = residual - slopes[i, c] * column
        residuals.append(residual)
        log_density = constants[i] + curvatures[i] * residual * residual
        joints.append(log_density + scores[i] if i < len(scores) else log_density)
    joint_max = joints[0]
    for joint in joints[1:]:
        joint_max = jnp.maximum(joint_max, joint)
    scaled = [jnp.exp(joint - joint_max) for joint in joints]
    total = scaled[0]
    for term in scaled[1:]:
        total = total + term
    return _EStep(top, exponentials, normaliser, residuals, joint_max, scaled, total)


def _evaluate(data: _Data, gate, expert, with_moments: bool) -> dict:
    """One fused pass at (gate, expert): Σ w ℓ, Σ w log Z and, optionally, every M-step moment."""
    top, exponentials, normaliser, residuals, joint_max, scaled, total = _e_step(data, gate, expert)
    # ℓ_j = joint_max + log total − log Z_j with log Z_j = top + log normaliser.
    by_products = _logs_by_products(data)
    if by_products:
        sums = {"log_likelihood": _weighted(data, joint_max - top), "log_normaliser": _weighted(data, top)}
        logs = {"total": total, "normaliser": normaliser}
    else:
        log_normaliser = top + jnp.log(normaliser)
        dotted = {"log_likelihood": joint_max + jnp.log(total) - log_normaliser, "log_normaliser": log_normaliser}
        sums, logs = {}, {}
    if with_moments:
        sums["moments"] = _moment_terms(data, exponentials, normaliser, residuals, scaled, total)
    totals = _reduce(data, sums, logs)
    if not by_products:
        return {**totals, **_dot_weights(data, dotted)}
    totals["log_likelihood"] = totals["log_likelihood"] + totals.pop("total") - totals["normaliser"]
    totals["log_normaliser"] = totals["log_normaliser"] + totals.pop("normaliser")
    return totals


def _exact_squares(data: _Data, gate, expert, update) -> jnp.ndarray:
    """Σ_j ω_ji (e_ji − D_jᵀΔ_i)² for every expert i: the new residual variance times Σ_j ω_ji,
    summed directly (a second E-step pass) where the residual form q_i − Δ_iᵀc_i would cancel."""
    step = _e_step(data, gate, expert)
    inverse_total = 1.0 / step.total
    terms = []
    for i, (scaled, residual) in enumerate(zip(step.scaled, step.residuals)):
        new_residual = residual - update[i, -1]
        for c, column in enumerate(data.inputs):
            new_residual = new_residual - update[i, c] * column
        terms.append(_weighted(data, scaled * inverse_total) * new_residual * new_residual)
    return jnp.stack(_reduce(data, {"squares": terms}, {})["squares"])


def _moment_terms(data: _Data, exponentials, normaliser, residuals, scaled, total) -> dict:
    """Per-sample terms of every moment of the module docstring, as nested lists."""
    num_free = len(exponentials)
    inverse_total = 1.0 / total
    inverse_normaliser = 1.0 / normaliser
    design = list(data.inputs) + [None]  # D = (x, 1)
    features = [None] + list(data.gate_inputs)  # G = (1, z)
    omegas = [_weighted(data, term * inverse_total) for term in scaled]  # ω_i = w r_i
    gate_weights = [term * inverse_normaliser for term in exponentials]  # π_i, i < k − 1
    weighted_gate = [_weighted(data, p) for p in gate_weights]
    weighted_residuals = [omega * e for omega, e in zip(omegas, residuals)]
    return {
        "gram": [_pair_products(omega, design) for omega in omegas],
        "cross": [[t if f is None else t * f for f in design] for t in weighted_residuals],
        "square": [t * e for t, e in zip(weighted_residuals, residuals)],
        # Σ ω_i z is part of the gram when z = x; with an input transform it is a moment of its own.
        "gate_response": (
            [[omegas[i] * z for z in data.gate_inputs] for i in range(num_free)]
            if data.gate_inputs is not data.inputs
            else []
        ),
        "gate_weight": [_pair_products(weighted_gate[i], features) for i in range(num_free)],
        "gate_cross": [
            [_pair_products(weighted_gate[i] * gate_weights[l], features) for l in range(i, num_free)]
            for i in range(num_free)
        ],
    }


# ----------------------------------------------------------------------------------------------
# M-steps from the moments.


def _symmetric(pairs, size: int) -> jnp.ndarray:
    """The symmetric matrix whose row-major upper triangle is ``pairs``."""
    rows = [[None] * size for _ in range(size)]
    entries = iter(pairs)
    for a in range(size):
        for b in range(a, size):
            rows[a][b] = rows[b][a] = next(entries)
    return jnp.stack([jnp.stack(row) for row in rows])


def _expert_update(moments, expert):
    """Δ_i of the weighted least squares in residual form, the residual sum of squares q_i − Δ_iᵀc_i,
    Σ_j ω_ji, and whether that difference has cancelled and must be summed directly."""
    slopes = expert[0]
    size = slopes.shape[1] + 1
    gram = jnp.stack([_symmetric(pairs, size) for pairs in moments["gram"]])  # (k, d + 1, d + 1)
    cross = jnp.stack([jnp.stack(terms) for terms in moments["cross"]])  # (k, d + 1)
    square = jnp.stack(moments["square"])
    update = linalg.solve_positive_definite(gram, cross)  # the generic M-step's factorisation
    squares = square - jnp.sum(update * cross, axis=-1)
    # q − Δᵀc carries a rounding error of a few ε·q: trust it only down to ε^(1/3)·q, where its
    # relative error is below ε^(2/3) (~4e-11 in float64). Below that an expert is collapsing onto
    # d + 1 points or fewer, and the sum is taken directly as the generic path does. (An expert
    # without responsibility keeps its parameters anyway.)
    responsibility = gram[:, -1, -1]
    cancelled = (squares <= jnp.finfo(square.dtype).eps ** (1 / 3) * square) & (responsibility > 0)
    return update, squares, responsibility, cancelled


def _expert_mstep(expert, update, squares, responsibility, variance_floor):
    """New expert parameters with the generic keep rule: an expert whose update is not finite, or
    which holds no responsibility, keeps its values."""
    slopes, intercepts, variances = expert
    new_slopes = slopes + update[:, :-1]
    new_intercepts = intercepts + update[:, -1]
    new_variances = jnp.maximum(squares / responsibility, variance_floor)
    keep = (
        jnp.all(jnp.isfinite(new_slopes), axis=-1)
        & jnp.isfinite(new_intercepts)
        & jnp.isfinite(new_variances)
        & (responsibility > 0)
    )
    return (
        jnp.where(keep[:, None], new_slopes, slopes),
        jnp.where(keep, new_intercepts, intercepts),
        jnp.where(keep, new_variances, variances),
    )


def _upper(pairs, size: int, a: int, b: int):
    """Entry (a, b) of the symmetric matrix whose row-major upper triangle is ``pairs``."""
    a, b = min(a, b), max(a, b)
    return pairs[a * size - a * (a - 1) // 2 + b - a]


def _gate_direction(moments, gate, total):
    """The generic path's damped Newton direction δ for Q, the gain Σ_i δ_iᵀ Σ_j ω_ji G_j, and the
    step's predicted improvement ½·Σ w·∇Qᵀδ (a lower bound on the quadratic model's).

    The system is assembled in the generic path's coordinate order (``ravel_pytree`` of the gate:
    all β₀, then β₁ row by row), so that the same factorisation runs on the same matrix. The generic
    matrix also holds identity rows for the fixed reference coordinates; they are decoupled, leave
    the ridge (≥ √ε·1) and any positive Gershgorin shift unchanged, and get δ = 0.
    """
    num_free, size = gate.shape
    coordinates = [(i, 0) for i in range(num_free)] + [(i, a) for i in range(num_free) for a in range(1, size)]
    weight, cross = moments["gate_weight"], moments["gate_cross"]
    # Σ_j ω_ji G_j = (Σ ω_ji, Σ ω_ji z_j): gram entries (1, 1) and, when z = x, (x_c, 1).
    response = []
    for i in range(num_free):
        gram = moments["gram"][i]
        rest = moments["gate_response"][i] if moments["gate_response"] else [_upper(gram, size, c, size - 1) for c in range(size - 1)]
        response.append([_upper(gram, size, size - 1, size - 1)] + list(rest))
    gradient = jnp.stack([response[i][a] - _upper(weight[i], size, a, 0) for i, a in coordinates]) / total
    curvature = jnp.stack(
        [
            jnp.stack(
                [
                    (_upper(weight[i], size, a, b) if i == l else 0.0) - _upper(cross[min(i, l)][abs(l - i)], size, a, b)
                    for l, b in coordinates
                ]
            )
            for i, a in coordinates
        ]
    ) / total  # −∇²Q = Σ w (diag π − ππᵀ) ⊗ G Gᵀ / Σ w
    flat = damped_newton_direction(curvature, gradient)
    position = {coordinate: p for p, coordinate in enumerate(coordinates)}
    direction = jnp.stack([jnp.stack([flat[position[i, a]] for a in range(size)]) for i in range(num_free)])
    gain = jnp.sum(direction * jnp.stack([jnp.stack(r) for r in response]))
    return direction, gain, 0.5 * total * jnp.dot(gradient, flat)


# ----------------------------------------------------------------------------------------------
# Loop state and iteration.


class FastState(NamedTuple):
    """The fast iteration's state: the accepted gate, the pending gate step and the experts, with the
    solver-state fields of :mod:`moe_theory.fit.solver` (ℓ, previous ℓ, iteration, finite)."""

    gate: jnp.ndarray  # accepted free gate coordinates u_t, (k − 1, d + 1)
    direction: jnp.ndarray  # pending Newton direction δ_t (zeros before the first M-step)
    gain: jnp.ndarray  # Σ_i δ_iᵀ Σ_j ω_ji G_j of the pending step
    predicted: jnp.ndarray  # ½·Σ w·∇Qᵀδ of the pending step
    log_normaliser: jnp.ndarray  # Σ_j w_j log Z_j at ``gate``
    pending: jnp.ndarray  # whether ``direction`` still awaits its step-halving decision
    expert: tuple  # (a, b, ν) of θ_{t+1}
    log_likelihood: jnp.ndarray  # ℓ(θ_t); this and the next three fields are the solver-state fields
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray


def state_at(params: MoEParams) -> FastState:
    """The state whose next :meth:`FastEM.step` is EM's iteration from the canonical ``params`` (no
    pending gate step; ℓ not yet known)."""
    gate = jnp.concatenate([params.gate["beta0"][:-1, None], params.gate["beta1"][:-1]], axis=1)
    dtype = gate.dtype
    nan = jnp.asarray(jnp.nan, dtype)
    return FastState(
        gate=gate,
        direction=jnp.zeros_like(gate),
        gain=jnp.zeros((), dtype),
        predicted=jnp.zeros((), dtype),
        log_normaliser=jnp.zeros((), dtype),
        pending=jnp.asarray(False),
        expert=(params.expert["a"], params.expert["b"], params.expert["nu"]),
        log_likelihood=nan,
        previous=nan,
        iteration=jnp.asarray(0),
        finite=all_finite(params),
    )


def params_at(gate: jnp.ndarray, expert: tuple) -> MoEParams:
    """The parameters of free gate coordinates ``gate`` (the reference expert's are 0) and experts (a, b, ν)."""
    full_gate = jnp.concatenate([gate, jnp.zeros((1, gate.shape[1]), gate.dtype)])
    slopes, intercepts, variances = expert
    return MoEParams(
        gate={"beta0": full_gate[:, 0], "beta1": full_gate[:, 1:]},
        expert={"a": slopes, "b": intercepts, "nu": variances},
    )


def _improves(gain, change):
    """Q(u + αδ) ≥ Q(u) with a finite value, as α·gain − ΔΣ w log Z ≥ 0 (the factor 1/Σ w dropped)."""
    difference = gain - change
    return jnp.isfinite(difference) & (difference >= 0)


def takes_full_step(state: FastState, candidate_log_normaliser) -> jnp.ndarray:
    """Whether the pending step is taken whole: there is none, or it passes the test Q(u + δ) ≥ Q(u),
    or its predicted improvement is below the rounding error of Σ w log Z and its value is finite
    (see "Steps below rounding" in the module docstring)."""
    rounding = ROUNDING_MARGIN * jnp.finfo(state.gate.dtype).eps * jnp.abs(state.log_normaliser)
    untestable = (state.predicted <= rounding) & jnp.isfinite(candidate_log_normaliser)
    return ~state.pending | untestable | _improves(state.gain, candidate_log_normaliser - state.log_normaliser)


def _only_where(needed, compute, operands, otherwise):
    """``compute(*operands)`` where ``needed``, else ``otherwise``, with no cost when nothing needs it.

    A ``while_loop`` that runs at most once: under ``vmap`` it takes zero trips unless some replicate
    needs it (a ``lax.cond`` would become a select that always runs ``compute``). The operands pass
    through an optimisation barrier together with the loop flag; otherwise the body depends on loop
    invariants only and XLA's while-loop invariant code motion hoists ``compute`` out of the loop,
    running it every time.
    """

    def body(carry):
        flag, _ = carry
        _, current = lax.optimization_barrier((flag, operands))
        return jnp.zeros_like(flag), compute(*current)

    return lax.while_loop(lambda carry: carry[0], body, (needed, otherwise))[1]


def _settle_and_evaluate(data: _Data, state: FastState, max_halvings: int, active, with_moments: bool):
    """Decide the pending gate step as the generic step halving does (apart from steps below
    rounding, see the module docstring), and evaluate the E-step there.

    The generic halving tries α = 1, ½, … while α > 2^−max_halvings. The pass at α = 1 runs for every
    replicate; the trials α = ½, ¼, … and the repeated pass at the accepted point run in
    ``while_loop``s that only active replicates whose full step was rejected enter.
    """
    candidate = state.gate + state.direction
    evaluated = _evaluate(data, candidate, state.expert, with_moments)
    full_step = takes_full_step(state, evaluated["log_normaliser"])
    # A non-finite direction makes every trial value non-finite: all its trials would be rejected.
    searching = active & ~full_step & jnp.all(jnp.isfinite(state.direction))
    smallest = 0.5**max_halvings

    def keep_halving(carry):
        step, accepted = carry
        return ~accepted & (step * 0.5 > smallest)

    def halve(carry):
        step = carry[0] * 0.5
        change = _sum_log_normaliser(data, state.gate + step * state.direction) - state.log_normaliser
        return step, _improves(step * state.gain, change)

    step, accepted = lax.while_loop(keep_halving, halve, (jnp.ones((), state.gate.dtype), ~searching))
    gate = jnp.where(
        full_step, candidate, jnp.where(searching & accepted, state.gate + step * state.direction, state.gate)
    )

    def evaluate(at, expert):
        return _evaluate(data, at, expert, with_moments)

    evaluated = _only_where(active & ~full_step, evaluate, (gate, state.expert), evaluated)
    return gate, evaluated


class FastData(NamedTuple):
    """The data of one fast-path fit: columns over samples and Σ_j w_j."""

    columns: _Data
    total: jnp.ndarray


@dataclass(frozen=True)
class FastEM:
    """The fast EM iteration of the module docstring, as a solver of :mod:`moe_theory.fit.solver`.

    ``step(data, state, active)`` performs one EM iteration (``active``: the replicate is still
    running, so that batched rare paths skip stopped ones); ``finish`` settles the pending gate step,
    runs the final E-step and returns the :class:`~moe_theory.fit.solver.FitResult`.
    """

    family: Family
    config: EMConfig

    @property
    def max_iter(self) -> int:
        return self.config.max_iter

    def init(self, params0: MoEParams, x, y, weights) -> tuple[FastData, FastState]:
        unit_weights = weights is None
        mask = not unit_weights and jnp.result_type(weights) == jnp.bool_
        prepared, generic = prepare(self.family, self.config, params0, x, y, weights)
        columns = _columns(prepared.x, prepared.y, None if unit_weights else prepared.weights, self.family.gate.transform, mask)
        return FastData(columns, prepared.total), state_at(generic.params)

    def step(self, data: FastData, state: FastState, active) -> FastState:
        columns, total, config = data.columns, data.total, self.config
        gate, evaluated = _settle_and_evaluate(columns, state, config.max_halvings, active, True)
        moments = evaluated["moments"]
        update, squares, responsibility, cancelled = _expert_update(moments, state.expert)

        def summed_directly(at, expert, step):
            return jnp.where(cancelled, _exact_squares(columns, at, expert, step), squares)

        squares = _only_where(active & jnp.any(cancelled), summed_directly, (gate, state.expert, update), squares)
        expert = _expert_mstep(state.expert, update, squares, responsibility, config.variance_floor)
        direction, gain, predicted = _gate_direction(moments, gate, total)
        log_likelihood = evaluated["log_likelihood"] / total
        return FastState(
            gate=gate,
            direction=direction,
            gain=gain,
            predicted=predicted,
            log_normaliser=evaluated["log_normaliser"],
            pending=jnp.asarray(True),
            expert=expert,
            log_likelihood=log_likelihood,
            previous=state.log_likelihood,
            iteration=state.iteration + 1,
            finite=jnp.isfinite(log_likelihood) & all_finite((gate, expert)),
        )

    def finish(self, data: FastData, state: FastState, converged) -> FitResult:
        gate, evaluated = _settle_and_evaluate(data.columns, state, self.config.max_halvings, jnp.asarray(True), False)
        final_log_likelihood = evaluated["log_likelihood"] / data.total
        params = params_at(gate, state.expert)
        finite = state.finite & jnp.isfinite(final_log_likelihood) & all_finite(params)
        return FitResult(
            params=canonicalize(self.family, params),
            log_likelihood=final_log_likelihood,
            n_iter=state.iteration,
            converged=converged & finite,
            finite=finite,
        )
