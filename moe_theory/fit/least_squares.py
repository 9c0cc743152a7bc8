"""Least squares by Levenberg–Marquardt, as a solver of :mod:`moe_theory.fit.solver`
(``docs/estimators.md``).

For a regression model y = f(x; θ) + ε (the regression form of an MoE or HMoE [5, 10], an attention
entry [7]) and sample weights w_j ≥ 0 (0 marks padding), least squares minimises

    S(θ) = Σ_j w_j (y_j − f(x_j; θ))².

With the weighted residuals r_j = √w_j (y_j − f(x_j; θ)) and their Jacobian J = ∂r/∂θ (row by row:
the gradient of f(x_j; θ), vmapped over the rows j), one iteration solves

    (JᵀJ + μ D) δ = −Jᵀr,    D = diag(max(diag JᵀJ, ε·max(max diag JᵀJ, 1))),   ε the machine epsilon,

and accepts θ + δ if S decreases; otherwise μ grows by ``damping_increase`` and the system is solved
again, until a step is accepted or μ would exceed ``max_damping``. After an accepted step μ shrinks
by ``damping_decrease``, to no less than ``min_damping``. This is Marquardt's diagonal scaling (in
the spirit of MINPACK's, which ``scipy.optimize.least_squares(method="lm")`` uses, though MINPACK
scales a trust region instead of μ); S never increases. Small μ gives Gauss–Newton steps, large μ
short scaled gradient steps.

**A compact parameter set.** The rates of [5] and [10] are proved for parameters in a compact set Θ.
Without one, an over-specified least-squares fit can use an extra expert to chase the noise with an
ever sharper step (slopes in the hundreds at n = 10⁵), which the theorems exclude. With
``bound = B`` the fit stays in the box Θ = [−B, B]^p: every trial point is projected onto the box
(the start too), and is accepted only if S decreases, so S stays monotone. Coordinates on a face of
the box whose descent direction points out of it are held fixed for the iteration, and the step
solves the reduced system of the others (an active-set rule, so Gauss–Newton steps keep their speed
along the face instead of being clipped back every time). A fit stopped on a face is stationary in
the box; :func:`at_bound` tells which fits touch it.

Everything runs under the protocol's drivers: the reported objective (the ``log_likelihood`` field
of :class:`~moe_theory.fit.solver.FitResult`) is −S/Σw, minus the mean squared residual, so the
stopping rule "relative change ≤ tol" is the same as for EM, and a NaN stops the fit with
``finite = False``. An iteration whose every trial fails leaves θ unchanged: the relative change is
then 0 and the fit counts as converged. That happens only once μ has reached ``max_damping``
(1e20 by default, a step about 1e-20 of the scaled gradient): no representable step decreases S,
so θ is stationary to rounding. (Stopping the trials after a fixed count instead would let a fit
whose μ had shrunk to its floor give up after a few Gauss–Newton-like trials and be reported
converged while still improving.)

The model is given as a hashable callable ``mean(params, x) -> (n,)``, a static argument (a
module-level function or a frozen dataclass with ``__call__``), so one compiled program serves
every dataset of a shape. It must act row by row (f(x_j; θ) depends on row j of every leaf of x
alone), as every regression function does; the Jacobian is computed per row.

[5] Nguyen, Ho, Rinaldo, NeurIPS 2024, arXiv 2405.13997. [7] Nguyen et al., arXiv 2602.01468.
[10] Nguyen, Ho, Rinaldo, ICML 2024, arXiv 2402.02952.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import linalg
from .solver import FitResult, all_finite


@dataclass(frozen=True)
class LeastSquaresConfig:
    """Static settings of :class:`LevenbergMarquardt` (part of the compiled program).

    Attributes:
        max_iter: at most this many accepted-or-failed iterations.
        initial_damping: μ at the start.
        damping_increase / damping_decrease: factors on μ after a rejected / accepted step.
        min_damping / max_damping: μ never shrinks below the first; an iteration gives up its step
            once μ would exceed the second.
        bound: B > 0 to keep every parameter coordinate in [−B, B] (module docstring), or None.
    """

    max_iter: int = 1000
    initial_damping: float = 1e-3
    damping_increase: float = 10.0
    damping_decrease: float = 0.3
    min_damping: float = 1e-12
    max_damping: float = 1e20
    bound: float | None = None

    def __post_init__(self) -> None:
        if self.bound is not None and not (isinstance(self.bound, (int, float)) and 0 < self.bound < float("inf")):
            raise ValueError(f"bound: expected a positive finite number or None, got {self.bound!r}")
        for name in ("max_iter",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.initial_damping > 0:
            raise ValueError(f"initial_damping: expected > 0, got {self.initial_damping!r}")
        if not self.damping_increase > 1 or not 0 < self.damping_decrease < 1:
            raise ValueError("damping_increase must exceed 1 and damping_decrease lie in (0, 1)")
        if not 0 < self.min_damping <= self.initial_damping < self.max_damping:
            raise ValueError("damping bounds: expected 0 < min_damping ≤ initial_damping < max_damping")


class LeastSquaresData(NamedTuple):
    x: Any
    y: jnp.ndarray
    root_weights: jnp.ndarray  # √w_j
    total: jnp.ndarray  # Σ_j w_j


class LeastSquaresState(NamedTuple):
    params: Any
    log_likelihood: jnp.ndarray  # −S/Σw at params
    previous: jnp.ndarray
    iteration: jnp.ndarray
    finite: jnp.ndarray
    damping: jnp.ndarray


def at_bound(params, bound: float | None) -> jnp.ndarray:
    """True where some coordinate of ``params`` lies on the box |θ| = ``bound`` (False when unbounded)."""
    if bound is None:
        return jnp.asarray(False)
    flat = ravel_pytree(params)[0]
    return jnp.any(jnp.abs(flat) >= bound * (1 - 1e-12))


def _mask_rows(x, keep):
    """Zero the rows of every leaf of ``x`` where ``keep`` is False, so padding cannot inject NaN."""
    return jax.tree_util.tree_map(lambda leaf: jnp.where(keep.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, 0), x)


@dataclass(frozen=True)
class LevenbergMarquardt:
    """Weighted least squares for ``mean`` (module docstring); θ is any pytree of float arrays."""

    mean: Callable[[Any, Any], jnp.ndarray]
    config: LeastSquaresConfig = LeastSquaresConfig()

    @property
    def max_iter(self) -> int:
        return self.config.max_iter

    def _project(self, flat):
        bound = self.config.bound
        return flat if bound is None else jnp.clip(flat, -bound, bound)

    def _free(self, flat, gradient):
        """False for the coordinates on a face of the box that the descent direction −∇(S/2) leaves."""
        bound = self.config.bound
        return ~(((flat >= bound) & (gradient < 0)) | ((flat <= -bound) & (gradient > 0)))

    def _residuals(self, data: LeastSquaresData, unravel, flat):
        return data.root_weights * (data.y - self.mean(unravel(flat), data.x))

    def _mean_gradients(self, x, unravel, flat):
        """∂f(x_j; θ)/∂θ for every row j, (n, p): one reverse pass per row, vmapped over rows. For a few
        dozen parameters this is far cheaper than forward mode's p passes over the whole data with
        batched tangents, which XLA contracts badly inside softmax-weighted einsums."""
        def row_gradient(row):
            single = jax.tree_util.tree_map(lambda leaf: leaf[None], row)
            return jax.grad(lambda f: self.mean(unravel(f), single)[0])(flat)

        return jax.vmap(row_gradient)(x)

    def init(self, params0, x, y, weights):
        dtype = jax.tree_util.tree_leaves(params0)[0].dtype
        weights = jnp.ones(y.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
        keep = weights > 0
        data = LeastSquaresData(_mask_rows(x, keep), jnp.where(keep, y, 0).astype(dtype), jnp.sqrt(weights), jnp.sum(weights))
        flat, unravel = ravel_pytree(params0)
        flat = self._project(flat)
        params0 = unravel(flat)
        objective = -jnp.sum(self._residuals(data, unravel, flat) ** 2) / data.total
        nan = jnp.asarray(jnp.nan, dtype)
        state = LeastSquaresState(params0, objective, nan, jnp.asarray(0), all_finite(params0) & jnp.isfinite(objective),
                                  jnp.asarray(self.config.initial_damping, dtype))
        return data, state

    def step(self, data: LeastSquaresData, state: LeastSquaresState, active) -> LeastSquaresState:
        del active
        config = self.config
        flat, unravel = ravel_pytree(state.params)
        residuals = self._residuals(data, unravel, flat)
        jacobian = -data.root_weights[:, None] * self._mean_gradients(data.x, unravel, flat)  # (n, p)
        curvature = jacobian.T @ jacobian
        gradient = jacobian.T @ residuals
        current = jnp.sum(residuals**2)
        scale = jnp.maximum(jnp.diagonal(curvature), jnp.finfo(flat.dtype).eps * jnp.maximum(jnp.max(jnp.diagonal(curvature)), 1.0))

        if config.bound is None:
            system_of, rhs = (lambda damping: curvature + damping * jnp.diag(scale)), gradient
        else:
            # Coordinates held on a face of the box, where S decreases only outwards, are fixed for
            # this iteration (step 0); the others take the Levenberg–Marquardt step of the reduced
            # system. (Unbounded fits keep the plain system, so their rounding is unchanged.)
            free = self._free(flat, gradient)
            pair = free[:, None] & free[None, :]
            fixed = jnp.diag(jnp.where(free, 0.0, 1.0))
            system_of = lambda damping: jnp.where(pair, curvature + damping * jnp.diag(scale), 0.0) + fixed  # noqa: E731
            rhs = jnp.where(free, gradient, 0.0)

        def trial(damping):
            factor = linalg.cholesky(system_of(damping))
            step = -linalg.solve_upper_transposed(factor, linalg.solve_lower(factor, rhs))
            candidate = self._project(flat + step)
            value = jnp.sum(self._residuals(data, unravel, candidate) ** 2)
            return candidate, value

        def keep_trying(carry):
            _, value, damping = carry
            return (damping * config.damping_increase <= config.max_damping) & ~(value < current)

        def next_trial(carry):
            damping = carry[2] * config.damping_increase
            return (*trial(damping), damping)

        candidate, value = trial(state.damping)
        candidate, value, damping = jax.lax.while_loop(keep_trying, next_trial, (candidate, value, state.damping))
        accepted = value < current  # False for NaN
        flat_new = jnp.where(accepted, candidate, flat)
        objective = -jnp.where(accepted, value, current) / data.total
        damping = jnp.where(accepted, jnp.maximum(damping * config.damping_decrease, config.min_damping), damping)
        params = unravel(flat_new)
        return LeastSquaresState(params, objective, state.log_likelihood, state.iteration + 1,
                                 jnp.isfinite(objective) & all_finite(params), damping)

    def finish(self, data: LeastSquaresData, state: LeastSquaresState, converged) -> FitResult:
        finite = state.finite & jnp.isfinite(state.log_likelihood) & all_finite(state.params)
        return FitResult(state.params, state.log_likelihood, state.iteration, converged & finite, finite)
