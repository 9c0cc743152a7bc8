"""Least squares: our Levenberg–Marquardt against scipy.optimize.least_squares, on two workloads.

* ``--workload attention`` (default): one entry of gated or plain attention
  (``configs/paper7_gated_attention.yaml``'s truth, H* = 2 heads, d = 2, L = 3 tokens, noise 0.1),
  fitted with ``--heads`` heads from the truth plus 0.1·N(0, 1) (the study's start);
* ``--workload regression``: the regression MoE of [5], [10], an arm ``--arm`` of
  ``configs/paper10_lse_softmax.yaml`` (default ``sigmoid_exact``: softmax gate, sigmoid experts,
  k = k* = 2, x ~ U[0, 1]), from the study's start. Use an exact arm: scipy's ``lm`` has no box, and
  the over-specified arms end on the box's faces.

Each fits to a relative change of the mean squared residual of ``--tol``.

* **ours, one dataset**: :class:`moe_theory.fit.least_squares.LevenbergMarquardt` jitted, one fit;
* **ours, vmapped**: ``--replicates`` datasets in one compiled program (the study's way);
* **scipy**: ``scipy.optimize.least_squares(method="lm")`` (MINPACK) on each dataset in a loop,
  with the residual and its Jacobian from the same jitted JAX functions (so the comparison is of
  the optimiser and its dispatch, not of the model code), ftol = xtol = ``--tol``.

Reported per method: median iterations (function evaluations for scipy), wall time (median of
``--repeats`` runs after a warm-up), time per iteration per replicate, replicates per second, XLA's
memory estimate, and the largest gap to scipy's optimum in mean squared residual.

    python benchmarks/bench_least_squares.py                     # n = 4000, MHSA, exact
    python benchmarks/bench_least_squares.py --position value --heads 3
    python benchmarks/bench_least_squares.py --workload regression --samples 10000
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import yaml
from jax.flatten_util import ravel_pytree

from moe_theory import structured
from moe_theory.fit.solver import run_solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["attention", "regression"], default="attention")
    parser.add_argument("--arm", default="sigmoid_exact", help="regression workload: an arm of paper10_lse_softmax.yaml")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--replicates", type=int, default=10)
    parser.add_argument("--position", default="none", choices=["none", "sdpa", "value", "output"])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.workload == "attention":
        config = structured.load_config("configs/paper7_gated_attention.yaml")
        position = None if args.position == "none" else args.position
        arm = {"name": "bench", "position": position, "heads": args.heads}
        workload = f"attention entry, position={args.position}, H = {args.heads} (truth H* = 2)"
    else:
        config = structured.load_config("configs/paper10_lse_softmax.yaml")
        arms = {arm["name"]: arm for arm in config.arms}
        if args.arm not in arms:
            parser.error(f"--arm: expected one of {sorted(arms)}")
        arm = arms[args.arm]
        workload = f"regression MoE, paper10_lse_softmax arm {args.arm}"
    problem, truth = structured._problem(config, arm)
    keys = jax.random.split(jax.random.key(0), args.replicates)
    data = jax.vmap(lambda key: problem.sample(key, truth, args.samples))(keys)
    starts = jax.vmap(lambda key: problem.start(jax.random.fold_in(key, 1), truth))(keys)
    solver = problem.solver

    def fit_one(start, X, y):
        return run_solver(solver, start, X, y, None, args.tol)

    one = jax.jit(fit_one)
    batched = jax.jit(jax.vmap(fit_one))
    first = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)  # noqa: E731

    def timed(function):
        jax.block_until_ready(function())
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = jax.block_until_ready(function())
            times.append(time.perf_counter() - started)
        return result, statistics.median(times)

    single, single_time = timed(lambda: one(first(starts), data[0][0], data[1][0]))
    vmapped, batch_time = timed(lambda: batched(starts, data[0], data[1]))

    flat0, unravel = ravel_pytree(first(starts))
    residual_fn = jax.jit(lambda theta, X, y: y - solver.mean(unravel(theta), X))
    jacobian_fn = jax.jit(lambda theta, X, y: -jax.vmap(
        lambda row: jax.grad(lambda t: solver.mean(unravel(t), row[None])[0])(theta))(X))

    def scipy_all():
        results = []
        for r in range(args.replicates):
            X, y = data[0][r], data[1][r]
            start = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a: a[r], starts))[0])
            results.append(scipy.optimize.least_squares(
                lambda t: np.asarray(residual_fn(jnp.asarray(t), X, y)), start,
                jac=lambda t: np.asarray(jacobian_fn(jnp.asarray(t), X, y)),
                method="lm", ftol=args.tol, xtol=args.tol, gtol=1e-15))
        return results

    scipy_all()
    scipy_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        reference = scipy_all()
        scipy_times.append(time.perf_counter() - started)
    scipy_time = statistics.median(scipy_times)

    scipy_mse = np.array([2 * result.cost / args.samples for result in reference])
    ours_mse = -np.asarray(vmapped.log_likelihood)
    memory = batched.lower(starts, data[0], data[1]).compile().memory_analysis()
    temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else float("nan")
    iterations = np.asarray(vmapped.n_iter)
    nfev = np.array([result.nfev for result in reference])

    print(f"{workload}, n = {args.samples}, "
          f"{args.replicates} replicates, tol = {args.tol:g}, device {jax.devices()[0].device_kind}")
    header = f"{'method':<22}{'median iters':>14}{'wall s':>10}{'ms/iter/rep':>13}{'reps/s':>9}{'temp MiB':>10}{'max ΔMSE vs scipy':>20}"
    print(header)
    print("-" * len(header))
    print(f"{'ours, one dataset':<22}{int(single.n_iter):>14}{single_time:>10.3f}{1e3 * single_time / int(single.n_iter):>13.3f}"
          f"{1 / single_time:>9.1f}{'':>10}{abs(float(-single.log_likelihood) - scipy_mse[0]):>20.2e}")
    print(f"{'ours, vmapped':<22}{int(np.median(iterations)):>14}{batch_time:>10.3f}"
          f"{1e3 * batch_time / (iterations.max() * args.replicates):>13.3f}{args.replicates / batch_time:>9.1f}"
          f"{temp_mb:>10.1f}{np.max(np.abs(ours_mse - scipy_mse)):>20.2e}")
    print(f"{'scipy lm (loop)':<22}{int(np.median(nfev)):>14}{scipy_time:>10.3f}"
          f"{1e3 * scipy_time / nfev.sum():>13.3f}{args.replicates / scipy_time:>9.1f}{'':>10}{0.0:>20.2e}")
    print(f"ratios: scipy wall / vmapped wall = {scipy_time / batch_time:.1f}; "
          f"scipy wall per replicate / ours one dataset = {scipy_time / args.replicates / single_time:.1f}; "
          f"converged {np.mean(np.asarray(vmapped.converged)):.0%}")


if __name__ == "__main__":
    main()
