"""Expert estimation errors against plain NumPy loops: TV of the class distributions for classifier
experts, |ĥ − h*| of the regression functions for regression experts, worst and mean per Voronoi cell."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import moe_theory as mt
from moe_theory.losses import expert_errors

INPUTS = mt.make_inputs({"name": "normal", "std": 1.5})


def multinomial_case():
    family = mt.make_family("softmax", "multinomial_logistic", 3, dim=2, num_classes=3)
    true_family = mt.make_family("softmax", "multinomial_logistic", 2, dim=2, num_classes=3)
    truth = mt.make_params(true_family, {
        "gate": {"beta0": [0.3, 0.0], "beta1": [[1.0, -1.0], [0.0, 0.0]]},
        "expert": {"eta0": [[0.5, -0.5], [-1.0, 1.0]], "eta1": [[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.5], [0.5, -1.0]]]},
    })
    rng = np.random.default_rng(1)
    fitted = mt.make_params(family, {
        "gate": {"beta0": [0.2, 0.1, 0.0], "beta1": [[0.9, -1.1], [1.1, -0.8], [0.0, 0.0]]},
        "expert": {"eta0": np.array([[0.5, -0.5], [0.5, -0.5], [-1.0, 1.0]]) + 0.2 * rng.normal(size=(3, 2)),
                   "eta1": np.array([[[1.0, 0.0], [0.0, 1.0]]] * 2 + [[[-1.0, 0.5], [0.5, -1.0]]]) + 0.2 * rng.normal(size=(3, 2, 2))},
    })
    return family, truth, fitted


def numpy_class_probs(eta0, eta1, x):
    """P(c | x, expert i) for one expert: softmax over the C − 1 free classes and a last class at 0."""
    logits = np.concatenate([x @ eta1.T + eta0, np.zeros((x.shape[0], 1))], axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def oracle(distance_of, assignment, num_fitted, num_true):
    distances = [distance_of(i, int(assignment[i])) for i in range(num_fitted)]
    worst, mean = [], []
    for j in range(num_true):
        cell = [distances[i] for i in range(num_fitted) if assignment[i] == j]
        worst.append(max(cell) if cell else np.nan)
        mean.append(np.mean(cell) if cell else np.nan)
    return np.array(distances), np.array(worst), np.array(mean)


def test_classifier_experts_match_a_numpy_loop_of_total_variations():
    family, truth, fitted = multinomial_case()
    key = jax.random.key(3)
    result = expert_errors(key, family, fitted, truth, INPUTS, num_inputs=500, translation="mass")
    x = np.asarray(INPUTS.draw(key, 500, 2, jnp.float64, truth))
    eta0_hat, eta1_hat = np.asarray(fitted.expert["eta0"]), np.asarray(fitted.expert["eta1"])
    eta0, eta1 = np.asarray(truth.expert["eta0"]), np.asarray(truth.expert["eta1"])

    def total_variation(i, j):
        return np.mean(0.5 * np.abs(numpy_class_probs(eta0_hat[i], eta1_hat[i], x) - numpy_class_probs(eta0[j], eta1[j], x)).sum(axis=1))

    assignment = np.asarray(result.assignment)
    assert sorted(set(assignment)) == [0, 1] and np.sum(assignment == 0) == 2  # the two copies of expert 0
    distances, worst, mean = oracle(total_variation, assignment, 3, 2)
    np.testing.assert_allclose(result.distance, distances, rtol=1e-12)
    np.testing.assert_allclose(result.max_error, worst, rtol=1e-12)
    np.testing.assert_allclose(result.mean_error, mean, rtol=1e-12)

    # The used error: each atom weighted by E_x of its softmax gate weight, from a NumPy softmax.
    scores = x @ np.asarray(fitted.gate["beta1"]).T + np.asarray(fitted.gate["beta0"])
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    usage = (weights / weights.sum(axis=1, keepdims=True)).mean(axis=0)
    used = [np.sum(usage[assignment == j] * distances[assignment == j]) / np.sum(usage[assignment == j]) for j in range(2)]
    np.testing.assert_allclose(result.usage, usage, rtol=1e-12)
    np.testing.assert_allclose(result.used_error, used, rtol=1e-12)
    assert worst[0] > result.used_error[0] > np.min(distances[assignment == 0])

    # A cell whose only atom the gate never routes to (its weight underflows) has no used error.
    unused = mt.MoEParams({**fitted.gate, "beta0": jnp.array([900.0, 900.0, 0.0])}, fitted.expert)
    never = expert_errors(key, family, unused, truth, INPUTS, num_inputs=500, translation="mass")
    assert np.asarray(never.assignment)[2] == 1 and float(never.usage[2]) == 0.0
    assert np.isnan(never.used_error[1]) and np.isfinite(never.max_error[1])


def test_regression_experts_match_a_numpy_loop_and_vanish_at_the_truth():
    family = mt.make_family("softmax", "gaussian", 2, dim=1)
    truth = mt.make_params(family, {"gate": {"beta0": [-1.0, 0.0], "beta1": [[2.0], [0.0]]},
                                    "expert": {"a": [[1.0], [-1.0]], "b": [0.5, -0.5], "nu": [0.1, 0.2]}})
    key = jax.random.key(0)
    # Experts relabelled: the cells follow the atoms, so the errors are still 0.
    swapped = mt.MoEParams({"beta0": jnp.array([1.0, 0.0]), "beta1": jnp.array([[-2.0], [0.0]])},
                           {k: v[::-1] for k, v in truth.expert.items()})
    for params in (truth, swapped):
        np.testing.assert_allclose(expert_errors(key, family, params, truth, INPUTS, 200).max_error, 0.0, atol=1e-15)

    fitted = mt.MoEParams(truth.gate, {"a": jnp.array([[1.1], [-0.9]]), "b": jnp.array([0.4, -0.3]), "nu": truth.expert["nu"]})
    batch = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf, leaf * 1.05]), fitted)
    result = expert_errors(key, family, batch, truth, INPUTS, 300)
    x = np.asarray(INPUTS.draw(key, 300, 1, jnp.float64, truth))[:, 0]
    for replicate in range(2):
        a_hat = np.asarray(batch.expert["a"][replicate])[:, 0]
        b_hat = np.asarray(batch.expert["b"][replicate])

        def absolute_gap(i, j):
            return np.mean(np.abs(a_hat[i] * x + b_hat[i] - ([1.0, -1.0][j] * x + [0.5, -0.5][j])))

        distances, worst, _ = oracle(absolute_gap, np.asarray(result.assignment[replicate]), 2, 2)
        np.testing.assert_allclose(result.distance[replicate], distances, rtol=1e-12)
        np.testing.assert_allclose(result.max_error[replicate], worst, rtol=1e-12)


def test_bad_arguments_are_refused():
    family, truth, fitted = multinomial_case()
    with pytest.raises(ValueError, match="num_inputs"):
        expert_errors(jax.random.key(0), family, fitted, truth, INPUTS, 0)
    batched_truth = jax.tree_util.tree_map(lambda leaf: leaf[None], truth)
    with pytest.raises(ValueError, match="unbatched"):
        expert_errors(jax.random.key(0), family, fitted, batched_truth, INPUTS, 10)


def test_the_sweep_stores_expert_errors_equal_to_a_direct_computation(tmp_path):
    from pathlib import Path

    from moe_theory import metrics, storage, sweep
    from moe_theory.config import load_config

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    config = load_config(smoke, ["metrics.expert_errors={num_inputs: 64}", "fit.num_experts=2", "sample_sizes=[40, 60]"])
    run_dir = storage.create_run_dir(tmp_path, config.name)
    storage.write_text(run_dir / storage.CONFIG_FILE, config.to_yaml())
    sweep.run_study(config, run_dir, progress=False, figures=False)
    table = storage.read_table(run_dir)
    columns = [metrics.expert_error_column(atom) for atom in range(2)]
    used = [metrics.used_expert_error_column(atom) for atom in range(2)]
    assert set(columns + used) <= set(table.columns) and np.isfinite(table[columns + used].to_numpy()).all()
    long = pd.read_parquet(run_dir / storage.METRICS_FILE)
    assert set(long.loc[long.metric == "expert_error", "column"]) == set(columns)
    assert set(long.loc[long.metric == "used_expert_error", "column"]) == set(used)

    # One stored fit, rebuilt from its hat_ columns and scored directly with the sweep's x draws.
    row = table.iloc[0]
    family = config.fitted_family(config.groups[0])
    values = {group: {field.name: np.array([row["hat_" + "_".join([field.name, *map(str, index)])]
                                            for index in np.ndindex(*family.field_shape(field))]).reshape(family.field_shape(field))
                      for field in family.fields[group]} for group in ("gate", "expert")}
    fitted = mt.make_params(family, values)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), sweep.DENSITY_STREAM), sweep.EXPERT_ERROR_DRAWS)
    direct = expert_errors(key, family, fitted, config.truth, config.inputs, 64, translation="mass", exponents="first_order")
    np.testing.assert_allclose(row[columns].to_numpy(dtype=float), direct.max_error, rtol=1e-10)
    np.testing.assert_allclose(row[used].to_numpy(dtype=float), direct.used_error, rtol=1e-10)
