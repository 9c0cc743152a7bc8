"""EM throughput: this package's fitter against its generic path, plain NumPy and the machine's floor.

Workload (the one the project's performance targets are set on): softmax gate and Gaussian-linear
experts, n = 10,000 samples, k = 3 fitted experts, d = 1, 200 EM iterations with a negative tolerance (so no fit stops early), float64,
64 replicates. Data follow paper 1's two-expert truth (β₀ = (−8, 0), β₁ = (25, 0), a = (−20, 20),
b = (15, −5), ν = (0.09, 0.16)) on a grid x ∈ [0, 1]; each replicate starts near the truth with the
second true expert split in two.

Rows of the table, each timed as the median of ``--repeats`` runs after one warm-up run:

* ``fast``: :func:`moe_theory.fit.fit_batch` as a user calls it; for this family it runs the fast
  path of :mod:`moe_theory.fit.fast` (chunks of ``--batch-size`` replicates, default per backend).
* ``defaults``: the fast path compiled with XLA's default options instead of the ones the package
  gives it (:data:`moe_theory.fit.compiling.FAST_PATH_OPTIONS`), to show what they contribute.
* ``generic``: the same call with ``EMConfig(fast_path=False)``, the generic EM iteration.
* ``numpy``: a plain NumPy implementation of the same algorithm, written below: vectorised over
  the samples, looping over replicates; closed-form expert M-step and one damped Newton gate step
  with step halving per iteration, as in docs/estimators.md.
* ``floor``: FLOPs, exponentials and bytes an iteration cannot avoid, at the measured matmul rate,
  exp throughput and copy bandwidth of this machine (see :func:`floor_model`).

Reported per row: time per EM iteration per replicate (median and best run), CPU time per
iteration per replicate (process time: the machine may be shared), replicates per second, compile
time (lowering + XLA compilation), peak memory (JAX rows: XLA's buffer assignment for the compiled
program, arguments + outputs + temporaries; NumPy: tracemalloc's peak during one replicate), and the
ratios to NumPy and to the floor. The final log-likelihoods of the three implementations are
checked against each other on the replicates they share.

XLA flags must be set before JAX starts, so ``--xla-flags`` is applied here before importing it
(e.g. ``--xla-flags=--xla_cpu_enable_fast_math=true``); a program's own compiler options, such as
the fast path's, take precedence over them. Run from the repository root::

    python benchmarks/bench_em.py                       # the issue's workload
    python benchmarks/bench_em.py --replicates 8 --iterations 50 --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000, help="n per dataset")
    parser.add_argument("--experts", type=int, default=3, help="k fitted experts (≥ 2)")
    parser.add_argument("--iterations", type=int, default=200, help="fixed EM iterations")
    parser.add_argument("--replicates", type=int, default=64, help="datasets fitted by the package's fast path")
    parser.add_argument("--generic-replicates", type=int, default=16, help="datasets for the generic path (slower)")
    parser.add_argument("--numpy-replicates", type=int, default=4, help="datasets for the NumPy reference (slowest)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row; medians are reported")
    parser.add_argument("--batch-size", type=int, default=None, help="replicates per chunk (default: per backend)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX is imported")
    parser.add_argument("--skip-generic", action="store_true", help="leave out the generic-path row")
    return parser.parse_args()


ARGS = parse_arguments()
if ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ARGS.xla_flags}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moe_theory as mt  # noqa: E402
from moe_theory.fit import EMConfig, fit_batch  # noqa: E402
from moe_theory.fit.api import default_batch_size, fit_batch_program  # noqa: E402
from moe_theory.fit.compiling import FAST_PATH_OPTIONS, accepted_options  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)
TRUTH = {"beta0": [-8.0, 0.0], "beta1": [25.0, 0.0], "a": [-20.0, 20.0], "b": [15.0, -5.0], "nu": [0.09, 0.16]}
MAX_HALVINGS = EMConfig().max_halvings


# ----------------------------------------------------------------------------------------------
# Workload.


def make_workload(replicates: int, samples: int, experts: int, dtype, seed: int = 0):
    """Grid inputs, responses from paper 1's truth, near-truth starts; every array (R, ...)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, samples)
    scores = np.array(TRUTH["beta0"])[None, :] + np.array(TRUTH["beta1"])[None, :] * x[:, None]
    first = 1.0 / (1.0 + np.exp(scores[:, 1] - scores[:, 0]))
    a, b, nu = (np.array(TRUTH[name]) for name in ("a", "b", "nu"))
    responses = np.empty((replicates, samples))
    for r in range(replicates):
        labels = (rng.random(samples) > first).astype(int)
        responses[r] = a[labels] * x + b[labels] + np.sqrt(nu[labels]) * rng.standard_normal(samples)
    # Start: true expert 0, then k − 1 noisy copies of true expert 1; the reference gate stays at 0.
    copies = experts - 1

    def jitter(scale, size):
        return scale * rng.standard_normal((replicates, size))

    beta0 = np.concatenate([TRUTH["beta0"][0] + jitter(0.1, 1), jitter(0.1, copies - 1), np.zeros((replicates, 1))], axis=1)
    beta1 = np.concatenate([TRUTH["beta1"][0] + jitter(0.1, 1), jitter(0.1, copies - 1), np.zeros((replicates, 1))], axis=1)
    start = {
        "beta0": beta0,
        "beta1": beta1[..., None],
        "a": np.concatenate([a[:1] + jitter(0.1, 1), a[1] + jitter(0.1, copies)], axis=1)[..., None],
        "b": np.concatenate([b[:1] + jitter(0.1, 1), b[1] + jitter(0.1, copies)], axis=1),
        "nu": np.concatenate([nu[:1] * np.exp(jitter(0.1, 1)), nu[1] * np.exp(jitter(0.1, copies))], axis=1),
    }
    inputs = np.broadcast_to(x[None, :, None], (replicates, samples, 1)).astype(dtype)
    return inputs, responses.astype(dtype), {name: value.astype(dtype) for name, value in start.items()}


def package_params(start: dict, count: int) -> mt.MoEParams:
    """The first ``count`` starts as MoEParams with a starts axis of length 1 (fit_batch's layout)."""
    def take(name):
        return jnp.asarray(start[name][:count, None])

    return mt.MoEParams(
        gate={"beta0": take("beta0"), "beta1": take("beta1")}, expert={"a": take("a"), "b": take("b"), "nu": take("nu")}
    )


# ----------------------------------------------------------------------------------------------
# The NumPy reference: the same EM iteration, written plainly.


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """log Σ_i exp(values_i) over the expert axis 0 of a (k, n) array."""
    top = values.max(axis=0)
    return top + np.log(np.exp(values - top).sum(axis=0))


def _log_gate(x: np.ndarray, beta0: np.ndarray, beta1: np.ndarray) -> np.ndarray:
    """log π, (k, n): experts along axis 0, so every operation is vectorised over the samples."""
    scores = beta0[:, None] + beta1 @ x.T
    return scores - _logsumexp(scores)


def _damped_newton_direction(curvature: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Solve (A + μI) δ = g as moe_theory.fit.newton does: a √ε ridge, else a Gershgorin shift."""
    diagonal = np.diag(curvature)
    ridge = np.sqrt(np.finfo(curvature.dtype).eps) * max(np.max(np.abs(diagonal)), 1.0)
    identity = np.eye(len(gradient), dtype=curvature.dtype)
    try:
        factor = np.linalg.cholesky(curvature + ridge * identity)
    except np.linalg.LinAlgError:
        gershgorin = np.max(np.abs(curvature).sum(axis=1) - np.abs(diagonal) - diagonal)
        factor = np.linalg.cholesky(curvature + (max(gershgorin, 0.0) + ridge) * identity)
    return np.linalg.solve(factor.T, np.linalg.solve(factor, gradient))


def numpy_em(x: np.ndarray, y: np.ndarray, start: dict, iterations: int) -> tuple[dict, float]:
    """``iterations`` EM iterations from ``start`` for one dataset (x (n, d), y (n,)), then a final
    E-step; returns the parameters and the final average log-likelihood."""
    beta0, beta1 = start["beta0"].copy(), start["beta1"].copy()
    a, b, nu = start["a"].copy(), start["b"].copy(), start["nu"].copy()
    n, k = y.shape[0], b.shape[0]
    design = np.concatenate([x, np.ones((n, 1), x.dtype)], axis=1)  # expert design (x, 1), (n, d + 1)
    features = np.concatenate([np.ones((n, 1), x.dtype), x], axis=1)  # gate features (1, x), (n, d + 1)
    free = k - 1  # the reference expert's gate stays at 0

    def e_step():
        log_gate = _log_gate(x, beta0, beta1)
        mean = a @ x.T + b[:, None]
        joint = log_gate - 0.5 * (LOG_2PI + np.log(nu)[:, None] + (y[None, :] - mean) ** 2 / nu[:, None])
        per_sample = _logsumexp(joint)
        return log_gate, np.exp(joint - per_sample), per_sample.mean()

    for _ in range(iterations):
        log_gate, responsibilities, _ = e_step()
        # Expert M-step: weighted least squares and the weighted residual variance, per expert.
        for i in range(k):
            weights = responsibilities[i]
            gram = design.T @ (weights[:, None] * design)
            coefficients = np.linalg.solve(gram, design.T @ (weights * y))
            variance = np.sum(weights * (y - design @ coefficients) ** 2) / np.sum(weights)
            if np.all(np.isfinite(coefficients)) and np.isfinite(variance) and np.sum(weights) > 0:
                a[i], b[i], nu[i] = coefficients[:-1], coefficients[-1], variance
        # Gate M-step: one damped Newton step on Q(u) = Σ r log π / n over the free coordinates
        # u = (β₀ of experts 0..k−2, then β₁ of each), with step halving.
        gate_weights = np.exp(log_gate)
        residual = (responsibilities - gate_weights)[:free]
        gradient = np.concatenate([residual @ features[:, 0], (residual @ features[:, 1:]).ravel()]) / n
        blocks = {}
        for i in range(free):
            for l in range(free):
                weight = gate_weights[i] * ((i == l) - gate_weights[l])
                blocks[i, l] = features.T @ (weight[:, None] * features) / n  # (d + 1) × (d + 1)
        index = [(i, 0) for i in range(free)] + [(i, c) for i in range(free) for c in range(1, features.shape[1])]
        curvature = np.array([[blocks[i, l][p, q] for (l, q) in index] for (i, p) in index])
        direction = _damped_newton_direction(curvature, gradient)

        def objective(step):
            trial0, trial1 = beta0.copy(), beta1.copy()
            trial0[:free] += step * direction[:free]
            trial1[:free] += step * direction[free:].reshape(free, -1)
            return np.sum(responsibilities * _log_gate(x, trial0, trial1)) / n, trial0, trial1

        current = np.sum(responsibilities * log_gate) / n
        step = 1.0
        while True:  # α = 1, ½, … while α > 2^−max_halvings, the first with Q(u + αδ) ≥ Q(u)
            value, trial0, trial1 = objective(step)
            if value >= current:
                if np.isfinite(value):
                    beta0, beta1 = trial0, trial1
                break
            step *= 0.5
            if not step > 0.5**MAX_HALVINGS:
                break
    _, _, log_likelihood = e_step()
    return {"beta0": beta0, "beta1": beta1, "a": a, "b": b, "nu": nu}, float(log_likelihood)


# ----------------------------------------------------------------------------------------------
# Timing.


@dataclass
class Row:
    """Timings of one implementation: seconds for all ``count`` replicates × ``iterations``."""

    count: int
    median: float
    best: float
    cpu: float
    compile: float = 0.0
    memory: int | None = None  # bytes
    log_likelihoods: np.ndarray | None = None  # final, per replicate


def timed_runs(run, repeats: int) -> tuple[float, float, float]:
    """Median and best wall time and median CPU time of ``repeats`` calls of ``run`` (after a warm-up)."""
    run()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return float(np.median(walls)), float(np.min(walls)), float(np.median(cpus))


def time_package(
    config: EMConfig, inputs, responses, start, count: int, batch_size: int, repeats: int, xla_defaults: bool = False
) -> Row:
    family = mt.make_family("softmax", "gaussian", start["b"].shape[1], 1)
    params = package_params(start, count)
    x, y = jnp.asarray(inputs[:count]), jnp.asarray(responses[:count])
    began = time.perf_counter()
    # fit_batch compiles with the XLA options the package picks for this family (moe_theory.fit.compiling);
    # traced inside a plain jit instead, it is compiled with XLA's defaults.
    static = ("family", "method", "config", "batch_size")
    program = jax.jit(fit_batch, static_argnames=static) if xla_defaults else fit_batch_program(family, config)
    compiled = program.lower(family, params, x, y, None, -1.0, "em", config, batch_size).compile()
    compile_seconds = time.perf_counter() - began
    buffers = compiled.memory_analysis()
    memory = None
    if buffers is not None:
        memory = buffers.argument_size_in_bytes + buffers.output_size_in_bytes + buffers.temp_size_in_bytes
    result = jax.block_until_ready(compiled(params, x, y, None, -1.0))
    median, best, cpu = timed_runs(lambda: jax.block_until_ready(compiled(params, x, y, None, -1.0)), repeats)
    return Row(count, median, best, cpu, compile_seconds, memory, np.asarray(result.log_likelihood))


def time_numpy(inputs, responses, start, count: int, iterations: int, repeats: int) -> Row:
    def fit(r, steps=iterations):
        return numpy_em(inputs[r], responses[r], {name: value[r] for name, value in start.items()}, steps)[1]

    log_likelihoods = np.array([fit(r) for r in range(count)])  # also the warm-up
    tracemalloc.start()
    fit(0, 2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    median, best, cpu = timed_runs(lambda: [fit(r) for r in range(count)], repeats)
    return Row(count, median, best, cpu, 0.0, peak, log_likelihoods)


# ----------------------------------------------------------------------------------------------
# The floor.


def measured_rates(dtype) -> dict:
    """Matmul FLOP rate (all cores: BLAS or XLA, the faster), copy bandwidth (read + write), and the
    time of one exponential on one core (NumPy's vectorised exp is single-threaded; XLA's may split a
    large array over the cores, so it is timed on a slice small enough to stay on one)."""
    rng = np.random.default_rng(1)
    size = 2048
    left, right = rng.random((size, size)).astype(dtype), rng.random((size, size)).astype(dtype)
    matmul = min(_best_of(lambda: left @ right, 5), _best_of(lambda: jax.block_until_ready(_jax_matmul(left, right)), 5))
    source = rng.random(32 * 2**20 // (np.dtype(dtype).itemsize // 4)).astype(dtype)  # 128–256 MB
    target = np.empty_like(source)
    copy = _best_of(lambda: np.copyto(target, source), 5)
    values = (rng.random(2**22) * 10 - 5).astype(dtype)
    output = np.empty_like(values)
    exp_numpy = _best_of(lambda: np.exp(values, out=output), 7) / values.size
    small = jnp.asarray(values[: 2**14])
    exp_xla = min(_best_of(lambda: jax.block_until_ready(program(small)), 200) for program in _jax_exp_sums) / small.size
    return {"matmul_flops": 2 * size**3 / matmul, "copy_bytes": 2 * source.nbytes / copy, "exp_seconds": min(exp_numpy, exp_xla)}


_jax_matmul = jax.jit(lambda a, b: a @ b)
_jax_exp_sums = [  # with XLA's defaults and with the fast path's options (wider vectors), the faster counts
    jax.jit(lambda v: jnp.sum(jnp.exp(v)), compiler_options=options) for options in (None, accepted_options(FAST_PATH_OPTIONS))
]


def _best_of(run, repeats: int) -> float:
    run()
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best


def floor_model(samples: int, experts: int, dim: int, itemsize: int, rates: dict, cores: int) -> dict:
    """Work of one EM iteration on one dataset that no implementation can avoid, and its time.

    Per sample: 2k exponentials (k gate weights π_i, k responsibilities r_i; logarithms can be
    amortised over products of samples, so none is counted); FLOPs: the scores, residuals, log
    densities and normalisation of the E-step (≈ 2d(k − 1) + 2(d + 1)k + 8k) plus a multiply and an
    add for each moment sum the M-steps need (expert: Σ r D Dᵀ, Σ r e D, Σ r e²; gate: Σ π G Gᵀ,
    Σ π_i π_l G Gᵀ); bytes: reading x and y once. Time = max(exp time + FLOP time, byte time), with
    exponentials spread over all cores, FLOPs at the measured matmul rate and bytes at the copy
    bandwidth.
    """
    free, size = experts - 1, dim + 1
    pairs = size * (size + 1) // 2
    moments = experts * (pairs + size + 1) + free * pairs + free * (free + 1) // 2 * pairs
    flops = 2 * dim * free + 2 * size * experts + 8 * experts + 2 * moments
    exponentials = 2 * experts
    data_bytes = (dim + 1) * itemsize
    compute = samples * (exponentials * rates["exp_seconds"] / cores + flops / rates["matmul_flops"])
    memory = samples * data_bytes / rates["copy_bytes"]
    return {
        "flops": flops,
        "exponentials": exponentials,
        "bytes": data_bytes,
        "moments": moments,
        "seconds": max(compute, memory),
        "compute": compute,
        "memory": memory,
    }


# ----------------------------------------------------------------------------------------------
# Report.


def print_table(rows: dict[str, Row], floor: dict, iterations: int) -> None:
    def per_iteration(row: Row, seconds: float) -> float:
        return seconds / (row.count * iterations)

    numpy_time = per_iteration(rows["numpy"], rows["numpy"].median)
    columns = ("method", "ms/iter/rep", "best", "cpu ms", "reps/s", "compile s", "peak MB", "vs NumPy", "÷ floor", "replicates")
    header = f"{columns[0]:9s}" + "".join(f" {c:>11s}" for c in columns[1:])
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        median = per_iteration(row, row.median)
        cells = [
            f"{1e3 * median:.4f}",
            f"{1e3 * per_iteration(row, row.best):.4f}",
            f"{1e3 * per_iteration(row, row.cpu):.4f}",
            f"{row.count / row.median:.2f}",
            f"{row.compile:.1f}",
            "n/a" if row.memory is None else f"{row.memory / 2**20:.1f}",
            f"{numpy_time / median:.1f}×",
            f"{median / floor['seconds']:.1f}×",
            str(row.count),
        ]
        print(f"{name:9s}" + "".join(f" {cell:>11s}" for cell in cells))
    floor_time = floor["seconds"]
    cells = [f"{1e3 * floor_time:.4f}", "", "", f"{1 / (iterations * floor_time):.2f}", "", "", f"{numpy_time / floor_time:.1f}×", "1.0×", ""]
    print(f"{'floor':9s}" + "".join(f" {cell:>11s}" for cell in cells))


def main() -> None:
    dtype = np.float64 if ARGS.dtype == "float64" else np.float32
    if ARGS.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    replicates, n, k, iterations = ARGS.replicates, ARGS.samples, ARGS.experts, ARGS.iterations
    batch_size = ARGS.batch_size or default_batch_size(replicates)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"EM benchmark: softmax gate × Gaussian-linear experts, n = {n}, k = {k}, d = 1, {iterations} iterations,", ARGS.dtype)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {cores} cores, chunks of {batch_size} replicates")
    print(f"compiler options of the fast path: {accepted_options(FAST_PATH_OPTIONS)}")
    print(f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'; load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    largest = max(replicates, ARGS.generic_replicates, ARGS.numpy_replicates)
    inputs, responses, start = make_workload(largest, n, k, dtype)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fast = EMConfig(max_iter=iterations)
    rows = {"fast": time_package(fast, inputs, responses, start, replicates, batch_size, ARGS.repeats)}
    slow_repeats = max(1, ARGS.repeats // 2)
    rows["defaults"] = time_package(fast, inputs, responses, start, replicates, batch_size, slow_repeats, xla_defaults=True)
    if not ARGS.skip_generic:
        count = ARGS.generic_replicates
        generic = EMConfig(max_iter=iterations, fast_path=False)
        rows["generic"] = time_package(generic, inputs, responses, start, count, min(batch_size, count), slow_repeats)
    rows["numpy"] = time_numpy(inputs, responses, start, ARGS.numpy_replicates, iterations, slow_repeats)
    rss_grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    rates = measured_rates(dtype)
    floor = floor_model(n, k, 1, np.dtype(dtype).itemsize, rates, cores)

    print()
    print_table(rows, floor, iterations)
    print()
    print(
        f"floor per sample and iteration: {floor['exponentials']} exp, {floor['flops']} FLOPs"
        f" ({floor['moments']} moment sums), {floor['bytes']} bytes; machine: {rates['matmul_flops'] / 1e9:.1f} GFLOP/s"
        f" matmul, {rates['copy_bytes'] / 1e9:.1f} GB/s copy, {1e9 * rates['exp_seconds']:.2f} ns/exp/core × {cores} cores"
        f" -> compute {1e3 * floor['compute']:.4f} ms, memory {1e3 * floor['memory']:.4f} ms"
    )
    print(
        "ms/iter/rep: median wall time per EM iteration per replicate; best: fastest run; cpu ms: process CPU"
        " time (all threads) per iteration per replicate; peak MB: JAX rows = XLA buffer assignment of the"
        " compiled program (arguments + outputs + temporaries), NumPy = tracemalloc peak of one replicate"
        f" (process max RSS grew {rss_grew:.0f} MB over the timed rows)"
    )
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    # The final log-likelihoods must agree on the replicates all rows fitted.
    shared = min(row.count for row in rows.values())
    reference = rows["fast"].log_likelihoods[:shared]
    differences = {
        name: float(np.max(np.abs(row.log_likelihoods[:shared] - reference) / np.abs(reference)))
        for name, row in rows.items()
        if name != "fast"
    }
    listed = ", ".join(f"{name} {value:.1e}" for name, value in differences.items())
    print(f"final log-likelihoods on {shared} shared replicates, max relative difference to fast: {listed}")
    tolerance = 1e-9 if ARGS.dtype == "float64" else 1e-4
    if not all(value <= tolerance for value in differences.values()):
        raise SystemExit(f"log-likelihoods disagree beyond {tolerance:g}")


if __name__ == "__main__":
    main()
