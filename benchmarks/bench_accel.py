"""Iterations and wall time to a tight tolerance: EM against its accelerations.

Every method fits the same datasets from the same starts to a relative log-likelihood change of
``--tol`` (default 1e-10), at most ``--max-iter`` iterations, vmapped over ``--replicates`` datasets
in one compiled program (:func:`moe_theory.fit.fit_batch`): ``em`` is the package's EM (its fast
path where it applies), ``squarem`` is EM accelerated by squared extrapolation
(:mod:`moe_theory.fit.squarem`; an iteration is a cycle of two EM steps and one extrapolation), and
``em_newton`` is EM with full-likelihood Newton steps (:mod:`moe_theory.fit.newton_em`). Workloads:

* ``paper6`` (default): the sigmoid-gated multinomial-logistic MoE of ``configs/paper6_sigmoid_vs_softmax.yaml``
  (C = 3, d = 2, k* = 2), x ~ N(0, I), fitted with ``--experts`` experts (2: exact, 3: over-fitted),
  started near the truth with noise 0.1·N(0, 1);
* ``paper1``: the softmax-gated Gaussian MoE of paper 1 (β₀ = (−8, 0), β₁ = (25, 0), a = (−20, 20),
  b = (15, −5), ν = (0.09, 0.16), x on a grid of [0, 1]), over-fitted with k = 3, started near the
  truth with the paper's noise.

Reported per method: median iterations, converged fraction, wall time of the batch (median of
``--repeats`` runs after a warm-up), time per iteration per replicate (wall time / (iterations of
the longest fit in each chunk × replicates): under vmap a chunk of ``--batch-size`` fits runs until
its slowest fit stops; with ``--batch-size 1`` each fit runs its own loop), replicates per
second, compile time, XLA's memory estimate for the program, and the largest relative gap of a
replicate's log-likelihood below the *reference maximum*: the best of every method and of SQUAREM
run until ℓ stops changing at all (tol = 0, up to 20,000 cycles), so that a stopping rule that fires
on a slow crawl shows up as a gap. The last line gives the wall-time ratios em / method.

    python benchmarks/bench_accel.py                                    # paper 6, n = 10⁴, k = 2
    python benchmarks/bench_accel.py --experts 3 --samples 4000         # over-fitted
    python benchmarks/bench_accel.py --workload paper1 --samples 10000 --methods em,squarem
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import moe_theory as mt
from moe_theory.fit import EMConfig, fit_batch
from moe_theory.fit.api import fit_batch_program
from moe_theory.init import NearTruthNoise, near_truth_init

PAPER6 = {
    "gate": {"beta0": [0.5, -0.5], "beta1": [[2.0, -1.0], [-1.0, 2.0]]},
    "expert": {"eta0": [[1.0, -1.0], [-1.0, 1.0]], "eta1": [[[2.0, 0.0], [0.0, 2.0]], [[-2.0, 1.0], [1.0, -2.0]]]},
}
PAPER1 = {
    "gate": {"beta0": [-8.0, 0.0], "beta1": [[25.0], [0.0]]},
    "expert": {"a": [[-20.0], [20.0]], "b": [15.0, -5.0], "nu": [0.09, 0.16]},
}


def workload(name: str, samples: int, experts: int, replicates: int):
    if name == "paper6":
        true_family = mt.make_family("sigmoid", "multinomial_logistic", 2, 2, num_classes=3)
        truth = mt.make_params(true_family, PAPER6)
        inputs = mt.make_inputs("normal")
        noise = NearTruthNoise(gate_scale=0.1, gate_exponent=0.0, mean_scale=0.1, mean_exponent=0.0,
                               variance_scale=0.05, variance_exponent=0.0)
    else:
        true_family = mt.make_family("softmax", "gaussian", 2, 1)
        truth = mt.make_params(true_family, PAPER1)
        inputs = mt.make_inputs("grid")
        noise = NearTruthNoise()
    family = mt.make_family(true_family.gate, true_family.expert, experts, true_family.dim, true_family.num_classes)
    keys = jax.random.split(jax.random.key(0), replicates)
    x, y = jax.vmap(lambda key: mt.sample(key, true_family, truth, samples, inputs)[:2])(keys)
    starts = jax.vmap(lambda key: near_truth_init(jax.random.fold_in(key, 1), family, true_family, truth, samples, noise))(keys)
    return family, jax.tree_util.tree_map(lambda leaf: leaf[:, None], starts), x, y


def _iterations_run(iterations: np.ndarray, batch_size: int) -> int:
    """Replicate-iterations the batches ran: each chunk of ``batch_size`` runs until its slowest fit stops."""
    batch_size = min(batch_size, iterations.size)
    chunks = [iterations[start:start + batch_size] for start in range(0, iterations.size, batch_size)]
    return sum(int(chunk.max()) * len(chunk) for chunk in chunks)


def measure(family, starts, x, y, method: str, tol: float, config: EMConfig, repeats: int, batch_size: int) -> dict:
    arguments = (family, starts, x, y, None, jnp.asarray(tol), method, config, batch_size)
    begin = time.perf_counter()
    compiled = fit_batch_program(family, config, method, arguments[1:6]).lower(*arguments).compile()
    compile_seconds = time.perf_counter() - begin
    memory = compiled.memory_analysis()
    memory_bytes = None if memory is None else memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    result = fit_batch(family, starts, x, y, tol=tol, method=method, config=config, batch_size=batch_size)
    jax.block_until_ready(result)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fit_batch(family, starts, x, y, tol=tol, method=method, config=config, batch_size=batch_size))
        times.append(time.perf_counter() - begin)
    wall = float(np.median(times))
    iterations = np.asarray(result.n_iter)
    return {
        "iterations": float(np.median(iterations)),
        "longest": int(iterations.max()),
        "converged": float(np.mean(np.asarray(result.converged))),
        "wall": wall,
        "per_iteration": wall / _iterations_run(iterations, batch_size),
        "replicates_per_second": x.shape[0] / wall,
        "compile": compile_seconds,
        "memory": memory_bytes,
        "log_likelihood": np.asarray(result.log_likelihood),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("paper6", "paper1"), default="paper6")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--experts", type=int, default=None, help="k fitted (default: 2 for paper6, 3 for paper1)")
    parser.add_argument("--replicates", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="replicates per vmapped chunk (default: all at once; 1 runs each fit in its own loop)")
    parser.add_argument("--methods", default="em,squarem,em_newton", help="comma-separated, from em, squarem, em_newton, mle")
    args = parser.parse_args()
    methods = [method.strip() for method in args.methods.split(",")]
    if "em" not in methods:
        parser.error("--methods: the ratios are against em, so it must be one of them")
    experts = args.experts or (2 if args.workload == "paper6" else 3)
    family, starts, x, y = workload(args.workload, args.samples, experts, args.replicates)
    config = EMConfig(max_iter=args.max_iter)
    print(f"{family.describe()}, n = {args.samples}, {args.replicates} replicates, tol = {args.tol:g}, "
          f"max_iter = {args.max_iter}, batch size {args.batch_size or args.replicates}, "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    batch_size = args.batch_size or args.replicates
    rows = {method: measure(family, starts, x, y, method, args.tol, config, args.repeats, batch_size) for method in methods}
    reference = fit_batch(family, starts, x, y, tol=0.0, method="squarem", config=EMConfig(max_iter=20_000),
                          batch_size=x.shape[0])
    best = np.max([np.asarray(reference.log_likelihood)] + [row["log_likelihood"] for row in rows.values()], axis=0)
    header = (f"{'method':10s} {'iter (med)':>10s} {'longest':>8s} {'conv':>6s} {'wall s':>8s} {'ms/iter/rep':>12s} "
              f"{'rep/s':>8s} {'compile s':>9s} {'memory MB':>9s} {'max rel ll gap':>15s}")
    print(header)
    for method, row in rows.items():
        gap = float(np.max((best - row["log_likelihood"]) / np.abs(best)))
        memory = "n/a" if row["memory"] is None else f"{row['memory'] / 2**20:.1f}"
        print(f"{method:10s} {row['iterations']:10.0f} {row['longest']:8d} {row['converged']:6.2f} {row['wall']:8.2f} "
              f"{1e3 * row['per_iteration']:12.3f} {row['replicates_per_second']:8.2f} {row['compile']:9.1f} {memory:>9s} {gap:15.2e}")
    print(f"reference maximum: squarem at tol = 0, median {np.median(np.asarray(reference.n_iter)):.0f} cycles, "
          f"{np.mean(np.asarray(reference.converged)):.2f} stopped by the rule")
    em = rows["em"]
    print("wall-time ratios: " + ", ".join(
        f"em / {method} {em['wall'] / row['wall']:.1f}x (iterations {em['iterations'] / row['iterations']:.1f}x)"
        for method, row in rows.items() if method != "em"))


if __name__ == "__main__":
    main()
