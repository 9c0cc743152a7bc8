"""The fast EM path (moe_theory.fit.fast) against the generic iteration it replaces.

Every check runs the same fit twice, with the default ``EMConfig()`` (which dispatches to the fast
path for the softmax × Gaussian-linear family) and with ``EMConfig(fast_path=False)``, and requires
the same n_iter, converged and finite flags, log-likelihoods and parameters to ~1e-9 relative.

Data and starts are drawn with NumPy (no per-family jitted helper) so that the only compilations are
the fits themselves; one family serves several checks to share them. Starts have wide gates
(|β| ~ 5), so that full Newton steps of the gate are rejected in early iterations and the fast
path's step-halving and repeated-pass branches run.

The problems are chosen inside the regime where the two computations are comparable at all: the
true experts overlap, so EM converges linearly and stops while its gate steps are still far above
rounding level (after a superlinear convergence the last gate step can be below the rounding noise
of Q, and accepting or rejecting it is arbitrary in either path), and a small variance floor keeps
over-fitted experts from collapsing onto d + 1 points (the likelihood is then unbounded and both
paths hold rounding noise). See the module docstring of moe_theory.fit.fast.

Programs that run the fast path are compiled with their own XLA options (moe_theory.fit.compiling):
three checks cover which programs get them and that they change only rounding. The last two cover
the fast path's own rule for gate steps below the rounding error of Q.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_theory as mt
from moe_theory.fit import EMConfig, fit_batch, fit_em, fit_em_trace
from moe_theory.fit.api import fit_batch_program
from moe_theory.fit.compiling import FAST_PATH_OPTIONS, accepted_options, program_options
from moe_theory.fit.fast import MAX_DIM, ROUNDING_MARGIN, FastState, takes_full_step, fast_path_applies

TOL = 1e-7
CONFIG = EMConfig(max_iter=400, variance_floor=1e-3)
GENERIC = EMConfig(max_iter=400, variance_floor=1e-3, fast_path=False)
SAMPLES = 240
PADDING = 37


def _data(dim: int, seed: int, n: int = SAMPLES):
    """Two overlapping true experts in dimension ``dim``: a softmax gate, Gaussian-linear experts."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, dim))
    slopes = np.vstack([rng.normal(0.0, 2.0, (1, dim)), np.zeros((1, dim))])
    scores = np.array([0.5, 0.0]) + x @ slopes.T
    first = 1.0 / (1.0 + np.exp(scores[:, 1] - scores[:, 0]))
    labels = (rng.random(n) > first).astype(int)
    a, b, nu = rng.normal(0.0, 1.0, (2, dim)), np.array([-1.0, 1.0]), np.array([0.5, 0.8])
    y = np.einsum("nd,nd->n", x, a[labels]) + b[labels] + np.sqrt(nu[labels]) * rng.standard_normal(n)
    return x, y


def _start(family: mt.Family, y: np.ndarray, seed: int, gate_scale: float = 5.0) -> mt.MoEParams:
    rng = np.random.default_rng(seed + 1000)
    k, dim = family.num_experts, family.dim
    values = {
        "gate": {"beta0": rng.normal(0.0, gate_scale, k), "beta1": rng.normal(0.0, gate_scale, (k, dim))},
        "expert": {
            "a": rng.normal(0.0, 0.5, (k, dim)),
            "b": np.quantile(y, (np.arange(k) + 0.5) / k),
            "nu": np.full(k, np.var(y)),
        },
    }
    return mt.make_params(family, values)


def _padded(x, y, seed: int):
    """Unequal positive weights, plus zero-weight padding rows holding NaN inputs and responses."""
    rng = np.random.default_rng(seed + 2000)
    weights = np.concatenate([rng.choice([0.5, 1.0, 2.0], size=x.shape[0]), np.zeros(PADDING)])
    x = np.concatenate([x, np.full((PADDING, x.shape[1]), np.nan)])
    y = np.concatenate([y, np.full(PADDING, np.nan)])
    return x, y, weights


def _assert_same_fit(fast, generic, rtol=1e-9):
    assert int(fast.n_iter) == int(generic.n_iter)
    assert bool(fast.converged) == bool(generic.converged)
    assert bool(fast.finite) == bool(generic.finite)
    np.testing.assert_allclose(fast.log_likelihood, generic.log_likelihood, rtol=1e-12)
    for group in ("gate", "expert"):
        for name, value in getattr(generic.params, group).items():
            np.testing.assert_allclose(getattr(fast.params, group)[name], value, rtol=rtol, atol=1e-11, err_msg=f"{group}.{name}")


def _fit_both(family, start, x, y, weights=None):
    args = (family, start, jnp.asarray(x), jnp.asarray(y), None if weights is None else jnp.asarray(weights), TOL)
    return fit_em(*args, CONFIG), fit_em(*args, GENERIC)


# (d, k) pairs: every d in {0, 1, 2} and k in {2, 3} appears with and without weights.
UNWEIGHTED = [(0, 2), (1, 3), (2, 2)]
WEIGHTED = [(0, 3), (1, 2), (2, 3)]


@pytest.mark.parametrize("dim,k", UNWEIGHTED)
def test_fast_fit_equals_generic(dim, k):
    family = mt.make_family("softmax", "gaussian", k, dim)
    converged = []
    for seed in (0, 1):
        x, y = _data(dim, seed)
        fast, generic = _fit_both(family, _start(family, y, seed), x, y)
        assert bool(generic.finite)
        converged.append(bool(generic.converged))
        _assert_same_fit(fast, generic)
    assert any(converged)


@pytest.mark.parametrize("dim,k", WEIGHTED)
def test_fast_fit_with_weights_and_nan_padding_equals_generic(dim, k):
    family = mt.make_family("softmax", "gaussian", k, dim)
    converged = []
    for seed in (0, 1):
        x, y = _data(dim, seed)
        fast, generic = _fit_both(family, _start(family, y, seed), *_padded(x, y, seed))
        assert bool(generic.finite)
        converged.append(bool(generic.converged))
        _assert_same_fit(fast, generic)
    assert any(converged)


@pytest.mark.parametrize("dim,k", [(0, 2), (1, 3), (2, 2)])
def test_fast_fit_with_a_padding_mask_equals_generic_and_the_unpadded_fit(dim, k):
    """A boolean mask (the sweep's padding) is summed like unit weights, as logs of products."""
    family = mt.make_family("softmax", "gaussian", k, dim)
    x, y = _data(dim, seed=3)
    start = _start(family, y, seed=3)
    padded_x = np.concatenate([x, np.full((PADDING, dim), np.nan)])
    padded_y = np.concatenate([y, np.full(PADDING, np.nan)])
    mask = np.arange(SAMPLES + PADDING) < SAMPLES
    masked, generic = _fit_both(family, start, padded_x, padded_y, mask)
    assert bool(masked.finite)
    _assert_same_fit(masked, generic)
    _assert_same_fit(masked, fit_em(family, start, jnp.asarray(x), jnp.asarray(y), None, TOL, CONFIG))
    # 0/1 float weights take the general path, with a logarithm per sample: the same fit.
    _assert_same_fit(masked, fit_em(family, start, padded_x, padded_y, mask.astype(float), TOL, CONFIG))


@pytest.mark.parametrize("dim,k,weighted", [(0, 3, False), (1, 2, True)])
def test_fast_trace_equals_generic_and_never_decreases(dim, k, weighted):
    family = mt.make_family("softmax", "gaussian", k, dim)
    x, y = _data(dim, 1)
    start = _start(family, y, 1)
    data = _padded(x, y, 1) if weighted else (x, y, None)
    args = (family, start, *(None if a is None else jnp.asarray(a) for a in data), TOL)
    (fast, fast_trace), (generic, generic_trace) = fit_em_trace(*args, CONFIG), fit_em_trace(*args, GENERIC)
    _assert_same_fit(fast, generic)
    np.testing.assert_allclose(fast_trace, generic_trace, rtol=1e-9)  # NaN after the stop in both
    path = np.asarray(fast_trace)[: int(fast.n_iter)]
    assert np.all(np.isfinite(path)) and np.all(np.isnan(np.asarray(fast_trace)[int(fast.n_iter) :]))
    assert np.all(np.diff(path) >= -1e-13 * np.abs(path[1:]))
    # The trace variant's result is fit_em's.
    _assert_same_fit(fast, fit_em(*args, CONFIG), rtol=0.0)


def test_short_step_halving_equals_generic():
    """With max_halvings = 2 a rejected full step is tried once more at α = ½, then given up."""
    family = mt.make_family("softmax", "gaussian", 3, 0)
    x, y = _data(0, 1)
    args = (family, _start(family, y, 1), jnp.asarray(x), jnp.asarray(y), None, TOL)
    short = EMConfig(max_iter=400, variance_floor=1e-3, max_halvings=2)
    _assert_same_fit(fit_em(*args, short), fit_em(*args, EMConfig(**{**short.__dict__, "fast_path": False})))


def test_collapsing_variance_is_summed_directly():
    """All responses within 1e-5 of one value: the new variances are ~1e-10 of the old residual
    variance, where the residual form q − Δᵀc has lost ~6 digits and the fast path sums directly."""
    family = mt.make_family("softmax", "gaussian", 2, 0)
    rng = np.random.default_rng(5)
    x = np.zeros((SAMPLES, 0))
    y = 1.0 + 1e-5 * rng.standard_normal(SAMPLES)
    start = _start(family, y, 5, gate_scale=1.0)
    config = EMConfig(max_iter=3)
    args = (family, start, jnp.asarray(x), jnp.asarray(y), None, -1.0)
    fast, generic = fit_em(*args, config), fit_em(*args, EMConfig(max_iter=3, fast_path=False))
    assert float(jnp.max(generic.params.expert["nu"])) < 1e-9
    _assert_same_fit(fast, generic)


def test_input_transform_and_an_active_variance_floor_equal_generic():
    family = mt.make_family("modified_softmax", "gaussian", 2, 1)  # gate input z = tanh(x)
    x, y = _data(1, 0)
    args = (family, _start(family, y, 0), jnp.asarray(x), jnp.asarray(y), None, TOL)
    floor = 0.6  # above one of the fitted variances
    fast = fit_em(*args, EMConfig(max_iter=400, variance_floor=floor))
    _assert_same_fit(fast, fit_em(*args, EMConfig(max_iter=400, variance_floor=floor, fast_path=False)))
    assert float(jnp.min(fast.params.expert["nu"])) == floor


def test_broken_starts_are_flagged_like_the_generic_path():
    family = mt.make_family("softmax", "gaussian", 3, 1)
    x, y = _data(1, 0)
    start = _start(family, y, 0)
    negative_variance = start._replace(expert={**start.expert, "nu": start.expert["nu"].at[1].set(-0.3)})
    nan_response = y.copy()
    nan_response[17] = np.nan
    for params, responses in ((negative_variance, y), (start, nan_response)):
        fast, generic = _fit_both(family, params, x, responses)
        for result in (fast, generic):
            assert not bool(result.finite) and not bool(result.converged)
        assert int(fast.n_iter) == int(generic.n_iter)


def test_fit_batch_uses_the_fast_path_with_unit_weights():
    family = mt.make_family("softmax", "gaussian", 2, 0)
    xs, ys, starts = [], [], []
    for seed in (0, 1, 2):
        x, y = _data(0, seed)
        xs.append(x)
        ys.append(y)
        starts.append(_start(family, y, seed))
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves)[:, None], *starts)
    xs, ys = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))
    batched = fit_batch(family, stacked, xs, ys, None, TOL, config=CONFIG, batch_size=2)
    for r in range(3):
        single, _ = _fit_both(family, starts[r], xs[r], ys[r])
        _assert_same_fit(jax.tree_util.tree_map(lambda leaf: leaf[r], batched), single, rtol=1e-12)


def test_dispatch_rules():
    plain = mt.make_family("softmax", "gaussian", 3, 1)
    assert fast_path_applies(plain, EMConfig())
    assert fast_path_applies(mt.make_family("modified_softmax", "gaussian", 3, 2), EMConfig())
    assert fast_path_applies(mt.make_family({"name": "softmax", "top_k": 3}, "gaussian", 3, 1), EMConfig())
    assert not fast_path_applies(plain, EMConfig(fast_path=False))
    assert not fast_path_applies(plain, EMConfig(gate_steps=2))
    assert not fast_path_applies(mt.make_family("softmax", "gaussian", 3, MAX_DIM + 1), EMConfig())
    assert not fast_path_applies(mt.make_family("softmax", "gaussian", 1, 1), EMConfig())
    for gate in ("sigmoid", "topk_softmax", "temperature_softmax", "euclidean_softmax", "gaussian"):
        assert not fast_path_applies(mt.make_family(gate, "gaussian", 3, 1), EMConfig()), gate
    assert not fast_path_applies(mt.make_family("softmax", "nonlinear", 3, 1), EMConfig())
    assert not fast_path_applies(mt.make_family("softmax", "multinomial_logistic", 3, 1, num_classes=3), EMConfig())
    with pytest.raises(ValueError, match="fast_path"):
        EMConfig(fast_path=1)


def test_compiler_options_go_to_fast_path_programs_only():
    plain = mt.make_family("softmax", "gaussian", 3, 1)
    # A jaxlib without one of the options still fits (test_unknown_compiler_options_are_dropped),
    # but more slowly: this fails then, so that the options are revisited for that jaxlib.
    assert program_options(plain, EMConfig()) == accepted_options(FAST_PATH_OPTIONS) == FAST_PATH_OPTIONS
    assert program_options(plain, EMConfig(fast_path=False)) is None
    assert program_options(plain, EMConfig(), method="mle") is None
    assert program_options(mt.make_family("sigmoid", "gaussian", 3, 1), EMConfig()) is None
    assert program_options(mt.make_family("gaussian", "gaussian", 3, 1), EMConfig(likelihood="joint")) is None


def test_unknown_compiler_options_are_dropped():
    known = {"xla_cpu_prefer_vector_width": 512}
    assert accepted_options({"xla_cpu_no_such_option": True, **known}) == known
    assert accepted_options({"xla_cpu_no_such_option": True}) is None


def test_compiler_options_change_only_rounding():
    family = mt.make_family("softmax", "gaussian", 3, 1)
    x, y = _data(1, seed=11)
    start = _start(family, y, seed=11)
    tuned = fit_em(family, start, x, y, None, TOL, CONFIG)
    # Traced into a plain jit, the same fit compiles with XLA's defaults (nested jits carry no options).
    default = jax.jit(fit_em, static_argnames=("family", "config"))(family, start, x, y, None, TOL, CONFIG)
    _assert_same_fit(tuned, default, rtol=1e-12)
    # A top-level call compiles through the jit variant with the options, one jit per variant.
    assert fit_batch_program(family, CONFIG) is fit_batch_program(family, CONFIG)
    assert fit_batch_program(family, CONFIG) is not fit_batch_program(family, GENERIC)
    # Traced under the caller's jit, the fit uses the defaults variant (nested jits carry no options).
    chosen = []
    jax.jit(lambda v: chosen.append(fit_batch_program(family, CONFIG, "em", (v,))) or v)(0.0)
    assert chosen == [fit_batch_program(family, GENERIC)]


def test_float32_fit_past_convergence_stays_monotone_and_on_the_float64_fit():
    """Past convergence every float32 gate step is below the rounding error of Q and is taken
    untested ("Steps below rounding" in moe_theory.fit.fast): ℓ must still never fall by more than
    its rounding error, and the fit must stay on the float64 one."""
    family = mt.make_family("softmax", "gaussian", 2, 1)
    x, y = _data(1, seed=5, n=2000)
    start = _start(family, y, seed=5)
    config = EMConfig(max_iter=150)
    double, _ = fit_em_trace(family, start, jnp.asarray(x), jnp.asarray(y), None, -1.0, config)
    single_start = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float32), start)
    single, trace = fit_em_trace(family, single_start, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), None, -1.0, config)
    path = np.asarray(trace, np.float64)
    assert bool(single.finite) and int(single.n_iter) == 150
    assert np.all(np.diff(path) >= -8 * np.finfo(np.float32).eps * np.abs(path[1:]))
    np.testing.assert_allclose(single.log_likelihood, double.log_likelihood, rtol=1e-5)
    for group in ("gate", "expert"):
        for name, value in getattr(double.params, group).items():
            np.testing.assert_allclose(getattr(single.params, group)[name], value, rtol=1e-3, atol=1e-3, err_msg=f"{group}.{name}")


def test_a_step_below_rounding_is_taken_untested_and_any_other_is_tested():
    """The rule of "Steps below rounding": with Σ w log Z = 1e4 in float64 the threshold is
    ROUNDING_MARGIN·ε·1e4 ≈ 3.6e-11; the candidate's Σ w log Z rose by 1 while the gain is 0.5,
    so the test Q(u + δ) ≥ Q(u) fails."""
    def state(predicted, pending=True):
        return FastState(
            gate=jnp.zeros((1, 2)), direction=jnp.ones((1, 2)), gain=jnp.asarray(0.5), predicted=jnp.asarray(predicted),
            log_normaliser=jnp.asarray(1e4), pending=jnp.asarray(pending), expert=(), log_likelihood=jnp.asarray(0.0),
            previous=jnp.asarray(0.0), iteration=jnp.asarray(1), finite=jnp.asarray(True),
        )

    threshold = ROUNDING_MARGIN * np.finfo(np.float64).eps * 1e4
    failing = jnp.asarray(1e4 + 1.0)
    assert bool(takes_full_step(state(0.5 * threshold), failing))  # untestable: taken
    assert not bool(takes_full_step(state(2.0 * threshold), failing))  # testable: fails the test
    assert bool(takes_full_step(state(2.0 * threshold), jnp.asarray(1e4 + 0.25)))  # passes the test
    assert not bool(takes_full_step(state(0.5 * threshold), jnp.asarray(np.nan)))  # never a NaN step
    assert not bool(takes_full_step(state(np.nan), failing))  # a NaN prediction is not "small"
    assert bool(takes_full_step(state(2.0 * threshold, pending=False), failing))  # no pending step
