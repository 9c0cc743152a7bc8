"""XLA compiler options for the fitting programs, chosen per program.

The fitting entry points (:func:`~moe_theory.fit.em.fit_em`, :func:`~moe_theory.fit.em.fit_em_trace`,
:func:`~moe_theory.fit.api.fit_batch`, and the fit programs of :mod:`moe_theory.sweep`) are compiled
once per static setting. A program that runs EM's fast path (:mod:`moe_theory.fit.fast`) is
compiled with :data:`FAST_PATH_OPTIONS`; every other program gets XLA's defaults.

**Why.** On a CPU, a fast-path iteration is a few element-wise passes over the samples, which
compute the 2k exponentials, and one variadic reduction of the ~35 moment sums (k = 3, d = 1). XLA's
default CPU fusion emitters generate that reduction as scalar code whose accumulators live in
memory, and vectorise the element-wise passes four doubles wide. XLA's loop emitter
(``xla_cpu_use_fusion_emitters=False``) with 512-bit vectors (``xla_cpu_prefer_vector_width=512``,
which only widens code where the CPU has AVX-512) runs the same program faster. On a 2-core AVX-512
machine, with n = 10,000, k = 3, d = 1, float64 and 64 replicates (``python benchmarks/bench_em.py``),
one iteration took 0.100 ms per replicate against 0.140 ms with the defaults. The generic iteration
(sigmoid, top-K, temperature and Laplace gates, or ``fast_path=False``) ran 0–10 % slower with the
same options and the joint-likelihood EM of the Gaussian gate 16–20 % slower; hence the choice per
path.

**Scope.** Options belong to the outermost compiled program. A fit called under the caller's own
``jax.jit`` or ``jax.vmap`` is compiled as part of the caller's program, with its options; pass
``compiler_options=program_options(...)`` to that jit for the same speed, as :mod:`moe_theory.sweep`
does. They are options of one program, never process-wide ``XLA_FLAGS``, so nothing else the caller
compiles changes. An option that the installed XLA does not know is dropped after one trial
compilation, so every jaxlib compiles the fit, with its own default in place of that option.

**Results.** The options change only how XLA arranges the arithmetic: fitted values agree with a
default compilation to rounding (relative differences of ~1e-15 on the benchmark), and the same
program on the same device still gives bit-identical results.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax

FAST_PATH_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False, "xla_cpu_prefer_vector_width": 512}
"""XLA compiler options of programs that run EM's fast path (see the module docstring)."""


@functools.cache
def _accepted(name: str, value: Any) -> bool:
    """Whether this jaxlib compiles a program with the option ``name = value``."""
    try:
        jax.jit(lambda v: v + 1, compiler_options={name: value}).lower(0.0).compile()
    except Exception:  # an unknown option (or a jax without per-program options) fails here, not in a fit
        return False
    return True


def accepted_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """The entries of ``options`` that this jaxlib accepts, or None if it accepts none of them."""
    return {name: value for name, value in options.items() if _accepted(name, value)} or None


def program_options(family, config, method: str = "em") -> dict[str, Any] | None:
    """Compiler options for a program that fits ``family`` by ``method`` under the EM ``config``:
    the :data:`FAST_PATH_OPTIONS` that this jaxlib accepts where EM's fast path runs, else None."""
    from .fast import fast_path_applies  # fast.py builds on em.py, which uses this module

    if method != "em" or not fast_path_applies(family, config):
        return None
    return accepted_options(FAST_PATH_OPTIONS)


class _FitProgram:
    """A fitting entry point compiled per call with :func:`program_options` of its arguments."""

    def __init__(self, function: Callable, static_argnames: tuple[str, ...]):
        functools.update_wrapper(self, function)
        self._function, self._static_argnames = function, static_argnames
        self._signature = inspect.signature(function)
        self._jitted: dict[tuple, Callable] = {}

    def _program(self, args: tuple, kwargs: dict) -> Callable:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        # Under a transformation (jit, vmap, ...) the fit is traced into the caller's program,
        # which alone may carry compiler options: JAX rejects them on a nested jit.
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs)))
        family, config, method = arguments["family"], arguments["config"], arguments.get("method", "em")
        options = None if traced else program_options(family, config, method)
        key = tuple(sorted((options or {}).items()))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self._function, static_argnames=self._static_argnames, compiler_options=options)
        return self._jitted[key]

    def __call__(self, *args, **kwargs):
        return self._program(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower`` of the program this call compiles (for ahead-of-time compilation)."""
        return self._program(args, kwargs).lower(*args, **kwargs)


def jit_fit(static_argnames: tuple[str, ...]) -> Callable[[Callable], _FitProgram]:
    """``jax.jit`` for a fitting entry point with arguments ``family``, ``config`` and optionally
    ``method``: each call compiles with :func:`program_options` of its arguments.

    The decorated function keeps ``jax.jit``'s behaviour: one compilation per static arguments and
    shapes, and ``.lower(...)`` for ahead-of-time compilation. Called under a transformation (the
    caller's jit, vmap, ...) it compiles without options of its own, as part of the caller's program.
    """
    return lambda function: _FitProgram(function, static_argnames)
