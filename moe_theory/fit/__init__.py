"""Estimators: EM and direct maximum likelihood for gated mixtures of experts, single or batched.

Layout (``docs/estimators.md``): :mod:`~moe_theory.fit.settings` (every default, :class:`EMConfig`),
:mod:`~moe_theory.fit.solver` (the solver protocol, :class:`FitResult`, the drivers and the stopping
rule), the solvers :mod:`~moe_theory.fit.em`, :mod:`~moe_theory.fit.fast` and
:mod:`~moe_theory.fit.mle`, :mod:`~moe_theory.fit.newton` (coordinates and Newton steps),
:mod:`~moe_theory.fit.starts` (random starts), :mod:`~moe_theory.fit.compiling` (jit with XLA options)
and :mod:`~moe_theory.fit.api` (the entry points).
"""

from .api import fit, fit_batch, fit_em, fit_em_trace, select_best
from .compiling import program_options
from .mle import fit_mle
from .settings import EM_DEFAULTS, FIT_DEFAULTS, METHODS, EMConfig, FitDefaults
from .solver import FitResult

__all__ = [
    "EM_DEFAULTS", "FIT_DEFAULTS", "METHODS", "EMConfig", "FitDefaults", "FitResult", "fit", "fit_batch", "fit_em",
    "fit_em_trace", "fit_mle", "program_options", "select_best",
]
