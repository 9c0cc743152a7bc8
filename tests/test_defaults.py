"""Every fit default has one source (moe_theory.fit.settings): the config parser, the command line
and the Python API must all read it from there, so that none can drift from the others."""

import dataclasses
import inspect

import yaml

from moe_theory import cli, sweep
from moe_theory.config import parse_config
from moe_theory.fit import EM_DEFAULTS, FIT_DEFAULTS, EMConfig, fit, fit_batch, fit_em, fit_em_trace, fit_mle
from moe_theory.fit.settings import LBFGS_DEFAULTS

MINIMAL = """\
name: defaults
model:
  gate: softmax
  expert: gaussian
  params:
    gate: {beta0: [-8.0, 0.0], beta1: [25.0, 0.0]}
    expert: {a: [-20.0, 20.0], b: [15.0, -5.0], nu: [0.09, 0.16]}
inputs: grid
sample_sizes: [100, 200]
replicates: 2
fit:
  num_experts: 2
"""


def _default(function, name):
    return inspect.signature(function).parameters[name].default


def test_the_defaults_are_the_dataclasses_defaults():
    assert EM_DEFAULTS == EMConfig()
    for config_field in dataclasses.fields(EMConfig):
        assert getattr(EM_DEFAULTS, config_field.name) == config_field.default


def test_the_api_reads_the_shared_defaults():
    for function in (fit, fit_batch, fit_em, fit_em_trace):
        assert _default(function, "tol") is FIT_DEFAULTS.tol, function.__name__
        assert _default(function, "config") is EM_DEFAULTS, function.__name__
    for function in (fit, fit_batch):
        assert _default(function, "method") is FIT_DEFAULTS.method, function.__name__
    assert _default(fit, "n_init") is FIT_DEFAULTS.n_init
    # L-BFGS keeps its own tighter tolerance and bound, also from the settings module.
    assert _default(fit_mle, "tol") is LBFGS_DEFAULTS.tol and _default(fit_mle, "max_iter") is LBFGS_DEFAULTS.max_iter


def test_the_config_parser_reads_the_shared_defaults():
    config = parse_config(yaml.safe_load(MINIMAL))
    settings = config.fit
    assert settings.tol == FIT_DEFAULTS.tol and settings.method == (FIT_DEFAULTS.method,)
    assert settings.n_init == (FIT_DEFAULTS.n_init,) and settings.gate_steps == (EM_DEFAULTS.gate_steps,)
    for name in ("max_iter", "expert_steps", "inner_tol", "max_halvings", "variance_floor", "likelihood"):
        assert getattr(settings, name) == getattr(EM_DEFAULTS, name), name
    # The sweep's EM settings of a config that sets nothing are the API's.
    assert sweep.em_config(config, config.groups[0]) == EM_DEFAULTS


def test_the_command_line_reads_the_shared_defaults():
    args = cli.build_parser().parse_args(["fit", "--data", "data.csv", "-k", "2"])
    assert args.tol == FIT_DEFAULTS.tol and args.method == FIT_DEFAULTS.method
    assert args.max_iter == EM_DEFAULTS.max_iter and args.gate_steps == EM_DEFAULTS.gate_steps
    assert args.likelihood == EM_DEFAULTS.likelihood
    # The one deliberate difference: the command line fits a user's data from several random starts.
    assert args.n_init == cli.CLI_RANDOM_STARTS
