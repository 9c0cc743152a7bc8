"""Compile time of EM for every gate × expert, with the small-matrix kernels chosen by size.

:mod:`moe_theory.linalg` unrolls Cholesky and triangular solves for matrices up to
:data:`moe_theory.linalg.UNROLL_MAX_SIZE` and calls LAPACK above. This benchmark measures what that
rule costs and saves, on the fits a sweep compiles.

**Pairs** (default mode). For every registered gate preset (``moe_theory.GATES``; ``topk_softmax``
with top_k = 1) × expert (``gaussian``, ``multinomial_logistic`` with C = 3, ``nonlinear``) at
k = 6, d = 4: the compile time of ``jax.jit(jax.vmap(fit_em))`` over 8 replicates, as the sweep
compiles it (lowering and XLA compilation timed separately, persistent compilation cache off), the
sizes of the Newton Hessians (gate and expert; "closed" where that M-step has a closed form, and the
(d+1) × (d+1) Gram matrix of the Gaussian-linear expert then), and the time per EM iteration per
replicate (``EMConfig(max_iter=--iterations)`` with tol = 0, n = ``--samples``, median of
``--repeats`` runs after a warm-up run). Data are drawn with :func:`moe_theory.sample` from a random
valid truth; every replicate starts from the same perturbed truth.

**Reference.** The pairs named by ``--reference`` (default: a subset whose largest Hessian is 30 or
31, since the unrolled kernels need minutes at 60 and more) are compiled and run again inside
``moe_theory.linalg.kernels(unroll_max_size=10**9)``, i.e. with the unrolled kernels at every size (the
module before the size rule), and the ratios are printed.

**Crossover** (``--crossover``). Compile time and run time of ``linalg.solve_positive_definite`` for
m = 2..12 inside a ``fori_loop`` of 200 solves, ``vmap``-ed over 8 systems, unrolled against LAPACK:
the measurement behind the threshold.

**Deadlock check** (``--deadlock``). Runs ``vmap``-ed fits that call LAPACK inside ``while`` loops
(sigmoid gate with multinomial-logistic experts, k = 6, d = 4; Gaussian gate with Gaussian experts,
k = 5, d = 2) ``--deadlock-runs`` times each under a watchdog (``--deadlock-timeout`` seconds per
run) that dumps every thread's stack and exits (status 1) on a hang. ``--large lapack`` runs any mode
with the LAPACK kernels above the threshold instead of the loop kernels (with jaxlib 0.10.2 on 2 cores
the first of these fits hangs in ``lapack_dpotrf_ffi``).

Run from the repository root::

    python benchmarks/bench_compile.py                        # all pairs, reference subset
    python benchmarks/bench_compile.py --gates sigmoid --experts gaussian --reference none
    python benchmarks/bench_compile.py --crossover
    python benchmarks/bench_compile.py --deadlock
    python benchmarks/bench_compile.py --deadlock --large lapack   # reproduces the hang
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_compilation_cache", False)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moe_theory as mt  # noqa: E402
from moe_theory import linalg  # noqa: E402
from moe_theory.fit import EMConfig, fit_em  # noqa: E402
from moe_theory.params import unconstrain  # noqa: E402

EXPERT_SPECS = {"gaussian": {}, "multinomial_logistic": {"num_classes": 3}, "nonlinear": {}}
DEFAULT_REFERENCE = "sigmoid:gaussian,temperature_softmax:gaussian,softmax:nonlinear"
REPLICATES = 8


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gates", default=",".join(mt.GATES), help="comma-separated gate presets")
    parser.add_argument("--experts", default=",".join(EXPERT_SPECS), help="comma-separated experts")
    parser.add_argument("--num-experts", type=int, default=6, help="k")
    parser.add_argument("--dim", type=int, default=4, help="d")
    parser.add_argument("--samples", type=int, default=1000, help="n per replicate")
    parser.add_argument("--iterations", type=int, default=20, help="EM iterations per run (tol = 0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pair (median reported)")
    parser.add_argument(
        "--reference",
        default=DEFAULT_REFERENCE,
        help="gate:expert pairs also timed with the unrolled kernels at every size ('none', 'all', or a list)",
    )
    parser.add_argument("--crossover", action="store_true", help="only the m = 2..12 kernel crossover")
    parser.add_argument("--deadlock", action="store_true", help="only the LAPACK-in-vmapped-while-loop check")
    parser.add_argument("--deadlock-runs", type=int, default=3)
    parser.add_argument("--deadlock-timeout", type=float, default=300.0)
    parser.add_argument(
        "--large", choices=("loop", "lapack"), default="loop", help="kernels above the size threshold (lapack: may hang)"
    )
    return parser.parse_args()


# --- data ---------------------------------------------------------------------------------------


def make_family(gate: str, expert: str, num_experts: int, dim: int) -> mt.Family:
    spec = EXPERT_SPECS[expert]
    gate_spec = {"name": gate, "top_k": 1} if gate == "topk_softmax" else gate
    return mt.make_family(gate_spec, expert, num_experts, dim, num_classes=spec.get("num_classes"))


def random_params(family: mt.Family, rng: np.random.Generator) -> mt.MoEParams:
    """A valid random truth: real fields N(0, 1), positive ones in [0.5, 1.5] (Gaussian-gate weights
    normalised), covariances SPD with eigenvalues of order 0.1–1."""
    values = {}
    for group in ("gate", "expert"):
        values[group] = {}
        for field in family.fields[group]:
            shape = field.resolve_shape(family.num_experts, family.dim, family.num_classes)
            if field.constraint == "positive":
                value = rng.uniform(0.5, 1.5, size=shape)
                if field.name == "weight":
                    value = value / value.sum()
            elif field.constraint == "positive_definite":
                base = rng.normal(size=shape) / np.sqrt(shape[-1])
                value = 0.2 * (base @ np.swapaxes(base, -1, -2)) + 0.1 * np.eye(shape[-1])
            else:
                value = rng.normal(size=shape)
            values[group][field.name] = value
    return mt.canonicalize(family, mt.make_params(family, values))


def perturbed(family: mt.Family, params: mt.MoEParams, rng: np.random.Generator) -> mt.MoEParams:
    """The truth moved a little: real fields by N(0, 0.1²), positive ones by a factor e^{N(0, 0.1²)}."""

    def move(field, value):
        value = np.asarray(value)
        if field.constraint == "positive":
            return value * np.exp(0.1 * rng.normal(size=value.shape))
        if field.constraint == "real":
            return value + 0.1 * rng.normal(size=value.shape)
        return value

    groups = {
        group: {f.name: jnp.asarray(move(f, getattr(params, group)[f.name])) for f in family.fields[group]}
        for group in ("gate", "expert")
    }
    return mt.canonicalize(family, mt.MoEParams(**groups))


def replicate_data(family: mt.Family, truth: mt.MoEParams, samples: int, seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), REPLICATES)
    x, y, _ = jax.vmap(lambda key: mt.sample(key, family, truth, samples))(keys)
    return x, y


def hessian_sizes(family: mt.Family, params: mt.MoEParams, config: EMConfig) -> tuple[str, str]:
    gate = (
        "closed"
        if config.likelihood == "joint"
        else str(ravel_pytree(unconstrain(family.gate.fields, params.gate))[0].size)
    )
    if family.expert.has_closed_form_mstep:
        expert = f"closed (Gram {family.dim + 1})"
    else:
        expert = str(ravel_pytree(unconstrain(family.expert.fields, params.expert))[0].size)
    return gate, expert


# --- timing -------------------------------------------------------------------------------------


def fit_program(family: mt.Family, config: EMConfig):
    def fit_all(params0, x, y):
        return jax.vmap(lambda xs, ys: fit_em(family, params0, xs, ys, None, 0.0, config))(x, y)

    return fit_all


def time_pair(family: mt.Family, params0, x, y, config: EMConfig, repeats: int) -> dict:
    program = jax.jit(fit_program(family, config))
    start = time.perf_counter()
    lowered = program.lower(params0, x, y)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    result = jax.block_until_ready(compiled(params0, x, y))  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(params0, x, y))
        runs.append(time.perf_counter() - start)
    iterations = max(int(np.max(result.n_iter)), 1)
    return {
        "lower": lower_seconds,
        "compile": compile_seconds,
        "iteration_ms": statistics.median(runs) / iterations / REPLICATES * 1e3,
        "n_iter": iterations,
        "finite": int(np.sum(result.finite)),
        "log_likelihood": np.asarray(result.log_likelihood),
    }


def run_pairs(args: argparse.Namespace) -> None:
    gates, experts = args.gates.split(","), args.experts.split(",")
    if args.reference == "all":
        reference = {(g, e) for g in gates for e in experts}
    elif args.reference == "none":
        reference = set()
    else:
        reference = {tuple(pair.split(":")) for pair in args.reference.split(",")}
    config = EMConfig(max_iter=args.iterations)
    k, d = args.num_experts, args.dim
    print(
        f"# bench_compile: jax {jax.__version__}, {os.cpu_count()} CPU(s), k = {k}, d = {d}, n = {args.samples}, "
        f"vmap over {REPLICATES} replicates, {args.iterations} EM iterations (tol = 0), median of {args.repeats} runs; "
        f"UNROLL_MAX_SIZE = {linalg.UNROLL_MAX_SIZE}; unrolled reference for {sorted(reference) or 'none'}"
    )
    header = (
        f"{'gate':31s} {'expert':21s} {'H gate':>6s} {'H expert':>15s} {'lower s':>8s} {'compile s':>9s} "
        f"{'ms/it/rep':>9s} {'finite':>6s} | {'unrolled: compile s':>19s} {'ms/it/rep':>9s} {'compile ratio':>13s} "
        f"{'run ratio':>9s} {'max |Δℓ|':>9s}"
    )
    print(header)
    print("-" * len(header))
    totals, reference_rows = [], []
    for index, (gate, expert) in enumerate((g, e) for g in gates for e in experts):
        family = make_family(gate, expert, k, d)
        rng = np.random.default_rng(index)
        truth = random_params(family, rng)
        params0 = perturbed(family, truth, rng)
        x, y = replicate_data(family, truth, args.samples, index)
        gate_size, expert_size = hessian_sizes(family, params0, config)
        row = time_pair(family, params0, x, y, config, args.repeats)
        totals.append(row["lower"] + row["compile"])
        line = (
            f"{gate:31s} {expert:21s} {gate_size:>6s} {expert_size:>15s} {row['lower']:8.2f} {row['compile']:9.2f} "
            f"{row['iteration_ms']:9.3f} {row['finite']:>4d}/{REPLICATES}"
        )
        if (gate, expert) in reference:
            with linalg.kernels(unroll_max_size=10**9):
                old = time_pair(family, params0, x, y, config, args.repeats)
            difference = np.nanmax(np.abs(old["log_likelihood"] - row["log_likelihood"]))
            reference_rows.append((old["lower"] + old["compile"]) / (row["lower"] + row["compile"]))
            line += (
                f" | {old['lower'] + old['compile']:19.2f} {old['iteration_ms']:9.3f} "
                f"{(old['lower'] + old['compile']) / (row['lower'] + row['compile']):13.1f} "
                f"{old['iteration_ms'] / row['iteration_ms']:9.2f} {difference:9.1e}"
            )
        print(line, flush=True)
    print(
        f"# lower + compile over {len(totals)} pairs: median {statistics.median(totals):.2f} s, "
        f"max {max(totals):.2f} s, total {sum(totals):.1f} s"
        + (
            f"; unrolled/size-rule compile ratio on the reference pairs: median {statistics.median(reference_rows):.1f}"
            if reference_rows
            else ""
        )
    )


# --- crossover ----------------------------------------------------------------------------------

CROSSOVER_STEPS = 200


def crossover_program(matrix, rhs):
    identity = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)

    def body(_, solution):
        # The shift depends on the carry, so XLA cannot hoist the factorisation out of the loop.
        shift = 1e-3 * jnp.tanh(solution[0]) ** 2
        return linalg.solve_positive_definite(matrix + shift * identity, rhs + 1e-3 * solution)

    return jax.lax.fori_loop(0, CROSSOVER_STEPS, body, rhs)


def run_crossover(args: argparse.Namespace) -> None:
    repeats = max(args.repeats, 5)
    print(
        f"# solve_positive_definite in a fori_loop of {CROSSOVER_STEPS} solves, vmap over {REPLICATES}: compile "
        f"seconds and run µs per solve (median of {repeats} runs) of the unrolled, loop and LAPACK kernels"
    )
    print(
        f"{'m':>3s} {'compile: unrolled':>17s} {'loop':>6s} {'lapack':>6s} | {'µs: unrolled':>12s} {'loop':>6s} "
        f"{'lapack':>6s} | {'loop/unrolled':>13s} {'lapack/unrolled':>15s}"
    )
    rng = np.random.default_rng(0)
    settings = [dict(unroll_max_size=10**9), dict(unroll_max_size=0, large="loop"), dict(unroll_max_size=0, large="lapack")]
    for size in range(2, 13):
        base = rng.normal(size=(REPLICATES, size, size))
        matrix = base @ np.swapaxes(base, -1, -2) + size * np.eye(size)
        rhs = rng.normal(size=(REPLICATES, size))
        compile_seconds, run_micros = [], []
        for setting in settings:
            with linalg.kernels(**setting):
                start = time.perf_counter()
                compiled = jax.jit(jax.vmap(crossover_program)).lower(matrix, rhs).compile()
                compile_seconds.append(time.perf_counter() - start)
                jax.block_until_ready(compiled(matrix, rhs))
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(matrix, rhs))
                    runs.append(time.perf_counter() - start)
                run_micros.append(statistics.median(runs) / CROSSOVER_STEPS / REPLICATES * 1e6)
        print(
            f"{size:3d} {compile_seconds[0]:17.3f} {compile_seconds[1]:6.3f} {compile_seconds[2]:6.3f} | "
            f"{run_micros[0]:12.3f} {run_micros[1]:6.3f} {run_micros[2]:6.3f} | "
            f"{run_micros[1] / run_micros[0]:13.2f} {run_micros[2] / run_micros[0]:15.2f}",
            flush=True,
        )


# --- deadlock check -----------------------------------------------------------------------------


def run_deadlock(args: argparse.Namespace) -> None:
    cases = [("sigmoid", "multinomial_logistic", 6, 4), ("gaussian", "gaussian", 5, 2)]
    config = EMConfig(max_iter=args.iterations)
    for index, (gate, expert, k, d) in enumerate(cases):
        family = make_family(gate, expert, k, d)
        rng = np.random.default_rng(100 + index)
        truth = random_params(family, rng)
        params0 = perturbed(family, truth, rng)
        print(f"# {gate} × {expert}, k = {k}, d = {d}: Hessian sizes {hessian_sizes(family, params0, config)}", flush=True)
        program = jax.jit(fit_program(family, config))
        for run in range(args.deadlock_runs):
            x, y = replicate_data(family, truth, args.samples, 1000 * index + run)
            faulthandler.dump_traceback_later(args.deadlock_timeout, exit=True)
            start = time.perf_counter()
            result = jax.block_until_ready(program(params0, x, y))
            faulthandler.cancel_dump_traceback_later()
            print(
                f"  run {run}: {time.perf_counter() - start:7.2f} s (first includes compilation), "
                f"{int(np.sum(result.finite))}/{REPLICATES} finite, iterations {np.asarray(result.n_iter).tolist()}",
                flush=True,
            )
    print("# no hang")


def main() -> None:
    args = parse_arguments()
    linalg.LARGE_KERNEL = args.large  # before anything is traced
    if args.crossover:
        run_crossover(args)
    elif args.deadlock:
        run_deadlock(args)
    else:
        run_pairs(args)


if __name__ == "__main__":
    main()
