"""Attention as a hierarchical mixture of experts (moe_theory.attention, docs/attention.md).

Oracles: the matrix formulas of (gated) multi-head attention written in plain NumPy inside this file,
independent of the package's NumPy reference, and per-head loops for the Voronoi errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_theory import attention as A


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def _attention_loop(weights, X, query, out, position):
    """out(X)[query, out] by loops over sequences, heads, value channels and tokens."""
    W = jax.tree_util.tree_map(np.asarray, weights)
    H, _, d_k = W.query.shape
    d_v = W.value.shape[-1]
    result = np.zeros(X.shape[0])
    for s, seq in enumerate(np.asarray(X)):
        x_l = seq[query]
        entry = 0.0
        for h in range(H):
            q = x_l @ W.query[h]
            if position == "query":
                q = q * _sigmoid(x_l @ W.gate[h])
            logits = np.array([q @ (token @ W.key[h]) for token in seq]) / np.sqrt(d_k)
            attention_weights = np.exp(logits - logits.max())
            attention_weights /= attention_weights.sum()
            for c in range(d_v):
                head_value = 0.0
                for t, token in enumerate(seq):
                    v = token @ W.value[h][:, c]
                    if position == "value":
                        v = v * _sigmoid(token @ W.gate[:, h * d_v + c])
                    head_value += attention_weights[t] * v
                if position == "sdpa":
                    head_value *= _sigmoid(x_l @ W.gate[:, h * d_v + c])
                entry += head_value * W.output[h * d_v + c, out]
        if position == "output":
            entry *= _sigmoid(x_l @ W.gate[:, out])
        result[s] = entry
    return result


@pytest.mark.parametrize("position", A.GATE_POSITIONS)
@pytest.mark.parametrize("query, out", [(0, 0), (4, 2)])
def test_hierarchical_mixture_equals_attention(position, query, out):
    """Σ_h ω_h Σ_c ω_{c|h} Σ_t π_{t|h} E_hct equals the attention entry, to 1e-12, for every gate position."""
    weights = A.random_weights(jax.random.key(1), dim=3, heads=2, key_dim=4, value_dim=2, out_dim=3, position=position)
    X = 1.5 * jax.random.normal(jax.random.key(2), (40, 5, 3))
    loop = _attention_loop(weights, np.asarray(X), query, out, position)
    np.testing.assert_allclose(A.attention_entry_direct(weights, X, query, out, position), loop, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(A.attention_entry_hmoe(weights, X, query, out, position)), loop, rtol=0, atol=1e-12)
    assert np.std(loop) > 0.05  # the check is not of a constant


@pytest.mark.parametrize("position", A.GATE_POSITIONS)
def test_hmoe_levels_are_what_the_derivation_says(position):
    """The token gate is a softmax over tokens (rows sum to 1); MHSA's upper levels are exactly 1 and its
    experts linear in the token; each gate position changes exactly the level the derivation names."""
    weights = A.random_weights(jax.random.key(3), dim=2, heads=3, key_dim=2, value_dim=1, out_dim=1, position=position)
    X = jax.random.normal(jax.random.key(4), (30, 4, 2))
    terms = A.hmoe_terms(weights, X, 1, 0, position)
    np.testing.assert_allclose(np.sum(terms.token_gate, axis=-1), 1.0, atol=1e-14)
    assert np.all(np.asarray(terms.head_weight) == 1.0) == (position != "output")
    assert np.all(np.asarray(terms.channel_weight) == 1.0) == (position != "sdpa")
    doubled = A.hmoe_terms(weights, 2.0 * X, 1, 0, position).experts
    linear = np.allclose(doubled, 2.0 * np.asarray(terms.experts), atol=1e-12)
    assert linear == (position != "value")  # only the value gate makes the experts nonlinear in x_t


@pytest.mark.parametrize("position", [None, "sdpa", "value", "output"])
def test_identified_model_equals_the_full_construction(position):
    model = A.AttentionModel(position, heads=2, dim=2, tokens=3)
    gate = {None: None, "sdpa": [[1.0, -0.5], [0.3, 1.2]], "value": [[1.0, -0.5], [0.3, 1.2]], "output": [0.7, -1.1]}[position]
    values = {"score": [[[1.0, 0.4], [-0.3, 0.8]], [[-0.6, 0.2], [0.5, -1.0]]], "value": [[1.0, -0.5], [0.5, 1.2]]}
    if gate is not None:
        values["gate"] = gate
    params = A.make_attention_params(model, values)
    X = jax.random.normal(jax.random.key(5), (25, 3, 2))
    direct = _attention_loop(A.as_weights(model, params), np.asarray(X), 0, 0, position)
    np.testing.assert_allclose(np.asarray(A.entry(model, params, X)), direct, rtol=0, atol=1e-12)


def test_sampler_draws_the_entry_plus_gaussian_noise():
    model = A.AttentionModel("value", heads=1, dim=2, tokens=3)
    params = A.make_attention_params(model, {"score": [[[1.0, 0.0], [0.0, 1.0]]], "value": [[1.0, 2.0]], "gate": [[0.5, -0.5]]})
    X, y = A.sample(jax.random.key(6), model, params, 40_000, 0.3)
    residual = np.asarray(y - A.entry(model, params, X))
    assert abs(residual.mean()) < 4 * 0.3 / np.sqrt(40_000)
    assert abs(residual.std() / 0.3 - 1.0) < 0.02
    assert abs(np.asarray(X).std() - 1.0) < 0.02 and abs(np.asarray(X).mean()) < 0.02


def _errors_loop(model, fitted, truth, X):
    """Cells by nearest routing parameters, then the summed-cell expert error, by loops."""
    fitted = jax.tree_util.tree_map(np.asarray, fitted)
    truth = jax.tree_util.tree_map(np.asarray, truth)
    X = np.asarray(X)
    per_head_gate = model.position in ("sdpa", "value")

    def routing(p, h):
        return np.concatenate([p.score[h].ravel()] + ([p.gate[h]] if per_head_gate else []))

    def expert(p, h, seq, t):
        linear = p.value[h] @ seq[t]
        if model.position == "value":
            return linear * _sigmoid(p.gate[h] @ seq[t])
        if model.position == "sdpa":
            return linear * _sigmoid(p.gate[h] @ seq[model.query])
        if model.position == "output":
            return linear * _sigmoid(p.gate @ seq[model.query])
        return linear

    H, H_true = fitted.score.shape[0], truth.score.shape[0]
    head_of = [int(np.argmin([np.sum((routing(fitted, i) - routing(truth, j)) ** 2) for j in range(H_true)])) for i in range(H)]
    errors, sizes = [], []
    for j in range(H_true):
        members = [i for i in range(H) if head_of[i] == j]
        sizes.append(len(members))
        total = 0.0
        for seq in X:
            for t in range(X.shape[1]):
                total += abs(sum(expert(fitted, i, seq, t) for i in members) - expert(truth, j, seq, t))
        errors.append(total / (X.shape[0] * X.shape[1]) if members else np.nan)
    return np.array(errors), np.array(sizes), np.array(head_of)


@pytest.mark.parametrize("position", [None, "sdpa", "value", "output"])
def test_attention_errors_equal_a_loop_for_an_over_specified_fit(position):
    model = A.AttentionModel(position, heads=2, dim=2, tokens=3)
    gate = {None: None, "sdpa": [[1.0, -0.5], [0.3, 1.2]], "value": [[1.0, -0.5], [0.3, 1.2]], "output": [0.7, -1.1]}[position]
    values = {"score": [[[1.0, 0.4], [-0.3, 0.8]], [[-0.6, 0.2], [0.5, -1.0]]], "value": [[1.0, -0.5], [0.5, 1.2]]}
    if gate is not None:
        values["gate"] = gate
    truth = A.make_attention_params(model, values)
    # Three fitted heads: the second true head split in two (value halved), everything perturbed.
    rng = np.random.default_rng(0)
    grow = lambda a: np.concatenate([a, a[-1:]], axis=0)  # noqa: E731
    value = np.asarray(truth.value).copy()
    value[-1] /= 2
    fitted = A.AttentionParams(
        jnp.asarray(grow(np.asarray(truth.score)) + 0.05 * rng.normal(size=(3, 2, 2))),
        jnp.asarray(grow(value) + 0.05 * rng.normal(size=(3, 2))),
        jnp.asarray(grow(np.asarray(truth.gate)) + 0.05 * rng.normal(size=(3, 2))) if position in ("sdpa", "value") else truth.gate,
    )
    X = jax.random.normal(jax.random.key(7), (60, 3, 2))
    errors = A.attention_errors(model, fitted, truth, X)
    expected, sizes, head_of = _errors_loop(model, fitted, truth, X)
    np.testing.assert_array_equal(np.asarray(errors.head_of), head_of)
    np.testing.assert_array_equal(np.asarray(errors.cell_size), sizes)
    np.testing.assert_allclose(np.asarray(errors.expert_error), expected, rtol=1e-12)
    assert list(sizes) == [1, 2]
    # A batch of fits gives the per-fit errors; the truth itself has zero error.
    batch = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), fitted)
    np.testing.assert_allclose(np.asarray(A.attention_errors(model, batch, truth, X).expert_error)[1], expected, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(A.attention_errors(model, truth, truth, X).expert_error), 0.0, atol=1e-15)


def test_bad_parameters_and_positions_are_named():
    model = A.AttentionModel("sdpa", heads=2, dim=2, tokens=3)
    with pytest.raises(ValueError, match=r"params.gate: expected shape \(2, 2\)"):
        A.make_attention_params(model, {"score": np.zeros((2, 2, 2)), "value": np.zeros((2, 2)), "gate": np.zeros(2)})
    with pytest.raises(ValueError, match="params.value: missing"):
        A.make_attention_params(model, {"score": np.zeros((2, 2, 2)), "gate": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="gate position"):
        A.AttentionModel("keys", heads=1, dim=2, tokens=3)
    with pytest.raises(ValueError, match="query: expected a token index"):
        A.AttentionModel(None, heads=1, dim=2, tokens=3, query=3)
