"""Shared registries, parameter builders and the independent NumPy/SciPy oracle of the core tests.

The oracle below re-derives docs/gates.md and docs/experts.md from the formulas alone. It reads only the *names* a
gate or expert record carries (score, normaliser, transform, activation, temperature, top_k,
top_k_on; expert name and activation) and never calls package code:

* gates: a plain Python loop over samples j and experts i computing
  z = M(x_j), g_i = slope_i(z), s_i = act(g_i)/τ + offset_i, the top-K selection S(x_j) (ties to
  the lower index), and log π_i = log φ(s_i) − log Σ_{l∈S} φ(s_l); the Gaussian gate's slope is
  scipy.stats.multivariate_normal.logpdf;
* experts: scipy.stats.norm.logpdf for Gaussian-noise experts and an explicit softmax loop over
  classes for the multinomial-logistic expert;
* mixtures: log p(y|x) = log Σ_i π_i(x) f_i(y|x) and r_ji = π_i f_i / p, again by loops.

A gate part or expert without an oracle entry raises KeyError / NotImplementedError, so a newly
registered part makes the parametrised tests fail until its reference formula is added here.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats

import moe_theory as mt

NUM_CLASSES = 3
"""C used for every classifier expert in the tests."""

NUM_EXPERTS = 3
SAMPLE_SIZE = 24
"""k and n of the small oracle checks. Un-jitted JAX code compiles each primitive once per input
shape, so sharing one (n, k) across the whole suite keeps it fast."""

# ----------------------------------------------------------------------------------------------
# Registries to parametrise over: a newly registered gate, expert or activation is picked up here.

GATE_PRESETS = sorted(mt.GATES)


def _expert_specs() -> dict[str, object]:
    specs: dict[str, object] = {}
    for name in sorted(mt.EXPERTS):
        if name == "nonlinear":
            for activation in sorted(mt.ACTIVATIONS):
                specs[f"nonlinear-{activation}"] = {"name": "nonlinear", "activation": activation}
        else:
            specs[name] = name
    return specs


EXPERT_SPECS = _expert_specs()
"""Test id -> expert spec: every registered expert, the nonlinear one with every activation."""

REGRESSION_EXPERT_IDS = [key for key, spec in EXPERT_SPECS.items() if not mt.make_expert(spec).is_classifier]
BASIC_EXPERT_IDS = ["gaussian", "multinomial_logistic", "nonlinear-relu"]
"""One expert of each kind, for gate × expert products in which every activation would add run time only."""


def _gate_variants() -> dict[str, mt.Gate]:
    """Every preset, plus a gate for each registered part (score × normaliser, transform,
    activation) and each top-K option that no preset reaches."""
    variants = {name: mt.make_gate(name) for name in GATE_PRESETS}
    extra = {}
    for score in sorted(mt.SCORES):
        for normaliser in sorted(mt.NORMALISERS):
            extra[f"{score}-{normaliser}"] = mt.Gate(score=score, normaliser=normaliser)
    for transform in sorted(mt.TRANSFORMS):
        extra[f"transform-{transform}"] = mt.Gate(transform=transform)
    for activation in sorted(mt.ACTIVATIONS):
        extra[f"activation-{activation}"] = mt.Gate(activation=activation, temperature="fitted")
    extra["temperature-fixed"] = mt.Gate(temperature="fixed")
    extra["top2-slope"] = mt.Gate(top_k=2)
    extra["top2-score"] = mt.Gate(top_k=2, top_k_on="score")
    extra["top2-euclidean-sigmoid"] = mt.Gate(score="euclidean", normaliser="sigmoid", top_k=2)
    for name, gate in extra.items():
        if gate not in variants.values():
            variants[name] = gate
    return variants


GATE_VARIANTS = _gate_variants()
"""Test id -> gate: presets and one variant per registered part (cheap gate-only tests use these)."""


# ----------------------------------------------------------------------------------------------
# Families, parameters and data.


def build_family(gate, expert, num_experts: int = NUM_EXPERTS, dim: int = 1) -> mt.Family:
    """A family through the public constructor; classifier experts get C = NUM_CLASSES."""
    expert_record = mt.make_expert(expert)
    num_classes = NUM_CLASSES if expert_record.is_classifier else None
    return mt.make_family(gate, expert_record, num_experts, dim, num_classes)


def random_param_values(family: mt.Family, rng: np.random.Generator, slope_scale: float = 1.5) -> dict:
    """Valid random parameter values for any family, drawn from its field schema.

    Real fields are normal (gate slopes scaled by ``slope_scale`` so gates are far from flat),
    positive fields (variances, τ, Gaussian-gate weights) uniform on [0.3, 1.5], and positive
    definite fields full (non-diagonal) SPD matrices A Aᵀ/d + 0.2 I.
    """
    values: dict[str, dict[str, np.ndarray]] = {}
    for group, fields in family.fields.items():
        values[group] = {}
        for field in fields:
            shape = family.field_shape(field)
            if field.constraint == "positive":
                value = rng.uniform(0.3, 1.5, size=shape)
            elif field.constraint == "positive_definite":
                factor = rng.normal(size=shape)
                value = factor @ np.swapaxes(factor, -1, -2) / family.dim + 0.2 * np.eye(family.dim)
            else:
                scale = slope_scale if (group, field.name) == ("gate", "beta1") else 1.0
                value = scale * rng.normal(size=shape)
            values[group][field.name] = value
    return values


def random_params(family: mt.Family, rng: np.random.Generator, **kwargs) -> tuple[dict, mt.MoEParams]:
    """(plain NumPy values for the oracle, validated package parameters built from them)."""
    values = random_param_values(family, rng, **kwargs)
    return values, mt.make_params(family, values)


def random_inputs(rng: np.random.Generator, sample_size: int, dim: int, scale: float = 2.0) -> np.ndarray:
    return rng.uniform(-scale, scale, size=(sample_size, dim))


def random_responses(family: mt.Family, rng: np.random.Generator, sample_size: int) -> np.ndarray:
    if family.expert.is_classifier:
        return rng.integers(0, family.num_classes, size=sample_size)
    return rng.normal(scale=2.0, size=sample_size)


def with_extreme_gate(family: mt.Family, values: dict) -> dict:
    """A copy of ``values`` whose gate locations are scaled by 1e3: β₁, or Gaussian-gate centres
    with covariances shrunk 100-fold, so that inputs |x| ~ 1e2 give scores |s| ~ 1e5 or more."""
    gate = dict(values["gate"])
    if family.gate.score == "gaussian":
        gate["centre"] = 1e3 * gate["centre"]
        gate["covariance"] = 1e-2 * gate["covariance"]
    else:
        gate["beta1"] = 1e3 * gate["beta1"]
    return {"gate": gate, "expert": dict(values["expert"])}


@pytest.fixture
def without_jit():
    """Run the test op by op under ``jax.disable_jit()``.

    The code evaluated is the package's own; only XLA compilation of a whole program per family is
    skipped, which would otherwise dominate the run time of the gate × expert products (each
    family is a new static argument). The jitted path is covered by dedicated tests (vmap,
    compile-once, padding, samplers).
    """
    with jax.disable_jit():
        yield


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's node id: reproducible, and different for every parameter."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ----------------------------------------------------------------------------------------------
# The oracle: scalar formulas and plain loops.

# Written with NumPy/SciPy ufuncs so that they apply to a scalar in the loops below and to a whole
# array in the large-n sampler checks.
REFERENCE_ACTIVATIONS = {
    "identity": lambda u: u,
    "tanh": np.tanh,
    "sigmoid": scipy.special.expit,
    "relu": lambda u: np.maximum(u, 0.0),
    "gelu": lambda u: 0.5 * u * (1.0 + scipy.special.erf(u / math.sqrt(2.0))),  # exact (erf) GELU
    "softplus": lambda u: np.logaddexp(0.0, u),
}

REFERENCE_TRANSFORMS = {"tanh": np.tanh, "sigmoid": scipy.special.expit}

REFERENCE_LOG_PHI = {
    "softmax": lambda s: s,  # φ = exp
    "sigmoid": lambda s: -float(np.logaddexp(0.0, -s)),  # φ = σ, log σ(s) = −log(1 + e^{−s})
}


def _reference_slope(score: str, gate_values: dict, z: np.ndarray, expert: int) -> float:
    if score == "linear":
        return sum(gate_values["beta1"][expert, l] * z[l] for l in range(z.size))
    if score == "euclidean":
        return -sum((z[l] - gate_values["beta1"][expert, l]) ** 2 for l in range(z.size))
    if score == "laplace":
        return -math.sqrt(sum((z[l] - gate_values["beta1"][expert, l]) ** 2 for l in range(z.size)))
    if score == "gaussian":
        return float(
            scipy.stats.multivariate_normal.logpdf(
                z, mean=gate_values["centre"][expert], cov=gate_values["covariance"][expert]
            )
        )
    raise NotImplementedError(f"no oracle for score {score!r}: add its formula to tests/conftest.py")


def _reference_offset(score: str, gate_values: dict, expert: int) -> float:
    if score == "gaussian":
        return math.log(gate_values["weight"][expert])
    return float(gate_values["beta0"][expert])


def _log_sum_exp(terms: list[float]) -> float:
    finite = [t for t in terms if t != -math.inf]
    if not finite:
        return -math.inf
    largest = max(finite)
    return largest + math.log(sum(math.exp(t - largest) for t in finite))


def reference_log_gate_weights(gate: mt.Gate, gate_values: dict, x: np.ndarray) -> np.ndarray:
    """log π_i(x_j), (n, k), by the four-step pipeline of docs/gates.md, one sample at a time."""
    x = np.asarray(x, dtype=np.float64)
    num_samples = x.shape[0]
    num_experts = len(gate_values["weight" if gate.score == "gaussian" else "beta0"])
    log_weights = np.full((num_samples, num_experts), -np.inf)
    for j in range(num_samples):
        z = np.array([REFERENCE_TRANSFORMS[gate.transform](v) if gate.transform else v for v in x[j]])
        slopes, scores = [], []
        for i in range(num_experts):
            slope = _reference_slope(gate.score, gate_values, z, i)
            activated = REFERENCE_ACTIVATIONS[gate.activation](slope) if gate.activation else slope
            if gate.temperature is not None:
                activated = activated / float(gate_values["tau"])
            slopes.append(slope)
            scores.append(activated + _reference_offset(gate.score, gate_values, i))
        if gate.top_k is None:
            selected = list(range(num_experts))
        else:
            key = slopes if gate.top_k_on == "slope" else scores
            # Largest key first; among equal keys the lower expert index wins.
            selected = sorted(range(num_experts), key=lambda i: (-key[i], i))[: gate.top_k]
        log_phi = {i: REFERENCE_LOG_PHI[gate.normaliser](scores[i]) for i in selected}
        log_normaliser = _log_sum_exp(list(log_phi.values()))
        for i in selected:
            log_weights[j, i] = log_phi[i] - log_normaliser
    return log_weights


def reference_class_log_probs(expert_values: dict, x: np.ndarray) -> np.ndarray:
    """log P(y = c | x_j, expert i), (n, k, C): softmax over classes with the last logit fixed at 0."""
    eta0, eta1 = expert_values["eta0"], expert_values["eta1"]
    num_experts, num_free = eta0.shape
    num_samples, dim = x.shape
    out = np.empty((num_samples, num_experts, num_free + 1))
    for j in range(num_samples):
        for i in range(num_experts):
            logits = [eta0[i, c] + sum(eta1[i, c, l] * x[j, l] for l in range(dim)) for c in range(num_free)]
            logits.append(0.0)
            log_normaliser = _log_sum_exp(logits)
            for c, logit in enumerate(logits):
                out[j, i, c] = logit - log_normaliser
    return out


def reference_expert_means(expert, expert_values: dict, x: np.ndarray) -> np.ndarray:
    """Regression function h_i(x_j), (n, k): a_iᵀx + b_i or act(η_{1i}ᵀx + η_{0i}), in NumPy."""
    if expert.name == "gaussian":
        slopes, intercepts = expert_values["a"], expert_values["b"]
        activation = REFERENCE_ACTIVATIONS["identity"]
    elif expert.name == "nonlinear":
        slopes, intercepts = expert_values["eta1"], expert_values["eta0"]
        activation = REFERENCE_ACTIVATIONS[expert.activation]
    else:
        raise NotImplementedError(f"no regression-mean oracle for expert {expert.name!r}")
    return activation(np.einsum("nd,kd->nk", np.asarray(x, dtype=np.float64), slopes) + intercepts[None, :])


def reference_expert_log_prob(expert, expert_values: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log f(y_j | x_j; η_i), (n, k): scipy.stats.norm for Gaussian noise, the class loop otherwise."""
    x = np.asarray(x, dtype=np.float64)
    num_samples = len(y)
    if expert.name == "multinomial_logistic":
        class_log_probs = reference_class_log_probs(expert_values, x)
        num_experts = class_log_probs.shape[1]
        return np.array([[class_log_probs[j, i, int(y[j])] for i in range(num_experts)] for j in range(num_samples)])
    if expert.name in ("gaussian", "nonlinear"):
        means = reference_expert_means(expert, expert_values, x)
        std = np.sqrt(expert_values["nu"])  # ν is a variance
        log_prob = np.empty_like(means)
        for j in range(num_samples):
            for i in range(means.shape[1]):
                log_prob[j, i] = scipy.stats.norm.logpdf(y[j], loc=means[j, i], scale=std[i])
        return log_prob
    raise NotImplementedError(f"no density oracle for expert {expert.name!r}: add one to tests/conftest.py")


def reference_joint_log_prob(family: mt.Family, values: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return reference_log_gate_weights(family.gate, values["gate"], x) + reference_expert_log_prob(
        family.expert, values["expert"], x, y
    )


def reference_log_density(family: mt.Family, values: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log p(y_j | x_j) = log Σ_i π_i(x_j) f(y_j | x_j; η_i), (n,)."""
    joint = reference_joint_log_prob(family, values, x, y)
    return np.array([_log_sum_exp(list(row)) for row in joint])


def reference_responsibilities(family: mt.Family, values: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """r_ji = π_i(x_j) f(y_j|x_j; η_i) / Σ_l π_l(x_j) f(y_j|x_j; η_l), (n, k), by a loop."""
    joint = reference_joint_log_prob(family, values, x, y)
    out = np.zeros_like(joint)
    for j, row in enumerate(joint):
        log_total = _log_sum_exp(list(row))
        for i, term in enumerate(row):
            out[j, i] = math.exp(term - log_total) if term != -math.inf else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# Small runs of the smoke study, for the executor and run-folder tests.

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def new_smoke_run(root: Path, overrides=()) -> tuple:
    """(config, run folder) of the smoke study with ``overrides``, its config.yaml written."""
    from moe_theory import storage
    from moe_theory.config import load_config

    config = load_config(SMOKE_CONFIG, list(overrides))
    run_dir = storage.create_run_dir(root, config.name)
    storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
    return config, run_dir


@pytest.fixture(scope="module")
def smoke_table(tmp_path_factory):
    """smoke_table(overrides) → the table of an uninterrupted in-process run of the smoke study
    (computed once per overrides and module): the reference of a resumed, sharded or distributed run."""
    from moe_theory import storage, sweep

    tables = {}

    def table(overrides=()):
        overrides = tuple(overrides)
        if overrides not in tables:
            config, run_dir = new_smoke_run(tmp_path_factory.mktemp("uninterrupted"), overrides)
            sweep.run_sweep(config, run_dir, progress=False)
            tables[overrides] = storage.read_table(run_dir)
        return tables[overrides]

    return table
