"""Multi-head self-attention and gated attention as hierarchical mixtures of experts
(``docs/attention.md``, following [7]).

**Attention.** A sequence X ∈ R^{L×d} has tokens x_1..x_L. Head h = 1..H has query, key and value
maps W_Q^h, W_K^h ∈ R^{d×d_k}, W_V^h ∈ R^{d×d_v}; the output map is W_O ∈ R^{H d_v × d_out}. The
scaled dot-product attention (SDPA) of head h at query position l is

    A_h(l, t) = softmax_t( (x_lᵀ W_Q^h)(x_tᵀ W_K^h)ᵀ / √d_k ),     o_h(l) = Σ_t A_h(l, t) W_V^hᵀ x_t ∈ R^{d_v},

and MHSA(X)[l, m] = Σ_h Σ_c o_h(l)[c] W_O[(h, c), m]. A sigmoid gate σ(·) can multiply the
computation at several positions [7]; the ones built here, with gate weights G:

* ``sdpa``:   o_h(l)[c] ← o_h(l)[c] · σ(x_lᵀ G[:, (h, c)])        (the SDPA output, query-dependent);
* ``value``:  (W_V^hᵀ x_t)[c] ← (W_V^hᵀ x_t)[c] · σ(x_tᵀ G[:, (h, c)])  (the value map, token-dependent);
* ``query``:  W_Q^hᵀ x_l ← (W_Q^hᵀ x_l) ⊙ σ(G_hᵀ x_l), G_h ∈ R^{d×d_k}   (the query map);
* ``output``: MHSA(X)[l, m] ← MHSA(X)[l, m] · σ(x_lᵀ G[:, m])       (after the output projection).

**The hierarchical mixture.** Exchanging the sums gives, for one entry y = out(X)[l, m], three
levels: heads h, value channels c within a head, and tokens t within a (head, channel):

    y = Σ_h ω_h(X) Σ_c ω_{c|h}(X) Σ_t π_{t|h}(X) E_{hct}(X)

* token gate (the routing):  π_{t|h}(X) = softmax_t(s_{ht}(X)) with the bilinear score
  s_{ht} = x_lᵀ M_h x_t, M_h = W_Q^h W_K^{hᵀ} / √d_k (for ``query``: W_Q^h replaced by the gated query);
  it is a softmax gate whose "experts" are the L tokens, and it is the same for every channel of h;
* experts:  E_{hct}(X) = W_O[(h, c), m] · x_tᵀ W_V^h[:, c], times σ(x_tᵀ G[:, (h, c)]) for ``value``;
  in plain MHSA every expert is **linear** in its token;
* upper levels: ω_h = 1 and ω_{c|h} = 1 in MHSA; ``sdpa`` makes ω_{c|h}(X) = σ(x_lᵀ G[:, (h, c)]), a
  sigmoid gate of the query token; ``output`` makes ω_h(X) = σ(x_lᵀ G[:, m]) for every head.

The upper levels are unnormalised weights, as in the least-squares regression form of [5] and
[10]: attention is a regression function of X, not a density. With d_v = 1 the channel level has
one member and the construction is the two-level HMoE y = Σ_h ω_h Σ_t π_{t|h} E_ht.
:func:`hmoe_terms` returns the three levels; :func:`attention_entry_hmoe` sums them, and
``tests/test_attention.py`` checks that this equals the direct matrix computation
(:func:`attention_entry_direct`) to 1e-12 for every gate position.

**The identified parametrisation.** One entry depends on the maps only through M_h (d × d), the
value-output products u_{hc} = W_V^h[:, c] W_O[(h, c), m] ∈ R^d and the gate weights, so these are
the parameters we estimate (:class:`AttentionParams`, with d_v = 1: one u_h and, for the sdpa and
value positions, one gate vector g_h per head; one g for the output position). Per head the
**expert** is the function the head applies to the tokens: E_h(X, t) = u_hᵀ x_t in MHSA,
σ(g_hᵀ x_t) u_hᵀ x_t with a value gate, σ(g_hᵀ x_l) u_hᵀ x_t with an SDPA gate and σ(gᵀ x_l) u_hᵀ x_t with
an output gate. The expert estimation error of true head j compares the experts of its Voronoi cell
(the fitted heads nearest to it in routing parameters) with E*_j (:func:`attention_errors`).

[5] Nguyen, Ho, Rinaldo, "Sigmoid Gating is More Sample Efficient than Softmax Gating in Mixture of
Experts", NeurIPS 2024, arXiv 2405.13997.
[7] Nguyen, Pham, Cao, Dinh, Nguyen, Ho, Rinaldo, "A Statistical Theory of Gated Attention through
the Lens of Hierarchical Mixture of Experts", arXiv 2602.01468.
[10] Nguyen, Ho, Rinaldo, "On Least Square Estimation in Softmax Gating Mixture of Experts", ICML 2024,
arXiv 2402.02952.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GATE_POSITIONS = (None, "sdpa", "value", "query", "output")
"""Where the sigmoid gate sits: None (plain MHSA) or one of the positions of the module docstring."""


# ----------------------------------------------------------------------------------------------
# Full attention weights: the direct computation and its hierarchical-mixture form.


class AttentionWeights(NamedTuple):
    """The maps of one attention layer (module docstring). ``gate`` is None for plain MHSA; its shape
    is (d, H·d_v) for ``sdpa`` and ``value``, (H, d, d_k) for ``query`` and (d, d_out) for ``output``."""

    query: jnp.ndarray  # (H, d, d_k)
    key: jnp.ndarray  # (H, d, d_k)
    value: jnp.ndarray  # (H, d, d_v)
    output: jnp.ndarray  # (H·d_v, d_out)
    gate: jnp.ndarray | None = None


def random_weights(key: jax.Array, dim: int, heads: int, key_dim: int, value_dim: int, out_dim: int,
                   position: str | None) -> AttentionWeights:
    """Standard-normal weights scaled by 1/√fan-in, with the gate of ``position`` (for tests and demos)."""
    _check_position(position)
    keys = jax.random.split(key, 5)
    scale = 1.0 / np.sqrt(dim)
    gate_shape = {None: None, "sdpa": (dim, heads * value_dim), "value": (dim, heads * value_dim),
                  "query": (heads, dim, key_dim), "output": (dim, out_dim)}[position]
    return AttentionWeights(
        query=scale * jax.random.normal(keys[0], (heads, dim, key_dim)),
        key=scale * jax.random.normal(keys[1], (heads, dim, key_dim)),
        value=scale * jax.random.normal(keys[2], (heads, dim, value_dim)),
        output=jax.random.normal(keys[3], (heads * value_dim, out_dim)) / np.sqrt(heads * value_dim),
        gate=None if gate_shape is None else scale * jax.random.normal(keys[4], gate_shape),
    )


def _check_position(position: str | None) -> None:
    if position not in GATE_POSITIONS:
        raise ValueError(f"gate position: expected one of {GATE_POSITIONS}, got {position!r}")


def attention_entry_direct(weights: AttentionWeights, X: np.ndarray, query: int, out: int,
                           position: str | None) -> np.ndarray:
    """out(X)[query, out] by the matrix formulas of attention, in NumPy, for X of shape (n, L, d).

    This is the reference the hierarchical form is checked against: whole matrices
    Q Kᵀ, row softmax, A V, concatenation over heads and the output projection, as a
    transformer layer computes them.
    """
    _check_position(position)
    W = jax.tree_util.tree_map(np.asarray, weights)
    X = np.asarray(X, dtype=np.float64)
    H, _, d_k = W.query.shape
    d_v = W.value.shape[-1]
    sigmoid = lambda u: 1.0 / (1.0 + np.exp(-u))  # noqa: E731
    heads = []
    for h in range(H):
        Q = X @ W.query[h]  # (n, L, d_k)
        if position == "query":
            Q = Q * sigmoid(X @ W.gate[h])
        K = X @ W.key[h]
        V = X @ W.value[h]  # (n, L, d_v)
        if position == "value":
            V = V * sigmoid(X @ W.gate[:, h * d_v:(h + 1) * d_v])
        logits = Q @ np.swapaxes(K, -1, -2) / np.sqrt(d_k)  # (n, L, L)
        logits = logits - logits.max(axis=-1, keepdims=True)
        A = np.exp(logits)
        A = A / A.sum(axis=-1, keepdims=True)
        O = A @ V  # (n, L, d_v)
        if position == "sdpa":
            O = O * sigmoid(X @ W.gate[:, h * d_v:(h + 1) * d_v])
        heads.append(O)
    result = np.concatenate(heads, axis=-1) @ W.output  # (n, L, d_out)
    if position == "output":
        result = result * sigmoid(X @ W.gate)
    return result[:, query, out]


class HMoETerms(NamedTuple):
    """The three levels of :func:`hmoe_terms` for n sequences: ω_h (n, H), ω_{c|h} (n, H, d_v),
    π_{t|h} (n, H, L) and the experts E_{hct} (n, H, d_v, L)."""

    head_weight: jnp.ndarray
    channel_weight: jnp.ndarray
    token_gate: jnp.ndarray
    experts: jnp.ndarray


def hmoe_terms(weights: AttentionWeights, X: jnp.ndarray, query: int, out: int, position: str | None) -> HMoETerms:
    """The hierarchical-mixture form of out(X)[query, out] (module docstring), for X of shape (n, L, d)."""
    _check_position(position)
    H, d, d_k = weights.query.shape
    d_v = weights.value.shape[-1]
    x_query = X[:, query, :]  # (n, d)
    projected_query = jnp.einsum("nd,hdk->nhk", x_query, weights.query)
    if position == "query":
        projected_query = projected_query * jax.nn.sigmoid(jnp.einsum("nd,hdk->nhk", x_query, weights.gate))
    # Bilinear score s_ht = x_lᵀ M_h x_t with M_h = W_Q^h W_K^hᵀ / √d_k.
    scores = jnp.einsum("nhk,ntd,hdk->nht", projected_query, X, weights.key) / np.sqrt(d_k)
    token_gate = jax.nn.softmax(scores, axis=-1)
    coefficients = weights.output[:, out].reshape(H, d_v)  # W_O[(h, c), m]
    experts = jnp.einsum("ntd,hdc,hc->nhct", X, weights.value, coefficients)
    if position == "value":
        experts = experts * jax.nn.sigmoid(jnp.einsum("ntd,dhc->nhct", X, weights.gate.reshape(d, H, d_v)))
    n = X.shape[0]
    channel_weight = jnp.ones((n, H, d_v), X.dtype)
    if position == "sdpa":
        channel_weight = jax.nn.sigmoid(jnp.einsum("nd,dhc->nhc", x_query, weights.gate.reshape(d, H, d_v)))
    head_weight = jnp.ones((n, H), X.dtype)
    if position == "output":
        head_weight = jnp.broadcast_to(jax.nn.sigmoid(x_query @ weights.gate[:, out])[:, None], (n, H))
    return HMoETerms(head_weight, channel_weight, token_gate, experts)


def attention_entry_hmoe(weights: AttentionWeights, X: jnp.ndarray, query: int, out: int, position: str | None) -> jnp.ndarray:
    """y = Σ_h ω_h Σ_c ω_{c|h} Σ_t π_{t|h} E_{hct}, (n,): the same number as :func:`attention_entry_direct`."""
    terms = hmoe_terms(weights, X, query, out, position)
    inner = jnp.einsum("nht,nhct->nhc", terms.token_gate, terms.experts)
    return jnp.einsum("nh,nhc,nhc->n", terms.head_weight, terms.channel_weight, inner)


# ----------------------------------------------------------------------------------------------
# The identified parametrisation (d_v = 1), its sampler and its expert errors.


class AttentionParams(NamedTuple):
    """Identified parameters of one attention entry with d_v = 1 (module docstring).

    ``score`` (H, d, d): M_h; ``value`` (H, d): u_h; ``gate``: (H, d) for the sdpa and value
    positions, (d,) for the output position, (0,) for plain MHSA.
    """

    score: jnp.ndarray
    value: jnp.ndarray
    gate: jnp.ndarray


@dataclass(frozen=True)
class AttentionModel:
    """One entry y = out(X)[query, ·] as a function of the sequence, with d_v = 1 and the gate at
    ``position`` (None, ``"sdpa"``, ``"value"`` or ``"output"``); tokens are i.i.d. N(0, I_d)."""

    position: str | None
    heads: int
    dim: int
    tokens: int
    query: int = 0

    def __post_init__(self) -> None:
        if self.position == "query":
            raise ValueError("gate position: the identified model covers None, 'sdpa', 'value' and 'output'")
        _check_position(self.position)
        for name in ("heads", "dim", "tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not 0 <= self.query < self.tokens:
            raise ValueError(f"query: expected a token index in [0, {self.tokens}), got {self.query!r}")

    def gate_shape(self, heads: int | None = None) -> tuple[int, ...]:
        heads = self.heads if heads is None else heads
        return {None: (0,), "sdpa": (heads, self.dim), "value": (heads, self.dim), "output": (self.dim,)}[self.position]

    def with_heads(self, heads: int) -> "AttentionModel":
        return AttentionModel(self.position, heads, self.dim, self.tokens, self.query)


def make_attention_params(model: AttentionModel, values: Mapping[str, Any], dtype=jnp.float64) -> AttentionParams:
    """Validated :class:`AttentionParams` from ``{"score": ..., "value": ..., "gate": ...}`` (gate omitted for MHSA)."""
    expected = {"score": (model.heads, model.dim, model.dim), "value": (model.heads, model.dim), "gate": model.gate_shape()}
    arrays = {}
    for name, shape in expected.items():
        given = values.get(name, np.zeros(shape) if name == "gate" and model.position is None else None)
        if given is None:
            raise ValueError(f"params.{name}: missing; expected an array of shape {shape}")
        array = np.asarray(given, dtype=np.float64)
        if array.shape != shape:
            raise ValueError(f"params.{name}: expected shape {shape}, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"params.{name}: expected finite values")
        arrays[name] = jnp.asarray(array, dtype)
    unknown = sorted(set(values) - set(expected))
    if unknown:
        raise ValueError(f"params: unknown key(s) {unknown}; expected some of {sorted(expected)}")
    return AttentionParams(**arrays)


def head_experts(model: AttentionModel, params: AttentionParams, X: jnp.ndarray) -> jnp.ndarray:
    """E_h(X, t), (n, H, L): what head h's expert gives token t (module docstring)."""
    linear = jnp.einsum("ntd,hd->nht", X, params.value)
    if model.position == "value":
        return linear * jax.nn.sigmoid(jnp.einsum("ntd,hd->nht", X, params.gate))
    if model.position == "sdpa":
        return linear * jax.nn.sigmoid(X[:, model.query, :] @ params.gate.T)[:, :, None]
    if model.position == "output":
        return linear * jax.nn.sigmoid(X[:, model.query, :] @ params.gate)[:, None, None]
    return linear


def token_gate(model: AttentionModel, params: AttentionParams, X: jnp.ndarray) -> jnp.ndarray:
    """π_{t|h}(X) = softmax_t(x_lᵀ M_h x_t), (n, H, L)."""
    scores = jnp.einsum("nd,hde,nte->nht", X[:, model.query, :], params.score, X)
    return jax.nn.softmax(scores, axis=-1)


def entry(model: AttentionModel, params: AttentionParams, X: jnp.ndarray) -> jnp.ndarray:
    """y(X) = Σ_h Σ_t π_{t|h}(X) E_h(X, t), (n,)."""
    return jnp.einsum("nht,nht->n", token_gate(model, params, X), head_experts(model, params, X))


def as_weights(model: AttentionModel, params: AttentionParams) -> AttentionWeights:
    """Full attention maps realising ``params`` (d_k = d, W_K = I, d_v = 1, d_out = 1, query = M √d):
    ties the identified model to the full construction."""
    H, d = model.heads, model.dim
    eye = jnp.broadcast_to(jnp.eye(d, dtype=params.score.dtype), (H, d, d))
    gate = {None: None, "sdpa": params.gate.T, "value": params.gate.T, "output": params.gate[:, None]}[model.position]
    return AttentionWeights(
        query=params.score * np.sqrt(d), key=eye, value=params.value[:, :, None],
        output=jnp.ones((H, 1), params.score.dtype), gate=gate,
    )


@partial(jax.jit, static_argnames=("model", "n"))
def sample(key: jax.Array, model: AttentionModel, params: AttentionParams, n: int, noise: float):
    """n sequences X (n, L, d) with i.i.d. N(0, I_d) tokens and y = entry(X) + N(0, noise²)."""
    dtype = params.score.dtype
    input_key, noise_key = jax.random.split(key)
    X = jax.random.normal(input_key, (n, model.tokens, model.dim), dtype)
    return X, entry(model, params, X) + noise * jax.random.normal(noise_key, (n,), dtype)


class AttentionErrors(NamedTuple):
    """Per true head j (see :func:`attention_errors`): the expert, score and value errors of its cell
    and the cell size; ``head_of`` gives each fitted head's true head. Batch axes lead."""

    expert_error: jnp.ndarray
    score_error: jnp.ndarray
    value_error: jnp.ndarray
    cell_size: jnp.ndarray
    head_of: jnp.ndarray


def _routing_atoms(model: AttentionModel, params: AttentionParams) -> jnp.ndarray:
    """What identifies a head: its score matrix M_h and, for per-head gates, its gate vector g_h.
    The value map is left out: in an over-specified fit the heads of one cell share the true u."""
    parts = [params.score.reshape(params.score.shape[0], -1)]
    if model.position in ("sdpa", "value"):
        parts.append(params.gate)
    return jnp.concatenate(parts, axis=1)


def attention_errors(model: AttentionModel, fitted: AttentionParams, truth: AttentionParams, X: jnp.ndarray) -> AttentionErrors:
    """Voronoi cells over heads and the errors of :class:`AttentionErrors`, with E_X estimated on the
    sequences ``X`` (n, L, d). ``fitted`` may carry leading batch axes and more heads than ``truth``.

    Fitted head i belongs to the cell A_j of the true head nearest in routing parameters (M, and g
    where each head has its own gate). The heads of a cell add up (the upper level of the mixture
    is a sum, not an average), so a cell's estimate of true expert j is the sum of its experts:

        expert error_j = E_X mean_t |Σ_{i∈A_j} Ê_i(X, t) − E*_j(X, t)|,   value error_j = ‖Σ_{i∈A_j} û_i − u*_j‖,

    and score error_j = max_{i∈A_j} ‖M̂_i − M*_j‖_F. With one head per cell (an exact fit) these are
    the per-head errors. An empty cell has NaN errors and size 0.
    """
    true_model = model.with_heads(truth.score.shape[0])
    true_experts = head_experts(true_model, truth, X)  # (n, H*, L)
    true_atoms = _routing_atoms(model, truth)
    num_true = truth.score.shape[0]

    def one(params):
        fitted_model = model.with_heads(params.score.shape[0])
        gaps = jnp.sum((_routing_atoms(model, params)[:, None] - true_atoms[None]) ** 2, axis=-1)
        head_of = jnp.argmin(gaps, axis=1)
        member = (head_of[:, None] == jnp.arange(num_true)[None]).astype(X.dtype)  # (H, H*)
        size = jnp.sum(member, axis=0)
        cell_experts = jnp.einsum("nht,hj->njt", head_experts(fitted_model, params, X), member)
        expert_error = jnp.mean(jnp.abs(cell_experts - true_experts), axis=(0, 2))
        value_error = jnp.linalg.norm(member.T @ params.value - truth.value, axis=1)
        score_gap = jnp.sqrt(jnp.sum((params.score - truth.score[head_of]) ** 2, axis=(1, 2)))
        score_error = jnp.max(jnp.where(member > 0, score_gap[:, None], -jnp.inf), axis=0)
        empty = size == 0
        return AttentionErrors(
            jnp.where(empty, jnp.nan, expert_error), jnp.where(empty, jnp.nan, score_error),
            jnp.where(empty, jnp.nan, value_error), size.astype(jnp.int32), head_of,
        )

    for _ in range(fitted.score.ndim - 3):
        one = jax.vmap(one)
    return one(fitted)
