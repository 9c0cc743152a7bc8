"""Parameter schemas, validation, conversion, and the static family records (moe_theory.params, models).

Oracles: the schema of docs/gates.md and docs/experts.md (which fields exist, their shapes in k, d, C and their
constraints: ν > 0 is a variance, τ > 0, Γ symmetric positive definite), exact equality for
round trips, and JAX's own trace counting for "a family compiles once".
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_theory as mt
from conftest import (
    BASIC_EXPERT_IDS,
    EXPERT_SPECS,
    GATE_PRESETS,
    NUM_CLASSES,
    build_family,
    random_param_values,
    random_params,
)


@pytest.mark.parametrize("expert_id", BASIC_EXPERT_IDS)
@pytest.mark.parametrize("gate_id", GATE_PRESETS)
def test_params_to_dict_round_trips_exactly(gate_id, expert_id, rng):
    """params_to_dict writes plain (JSON-serialisable) nested lists that make_params reads back
    to bit-identical arrays, for every gate preset and expert kind."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=2)
    _, params = random_params(family, rng)
    as_dict = json.loads(json.dumps(mt.params_to_dict(params)))
    again = mt.make_params(family, as_dict)
    for group in ("gate", "expert"):
        assert set(getattr(again, group)) == set(getattr(params, group))
        for name, value in getattr(params, group).items():
            np.testing.assert_array_equal(getattr(again, group)[name], value)
            assert getattr(again, group)[name].dtype == value.dtype


def test_make_params_uses_the_requested_dtype(rng):
    """float64 by default (the package turns on x64); float32 on request, for every leaf."""
    family = build_family("temperature_softmax", "gaussian", dim=2)
    params = mt.make_params(family, random_param_values(family, rng), dtype=jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    default = mt.make_params(family, random_param_values(family, rng))
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(default))


def drop_trailing_unit_axis(name, value):
    """The flat form a one-dimensional config may use: (k, 1) → (k,), (k, C−1, 1) → (k, C−1).
    Covariances (k, 1, 1) keep their matrix axes."""
    if name != "covariance" and value.ndim >= 2 and value.shape[-1] == 1:
        return value[..., 0]
    return value


@pytest.mark.parametrize("expert_id", BASIC_EXPERT_IDS)
@pytest.mark.parametrize("gate_id", ["softmax", "gaussian"])
def test_flat_lists_stand_for_trailing_unit_axes_when_d_is_1(gate_id, expert_id, rng):
    """For d = 1, a (k,) list is accepted for a (k, 1) field (β₁, a, η₁, centres) and a
    (k, C−1) list for a (k, C−1, 1) field, and gives the same arrays as the nested form."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=1)
    nested = random_param_values(family, rng)
    flat = {
        group: {name: drop_trailing_unit_axis(name, value).tolist() for name, value in fields.items()}
        for group, fields in nested.items()
    }
    from_flat, from_nested = mt.make_params(family, flat), mt.make_params(family, nested)
    for group in ("gate", "expert"):
        for name, value in getattr(from_nested, group).items():
            np.testing.assert_array_equal(getattr(from_flat, group)[name], value)


def test_flat_list_is_refused_when_d_is_2(rng):
    """The flat shorthand is only for d = 1: with d = 2 the message gives the expected shape."""
    family = build_family("softmax", "gaussian", dim=2)
    values = random_param_values(family, rng)
    values["gate"]["beta1"] = values["gate"]["beta1"][:, 0]
    with pytest.raises(mt.ParameterError, match=r"gate\.beta1: expected shape \(3, 2\) \(k, d\), got \(3,\)"):
        mt.make_params(family, values)


def replace_field(group, name, new_value):
    """A mutation of parameter values: ``new_value`` is a value or a function of the old one."""

    def mutate(values):
        values[group][name] = new_value(values[group][name]) if callable(new_value) else new_value

    return mutate


def delete_field(group, name):
    def mutate(values):
        del values[group][name]

    return mutate


def with_entry(index, entry):
    def change(array):
        array = np.array(array, dtype=float)
        array[index] = entry
        return array

    return change


def not_positive_definite(covariance):
    covariance = covariance.copy()
    covariance[1] = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and −1
    return covariance


def not_symmetric(covariance):
    covariance = covariance.copy()
    covariance[0, 0, 1] += 0.5
    return covariance


def bad(case_id, gate, expert, mutate, message, numeric=True):
    """A family (d = 2, k = 3, C = 3), a mutation of valid values, and the message it must cause;
    ``numeric`` says whether the broken values can still be held as float arrays."""
    return pytest.param(gate, expert, mutate, message, numeric, id=case_id)


BAD_PARAMETERS = [
    bad("negative variance", "softmax", "gaussian", replace_field("expert", "nu", with_entry(1, -0.1)),
        r"expert\.nu\[1\] = -0\.1: expected > 0 \(expert variances"),
    bad("zero variance", "softmax", "nonlinear-relu", replace_field("expert", "nu", with_entry(0, 0.0)),
        r"expert\.nu\[0\] = 0\.0: expected > 0"),
    bad("zero temperature", "temperature_softmax", "gaussian", replace_field("gate", "tau", 0.0),
        r"gate\.tau = 0\.0: expected > 0 \(shared temperature"),
    bad("negative temperature", "activation_temperature_softmax", "gaussian", replace_field("gate", "tau", -2.0),
        r"gate\.tau = -2\.0: expected > 0"),
    bad("zero gate weight", "gaussian", "gaussian", replace_field("gate", "weight", with_entry(2, 0.0)),
        r"gate\.weight\[2\] = 0\.0: expected > 0"),
    bad("wrong input dimension", "softmax", "gaussian", replace_field("gate", "beta1", np.zeros((3, 3))),
        r"gate\.beta1: expected shape \(3, 2\) \(k, d\), got \(3, 3\)"),
    bad("wrong number of experts", "softmax", "gaussian", replace_field("expert", "b", np.zeros(2)),
        r"expert\.b: expected shape \(3,\) \(k\), got \(2,\)"),
    bad("wrong number of classes", "softmax", "multinomial_logistic", replace_field("expert", "eta0", np.zeros((3, 3))),
        r"expert\.eta0: expected shape \(3, 2\) \(k, C-1\), got \(3, 3\)"),
    bad("wrong covariance shape", "gaussian", "gaussian", replace_field("gate", "covariance", np.ones((3, 2))),
        r"gate\.covariance: expected shape \(3, 2, 2\) \(k, d, d\), got \(3, 2\)"),
    bad("scalar for a vector", "softmax", "gaussian", replace_field("gate", "beta0", 1.0),
        r"gate\.beta0: expected shape \(3,\) \(k\), got \(\)"),
    bad("vector for a scalar", "temperature_softmax", "gaussian", replace_field("gate", "tau", [1.0, 1.0]),
        r"gate\.tau: expected shape \(\) \(a scalar\), got \(2,\)"),
    bad("NaN value", "softmax", "gaussian", replace_field("expert", "a", with_entry((1, 0), np.nan)),
        r"expert\.a\[1, 0\]: expected finite values"),
    bad("infinite value", "temperature_softmax", "gaussian", replace_field("gate", "tau", np.inf),
        r"gate\.tau: expected finite values"),
    bad("unknown field", "softmax", "gaussian", replace_field("gate", "gamma", [0.0, 0.0, 0.0]),
        r"gate: unknown parameter\(s\) \['gamma'\]"),
    bad("missing field", "softmax", "gaussian", delete_field("expert", "nu"),
        r"expert: missing parameter\(s\) \['nu'\]"),
    bad("missing temperature", "temperature_softmax", "gaussian", delete_field("gate", "tau"),
        r"gate: missing parameter\(s\) \['tau'\]"),
    bad("non-SPD covariance", "gaussian", "gaussian", replace_field("gate", "covariance", not_positive_definite),
        r"gate\.covariance\[1\]: expected a positive definite matrix"),
    bad("non-symmetric covariance", "gaussian", "gaussian", replace_field("gate", "covariance", not_symmetric),
        r"gate\.covariance: expected symmetric matrices"),
    bad("non-numeric value", "softmax", "gaussian", replace_field("expert", "b", ["a", "b", "c"]),
        r"expert\.b: expected a numeric array", numeric=False),
]


@pytest.mark.parametrize("gate_id, expert_id, mutate, message, numeric", BAD_PARAMETERS)
def test_bad_parameters_are_refused_with_the_field_named(gate_id, expert_id, mutate, message, numeric, rng):
    """Each invalid value raises ParameterError (a ValueError) whose message names the field and
    says what was expected; validate_params refuses the same values handed over as arrays."""
    family = build_family(gate_id, EXPERT_SPECS[expert_id], dim=2)
    values = random_param_values(family, rng)
    valid = mt.make_params(family, values)
    mt.validate_params(family, valid)
    mutate(values)
    with pytest.raises(mt.ParameterError, match=message):
        mt.make_params(family, values)
    if numeric:
        gate, expert = ({name: np.asarray(v, dtype=float) for name, v in values[g].items()} for g in ("gate", "expert"))
        with pytest.raises(mt.ParameterError, match=message):
            mt.validate_params(family, mt.MoEParams(gate, expert))


def test_parameter_error_is_a_value_error():
    """Callers may catch ValueError, as the brief's error contract promises."""
    assert issubclass(mt.ParameterError, ValueError)


def test_malformed_parameter_groups_are_refused(rng):
    """The top level must be exactly {"gate": ..., "expert": ...}, and each group a mapping."""
    family = build_family("softmax", "gaussian", dim=1)
    values = random_param_values(family, rng)
    with pytest.raises(mt.ParameterError, match=r"params: expected exactly the keys \['expert', 'gate'\]"):
        mt.make_params(family, {"gate": values["gate"]})
    with pytest.raises(mt.ParameterError, match=r"params: expected exactly the keys"):
        mt.make_params(family, {**values, "noise": {}})
    with pytest.raises(mt.ParameterError, match="gate: expected a mapping"):
        mt.make_params(family, {"gate": [1.0, 2.0], "expert": values["expert"]})


def refused(case_id, build, message):
    return pytest.param(build, message, id=case_id)


BAD_RECORDS = [
    refused("top-K larger than k", lambda: mt.make_family({"name": "topk_softmax", "top_k": 5}, "gaussian", 4),
            r"gate\.top_k: K = 5 exceeds the number of experts k = 4"),
    refused("top-K zero", lambda: mt.make_gate("topk_softmax", top_k=0), r"gate\.top_k: expected a positive integer"),
    refused("top-K selection key", lambda: mt.make_gate("topk_softmax", top_k_on="gate"),
            r"gate\.top_k_on: expected one of"),
    refused("unknown gate", lambda: mt.make_gate("softmin"), r"gate: unknown gate 'softmin'"),
    refused("unknown gate option", lambda: mt.make_gate("softmax", temprature="fitted"),
            r"gate: unknown option\(s\) \['temprature'\]"),
    refused("unknown score", lambda: mt.make_gate({"score": "cosine"}), r"gate\.score: unknown score 'cosine'"),
    refused("unknown normaliser", lambda: mt.Gate(normaliser="sparsemax"),
            r"gate\.normaliser: unknown normaliser 'sparsemax'"),
    refused("unknown gate activation", lambda: mt.Gate(activation="swish"),
            r"gate\.activation: unknown activation 'swish'"),
    refused("unknown transform", lambda: mt.Gate(transform="log"), r"gate\.transform: unknown transform 'log'"),
    refused("unknown temperature mode", lambda: mt.Gate(temperature="annealed"), r"gate\.temperature: expected one of"),
    refused("unknown expert", lambda: mt.make_expert("poisson"), r"expert: unknown expert 'poisson'"),
    refused("unknown expert option", lambda: mt.make_expert({"name": "gaussian", "activation": "relu"}),
            r"expert 'gaussian': unknown option"),
    refused("unknown expert activation", lambda: mt.make_expert({"name": "nonlinear", "activation": "swish"}),
            r"expert\.activation: unknown activation 'swish'"),
    refused("no experts", lambda: mt.make_family("softmax", "gaussian", 0), r"num_experts: expected .*got 0"),
    refused("negative dimension", lambda: mt.make_family("softmax", "gaussian", 2, -1), r"dim: expected .*got -1"),
    refused("non-integer experts", lambda: mt.make_family("softmax", "gaussian", 2.0),
            r"num_experts: expected .*got 2\.0"),
    refused("classifier without classes", lambda: mt.make_family("softmax", "multinomial_logistic", 2),
            r"num_classes: a multinomial_logistic expert needs an integer C ≥ 2"),
    refused("classes for a regression expert", lambda: mt.make_family("softmax", "gaussian", 2, 1, 3),
            r"num_classes: only classifier experts"),
    refused("unknown model key", lambda: mt.model_from_dict({"gate": "softmax", "params": {}, "experts": 2}),
            r"model: unknown key\(s\) \['experts'\]"),
]


@pytest.mark.parametrize("build, message", BAD_RECORDS)
def test_bad_family_choices_are_refused(build, message):
    """Invalid gate, expert and family choices raise ValueError naming the option and the choices."""
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("expert_id", list(EXPERT_SPECS))
@pytest.mark.parametrize("gate_id", GATE_PRESETS)
def test_family_records_built_twice_are_equal_and_hashable(gate_id, expert_id):
    """Two families built from the same names are equal with equal hashes (so they hit the same
    jit cache entry), yet distinct objects; changing k, d or the gate makes them unequal."""
    first = build_family(gate_id, EXPERT_SPECS[expert_id], dim=2)
    second = build_family(gate_id, EXPERT_SPECS[expert_id], dim=2)
    assert first is not second and first == second and hash(first) == hash(second)
    assert first != build_family(gate_id, EXPERT_SPECS[expert_id], num_experts=4, dim=2)
    assert first != build_family(gate_id, EXPERT_SPECS[expert_id], dim=1)
    other_gate = "sigmoid" if gate_id != "sigmoid" else "softmax"
    assert first != build_family(other_gate, EXPERT_SPECS[expert_id], dim=2)


def test_log_likelihood_compiles_once_for_equal_families(rng):
    """Equal-but-distinct family records reuse one compiled program: a Python side effect inside
    a jitted wrapper runs only when JAX traces, and log_likelihood's own cache grows by one."""
    traces = []

    def traced_log_likelihood(family, params, x, y):
        traces.append(family)
        return mt.log_likelihood(family, params, x, y)

    compiled = jax.jit(traced_log_likelihood, static_argnums=0)
    # An (n, k, d) used nowhere else, so that the cache-size check below starts from a fresh entry.
    first = build_family("softmax", "gaussian", num_experts=5, dim=3)
    second = build_family("softmax", "gaussian", num_experts=5, dim=3)
    _, params = random_params(first, rng)
    x, y = jnp.asarray(rng.normal(size=(13, 3))), jnp.asarray(rng.normal(size=13))
    cache_before = mt.log_likelihood._cache_size()
    values = [compiled(family, params, x, y) for family in (first, second, first)]
    direct = [mt.log_likelihood(family, params, x, y) for family in (first, second)]
    assert len(traces) == 1
    assert mt.log_likelihood._cache_size() == cache_before + 1
    assert float(values[0]) == float(values[1]) == float(direct[0]) == float(direct[1])


def test_model_from_dict_infers_sizes_and_matches_make_params():
    """The config layout gives the same family and parameters as make_family + make_params,
    with k and d inferred from the parameter shapes."""
    values = {
        "gate": {"beta0": [-8.0, 0.0], "beta1": [[25.0], [0.0]]},
        "expert": {"a": [[-20.0], [20.0]], "b": [15.0, -5.0], "nu": [0.09, 0.16]},
    }
    family, params = mt.model_from_dict({"gate": "softmax", "expert": "gaussian", "params": values})
    assert family == mt.make_family("softmax", "gaussian", 2, 1)
    expected = mt.make_params(family, values)
    for group in ("gate", "expert"):
        for name, value in getattr(expected, group).items():
            np.testing.assert_array_equal(getattr(params, group)[name], value)
    classifier, _ = mt.model_from_dict(
        {
            "expert": "multinomial_logistic",
            "num_classes": NUM_CLASSES,
            "params": {
                "gate": {"beta0": [0.0, 0.0, 0.0], "beta1": [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]},
                "expert": {
                    "eta0": np.zeros((3, NUM_CLASSES - 1)).tolist(),
                    "eta1": np.zeros((3, NUM_CLASSES - 1, 2)).tolist(),
                },
            },
        }
    )
    assert (classifier.num_experts, classifier.dim, classifier.num_classes) == (3, 2, NUM_CLASSES)
