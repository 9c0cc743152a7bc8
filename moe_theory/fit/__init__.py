"""Estimators: EM and direct maximum likelihood for gated mixtures of experts, single or batched."""

from .api import METHODS, fit, fit_batch, select_best
from .compiling import program_options
from .em import EMConfig, FitResult, fit_em, fit_em_trace
from .mle import fit_mle

__all__ = ["METHODS", "EMConfig", "FitResult", "fit", "fit_batch", "fit_em", "fit_em_trace", "fit_mle", "program_options", "select_best"]
