"""Every default of the fitters, in one place: the config parser (:mod:`moe_theory.config`), the
command line (:mod:`moe_theory.cli`) and the Python API (:mod:`moe_theory.fit`) read them from here.

* :class:`EMConfig` holds the *static* EM settings (part of the compiled program: changing one
  recompiles). :data:`EM_DEFAULTS` is its default instance.
* :class:`FitDefaults` holds the defaults that are not static: ``tol`` is a traced argument of
  every fitter (changing it does not recompile), and the estimator and the number of random
  starts are chosen per call. :data:`FIT_DEFAULTS` is its default instance.

L-BFGS (:mod:`moe_theory.fit.mle`) has its own tighter tolerance, iteration bound and history
length, :data:`LBFGS_DEFAULTS`. The algorithms and the stopping rule are in ``docs/estimators.md``.

[1] Nguyen, Nguyen, Ho, "Demystifying Softmax Gating Function in Gaussian Mixture of Experts",
NeurIPS 2023, arXiv 2305.03288 (``max_iter`` = 2000, ``tol`` = 1e-6, the authors' stopping rule).
[8] Nguyen, Nguyen, Nguyen, Ho, "Towards Convergence Rates for Parameter Estimation in
Gaussian-gated Mixture of Experts", AISTATS 2024, arXiv 2305.07572 (the joint likelihood).
"""

from __future__ import annotations

from dataclasses import dataclass

LIKELIHOODS = ("conditional", "joint")
"""The likelihoods EM maximises: log p(y | x), or log p(x, y) under the Gaussian gate's input mixture [8]."""

METHODS = ("em", "squarem", "em_newton", "mle")
"""The estimators: EM (:mod:`moe_theory.fit.em`, :mod:`moe_theory.fit.fast`), EM accelerated by
squared extrapolation (:mod:`moe_theory.fit.squarem`), EM safeguarded by full-likelihood Newton
steps (:mod:`moe_theory.fit.newton_em`) and L-BFGS (:mod:`moe_theory.fit.mle`)."""


@dataclass(frozen=True)
class EMConfig:
    """Static EM settings (changing one recompiles).

    Attributes:
        max_iter: at most this many EM iterations (the authors use 2000 [1]).
        gate_steps: damped Newton steps on the gate per iteration (1: generalised EM; the authors
            iterate to convergence, up to 300).
        expert_steps: Newton steps for experts without a closed-form M-step.
        inner_tol: the gate's (and such experts') Newton loop stops early once a step gains at most
            ``inner_tol``·|Q| (:func:`moe_theory.fit.newton.newton_ascent`), so ``gate_steps=300``
            costs only the steps that still move.
        max_halvings: step halvings tried per Newton step.
        variance_floor: lower bound on fitted Gaussian variances; 0 returns the exact MLE, under
            which an over-fitted expert may collapse onto one point (reported as ``finite=False``).
        likelihood: ``"conditional"`` (log p(y | x), the default) or ``"joint"`` (log p(x, y) under
            the Gaussian gate's input mixture [8]; plain Gaussian gate only, see :mod:`moe_theory.fit.em`).
        fast_path: use :mod:`moe_theory.fit.fast` where it applies (softmax gate without
            activation, temperature or top-K, Gaussian-linear experts, 2 ≤ k ≤ 6, d ≤ 4,
            ``gate_steps == 1``). It computes the same iteration; False forces the generic path.
        selection_schedule: decreasing selection temperatures T₁ > T₂ > … for a top-K gate (empty:
            none). :func:`~moe_theory.fit.fit` and :func:`~moe_theory.fit.fit_batch` (every method)
            then fit first under the soft selection at T₁, T₂, … (each stage from the previous one's
            end, :mod:`moe_theory.gates`), then under the hard gate, and keep the better of that and
            the hard fit from the start itself; ``n_iter`` counts every stage. The single-solver
            entry points ``fit_em`` and ``fit_em_trace`` ignore it. A dense gate ignores it.
        bound: B > 0 to maximise over the compact set Θ of parameters whose unconstrained
            coordinates lie in [−B, B] (:mod:`moe_theory.fit.newton`), or None (no bound). For
            experts fitted by Newton steps (multinomial-logistic, nonlinear) under the conditional
            likelihood, with the methods ``em``, ``squarem`` and ``em_newton``.
    """

    max_iter: int = 2000
    gate_steps: int = 1
    expert_steps: int = 1
    inner_tol: float = 1e-12
    max_halvings: int = 20
    variance_floor: float = 0.0
    likelihood: str = "conditional"
    fast_path: bool = True
    selection_schedule: tuple[float, ...] = ()
    bound: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_iter", "gate_steps", "expert_steps", "max_halvings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "max_iter" else 0):
                raise ValueError(f"{name}: expected a non-negative integer (max_iter ≥ 1), got {value!r}")
        if not self.inner_tol >= 0:
            raise ValueError(f"inner_tol: expected ≥ 0, got {self.inner_tol!r}")
        if not self.variance_floor >= 0:
            raise ValueError(f"variance_floor: expected ≥ 0, got {self.variance_floor!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not isinstance(self.fast_path, bool):
            raise ValueError(f"fast_path: expected True or False, got {self.fast_path!r}")
        schedule = self.selection_schedule
        if not isinstance(schedule, tuple) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf") for t in schedule
        ) or any(later >= earlier for earlier, later in zip(schedule, schedule[1:])):
            raise ValueError(f"selection_schedule: expected a tuple of decreasing temperatures > 0, got {schedule!r}")
        if self.bound is not None and not (
            isinstance(self.bound, (int, float)) and not isinstance(self.bound, bool) and 0 < self.bound < float("inf")
        ):
            raise ValueError(f"bound: expected a positive finite number or None, got {self.bound!r}")


@dataclass(frozen=True)
class FitDefaults:
    """Defaults of the per-call fit settings that are not part of the compiled program.

    Attributes:
        tol: relative log-likelihood change at which EM stops [1] (traced, never static).
        method: the estimator, one of :data:`METHODS`.
        n_init: random starts per dataset; the best final log-likelihood is kept.
    """

    tol: float = 1e-6
    method: str = "em"
    n_init: int = 1


EM_DEFAULTS = EMConfig()
"""The default static EM settings."""

FIT_DEFAULTS = FitDefaults()
"""The default per-call fit settings."""


@dataclass(frozen=True)
class LBFGSDefaults:
    """Defaults of direct maximum likelihood (:func:`moe_theory.fit.fit_mle`).

    Attributes:
        tol: relative log-likelihood change at which L-BFGS stops; it takes many cheap steps, so
            its tolerance is tighter than EM's.
        max_iter: at most this many L-BFGS iterations when called directly (the batched fitters
            pass :attr:`EMConfig.max_iter`).
        memory_size: L-BFGS history length.
    """

    tol: float = 1e-10
    max_iter: int = 500
    memory_size: int = 10


LBFGS_DEFAULTS = LBFGSDefaults()
"""The default L-BFGS settings."""
