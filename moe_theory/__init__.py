"""moe_theory: the statistical theory of mixture-of-experts estimation, on a computer.

Importing the package turns on JAX's 64-bit mode: rate studies compare losses across four decades
of n, and float32 round-off would show up in the slopes. Pass ``dtype=jnp.float32`` where speed
matters more.

The data flow is ``family, params -> sample -> fit -> score -> rates``. Start with
:func:`make_family` / :func:`make_params` (or :func:`model_from_dict` for config layouts),
:func:`sample`, :func:`log_likelihood` and :func:`responsibilities`; then :mod:`moe_theory.fit`
(estimators), :mod:`moe_theory.init` (starting points), :mod:`moe_theory.losses` (Voronoi losses,
parameter errors, density distances) and :mod:`moe_theory.rates` (slopes and the theory registry).
"""

import jax

jax.config.update("jax_enable_x64", True)

from .experts import EXPERTS, Expert, GaussianLinear, MultinomialLogistic, NonlinearRegression, make_expert  # noqa: E402
from .gates import ACTIVATIONS, GATES, NORMALISERS, SCORES, TRANSFORMS, Gate, make_gate  # noqa: E402
from .models import (  # noqa: E402
    Family,
    canonicalize,
    expert_log_prob,
    gate_log_weights,
    gate_weights,
    joint_log_prob,
    log_likelihood,
    make_family,
    make_params,
    mean_function,
    model_from_dict,
    responsibilities,
    validate_params,
)
from .params import ROLES, Field, MoEParams, ParameterError, params_to_dict  # noqa: E402
from .sampling import INPUTS, InputDistribution, make_inputs, sample  # noqa: E402
from . import fit, init, losses, rates  # noqa: E402  (submodules: estimators, starts, scoring, rates)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "EXPERTS",
    "GATES",
    "INPUTS",
    "NORMALISERS",
    "ROLES",
    "SCORES",
    "TRANSFORMS",
    "Expert",
    "Family",
    "Field",
    "GaussianLinear",
    "Gate",
    "InputDistribution",
    "MoEParams",
    "MultinomialLogistic",
    "NonlinearRegression",
    "ParameterError",
    "canonicalize",
    "expert_log_prob",
    "gate_log_weights",
    "gate_weights",
    "joint_log_prob",
    "log_likelihood",
    "make_expert",
    "make_family",
    "make_gate",
    "make_inputs",
    "make_params",
    "mean_function",
    "model_from_dict",
    "params_to_dict",
    "responsibilities",
    "sample",
    "validate_params",
]
