"""The registries are open: a new gate score, a new expert and a new input distribution, each a few
lines plus a registry entry, get sampling, validation, likelihoods, EM, losses and the sweep with no
further code. The oracles are NumPy and scipy densities."""

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from scipy import stats

import moe_theory as mt
from moe_theory import storage, sweep
from moe_theory.config import load_config
from moe_theory.experts import EXPERTS, Expert
from moe_theory.fit import EMConfig, fit_em_trace
from moe_theory.gates import BETA_FIELDS, GATES, SCORES, Gate, Score
from moe_theory.init import random_init
from moe_theory.params import Field
from moe_theory.sampling import INPUTS, InputDistribution


def quadratic_slope(gate_params, z):
    return z @ gate_params["beta1"].T + jnp.sum(z**2, axis=1, keepdims=True) * gate_params["gamma"]


@pytest.fixture
def quadratic_gate():
    fields = BETA_FIELDS + (Field("gamma", ("k",), "real", "quadratic gate coefficients γ"),)
    SCORES["quadratic"] = Score(fields, quadratic_slope)
    GATES["quadratic_softmax"] = Gate(score="quadratic")
    yield "quadratic_softmax"
    del SCORES["quadratic"], GATES["quadratic_softmax"]


def test_a_registered_score_samples_scores_and_fits(quadratic_gate):
    family = mt.make_family(quadratic_gate, "gaussian", 2, dim=2)
    truth = mt.make_params(
        family,
        {"gate": {"beta0": [1.0, 0.0], "beta1": [[2.0, -1.0], [0.0, 0.0]], "gamma": [-1.5, 0.0]},
         "expert": {"a": [[1.0, 0.0], [0.0, -1.0]], "b": [1.0, -1.0], "nu": [0.2, 0.3]}},
    )
    x, y, labels = mt.sample(jax.random.key(0), family, truth, 4000, mt.make_inputs("normal"))

    # Oracle: softmax of β₁ᵀx + γ‖x‖² + β₀ and Gaussian experts, written out in NumPy.
    x_np, y_np = np.asarray(x), np.asarray(y)
    scores = x_np @ np.array([[2.0, -1.0], [0.0, 0.0]]).T + (x_np**2).sum(1, keepdims=True) * np.array([-1.5, 0.0])
    scores += np.array([1.0, 0.0])
    gate = np.exp(scores - scores.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    means = x_np @ np.array([[1.0, 0.0], [0.0, -1.0]]).T + np.array([1.0, -1.0])
    variances = np.array([0.2, 0.3])
    density = gate * np.exp(-((y_np[:, None] - means) ** 2) / (2 * variances)) / np.sqrt(2 * np.pi * variances)
    truth_log_likelihood = np.log(density.sum(1)).mean()
    np.testing.assert_allclose(mt.log_likelihood(family, truth, x, y), truth_log_likelihood, rtol=1e-10)
    # Labels follow the gate.
    assert abs(np.mean(np.asarray(labels) == 0) - gate[:, 0].mean()) < 5 * np.sqrt(0.25 / 4000)

    # EM with the generic gate M-step: monotone, and at least as likely as the truth (the MLE).
    start = random_init(jax.random.key(1), family, x, y)
    result, trace = fit_em_trace(family, start, x, y, tol=1e-9, config=EMConfig(max_iter=300))
    path = np.asarray(trace)[~np.isnan(np.asarray(trace))]
    assert bool(result.converged) and np.all(np.diff(path) >= -1e-12 * np.abs(path[:-1]))
    assert float(result.log_likelihood) >= truth_log_likelihood - 1e-6
    # The softmax identifies γ only up to a common shift and the experts up to relabelling.
    gamma = np.asarray(result.params.gate["gamma"])
    np.testing.assert_allclose(abs(gamma[0] - gamma[1]), 1.5, atol=0.3)


# ----------------------------------------------------------------------------------------------
# A new expert and a new input distribution, each registered in a few lines.


@dataclass(frozen=True)
class StudentTLinear(Expert):
    """y | i ~ t_df(a_iᵀx + b_i, scale s_i²): a heavy-tailed regression expert with s² of role variance."""

    df: float = 5.0
    name: ClassVar[str] = "student_t"
    fields: ClassVar[tuple] = (
        Field("slope", ("k", "d"), "real", "expert slopes"),
        Field("intercept", ("k",), "real", "expert intercepts"),
        Field("scale2", ("k",), "positive", "squared scales s²", role="variance"),
    )

    def mean(self, expert, x):
        return x @ expert["slope"].T + expert["intercept"][None, :]

    def log_prob(self, expert, x, y):
        df, scale2 = self.df, expert["scale2"]
        z2 = (y[:, None] - self.mean(expert, x)) ** 2 / (df * scale2)
        constant = jax.scipy.special.gammaln((df + 1) / 2) - jax.scipy.special.gammaln(df / 2)
        return constant - 0.5 * jnp.log(df * jnp.pi * scale2) - (df + 1) / 2 * jnp.log1p(z2)

    def sample(self, key, expert, x, labels):
        chosen = jnp.take_along_axis(self.mean(expert, x), labels[:, None], axis=1)[:, 0]
        return chosen + jnp.sqrt(expert["scale2"][labels]) * jax.random.t(key, self.df, chosen.shape, dtype=chosen.dtype)


@dataclass(frozen=True)
class LaplaceInputs(InputDistribution):
    """x ~ Laplace(loc, scale) independently per coordinate."""

    loc: float = 0.0
    scale: float = 1.0
    name: ClassVar[str] = "laplace"

    def draw(self, key, n, dim, dtype, params):
        return self.loc + self.scale * jax.random.laplace(key, (n, dim), dtype=dtype)


@pytest.fixture
def student_t_and_laplace():
    EXPERTS["student_t"], INPUTS["laplace"] = StudentTLinear, LaplaceInputs
    yield
    del EXPERTS["student_t"], INPUTS["laplace"]


STUDENT_TRUTH = {
    "gate": {"beta0": [0.5, 0.0], "beta1": [[3.0], [0.0]]},
    "expert": {"slope": [[2.0], [-2.0]], "intercept": [1.0, -1.0], "scale2": [0.1, 0.2]},
}


def test_a_registered_expert_and_input_distribution_sample_score_and_fit(student_t_and_laplace):
    family = mt.make_family("softmax", "student_t", 2, dim=1)
    truth = mt.make_params(family, STUDENT_TRUTH)
    with pytest.raises(mt.ParameterError, match=r"expert\.scale2\[1\] = -0\.2: expected > 0"):
        mt.make_params(family, {**STUDENT_TRUTH, "expert": {**STUDENT_TRUTH["expert"], "scale2": [0.1, -0.2]}})
    inputs = mt.make_inputs({"name": "laplace", "scale": 0.5})
    x, y, labels = mt.sample(jax.random.key(3), family, truth, 4000, inputs)

    # Inputs: the Laplace law (Kolmogorov–Smirnov against scipy).
    assert stats.kstest(np.asarray(x)[:, 0], stats.laplace(0.0, 0.5).cdf).pvalue > 1e-3
    # Responses given the label: Student-t residuals (KS against scipy's t law).
    x_np, y_np, z = np.asarray(x)[:, 0], np.asarray(y), np.asarray(labels)
    means = np.stack([2.0 * x_np + 1.0, -2.0 * x_np - 1.0], axis=1)
    residual = (y_np - means[np.arange(len(z)), z]) / np.sqrt(np.array([0.1, 0.2])[z])
    assert stats.kstest(residual, stats.t(5.0).cdf).pvalue > 1e-3

    # Likelihood: softmax gate and scipy's t density, written out in NumPy.
    scores = np.stack([3.0 * x_np + 0.5, np.zeros_like(x_np)], axis=1)
    gate = np.exp(scores - scores.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    density = gate * stats.t.pdf(y_np[:, None], 5.0, loc=means, scale=np.sqrt([0.1, 0.2]))
    truth_log_likelihood = np.log(density.sum(1)).mean()
    np.testing.assert_allclose(mt.log_likelihood(family, truth, x, y), truth_log_likelihood, rtol=1e-10)

    # EM with Newton M-steps for the new expert: monotone, and at least as likely as the truth.
    start = random_init(jax.random.key(4), family, x, y)
    result, trace = fit_em_trace(family, start, x, y, tol=1e-10, config=EMConfig(max_iter=400, expert_steps=3))
    path = np.asarray(trace)[~np.isnan(np.asarray(trace))]
    assert bool(result.finite) and np.all(np.diff(path) >= -1e-12 * np.abs(path[:-1]))
    assert float(result.log_likelihood) >= truth_log_likelihood - 1e-6

    # Voronoi loss and per-parameter errors over the new expert's blocks: small at n = 4000.
    loss = mt.losses.exact_fitted_loss(family, result.params, truth)
    assert float(loss.loss) < 0.5
    errors = mt.losses.parameter_errors(family, result.params, truth)
    assert set(errors.max_error) == {"beta1", "slope", "intercept", "scale2"}
    assert max(float(np.max(v)) for v in errors.max_error.values()) < 0.3


def test_a_registered_expert_and_input_distribution_run_in_a_sweep(student_t_and_laplace, tmp_path):
    config_file = tmp_path / "student.yaml"
    config_file.write_text(yaml.safe_dump({
        "name": "student_t_smoke",
        "model": {"gate": "softmax", "expert": {"name": "student_t", "df": 5.0}, "params": STUDENT_TRUTH},
        "inputs": {"name": "laplace", "scale": 0.5},
        "sample_sizes": [200, 400],
        "replicates": 2,
        "fit": {"num_experts": 2, "max_iter": 200, "expert_steps": 3},
        "metrics": {"losses": ["D1"], "density": {"num_inputs": 20, "grid_size": 8, "num_quadrature": 4}},
        "rates": {"theory": None, "n_boot": 50},
    }))
    config = load_config(config_file)
    run_dir = storage.create_run_dir(tmp_path, config.name)
    storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
    sweep.run_study(config, run_dir, progress=False, figures=False)
    table = storage.read_table(run_dir)
    assert len(table) == 4 and table["finite"].all()
    assert np.isfinite(table["D1"]).all() and (table["D1"] > 0).all()
    assert np.isfinite(table["hellinger"]).all() and (table["hellinger"] >= 0).all()
    # The new expert's blocks are scored by name, like every built-in block.
    assert {"err_slope_atom0", "err_intercept_atom1", "err_scale2_atom0"} <= set(table.columns)
