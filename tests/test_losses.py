"""Tests for moe_theory.losses: Voronoi losses, per-parameter errors and density distances.

The oracles are independent of the package: a plain NumPy nested-loop Voronoi loss written from
docs/losses.md (its own canonical form, weights, block lists and exponent tables), a brute-force
grid search over translations (t₀, t₁), closed-form Hellinger and total-variation distances between
two Gaussians, scipy.integrate.quad over y for mixtures, and plain sums for class probabilities.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats

import moe_theory as mt
from moe_theory import losses
from moe_theory.gates import translate_gate

# ----------------------------------------------------------------------------------------------
# Paper 1's true model (docs/studies/paper1_softmax_gaussian.md): expert 1 (β₀, β₁, b, a, ν) = (−8, 25, 15, −20, 0.09),
# expert 2 = (0, 0, −5, 20, 0.16), the reference expert.

PAPER1_TRUTH = {
    "gate": {"beta0": np.array([-8.0, 0.0]), "beta1": np.array([[25.0], [0.0]])},
    "expert": {"a": np.array([[-20.0], [20.0]]), "b": np.array([15.0, -5.0]), "nu": np.array([0.09, 0.16])},
}


def softmax_gaussian(num_experts: int, dim: int = 1) -> mt.Family:
    return mt.make_family("softmax", "gaussian", num_experts, dim)


def to_params(values: dict) -> mt.MoEParams:
    """Raw arrays (possibly batched) to MoEParams, without schema validation."""
    return mt.MoEParams(
        {name: jnp.asarray(value) for name, value in values["gate"].items()},
        {name: jnp.asarray(value) for name, value in values["expert"].items()},
    )


def stack_values(cases: list[dict]) -> dict:
    return {
        group: {name: np.stack([case[group][name] for case in cases]) for name in cases[0][group]}
        for group in ("gate", "expert")
    }


def take_experts(values: dict, order) -> dict:
    """The same model with its experts listed in ``order`` (a subset/duplicate list is allowed)."""
    order = np.asarray(order)
    return {
        group: {name: np.asarray(value)[order] if np.ndim(value) > 0 else value for name, value in fields.items()}
        for group, fields in values.items()
    }


# ----------------------------------------------------------------------------------------------
# The NumPy reference: docs/losses.md as nested loops.

REFERENCE_FAMILIES = {
    # gate preset, expert, atom blocks (group, field), weight rule, shared blocks, canonical form
    "softmax_gaussian": dict(
        gate="softmax", expert="gaussian", blocks=[("gate", "beta1"), ("expert", "a"), ("expert", "b"), ("expert", "nu")],
        weight="exp", shared=[], canonical="reference_at_zero",
    ),
    "temperature_softmax": dict(
        gate="temperature_softmax", expert="gaussian",
        blocks=[("gate", "beta1"), ("expert", "a"), ("expert", "b"), ("expert", "nu")],
        weight="exp", shared=[("gate", "tau")], canonical="reference_at_zero",
    ),
    "gaussian_gate": dict(
        gate="gaussian", expert="gaussian",
        blocks=[("gate", "centre"), ("gate", "covariance"), ("expert", "a"), ("expert", "b"), ("expert", "nu")],
        weight="normalised", shared=[], canonical="weights_sum_to_one",
    ),
    "sigmoid_relu": dict(
        gate="sigmoid", expert={"name": "nonlinear", "activation": "relu"},
        blocks=[("gate", "beta1"), ("expert", "eta0"), ("expert", "eta1"), ("expert", "nu")],
        weight="sigmoid", shared=[], canonical="none",
    ),
    "softmax_multinomial": dict(
        gate="softmax", expert="multinomial_logistic", blocks=[("gate", "beta1"), ("expert", "eta0"), ("expert", "eta1")],
        weight="exp", shared=[], canonical="reference_at_zero",
    ),
}


def reference_exponent(table: str, block: str, cell_size: int) -> float:
    if cell_size == 1 or table == "first_order":
        return 1.0
    if table == "strongly_identifiable":
        return 2.0
    if table == "softmax_gaussian":  # [1]: β₁, b get r̄(m); a, ν get r̄(m)/2; r̄(2)=4, r̄(3)=6, unknown beyond
        rbar = {2: 4.0, 3: 6.0}.get(cell_size)
        if rbar is None:
            return math.nan
        return rbar if block in ("beta1", "b") else rbar / 2
    if table == "unknown_multi_atom":
        return math.nan
    raise KeyError(table)


def reference_canonical(description: dict, values: dict) -> dict:
    gate = {name: np.array(value, dtype=float) for name, value in values["gate"].items()}
    if description["canonical"] == "reference_at_zero":
        gate["beta0"] = gate["beta0"] - gate["beta0"][-1]
        gate["beta1"] = gate["beta1"] - gate["beta1"][-1]
    elif description["canonical"] == "weights_sum_to_one":
        gate["weight"] = gate["weight"] / gate["weight"].sum()
    return {"gate": gate, "expert": values["expert"]}


def reference_weights(description: dict, gate: dict) -> list[float]:
    if description["weight"] == "exp":
        return [math.exp(v) for v in gate["beta0"]]
    if description["weight"] == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in gate["beta0"]]
    total = sum(gate["weight"])
    return [v / total for v in gate["weight"]]


def reference_voronoi_loss(description: dict, fitted: dict, truth: dict, table: str, translation: str) -> dict:
    """D(G, G*) by loops: canonical truth, Voronoi cells (ties to the lowest true index), the loss."""
    truth = reference_canonical(description, truth)
    true_weights = reference_weights(description, truth["gate"])
    weights = reference_weights(description, fitted["gate"])
    if translation == "mass" and description["weight"] == "exp":
        scale = sum(true_weights) / sum(weights)
        weights = [w * scale for w in weights]
    num_fitted, num_true = len(weights), len(true_weights)

    def block_distance(group, name, i, j):
        difference = np.ravel(np.asarray(fitted[group][name][i], dtype=float) - np.asarray(truth[group][name][j], dtype=float))
        return math.sqrt(sum(float(v) ** 2 for v in difference))

    assignment = []
    for i in range(num_fitted):
        best, best_distance = 0, math.inf
        for j in range(num_true):
            distance = sum(block_distance(group, name, i, j) for group, name in description["blocks"])
            if distance < best_distance:  # strict: a tie keeps the lower index
                best, best_distance = j, distance
        assignment.append(best)
    cells = [[i for i in range(num_fitted) if assignment[i] == j] for j in range(num_true)]
    mass = sum(abs(sum(weights[i] for i in cells[j]) - true_weights[j]) for j in range(num_true))
    atom, undefined = 0.0, False
    for j in range(num_true):
        for i in cells[j]:
            for group, name in description["blocks"]:
                exponent = reference_exponent(table, name, len(cells[j]))
                if math.isnan(exponent):
                    undefined = True
                    continue
                atom += weights[i] * block_distance(group, name, i, j) ** exponent
    shared = sum(
        float(np.sum(np.abs(np.asarray(fitted[group][name]) - np.asarray(truth[group][name]))))
        for group, name in description["shared"]
    )
    loss = math.nan if undefined else mass + atom + shared
    return dict(loss=loss, mass=mass, sizes=[len(c) for c in cells], undefined=undefined, assignment=assignment)


def reference_family(description: dict, num_experts: int, dim: int) -> mt.Family:
    num_classes = 3 if description["expert"] == "multinomial_logistic" else None
    return mt.make_family(description["gate"], description["expert"], num_experts, dim, num_classes)


def random_truth(description: dict, num_experts: int, dim: int, rng: np.random.Generator) -> dict:
    family = reference_family(description, num_experts, dim)
    values = {}
    for group, fields in family.fields.items():
        values[group] = {}
        for field in fields:
            shape = family.field_shape(field)
            if field.constraint == "positive":
                values[group][field.name] = rng.uniform(0.3, 1.5, size=shape)
            elif field.constraint == "positive_definite":
                factor = rng.normal(size=shape)
                values[group][field.name] = factor @ np.swapaxes(factor, -1, -2) / dim + 0.3 * np.eye(dim)
            else:
                values[group][field.name] = 2.0 * rng.normal(size=shape)
    return values


def random_fit_near(truth: dict, num_fitted: int, noise: float, rng: np.random.Generator, source=None) -> dict:
    """Fitted experts copied from random (or given) true experts, every entry perturbed."""
    num_true = len(next(iter(truth["expert"].values())))
    source = rng.integers(0, num_true, size=num_fitted) if source is None else np.asarray(source)
    fitted = {}
    for group, fields in truth.items():
        fitted[group] = {}
        for name, value in fields.items():
            value = np.asarray(value, dtype=float)
            if value.ndim == 0:  # τ
                fitted[group][name] = value * math.exp(noise * rng.normal())
            elif name in ("nu", "weight"):  # positive: perturb multiplicatively
                fitted[group][name] = value[source] * np.exp(noise * rng.normal(size=value[source].shape))
            elif name == "covariance":  # keep it symmetric
                perturbation = 0.05 * noise * rng.normal(size=value[source].shape)
                fitted[group][name] = value[source] + perturbation + np.swapaxes(perturbation, -1, -2)
            else:
                fitted[group][name] = value[source] + noise * rng.normal(size=value[source].shape)
    if "beta0" in fitted["gate"]:
        fitted["gate"]["beta0"] = fitted["gate"]["beta0"] - np.log(np.bincount(source, minlength=num_true)[source])
    return fitted


# (family, k*, k, d, table, translation): every table and option, cells of size 1..4, d = 1 and 2.
REFERENCE_CASES = [
    ("softmax_gaussian", 2, 2, 1, "first_order", "none"),
    ("softmax_gaussian", 2, 3, 1, "softmax_gaussian", "mass"),
    ("softmax_gaussian", 1, 4, 2, "softmax_gaussian", "none"),
    ("softmax_gaussian", 3, 6, 2, "softmax_gaussian", "mass"),
    ("softmax_gaussian", 2, 5, 1, "strongly_identifiable", "none"),
    ("temperature_softmax", 2, 3, 1, "unknown_multi_atom", "mass"),
    ("gaussian_gate", 3, 4, 2, "strongly_identifiable", "mass"),
    ("sigmoid_relu", 2, 4, 2, "strongly_identifiable", "mass"),
    ("softmax_multinomial", 2, 3, 1, "first_order", "none"),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: f"{c[0]}-k*{c[1]}-k{c[2]}-d{c[3]}-{c[4]}-{c[5]}")
def test_voronoi_loss_matches_numpy_loops(case):
    name, num_true, num_fitted, dim, table, translation = case
    description = REFERENCE_FAMILIES[name]
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    family = reference_family(description, num_true, dim)
    num_cases = 12
    truths = [random_truth(description, num_true, dim, rng) for _ in range(num_cases)]
    # Half near the truth (cells of every size), half far away (cells decided by large distances).
    fits = [random_fit_near(truth, num_fitted, 0.3 if c % 2 else 3.0, rng) for c, truth in enumerate(truths)]
    compute = jax.vmap(lambda f, t: losses.voronoi_loss(family, f, t, exponents=table, translation=translation))
    result = compute(to_params(stack_values(fits)), to_params(stack_values(truths)))
    for c in range(num_cases):
        expected = reference_voronoi_loss(description, fits[c], truths[c], table, translation)
        assert list(np.asarray(result.assignment[c])) == expected["assignment"]
        assert list(np.asarray(result.cell_sizes[c])) == expected["sizes"]
        assert bool(result.undefined[c]) == expected["undefined"]
        assert float(result.mass[c]) == pytest.approx(expected["mass"], rel=1e-10, abs=1e-12)
        if expected["undefined"]:
            assert math.isnan(float(result.loss[c]))
        else:
            assert float(result.loss[c]) == pytest.approx(expected["loss"], rel=1e-10, abs=1e-12)


def test_ties_go_to_the_lowest_true_index():
    description = REFERENCE_FAMILIES["softmax_gaussian"]
    truth = {
        "gate": {"beta0": np.array([0.0, 0.0]), "beta1": np.array([[0.0], [0.0]])},
        "expert": {"a": np.array([[1.0], [1.0]]), "b": np.array([-1.0, 1.0]), "nu": np.array([0.5, 0.5])},
    }
    fitted = take_experts(truth, [0, 0])
    fitted["expert"]["b"] = np.array([0.0, 0.0])  # equidistant from both true atoms
    result = losses.voronoi_loss(softmax_gaussian(2), to_params(fitted), to_params(truth), translation="none")
    assert list(np.asarray(result.assignment)) == [0, 0]
    assert list(np.asarray(result.cell_sizes)) == [2, 0]
    expected = reference_voronoi_loss(description, fitted, truth, "softmax_gaussian", "none")
    assert float(result.loss) == pytest.approx(expected["loss"], rel=1e-12)
    # The empty cell contributes only its mass term w*_2 = 1.
    assert float(result.mass) == pytest.approx(abs(2.0 - 1.0) + 1.0)


# ----------------------------------------------------------------------------------------------
# Invariances and the infimum over translations.


def near_truth_batch(num_fitted: int, num_cases: int, noise: float, seed: int, source=None) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    fits = [random_fit_near(PAPER1_TRUTH, num_fitted, noise, rng, source) for _ in range(num_cases)]
    return stack_values(fits), fits


def test_zero_at_the_truth_for_every_reference_family():
    rng = np.random.default_rng(0)
    for name, description in REFERENCE_FAMILIES.items():
        truth = random_truth(description, 3, 2, rng)
        family = reference_family(description, 3, 2)
        result = losses.exact_fitted_loss(family, to_params(truth), to_params(truth), translation="none", canonical_truth=False)
        assert float(result.loss) == pytest.approx(0.0, abs=1e-12), name
        assert list(np.asarray(result.assignment)) == [0, 1, 2]
    truth = to_params(PAPER1_TRUTH)
    for translation in losses.TRANSLATIONS:
        result = losses.voronoi_loss(softmax_gaussian(2), truth, truth, translation=translation)
        assert float(result.loss) == pytest.approx(0.0, abs=1e-12)


def test_infimum_is_invariant_to_permuting_and_translating_the_fitted_gate():
    family = softmax_gaussian(2)
    values, fits = near_truth_batch(num_fitted=3, num_cases=8, noise=0.2, seed=1)
    rng = np.random.default_rng(2)
    permutations = [rng.permutation(3) for _ in fits]
    permuted = stack_values([take_experts(fit, order) for fit, order in zip(fits, permutations)])
    shifts, slope_shifts = rng.normal(scale=3.0, size=len(fits)), rng.normal(scale=10.0, size=(len(fits), 1))
    translate = jax.vmap(lambda gate, shift, slope_shift: translate_gate(family.gate, gate, shift, slope_shift))
    translated_gate = translate(to_params(values).gate, shifts, slope_shifts)
    truth = to_params(PAPER1_TRUTH)
    base = losses.voronoi_loss(family, to_params(values), truth)
    after_permutation = losses.voronoi_loss(family, to_params(permuted), truth)
    after_translation = losses.voronoi_loss(family, mt.MoEParams(translated_gate, to_params(values).expert), truth)
    assert np.all(np.asarray(base.loss) > 1e-4)
    np.testing.assert_allclose(after_permutation.loss, base.loss, rtol=1e-9)
    np.testing.assert_allclose(after_translation.loss, base.loss, rtol=1e-9)
    for c, order in enumerate(permutations):
        np.testing.assert_array_equal(np.asarray(after_permutation.assignment[c]), np.asarray(base.assignment[c])[order])
    # The translation found absorbs the one applied.
    np.testing.assert_allclose(after_translation.shift + shifts, base.shift, atol=1e-8)
    np.testing.assert_allclose(after_translation.slope_shift + slope_shifts, base.slope_shift, atol=1e-8)


def grid_loss_softmax_gaussian(fitted: dict, truth: dict, table: str, shifts: np.ndarray, slope_shifts: np.ndarray) -> np.ndarray:
    """Vectorised NumPy D(G_{t₀,t₁}, G*) for d = 1 over a grid of translations (shifts, slope_shifts: (G,))."""
    truth = reference_canonical(REFERENCE_FAMILIES["softmax_gaussian"], truth)
    true_weights = np.exp(truth["gate"]["beta0"])
    weights = np.exp(fitted["gate"]["beta0"])[None, :] * np.exp(shifts)[:, None]  # (G, k)
    beta1 = fitted["gate"]["beta1"][None, :, 0] + slope_shifts[:, None]  # (G, k)
    distances = {"beta1": np.abs(beta1[:, :, None] - truth["gate"]["beta1"][None, None, :, 0])}
    distances["a"] = np.abs(fitted["expert"]["a"][:, None, 0] - truth["expert"]["a"][None, :, 0])[None]
    for name in ("b", "nu"):
        distances[name] = np.abs(fitted["expert"][name][:, None] - truth["expert"][name][None, :])[None]
    total = sum(np.broadcast_to(d, distances["beta1"].shape) for d in distances.values())
    assignment = np.argmin(total, axis=2)  # (G, k); NumPy's argmin also returns the first minimum
    num_true = true_weights.size
    one_hot = assignment[:, :, None] == np.arange(num_true)[None, None, :]
    sizes = one_hot.sum(axis=1)  # (G, k*)
    loss = np.abs(np.einsum("gk,gkj->gj", weights, one_hot) - true_weights[None, :]).sum(axis=1)
    own_size = np.take_along_axis(sizes, assignment, axis=1)
    for name, distance in distances.items():
        own = np.take_along_axis(np.broadcast_to(distance, total.shape), assignment[:, :, None], axis=2)[..., 0]
        by_size = np.array([1.0] + [reference_exponent(table, name, m) for m in range(1, assignment.shape[1] + 1)])
        loss = loss + np.sum(weights * own ** by_size[own_size], axis=1)
    return loss


def brute_force_infimum(fitted: dict, truth: dict, table: str) -> float:
    """A fine grid over (t₀, t₁), then six zooms around its best point (final spacing ~1e-10)."""
    true_mass = np.exp(truth["gate"]["beta0"] - truth["gate"]["beta0"][-1]).sum()
    centre_shift = math.log(true_mass / np.exp(fitted["gate"]["beta0"]).sum())
    shifts, slope_shifts = np.meshgrid(np.linspace(centre_shift - 2.0, centre_shift + 2.0, 81), np.linspace(-3.0, 3.0, 1201))
    values = grid_loss_softmax_gaussian(fitted, truth, table, shifts.ravel(), slope_shifts.ravel())
    index = int(np.argmin(values))
    best = float(values[index])
    centre_shift, centre_slope = float(shifts.ravel()[index]), float(slope_shifts.ravel()[index])
    shift_radius, slope_radius = 0.1, 0.01
    for _ in range(6):
        shifts, slope_shifts = np.meshgrid(
            np.linspace(centre_shift - shift_radius, centre_shift + shift_radius, 161),
            np.linspace(centre_slope - slope_radius, centre_slope + slope_radius, 161),
        )
        values = grid_loss_softmax_gaussian(fitted, truth, table, shifts.ravel(), slope_shifts.ravel())
        index = int(np.argmin(values))
        best = min(best, float(values[index]))
        centre_shift, centre_slope = float(shifts.ravel()[index]), float(slope_shifts.ravel()[index])
        shift_radius, slope_radius = shift_radius / 20.0, slope_radius / 20.0
    return best


def test_infimum_matches_a_brute_force_grid_search():
    family = softmax_gaussian(2)
    truth = to_params(PAPER1_TRUTH)
    # Over-fitted fits (cells of size 1 and 2, exponents 1, 2 and 4): the optimum balances the kinks
    # of the size-1 terms against the smooth size-2 terms.
    values, fits = near_truth_batch(num_fitted=3, num_cases=8, noise=0.1, seed=3)
    result = losses.voronoi_loss(family, to_params(values), truth)
    for c, fit in enumerate(fits):
        grid_best = brute_force_infimum(fit, PAPER1_TRUTH, "softmax_gaussian")
        found = float(result.loss[c])
        assert found <= grid_best + 1e-12
        assert found == pytest.approx(grid_best, rel=1e-7)
        # The value is attained: the loss without translation at the returned translation equals it.
        shift, slope_shift = np.array([float(result.shift[c])]), np.asarray(result.slope_shift[c])
        replayed = grid_loss_softmax_gaussian(fit, PAPER1_TRUTH, "softmax_gaussian", shift, slope_shift)
        assert found == pytest.approx(float(replayed[0]), rel=1e-10, abs=1e-12)


def test_perfect_over_fit_of_the_reference_expert_is_zero_only_with_translation():
    """Split paper 1's reference expert into two equal halves and put the fit in the authors'
    convention (last fitted expert at 0): the model is the truth, but "none" stays near 1."""
    family = softmax_gaussian(2)
    split = take_experts(PAPER1_TRUTH, [0, 1, 1])
    split["gate"]["beta0"] = np.array([-8.0, math.log(0.5), math.log(0.5)])
    canonical_gate = {"beta0": split["gate"]["beta0"] - split["gate"]["beta0"][-1], "beta1": split["gate"]["beta1"]}
    canonical = {"gate": canonical_gate, "expert": split["expert"]}
    fitted, truth = to_params(canonical), to_params(PAPER1_TRUTH)
    assert float(losses.voronoi_loss(family, fitted, truth).loss) == pytest.approx(0.0, abs=1e-12)
    assert float(losses.voronoi_loss(family, fitted, truth, translation="mass").loss) == pytest.approx(0.0, abs=1e-12)
    uncorrected = losses.voronoi_loss(family, fitted, truth, translation="none")
    assert float(uncorrected.loss) == pytest.approx(1.0, abs=1e-3)
    assert list(np.asarray(uncorrected.cell_sizes)) == [1, 2]
    distances = losses.density_distances(jax.random.PRNGKey(0), family, fitted, truth, num_inputs=64)
    assert float(distances.hellinger) < 1e-12 and float(distances.total_variation) < 1e-12


@pytest.mark.parametrize("num_experts", [3, 4])
def test_infimum_is_never_above_the_mass_and_no_translation(num_experts):
    """The infimum's search includes t₁ = 0, where "mass" and "none" sit, and minimises t₀ exactly:
    on random fits near paper 1's truth (perturbations from 1e-6 to 1, so that some cells are tight)
    and on the split reference expert in the authors' convention, under both exponent tables."""
    family = softmax_gaussian(num_experts)
    truth = to_params(PAPER1_TRUTH)
    rng = np.random.default_rng(num_experts)
    replicates = 200
    order = [0] + [1] * (num_experts - 1)
    scale = rng.choice([1e-6, 1e-3, 0.1, 1.0], size=(replicates, 1))
    beta0 = np.asarray(PAPER1_TRUTH["gate"]["beta0"])[order] + scale * rng.normal(size=(replicates, num_experts))
    beta1 = np.asarray(PAPER1_TRUTH["gate"]["beta1"])[order][None] + scale[:, :, None] * rng.normal(size=(replicates, num_experts, 1))
    expert = {
        "a": np.asarray(PAPER1_TRUTH["expert"]["a"])[order][None] + 0.1 * rng.normal(size=(replicates, num_experts, 1)),
        "b": np.asarray(PAPER1_TRUTH["expert"]["b"])[order][None] + 0.1 * rng.normal(size=(replicates, num_experts)),
        "nu": np.asarray(PAPER1_TRUTH["expert"]["nu"])[order][None] * np.exp(0.1 * rng.normal(size=(replicates, num_experts))),
    }
    fitted = to_params({"gate": {"beta0": beta0 - beta0[:, -1:], "beta1": beta1 - beta1[:, -1:]}, "expert": expert})
    split = take_experts(PAPER1_TRUTH, order)
    split["gate"]["beta0"] = np.array([-8.0 + math.log(num_experts - 1)] + [0.0] * (num_experts - 1))
    for exponents in ("first_order", "softmax_gaussian"):
        values = {
            translation: np.asarray(losses.voronoi_loss(family, fitted, truth, translation=translation, exponents=exponents).loss)
            for translation in ("infimum", "mass", "none")
        }
        bound = np.minimum(values["mass"], values["none"])
        assert np.all(values["infimum"] <= bound * (1 + 1e-12)), np.max(values["infimum"] - bound)
        exact = losses.voronoi_loss(family, to_params(split), truth, exponents=exponents)
        assert float(exact.loss) <= 1e-12


def test_loss_grows_monotonically_as_one_fitted_atom_moves_away():
    """Move one half of a split reference expert along b: in a cell of size 2 the intercept enters
    as w·|δ|^{r̄(2)} = ½δ⁴ (softmax_gaussian table) or ½|δ| (first order)."""
    family = softmax_gaussian(2)
    offsets = np.concatenate([np.linspace(0.0, 1.1, 7), [10.0]])
    cases = []
    for offset in offsets:
        fit = take_experts(PAPER1_TRUTH, [0, 1, 1])
        fit["gate"]["beta0"] = np.array([-8.0, math.log(0.5), math.log(0.5)])
        fit["expert"]["b"] = fit["expert"]["b"] + np.array([0.0, 0.0, offset])
        cases.append(fit)
    fitted, truth = to_params(stack_values(cases)), to_params(PAPER1_TRUTH)
    values = np.asarray(losses.voronoi_loss(family, fitted, truth).loss)
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(values[:-1]) > 0)
    np.testing.assert_allclose(values[:-1], 0.5 * offsets[:-1] ** 4, rtol=1e-9, atol=1e-15)
    # Far away the infimum saturates: shrinking all fitted mass (t₀ → −∞) costs only Σ_j w*_j.
    assert values[-1] == pytest.approx(1.0 + math.exp(-8.0), rel=1e-12)
    first_order = np.asarray(losses.voronoi_loss(family, fitted, truth, exponents="first_order", translation="mass").loss)
    np.testing.assert_allclose(first_order, 0.5 * offsets, rtol=1e-9, atol=1e-15)


def test_cells_of_size_four_are_undefined_under_the_softmax_gaussian_table():
    family = softmax_gaussian(2)
    one_true = take_experts(PAPER1_TRUTH, [1])
    values, _ = near_truth_batch(num_fitted=4, num_cases=3, noise=0.1, seed=4, source=[1, 1, 1, 1])
    result = losses.voronoi_loss(family, to_params(values), to_params(one_true))
    assert np.all(np.asarray(result.undefined)) and np.all(np.isnan(np.asarray(result.loss)))
    assert np.all(np.isfinite(np.asarray(result.mass)))
    np.testing.assert_array_equal(np.asarray(result.cell_sizes), 4)
    # Four atoms in one cell of two: still undefined; a size-3 cell (r̄(3) = 6) is defined.
    values, _ = near_truth_batch(num_fitted=5, num_cases=2, noise=0.1, seed=5, source=[0, 1, 1, 1, 1])
    four_in_one = losses.voronoi_loss(family, to_params(values), to_params(PAPER1_TRUTH), translation="none")
    assert np.all(np.asarray(four_in_one.undefined))
    values, _ = near_truth_batch(num_fitted=4, num_cases=2, noise=0.1, seed=6, source=[0, 1, 1, 1])
    defined = losses.voronoi_loss(family, to_params(values), to_params(PAPER1_TRUTH), translation="none")
    assert not np.any(np.asarray(defined.undefined)) and np.all(np.isfinite(np.asarray(defined.loss)))
    # The strongly identifiable table knows every size.
    strong = losses.voronoi_loss(
        family, to_params(values), to_params(one_true), exponents="strongly_identifiable", translation="none"
    )
    assert np.all(np.isfinite(np.asarray(strong.loss)))


def test_vmap_over_replicates_equals_a_python_loop():
    family = softmax_gaussian(2)
    values, fits = near_truth_batch(num_fitted=3, num_cases=8, noise=0.2, seed=7)
    truth = to_params(PAPER1_TRUTH)
    batched = losses.voronoi_loss(family, to_params(values), truth)
    errors = losses.parameter_errors(family, to_params(values), truth)
    for c, fit in enumerate(fits):
        single = losses.voronoi_loss(family, to_params(fit), truth)
        for field in losses.VoronoiLoss._fields:
            expected = np.asarray(getattr(single, field))
            np.testing.assert_allclose(np.asarray(getattr(batched, field)[c]), expected, rtol=1e-12, atol=1e-14)
        single_errors = losses.parameter_errors(family, to_params(fit), truth)
        for block, value in single_errors.max_error.items():
            np.testing.assert_allclose(np.asarray(errors.max_error[block][c]), np.asarray(value), rtol=1e-12)
    key = jax.random.PRNGKey(3)
    distances = losses.density_distances(key, family, to_params(values), truth, num_inputs=50)
    for c, fit in enumerate(fits):
        single = losses.density_distances(key, family, to_params(fit), truth, num_inputs=50)
        for field in losses.DensityDistances._fields:
            np.testing.assert_allclose(np.asarray(getattr(distances, field)[c]), np.asarray(getattr(single, field)), rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Per-parameter errors.


def test_parameter_errors_per_cell():
    family = softmax_gaussian(2)
    fit = take_experts(PAPER1_TRUTH, [0, 1, 1])
    fit["gate"]["beta0"] = np.array([-8.0, math.log(0.25), math.log(0.5)])
    fit["expert"]["b"] = PAPER1_TRUTH["expert"]["b"][[0, 1, 1]] + np.array([0.1, -0.2, 0.4])
    fit["expert"]["nu"] = PAPER1_TRUTH["expert"]["nu"][[0, 1, 1]] + np.array([0.0, 0.01, 0.03])
    errors = losses.parameter_errors(family, to_params(fit), to_params(PAPER1_TRUTH), translation="none")
    np.testing.assert_array_equal(np.asarray(errors.cell_sizes), [1, 2])
    np.testing.assert_allclose(errors.max_error["b"], [0.1, 0.4], rtol=1e-12)
    np.testing.assert_allclose(errors.mean_error["b"], [0.1, 0.3], rtol=1e-12)
    np.testing.assert_allclose(errors.max_error["nu"], [0.0, 0.03], atol=1e-15)
    np.testing.assert_allclose(errors.mean_error["a"], [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(errors.cell_mass, [math.exp(-8.0), 0.75], rtol=1e-12)
    np.testing.assert_allclose(errors.true_mass, [math.exp(-8.0), 1.0], rtol=1e-12)
    np.testing.assert_allclose(errors.mass_error, [0.0, 0.25], atol=1e-15)
    # An empty cell has no fitted atom: NaN errors, zero mass; its mass term is w*_j.
    only_first = take_experts(PAPER1_TRUTH, [0])
    empty = losses.parameter_errors(family, to_params(only_first), to_params(PAPER1_TRUTH), translation="none")
    assert np.asarray(empty.cell_sizes).tolist() == [1, 0]
    assert math.isnan(float(empty.max_error["b"][1])) and math.isnan(float(empty.mean_error["a"][1]))
    assert float(empty.cell_mass[1]) == 0.0
    # τ gets its own error term.
    temperature = mt.make_family("temperature_softmax", "gaussian", 2, 1)
    true_values = {"gate": dict(PAPER1_TRUTH["gate"], tau=np.array(0.5)), "expert": PAPER1_TRUTH["expert"]}
    fitted_values = {"gate": dict(PAPER1_TRUTH["gate"], tau=np.array(0.8)), "expert": PAPER1_TRUTH["expert"]}
    tau_errors = losses.parameter_errors(temperature, to_params(fitted_values), to_params(true_values))
    assert float(tau_errors.shared_error["tau"]) == pytest.approx(0.3)
    assert float(losses.voronoi_loss(temperature, to_params(fitted_values), to_params(true_values)).loss) == pytest.approx(0.3)


def test_default_tables_and_atom_specs():
    assert losses.default_exponent_table(softmax_gaussian(3)).name == "softmax_gaussian"
    for gate in ("sigmoid", "topk_softmax", "temperature_softmax", "gaussian", "euclidean_softmax"):
        assert losses.default_exponent_table(mt.make_family(gate, "gaussian", 3)).name == "unknown_multi_atom"
    spec = losses.atom_spec(softmax_gaussian(2))
    assert spec.block_names == ("beta1", "a", "b", "nu") and spec.weight == "exp_offset" and spec.shared == ()
    gaussian_gate = losses.atom_spec(mt.make_family("gaussian", "gaussian", 2))
    assert gaussian_gate.block_names == ("centre", "covariance", "a", "b", "nu") and gaussian_gate.weight == "normalised"
    assert losses.atom_spec(mt.make_family("temperature_softmax", "gaussian", 2)).shared == (losses.Block("tau", "gate"),)
    assert losses.atom_spec(mt.make_family("sigmoid", "gaussian", 2)).weight == "sigmoid_offset"
    table = losses.EXPONENT_TABLES["softmax_gaussian"]
    assert [table.exponent("beta1", m) for m in (1, 2, 3, 4)] == [1.0, 4.0, 6.0, None]
    assert [table.exponent("nu", m) for m in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, None]


def test_invalid_options_are_rejected_with_a_clear_message():
    family, truth = softmax_gaussian(2), to_params(PAPER1_TRUTH)
    with pytest.raises(ValueError, match="translation"):
        losses.voronoi_loss(family, truth, truth, translation="canonical")
    with pytest.raises(ValueError, match="exponents"):
        losses.voronoi_loss(family, truth, truth, exponents="made_up")
    with pytest.raises(ValueError, match="weight"):
        losses.voronoi_loss(family, truth, truth, weight="softmax")
    with pytest.raises(ValueError, match="names block"):
        gaussian_gate = mt.make_family("gaussian", "gaussian", 2)
        losses.voronoi_loss(gaussian_gate, truth, truth, exponents="softmax_gaussian")
    with pytest.raises(ValueError, match="k = k\\*"):
        losses.exact_fitted_loss(family, to_params(take_experts(PAPER1_TRUTH, [0, 1, 1])), truth)
    with pytest.raises(ValueError, match="unbatched"):
        losses.voronoi_loss(family, truth, to_params(stack_values([PAPER1_TRUTH, PAPER1_TRUTH])))


# ----------------------------------------------------------------------------------------------
# Density distances.


def closed_form_hellinger(mean1, sd1, mean2, sd2):
    squared = 1.0 - np.sqrt(2 * sd1 * sd2 / (sd1**2 + sd2**2)) * np.exp(-((mean1 - mean2) ** 2) / (4 * (sd1**2 + sd2**2)))
    return np.sqrt(squared)


def closed_form_total_variation(mean1, sd1, mean2, sd2):
    """½∫|p − q| for two normals: log p − log q is quadratic in y, so the sign changes at ≤ 2 roots
    and TV = ½ Σ_intervals |P(interval) − Q(interval)| with normal CDFs."""
    quadratic = 1 / (2 * sd2**2) - 1 / (2 * sd1**2)
    linear = mean1 / sd1**2 - mean2 / sd2**2
    constant = mean2**2 / (2 * sd2**2) - mean1**2 / (2 * sd1**2) + math.log(sd2 / sd1)
    roots = np.sort(np.roots([quadratic, linear, constant]).real) if quadratic != 0 else np.array([-constant / linear])
    edges = np.concatenate([[-np.inf], roots, [np.inf]])
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        first = scipy.stats.norm.cdf(high, mean1, sd1) - scipy.stats.norm.cdf(low, mean1, sd1)
        second = scipy.stats.norm.cdf(high, mean2, sd2) - scipy.stats.norm.cdf(low, mean2, sd2)
        total += abs(first - second)
    return 0.5 * total


def single_gaussian(mean, variance) -> dict:
    return {
        "gate": {"beta0": np.zeros(1), "beta1": np.zeros((1, 1))},
        "expert": {"a": np.zeros((1, 1)), "b": np.array([mean]), "nu": np.array([variance])},
    }


def test_density_distances_match_closed_forms_for_two_gaussians():
    family = softmax_gaussian(1)
    truth_mean, truth_sd = 0.3, 0.7
    means = np.array([0.3, 0.35, 1.0, -2.0, 0.3, 5.0, 40.0])
    sds = np.array([0.7, 0.7, 0.7, 0.7, 1.9, 0.01, 0.2])
    fitted = to_params(stack_values([single_gaussian(m, s**2) for m, s in zip(means, sds)]))
    truth = to_params(single_gaussian(truth_mean, truth_sd**2))
    result = losses.density_distances(jax.random.PRNGKey(0), family, fitted, truth, num_inputs=4)
    np.testing.assert_allclose(result.hellinger, closed_form_hellinger(means, sds, truth_mean, truth_sd), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(result.hellinger_se, 0.0, atol=1e-12)
    equal = sds == truth_sd
    expected_tv = 2 * scipy.stats.norm.cdf(np.abs(means[equal] - truth_mean) / (2 * truth_sd)) - 1
    np.testing.assert_allclose(np.asarray(result.total_variation)[equal], expected_tv, rtol=1e-9, atol=1e-12)
    unequal = ~equal
    general_tv = [closed_form_total_variation(m, s, truth_mean, truth_sd) for m, s in zip(means[unequal], sds[unequal])]
    np.testing.assert_allclose(np.asarray(result.total_variation)[unequal], general_tv, rtol=1e-9)
    assert float(result.hellinger[0]) == 0.0 and float(result.total_variation[0]) == 0.0
    values = np.concatenate([np.asarray(result.hellinger), np.asarray(result.total_variation)])
    assert np.all((values >= 0) & (values <= 1))
    assert float(result.total_variation[-1]) == pytest.approx(1.0, abs=1e-12)


def reference_mixture_density(values: dict, x: float, y: float) -> float:
    """p(y | x) of a d = 1 softmax-gated Gaussian MoE, from the formulas."""
    scores = values["gate"]["beta0"] + values["gate"]["beta1"][:, 0] * x
    gate = np.exp(scores - scipy.special.logsumexp(scores))
    means = values["expert"]["a"][:, 0] * x + values["expert"]["b"]
    return float(np.sum(gate * scipy.stats.norm.pdf(y, means, np.sqrt(values["expert"]["nu"]))))


def test_density_distances_of_mixtures_match_scipy_quad():
    family = softmax_gaussian(2)
    rng = np.random.default_rng(8)
    fit = random_fit_near(PAPER1_TRUTH, 3, 0.3, rng, source=[0, 1, 1])
    inputs = mt.make_inputs("grid")
    num_inputs = 3
    result = losses.density_distances(jax.random.PRNGKey(0), family, to_params(fit), to_params(PAPER1_TRUTH), inputs, num_inputs)
    hellinger, total_variation = [], []
    for x in np.linspace(0.0, 1.0, num_inputs):
        def p(y):
            return reference_mixture_density(fit, x, y)

        def q(y):
            return reference_mixture_density(PAPER1_TRUTH, x, y)

        expert_means = [values["expert"]["a"][:, 0] * x + values["expert"]["b"] for values in (fit, PAPER1_TRUTH)]
        breakpoints = sorted(set(np.concatenate(expert_means)))
        options = dict(points=breakpoints, limit=200, epsabs=1e-13, epsrel=1e-11)
        squared = 0.5 * scipy.integrate.quad(lambda y: (math.sqrt(p(y)) - math.sqrt(q(y))) ** 2, -60, 70, **options)[0]
        hellinger.append(math.sqrt(squared))
        total_variation.append(0.5 * scipy.integrate.quad(lambda y: abs(p(y) - q(y)), -60, 70, **options)[0])
    assert float(result.hellinger) == pytest.approx(np.mean(hellinger), rel=1e-7)
    assert float(result.total_variation) == pytest.approx(np.mean(total_variation), rel=1e-7)
    assert float(result.hellinger_se) == pytest.approx(np.std(hellinger, ddof=1) / math.sqrt(num_inputs), rel=1e-6)


def test_density_distances_for_multinomial_experts_are_exact_class_sums():
    family = mt.make_family("softmax", "multinomial_logistic", 2, 2, num_classes=3)
    rng = np.random.default_rng(9)
    description = REFERENCE_FAMILIES["softmax_multinomial"]
    truth = random_truth(description, 2, 2, rng)
    fit = random_fit_near(truth, 3, 0.5, rng)
    inputs = mt.make_inputs({"name": "normal", "std": 1.0})
    key = jax.random.PRNGKey(4)
    result = losses.density_distances(key, family, to_params(fit), to_params(truth), inputs, 200)
    x = np.asarray(inputs.draw(key, 200, 2, jnp.float64, to_params(truth)))

    def class_probabilities(values, point):
        scores = values["gate"]["beta0"] + values["gate"]["beta1"] @ point
        gate = np.exp(scores - scipy.special.logsumexp(scores))
        logits = np.concatenate([values["expert"]["eta0"] + values["expert"]["eta1"] @ point, np.zeros((len(gate), 1))], axis=1)
        return gate @ scipy.special.softmax(logits, axis=1)

    hellinger, total_variation = [], []
    for point in x:
        p, q = class_probabilities(fit, point), class_probabilities(truth, point)
        hellinger.append(math.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)))
        total_variation.append(0.5 * np.sum(np.abs(p - q)))
    assert float(result.hellinger) == pytest.approx(np.mean(hellinger), rel=1e-10)
    assert float(result.total_variation) == pytest.approx(np.mean(total_variation), rel=1e-10)
    assert float(result.total_variation_se) == pytest.approx(np.std(total_variation, ddof=1) / math.sqrt(200), rel=1e-8)


def test_density_distances_lie_in_the_unit_interval_and_vanish_at_the_truth():
    family = softmax_gaussian(2)
    rng = np.random.default_rng(10)
    fits = [random_fit_near(PAPER1_TRUTH, 3, noise, rng) for noise in (0.01, 0.3, 3.0, 30.0)]
    fits.append(take_experts(PAPER1_TRUTH, [0, 1, 1]))
    fits[-1]["gate"]["beta0"] = np.array([-8.0, math.log(0.5), math.log(0.5)])
    fitted = to_params(stack_values(fits))
    result = losses.density_distances(jax.random.PRNGKey(1), family, fitted, to_params(PAPER1_TRUTH), num_inputs=100)
    for field in ("hellinger", "total_variation"):
        values = np.asarray(getattr(result, field))
        assert np.all((values >= 0) & (values <= 1)), field
        assert values[-1] < 1e-12 and 0 < values[0] < 0.05 and values[3] > 0.9
    # TV ≥ H² (the standard inequality H² ≤ TV ≤ H√(2 − H²)) holds pointwise, so on average.
    assert np.all(np.asarray(result.total_variation) + 1e-12 >= np.asarray(result.hellinger) ** 2 - 1e-3)


def test_density_distances_compare_a_top_k_fit_with_another_number_of_active_experts():
    """A fitted top-K̄ gate against a true top-K gate (K̄ ≠ K) [2]: each side keeps its own selection."""
    truth_values = {"gate": {"beta0": np.array([0.2, -0.1, 0.0]), "beta1": np.array([[2.0], [-1.0], [0.0]])},
                    "expert": {"a": np.array([[1.0], [-1.0], [0.5]]), "b": np.array([0.5, -0.5, 2.0]),
                               "nu": np.array([0.2, 0.3, 0.25])}}
    fit_values = {"gate": {"beta0": np.array([0.1, 0.0, 0.3, 0.0]), "beta1": np.array([[1.8], [-1.2], [0.1], [0.0]])},
                  "expert": {"a": np.array([[1.1], [-0.9], [0.4], [0.6]]), "b": np.array([0.4, -0.6, 2.1, 1.9]),
                             "nu": np.array([0.25, 0.3, 0.2, 0.3])}}
    true_family = mt.make_family({"name": "topk_softmax", "top_k": 1}, "gaussian", 3, 1)
    fitted_family = mt.make_family({"name": "topk_softmax", "top_k": 2}, "gaussian", 4, 1)
    inputs = mt.make_inputs({"name": "uniform", "low": -1.0, "high": 1.0})
    key = jax.random.PRNGKey(2)
    result = losses.density_distances(key, true_family, to_params(fit_values), to_params(truth_values), inputs, 5,
                                      fitted_family=fitted_family)

    def density(values, top_k, x, y):
        slopes = values["gate"]["beta1"][:, 0] * x
        chosen = np.argsort(-slopes, kind="stable")[:top_k]
        scores = (values["gate"]["beta0"] + slopes)[chosen]
        gate = np.exp(scores - scipy.special.logsumexp(scores))
        means = values["expert"]["a"][chosen, 0] * x + values["expert"]["b"][chosen]
        return float(np.sum(gate * scipy.stats.norm.pdf(y, means, np.sqrt(values["expert"]["nu"][chosen]))))

    total_variation = []
    for x in np.asarray(inputs.draw(key, 5, 1, jnp.float64, to_params(truth_values)))[:, 0]:
        gap = scipy.integrate.quad(lambda y: abs(density(fit_values, 2, x, y) - density(truth_values, 1, x, y)),
                                   -20, 20, limit=400, epsabs=1e-12, epsrel=1e-10)[0]
        total_variation.append(0.5 * gap)
    assert float(result.total_variation) == pytest.approx(np.mean(total_variation), rel=1e-6)
    # Without fitted_family the fit would be scored under the true K = 1: a different number.
    same_gate = losses.density_distances(key, true_family, to_params(fit_values), to_params(truth_values), inputs, 5)
    assert abs(float(same_gate.total_variation) - float(result.total_variation)) > 1e-3
    with pytest.raises(ValueError, match="only the gate may differ"):
        losses.density_distances(key, true_family, to_params(fit_values), to_params(truth_values), inputs, 5,
                                 fitted_family=mt.make_family("softmax", "gaussian", 4, 2))
