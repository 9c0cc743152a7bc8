"""Experts f(y | x; η_i): log-densities, regression functions, samplers, closed-form M-steps.

Registered experts:

* ``gaussian`` -- Gaussian linear regression [1]: y | i ~ N(a_iᵀx + b_i, ν_i), **ν_i a variance**
  (the authors' code draws with standard deviations 0.3 and 0.4, i.e. ν = 0.09 and 0.16).
  Closed-form M-step: for responsibilities r_{ji} and sample weights w_j, with ω_j = w_j r_{ji},
  (a_i, b_i) solve the weighted least-squares normal equations
  [x 1]ᵀ Ω [x 1] (a_i, b_i) = [x 1]ᵀ Ω y, and ν_i = Σ_j ω_j (y_j − a_iᵀx_j − b_i)² / Σ_j ω_j.
* ``multinomial_logistic`` -- softmax regression over C classes [4]:
  P(y = c | i) = exp(η_{1ic}ᵀx + η_{0ic}) / Σ_ℓ exp(η_{1iℓ}ᵀx + η_{0iℓ}), with the last class's
  parameters fixed at 0, so only C − 1 rows are stored. No closed-form M-step; the fitter uses
  Newton steps on the weighted log-likelihood.
* ``nonlinear`` -- a nonlinear regression expert [5], [10]: mean h(x; η_i) = act(η_{1i}ᵀx + η_{0i})
  with act ∈ {identity, relu, gelu, sigmoid, tanh}, and Gaussian noise of variance ν_i, so that it is
  a density expert as well as a regression function. With act = identity it is exactly the
  Gaussian-linear expert (a = η₁, b = η₀).

**Adding an expert.** Experts form an open registry, like gates: subclass :class:`Expert` as a
frozen dataclass that declares its ``fields`` (each with its role, see :data:`moe_theory.params.ROLES`)
and implements ``log_prob``, ``sample`` and ``mean``, then add it to :data:`EXPERTS`. Sampling,
validation, likelihoods, EM (Newton M-steps from automatic differentiation, unless the expert
offers a closed-form ``weighted_mstep``), starts, losses and sweeps then work for it;
``tests/test_extending.py`` does exactly this.

Each expert is a frozen (hashable) dataclass, so that it can be part of a static family record.
Arrays follow one convention: x is (n, d); y is (n,) (float, or int class labels); per-expert
results are (n, k). The mathematics is in ``docs/experts.md``.

Papers: [1] arXiv 2305.03288, [4] 2310.14188, [5] 2405.13997, [10] 2402.02952.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import linalg
from .gates import ACTIVATIONS
from .params import Field, constrain

_LOG_2PI = math.log(2.0 * math.pi)


def _gaussian_log_prob(y: jnp.ndarray, mean: jnp.ndarray, variance: jnp.ndarray) -> jnp.ndarray:
    return -0.5 * (_LOG_2PI + jnp.log(variance) + (y[:, None] - mean) ** 2 / variance)


def _gaussian_sample(key: jax.Array, mean: jnp.ndarray, variance: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    chosen_mean = jnp.take_along_axis(mean, labels[:, None], axis=1)[:, 0]
    noise = jax.random.normal(key, chosen_mean.shape, dtype=mean.dtype)
    return chosen_mean + jnp.sqrt(variance[labels]) * noise


@dataclass(frozen=True)
class Expert:
    """Base of every expert f(y | x; η_i): a static, hashable record.

    Class attributes a subclass sets:
        name: registry key.
        fields: the parameter schema (:class:`~moe_theory.params.Field`, each with its role).
        is_classifier: y holds integer classes 0..C−1 and the family needs ``num_classes``.
        has_closed_form_mstep: the expert implements ``weighted_mstep``; otherwise EM takes damped
            Newton steps on its weighted log-likelihood.
    """

    name: ClassVar[str] = "expert"
    fields: ClassVar[tuple[Field, ...]] = ()
    is_classifier: ClassVar[bool] = False
    has_closed_form_mstep: ClassVar[bool] = False

    def log_prob(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        """log f(y_j | x_j; η_i), shape (n, k)."""
        raise NotImplementedError

    def sample(self, key: jax.Array, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
        """y_j ~ f(· | x_j; η_{labels_j}), shape (n,)."""
        raise NotImplementedError

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        """E[y | x, expert i]: (n, k) for regression experts, class probabilities (n, k, C) for classifiers."""
        raise NotImplementedError

    def weighted_mstep(
        self, x: jnp.ndarray, y: jnp.ndarray, weights: jnp.ndarray, variance_floor: float = 0.0
    ) -> dict[str, jnp.ndarray]:
        """Closed-form maximiser of Σ_j Σ_i ω_{ji} log f(y_j | x_j; η_i), where one exists."""
        raise NotImplementedError(f"the {self.name} expert has no closed-form M-step")

    def derivatives_one(
        self, unconstrained: Mapping[str, jnp.ndarray], x: jnp.ndarray, y: jnp.ndarray, weight: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Derivatives of ONE expert's weighted log-likelihood L(u) = Σ_j w_j log f(y_j | x_j; η(u)).

        ``unconstrained`` holds one expert's fields (no expert axis) in the coordinates of
        :func:`moe_theory.fit.newton.unconstrain`; ``weight`` is (n,). Returns (L, ∇L, ∇²L, scores),
        the derivatives flattened in ``jax.flatten_util.ravel_pytree`` order of ``unconstrained`` and
        ``scores`` (n, q) the per-sample gradients ∇_u log f(y_j | x_j; η(u)). This default uses
        forward-mode automatic differentiation; an expert with a cheap closed form overrides it.
        """
        flat, unravel = ravel_pytree(unconstrained)

        def per_sample(u):
            single = {name: value[None] for name, value in constrain(self.fields, unravel(u)).items()}
            log_f = self.log_prob(single, x, y)[:, 0]
            return log_f, log_f

        def total(u):
            log_f = per_sample(u)[0]
            return jnp.sum(jnp.where(weight > 0, weight * log_f, 0.0))

        scores, log_f = jax.jacfwd(per_sample, has_aux=True)(flat)
        value = jnp.sum(jnp.where(weight > 0, weight * log_f, 0.0))
        gradient = jnp.einsum("n,nq->q", jnp.where(weight > 0, weight, 0.0), jnp.where(weight[:, None] > 0, scores, 0.0))
        return value, gradient, jax.hessian(total)(flat), scores


@dataclass(frozen=True)
class GaussianLinear(Expert):
    """y | expert i ~ N(a_iᵀx + b_i, ν_i) with ν_i a variance."""

    name: ClassVar[str] = "gaussian"
    is_classifier: ClassVar[bool] = False
    has_closed_form_mstep: ClassVar[bool] = True
    fields: ClassVar[tuple[Field, ...]] = (
        Field("a", ("k", "d"), "real", "expert slopes a"),
        Field("b", ("k",), "real", "expert intercepts b"),
        Field("nu", ("k",), "positive", "expert variances ν (a variance, not a standard deviation)", role="variance"),
    )

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        """Regression function of each expert, (n, k)."""
        return x @ expert["a"].T + expert["b"][None, :]

    def log_prob(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        """log f(y_j | x_j; η_i), shape (n, k)."""
        return _gaussian_log_prob(y, self.mean(expert, x), expert["nu"])

    def sample(self, key: jax.Array, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
        """y_j ~ f(· | x_j; η_{labels_j}), shape (n,)."""
        return _gaussian_sample(key, self.mean(expert, x), expert["nu"], labels)

    def weighted_mstep(
        self, x: jnp.ndarray, y: jnp.ndarray, weights: jnp.ndarray, variance_floor: float = 0.0
    ) -> dict[str, jnp.ndarray]:
        """Closed-form maximiser of Σ_j Σ_i ω_{ji} log f(y_j | x_j; η_i) for weights ω of shape (n, k).

        Weighted least squares per expert, then the weighted residual variance (floored at
        ``variance_floor``, 0 by default, so the exact MLE is returned).
        """
        design = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)  # (n, d + 1)
        gram = jnp.einsum("ni,nk,nj->kij", design, weights, design)  # (k, d+1, d+1)
        moment = jnp.einsum("ni,nk,n->ki", design, weights, y)  # (k, d+1)
        coefficients = linalg.solve_positive_definite(gram, moment)
        residual = y[:, None] - design @ coefficients.T  # (n, k)
        total = jnp.sum(weights, axis=0)
        variance = jnp.sum(weights * residual**2, axis=0) / total
        return {"a": coefficients[:, :-1], "b": coefficients[:, -1], "nu": jnp.maximum(variance, variance_floor)}


@dataclass(frozen=True)
class MultinomialLogistic(Expert):
    """P(y = c | x, expert i) = softmax_c(η_{1ic}ᵀx + η_{0ic}), the last class fixed at 0."""

    name: ClassVar[str] = "multinomial_logistic"
    is_classifier: ClassVar[bool] = True
    has_closed_form_mstep: ClassVar[bool] = False
    fields: ClassVar[tuple[Field, ...]] = (
        Field("eta0", ("k", "C-1"), "real", "expert class intercepts η₀ (last class fixed at 0)"),
        Field("eta1", ("k", "C-1", "d"), "real", "expert class slopes η₁ (last class fixed at 0)"),
    )

    def logits(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        """Class logits of every expert, (n, k, C), the last class 0."""
        free = jnp.einsum("nd,kcd->nkc", x, expert["eta1"]) + expert["eta0"][None]
        return jnp.concatenate([free, jnp.zeros_like(free[..., :1])], axis=-1)

    def class_log_probs(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        """log P(y = c | x, i), shape (n, k, C)."""
        return jax.nn.log_softmax(self.logits(expert, x), axis=-1)

    def log_prob(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        logits = self.logits(expert, x)
        # A one-hot contraction instead of a gather: its derivatives are dense products, where a
        # gather's would be a scatter, which is several times slower on a CPU inside EM's Newton steps.
        chosen = jnp.einsum("nkc,nc->nk", logits, jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype))
        return chosen - jax.nn.logsumexp(logits, axis=-1)

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        """Class probabilities of every expert, (n, k, C)."""
        return jnp.exp(self.class_log_probs(expert, x))

    def sample(self, key: jax.Array, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
        chosen = jnp.take_along_axis(self.logits(expert, x), labels[:, None, None], axis=1)[:, 0]
        return jax.random.categorical(key, chosen, axis=-1).astype(jnp.int32)

    def derivatives_one(
        self, unconstrained: Mapping[str, jnp.ndarray], x: jnp.ndarray, y: jnp.ndarray, weight: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """The closed form of :meth:`Expert.derivatives_one` (multinomial logistic regression [4]).

        With x̃ = (1, x), class probabilities p_j and e_j the one-hot label, over the C − 1 free
        classes: score (e_j − p_j) ⊗ x̃_j, Hessian −Σ_j w_j (diag p_j − p_j p_jᵀ) ⊗ x̃_j x̃_jᵀ.
        Coordinates are ordered as ``ravel_pytree({"eta0", "eta1"})``: the C − 1 intercepts, then
        the slopes class by class.
        """
        eta0, eta1 = unconstrained["eta0"], unconstrained["eta1"]  # (C-1,), (C-1, d)
        free_classes, dim = eta1.shape
        weight = jnp.where(weight > 0, weight, 0.0)
        logits = jnp.concatenate([x @ eta1.T + eta0, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)  # (n, C)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        one_hot = jax.nn.one_hot(y, free_classes + 1, dtype=x.dtype)
        value = jnp.sum(weight * jnp.sum(one_hot * log_probs, axis=-1))
        probs = jnp.exp(log_probs[:, :free_classes])
        design = jnp.concatenate([jnp.ones((x.shape[0], 1), x.dtype), x], axis=1)  # (n, d + 1)
        residual = one_hot[:, :free_classes] - probs  # (n, C-1)
        # Reorder (class, feature) with feature 0 the intercept into ravel order: intercepts, then slopes.
        order = jnp.concatenate([jnp.arange(free_classes) * (dim + 1),
                                 (jnp.arange(free_classes)[:, None] * (dim + 1) + 1 + jnp.arange(dim)).reshape(-1)])
        scores = (residual[:, :, None] * design[:, None, :]).reshape(x.shape[0], -1)[:, order]
        covariance = jnp.einsum("nc,ce->nce", probs, jnp.eye(free_classes, dtype=x.dtype)) - probs[:, :, None] * probs[:, None, :]
        hessian = -jnp.einsum("n,nce,nf,ng->cfeg", weight, covariance, design, design).reshape(
            free_classes * (dim + 1), free_classes * (dim + 1)
        )
        return value, scores.T @ weight, hessian[order][:, order], scores


@dataclass(frozen=True)
class NonlinearRegression(Expert):
    """y | expert i ~ N(act(η_{1i}ᵀx + η_{0i}), ν_i)."""

    activation: str = "relu"
    name: ClassVar[str] = "nonlinear"
    is_classifier: ClassVar[bool] = False
    has_closed_form_mstep: ClassVar[bool] = False
    fields: ClassVar[tuple[Field, ...]] = (
        Field("eta0", ("k",), "real", "expert inner intercepts η₀"),
        Field("eta1", ("k", "d"), "real", "expert inner slopes η₁"),
        Field("nu", ("k",), "positive", "expert noise variances ν", role="variance"),
    )

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"expert.activation: unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")

    def mean(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
        return ACTIVATIONS[self.activation](x @ expert["eta1"].T + expert["eta0"][None, :])

    def log_prob(self, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        return _gaussian_log_prob(y, self.mean(expert, x), expert["nu"])

    def sample(self, key: jax.Array, expert: Mapping[str, jnp.ndarray], x: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
        return _gaussian_sample(key, self.mean(expert, x), expert["nu"], labels)


EXPERTS: dict[str, type[Expert]] = {cls.name: cls for cls in (GaussianLinear, MultinomialLogistic, NonlinearRegression)}
"""Registered experts by name; add an :class:`Expert` subclass here to make it available by name."""


def build_expert(spec: Any, registry: Mapping[str, Any], kind: type, noun: str, options: Mapping[str, Any]) -> Any:
    """``spec`` itself if it is a ``kind``, else ``registry[name](**options)`` for a name or a dict
    ``{"name": ..., **options}``; an unknown name or option is a ``ValueError`` naming it. The one
    lookup behind :func:`make_expert` and the regression experts' ``make_regression_expert``."""
    if isinstance(spec, kind):
        return spec
    options = dict(options)
    if isinstance(spec, Mapping):
        options = {**dict(spec), **options}
        spec = options.pop("name", None)
    if spec not in registry:
        raise ValueError(f"expert: unknown {noun} {spec!r}; expected one of {sorted(registry)}")
    try:
        return registry[spec](**options)
    except TypeError:
        raise ValueError(f"expert {spec!r}: unknown option(s) {sorted(options)}") from None


def make_expert(spec: str | Expert | Mapping[str, Any], **options: Any) -> Expert:
    """Build an expert from a name (``"gaussian"``, ``"multinomial_logistic"``, ``"nonlinear"``),
    an expert instance, or a dict ``{"name": ..., **options}`` (e.g. ``{"name": "nonlinear",
    "activation": "gelu"}``)."""
    return build_expert(spec, EXPERTS, Expert, "expert", options)
