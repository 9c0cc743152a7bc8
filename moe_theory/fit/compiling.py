"""XLA compiler options for the fitting programs, chosen per program.

The fitting entry points (:func:`~moe_theory.fit.api.fit_em`, :func:`~moe_theory.fit.api.fit_em_trace`,
:func:`~moe_theory.fit.api.fit_batch`, and the fit programs of :mod:`moe_theory.sweep`) are plain
``jax.jit`` of module-level functions, compiled once per static setting and served from JAX's own
caches. Each has two jitted variants (:func:`jit_variant`): one with XLA's defaults and one with
:data:`FAST_PATH_OPTIONS`; :func:`choose_program` picks the second for a program that runs EM's
fast path (:mod:`moe_theory.fit.fast`) and the first for every other program.

**Why.** On a CPU, a fast-path iteration is a few element-wise passes over the samples, which
compute the 2k exponentials, and one variadic reduction of the ~35 moment sums (k = 3, d = 1). XLA's
default CPU fusion emitters generate that reduction as scalar code whose accumulators live in
memory, and vectorise the element-wise passes four doubles wide. XLA's loop emitter
(``xla_cpu_use_fusion_emitters=False``) with 512-bit vectors (``xla_cpu_prefer_vector_width=512``,
which only widens code where the CPU has AVX-512) runs the same program faster: about 1.4 times
on a 2-core AVX-512 machine. The generic iteration (sigmoid, top-K, temperature and Laplace
gates, or ``fast_path=False``) and the joint-likelihood EM of the Gaussian gate run slower with
the same options; hence the choice per path. ``python benchmarks/bench_em.py`` measures both, and
``benchmarks/README.md`` records the figures.

**Scope.** Options belong to the outermost compiled program (JAX rejects them on a nested jit). A
fit called under the caller's own ``jax.jit`` or ``jax.vmap`` is traced, through the defaults
variant, into the caller's program and compiled with the caller's options; pass
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
from typing import Any, Callable

import jax

from ..models import Family
from .fast import fast_path_applies
from .settings import EMConfig

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


def program_options(family: Family, config: EMConfig, method: str = "em") -> dict[str, Any] | None:
    """Compiler options for a program that fits ``family`` by ``method`` under the EM ``config``:
    the :data:`FAST_PATH_OPTIONS` that this jaxlib accepts where EM's fast path runs, else None."""
    if method not in ("em", "squarem") or not fast_path_applies(family, config):
        return None
    return accepted_options(FAST_PATH_OPTIONS)


@functools.cache
def jit_variant(function: Callable, static_argnames: tuple[str, ...], fast_path: bool) -> Callable:
    """``jax.jit`` of a module-level ``function``: with XLA's defaults, or (``fast_path``) with the
    :data:`FAST_PATH_OPTIONS` this jaxlib accepts. Cached, so each function has at most these two
    jitted variants, whose own caches hold the compiled programs."""
    options = accepted_options(FAST_PATH_OPTIONS) if fast_path else None
    return jax.jit(function, static_argnames=static_argnames, compiler_options=options)


def is_traced(arguments) -> bool:
    """Whether any leaf of ``arguments`` is a tracer of an enclosing transformation (jit, vmap, …)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(arguments))


def choose_program(
    function: Callable, static_argnames: tuple[str, ...], family: Family, config: EMConfig, method: str, arguments
) -> Callable:
    """The jitted variant of ``function`` to call for a fit of ``family`` by ``method`` under ``config``:
    with :func:`program_options` at the top level; under a transformation of the caller (any of the
    array ``arguments`` traced) the defaults variant, which is traced into the caller's program."""
    fast_path = not is_traced(arguments) and program_options(family, config, method) is not None
    return jit_variant(function, static_argnames, fast_path)
