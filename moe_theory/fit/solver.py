"""The solver protocol shared by every fitter, its two drivers and its one stopping rule.

A **solver** is a frozen dataclass holding a fitter's static settings (the family, the iteration
bound, …), hashable so that it can be part of a compiled program's key. It fits one dataset
through three pure functions, in the manner of optax and optimistix:

* ``init(params0, x, y, weights) -> (data, state)``: the prepared data (padding zeroed, totals;
  constant during the fit) and the state before the first iteration;
* ``step(data, state, active) -> state``: one iteration. ``active`` says whether the fit is still
  running; under ``vmap`` a stopped replicate's step still runs (its result is discarded), and a
  solver may use ``active`` to skip replicate-dependent extra work for it;
* ``finish(data, state, converged) -> FitResult``: the reported fit.

Every state is a NamedTuple with at least the fields ``log_likelihood`` (the objective at the
current point), ``previous`` (its value one iteration earlier), ``iteration`` (iterations done)
and ``finite`` (every value so far is finite). The drivers read only these.

**Stopping rule** [1] (``docs/estimators.md``): stop when |ℓ_t − ℓ_{t−1}| ≤ tol·|ℓ_{t−1}| after at
least two iterations (``converged``), after ``max_iter`` iterations, or when a value is no longer
finite. Since ``NaN ≤ tol`` is False, a NaN can never be mistaken for convergence. ``tol`` is
traced: changing it does not recompile.

**Drivers.** :func:`run_solver` iterates in one ``lax.while_loop``; :func:`trace_solver` runs
``max_iter`` steps of a ``lax.scan``, freezes the state once the stopping rule holds (so its result
equals :func:`run_solver`'s) and also returns the path ℓ_t.

[1] Nguyen, Nguyen, Ho, "Demystifying Softmax Gating Function in Gaussian Mixture of Experts",
NeurIPS 2023, arXiv 2305.03288.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from ..params import MoEParams


class FitResult(NamedTuple):
    """Outcome of one fit (fields gain leading batch axes under ``vmap``).

    Attributes:
        params: fitted parameters, in canonical form.
        log_likelihood: average log-likelihood Σ w_j ℓ_j / Σ w_j at ``params``.
        n_iter: number of iterations performed.
        converged: the relative-change rule was met before ``max_iter``, with finite values.
        finite: every parameter and the log-likelihood are finite.
    """

    params: MoEParams
    log_likelihood: jnp.ndarray
    n_iter: jnp.ndarray
    converged: jnp.ndarray
    finite: jnp.ndarray


class Solver(Protocol):
    """What the drivers need of a fitter (see the module docstring)."""

    @property
    def max_iter(self) -> int: ...

    def init(self, params0: MoEParams, x, y, weights) -> tuple[Any, Any]: ...

    def step(self, data: Any, state: Any, active: jnp.ndarray) -> Any: ...

    def finish(self, data: Any, state: Any, converged: jnp.ndarray) -> FitResult: ...


def all_finite(tree) -> jnp.ndarray:
    """Whether every entry of every leaf of ``tree`` is finite (a scalar boolean)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def relative_change_converged(value, previous, iteration, tol) -> jnp.ndarray:
    """The stopping rule of [1]: |ℓ_t − ℓ_{t−1}| ≤ tol·|ℓ_{t−1}| after at least two iterations.

    False whenever either value is NaN, so a NaN can never count as converged.
    """
    return (iteration >= 2) & (jnp.abs(value - previous) <= tol * jnp.abs(previous))


def has_converged(state, tol) -> jnp.ndarray:
    """The stopping rule at a solver state."""
    return relative_change_converged(state.log_likelihood, state.previous, state.iteration, tol)


def run_solver(solver: Solver, params0: MoEParams, x, y, weights, tol) -> FitResult:
    """Fit one dataset: iterate ``solver`` from ``params0`` until the stopping rule holds."""
    data, initial = solver.init(params0, x, y, weights)

    def keep_going(state):
        return (state.iteration < solver.max_iter) & state.finite & ~has_converged(state, tol)

    state = jax.lax.while_loop(keep_going, lambda state: solver.step(data, state, keep_going(state)), initial)
    return solver.finish(data, state, has_converged(state, tol))


def trace_solver(solver: Solver, params0: MoEParams, x, y, weights, tol) -> tuple[FitResult, jnp.ndarray]:
    """:func:`run_solver` that also returns the objective's path: ℓ(θ_t) for t = 0 .. max_iter − 1,
    NaN after the fit stopped. The state is frozen once the stopping rule holds, so the result
    equals :func:`run_solver`'s."""
    data, initial = solver.init(params0, x, y, weights)

    def scan_step(state, _):
        active = state.finite & ~has_converged(state, tol)
        new = solver.step(data, state, active)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
        return state, jnp.where(active, state.log_likelihood, jnp.nan)

    state, trace = jax.lax.scan(scan_step, initial, length=solver.max_iter)
    return solver.finish(data, state, has_converged(state, tol)), trace
