"""Limits on what a study may ask for, and a memory plan checked before anything compiles.

Why: a config is a few lines of YAML, and a few characters can ask for more than any machine has.
``sample_sizes: [1e9]`` used to compile for minutes and then die with an 87 GB allocation
traceback; ``replicates: 1e8`` crashed the process under a 4 GB cap. Two layers stop such a study
with a one-line message that names the key:

1. **Caps at parse time** (the ``MAX_*`` constants below, applied by :mod:`moe_theory.config`) on
   values no study needs, whatever the machine: they also bound what parsing itself allocates (a
   ``{linspace: [2, 10, 1e8]}`` would exhaust memory inside ``np.linspace``).
2. **A memory plan** (:func:`check_study`): the peak memory of the largest cell, estimated from the
   config alone, against the memory available (:func:`host_memory`, :func:`accelerator_memory`, or
   ``--memory-limit``).
   ``moe-theory run`` refuses a plan that does not fit, naming ``sample_sizes``,
   ``sweep.batch_size`` or ``replicates``, unless ``--allow-large`` is given.

The estimate
------------
A cell runs one compiled fit program per chunk of B = ``sweep.batch_size`` replicates (rounded up
to a multiple of the device count), each fitted from S = ``fit.n_init`` starts, on samples padded
to the bucket size N (:func:`moe_theory.sampling.bucket_size`). Its device memory is

    bytes = BASELINE_BYTES + SAFETY_FACTOR · itemsize · B · S · N · per_row,

where ``per_row`` counts the floating-point values one fit holds per sample:

* the data: x (d values), y and the padding mask: d + 2;
* the sampling of the data: the (N, k) gate log weights, label noise and expert means it draws
  through: 3 · k;
* the (N, k) arrays of an EM iteration: log gate weights, expert log densities, their sum,
  responsibilities, weighted responsibilities and the per-sample objective terms, with a class axis
  for classification experts: 6 · k · C (C = 1 for regression experts);
* the Newton systems of the M-steps: forward-mode Hessians of the gate objective carry one tangent
  per gate parameter through each of those (N, k) arrays, 6 · k · p_gate, and the expert's step
  adds its per-sample scores and design rows, p_expert + k · (d + 1).

Two methods lay out less. EM's fast path for the softmax-gated Gaussian-linear MoE
(:mod:`moe_theory.fit.fast`, methods ``em`` and ``squarem``) keeps no (N, k) array of its own: it
reduces every per-sample term to moments in one pass, so its ``per_row`` is the data and sampling
terms plus the per-sample coordinates it lays out and 2k exponentials, 2 · (d + 2) + 2 · k. L-BFGS (``mle``) has no
Newton system; reverse mode keeps the forward pass's (N, k) arrays for the backward one,
2 · 6 · k · C. Other methods (``em_newton``) get the generic formula, unmeasured. The results add
host memory, :data:`RESULT_BYTES_PER_VALUE` per (fit, score column) of the whole study.

**Measured.** Peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of one call of the sweep's
fit program (:func:`moe_theory.sweep.fit_cells_program`) on the smoke config's model (softmax gate,
Gaussian-linear experts, d = 1, float64, 20 iterations), minus the RSS after compiling it, on the
2-core CPU this was written on (jax 0.10); values per row = bytes / (8 · B · S · N):

====================================  =====  =====  =======================  =======  ===========
path (k)                              N      B · S  measured above compiled  per_row  formula
====================================  =====  =====  =======================  =======  ===========
fast path, ``em`` (k = 3)             2^20   8      1167 MiB                 18       24 (0.76)
generic, ``em``, gate_steps 2 (k = 3) 2^20   8      9202 MiB                 144      153 (0.94)
generic, ``em``, gate_steps 2 (k = 3) 2^18   8      2301 MiB                 144      153 (0.94)
generic, ``em``, gate_steps 2 (k = 5) 2^18   4 · 2  3656 MiB                 228      373 (0.61)
L-BFGS, ``mle`` (k = 3)               2^20   8      3081 MiB                 48       48 (1.00)
====================================  =====  =====  =======================  =======  ===========

The formula is at or above every measurement (the largest measured/formula ratio is 1.00) and
scales with N as measured; :data:`SAFETY_FACTOR` = 1.5 covers the families, methods and XLA
versions not measured. :data:`BASELINE_BYTES` is the RSS after compiling (405 to 664 MiB), rounded
up. End to end, ``moe-theory run configs/smoke.yaml`` with k = 3, n = 500000 (padded to 2^19), 4
replicates in one call and 20 iterations peaked at 732 MiB (``getrusage(RUSAGE_CHILDREN)``, the
whole run: sampling, fit, scores, tables and figures) against an estimate of 1.3 GiB.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

MAX_SAMPLE_SIZE = 10**8
"""Largest sample size n: 1e8 samples of one replicate already take ≥ 2.4 GB of data in float64."""

MAX_SAMPLE_SIZE_COUNT = 10_000
"""Most sample sizes a study may list or expand to (paper 1 uses 200)."""

MAX_REPLICATES = 10**6
"""Most replicates per cell, and the largest ``sweep.batch_size`` (studies use 20 to 40)."""

MAX_BUCKET_GROWTH = 100.0
"""Largest ``sweep.bucket_growth``: a ratio g pads a sample of n + 1 to about g·n rows."""

MAX_NAME_LENGTH = 100
"""Longest study or arm name: it names a folder, and file systems refuse names beyond 255 bytes."""

MAX_SEED = 2**63 - 1
"""Largest seed: ``jax.random.key`` takes a signed 64-bit integer (x64 is enabled by the package)."""

MAX_COUNT = 2**31 - 1
"""Default ceiling of every other integer key: the compiled programs count in int32."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB); the biggest shipped config is a few kB."""


class ResourceError(ValueError):
    """A study's plan needs more memory than is available. The message names the key to change."""


# ----------------------------------------------------------------------------------------------
# The estimate.

BASELINE_BYTES = 768 << 20
"""Memory of the process before any sample: JAX, XLA and the compiled programs (measured 405 MiB
after compiling the fast-path program and 664 MiB after the L-BFGS one, rounded up to 768 MiB)."""

SAFETY_FACTOR = 1.5
"""Multiplies the per-sample formula: the largest measured/formula ratio was 1.0 (see the module
docstring), and other families, methods and XLA versions lay out their temporaries differently."""

RESULT_BYTES_PER_VALUE = 256
"""Host bytes per (fit, score column) of the results: the wide table (8 bytes), its row of the long
metrics table (13 fields, strings included) and the copies pandas makes while concatenating and
writing them."""

ID_AND_FIT_COLUMNS = 16
"""Columns of the results table besides the scores: the group, grid axes, n, replicate, bucket and fit flags."""

ITEMSIZE = {"float64": 8, "float32": 4}


@dataclass(frozen=True)
class CellEstimate:
    """The estimated peak of one cell (a fit group at one bucket size) and what it is made of."""

    group: str
    n: int
    size: int
    num_experts: int
    fits_per_call: int
    batch: int
    starts: int
    per_row: int
    device_bytes: int


@dataclass(frozen=True)
class StudyEstimate:
    """The largest cell of a study (device memory) and the results table of the whole study (host)."""

    peak: CellEstimate
    host_bytes: int
    fits: int
    itemsize: int


def values_per_row(family, method: str, fast_path: bool) -> int:
    """Floating-point values one fit holds per sample (see "The estimate" in the module docstring)."""
    k, d = family.num_experts, family.dim
    classes = family.num_classes or 1
    gate_parameters = sum(_size(family, field) for field in family.gate.fields)
    expert_parameters = sum(_size(family, field) for field in family.expert.fields)
    sampling = (d + 2) + 3 * k  # x, y, mask; gate log weights, label noise, expert means
    if fast_path:
        return sampling + 2 * (d + 2) + 2 * k
    em_arrays = 6 * k * classes
    if method == "mle":  # L-BFGS: the (N, k) arrays of the forward pass, kept for the backward one
        return sampling + 2 * em_arrays
    # Forward-mode Hessians of the gate objective carry one tangent per gate parameter through each
    # of its (N, k) arrays; the expert's Newton step adds its per-sample scores and design rows.
    newton = 6 * k * gate_parameters + expert_parameters + k * (d + 1)
    return sampling + em_arrays + newton


def _size(family, field) -> int:
    return int(math.prod(family.field_shape(field)))


def estimate_study(config, devices: int = 1) -> StudyEstimate:
    """Estimate the peak device memory of the largest cell and the host memory of the results of a
    :class:`~moe_theory.config.StudyConfig` (see the module docstring)."""
    from dataclasses import replace

    from .fit.fast import fast_path_applies
    from .fit.settings import EM_DEFAULTS
    from .sampling import bucket_size

    itemsize = ITEMSIZE[config.fit.dtype]
    batch = math.ceil(config.sweep.batch_size / devices) * devices
    batch_per_device = batch // devices
    sizes = sorted({(bucket_size(n, config.sweep.bucket_growth), n) for n in config.sample_sizes})
    largest_size, largest_n = max(sizes)
    peak = None
    columns = 0
    for group in config.groups:
        family = config.fitted_family(group)
        em_config = replace(EM_DEFAULTS, gate_steps=group.gate_steps, likelihood=config.fit.likelihood,
                            bound=config.fit.bound)
        fast = group.method in ("em", "squarem") and fast_path_applies(family, em_config)
        per_row = values_per_row(family, group.method, fast)
        fits_per_call = batch_per_device * group.n_init
        device_bytes = BASELINE_BYTES + int(SAFETY_FACTOR * itemsize * fits_per_call * largest_size * per_row)
        cell = CellEstimate(group.label, largest_n, largest_size, group.num_experts, fits_per_call, batch,
                            group.n_init, per_row, device_bytes)
        if peak is None or cell.device_bytes > peak.device_bytes:
            peak = cell
        columns = max(columns, ID_AND_FIT_COLUMNS + len(config.metric_columns(group)))
    fits = len(config.groups) * len(config.sample_sizes) * config.replicates
    return StudyEstimate(peak, fits * columns * RESULT_BYTES_PER_VALUE, fits, itemsize)


# ----------------------------------------------------------------------------------------------
# The memory available.


def host_memory() -> tuple[int, str]:
    """Bytes this process may use on the host, and where the figure comes from: the physical
    memory, lowered by a cgroup limit (containers) or an address-space limit (``ulimit -v``)."""
    import resource

    candidates = [(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            candidates.append((int(text), f"the cgroup limit ({path})"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        candidates.append((soft, "the address-space limit (ulimit -v)"))
    return min(candidates)


def accelerator_memory() -> tuple[int, str] | None:
    """Bytes of the first accelerator's memory that JAX may use, or None on a CPU."""
    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return None
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except (RuntimeError, NotImplementedError):  # a backend without memory statistics
        return None
    return (int(limit), f"{device.device_kind} memory") if limit else None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes → bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size like 8G, 512M or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} KiB"


# ----------------------------------------------------------------------------------------------
# The check.


def check_study(study, limit: int | None = None, allow_large: bool = False, devices: int | None = None,
                accelerator: tuple[int, str] | None = None) -> str | None:
    """Refuse a study (a :class:`~moe_theory.config.StudyConfig` or an
    :class:`~moe_theory.config.ArmsStudy`) whose estimated memory exceeds what is available.

    ``limit`` (bytes, ``--memory-limit``) replaces the memory found by :func:`host_memory` and
    :func:`accelerator_memory`. On an accelerator the largest cell is compared with its memory and the
    results with the host's; on a CPU their sum with the host's. Raises :class:`ResourceError`
    naming the key to change; with ``allow_large`` returns that message as a warning instead (None
    when everything fits). ``devices`` and ``accelerator`` default to what JAX sees."""
    import jax

    devices = jax.device_count() if devices is None else devices
    if accelerator is None and limit is None:
        accelerator = accelerator_memory()
    host_limit, host_source = (limit, "--memory-limit") if limit is not None else host_memory()
    if limit is not None:
        device_limit, device_source = limit, "--memory-limit"
    else:
        device_limit, device_source = accelerator or (host_limit, host_source)
    arms = getattr(study, "arms", None)
    for label, config in arms if arms is not None else (("", study),):
        problem = _memory_problem(config, estimate_study(config, devices), accelerator is not None,
                                  (host_limit, host_source), (device_limit, device_source))
        if problem is None:
            continue
        where = f"{config.source}" + (f" (arm {label})" if label else "")
        if not allow_large:
            raise ResourceError(f"{where}: {problem}; or pass --allow-large to run anyway")
        return f"{where}: {problem.split('; expected')[0]}; running anyway (--allow-large)"
    return None


def _memory_problem(config, estimate: StudyEstimate, separate: bool, host: tuple[int, str],
                    device: tuple[int, str]) -> str | None:
    """The message naming the key to change, or None when the study fits. ``separate``: the cells
    run in an accelerator's memory, apart from the host's results; otherwise both share the host's."""
    peak = estimate.peak
    host_limit, host_source = host
    device_limit, device_source = device
    results = f"the results of its {estimate.fits} fits need about {format_bytes(estimate.host_bytes)}"
    host_room = host_limit if separate else host_limit - BASELINE_BYTES
    if estimate.host_bytes > host_room:
        most = max(1, int(max(host_room, 0) // (estimate.host_bytes / config.replicates)))
        return (f"replicates: {results}, more than the {format_bytes(host_limit)} of {host_source}; "
                f"expected at most about {most} replicates")
    device_room = device_limit if separate else device_limit - estimate.host_bytes
    if peak.device_bytes <= device_room:
        return None
    beside_results = "" if separate else f" besides {format_bytes(estimate.host_bytes)} of results"
    cell = (f"its largest cell ({peak.group}, n = {peak.n} padded to {peak.size}, {peak.fits_per_call} fit(s) per "
            f"program call: sweep.batch_size {peak.batch} × {peak.starts} start(s)) needs about "
            f"{format_bytes(peak.device_bytes)}{beside_results}, more than the {format_bytes(device_limit)} of "
            f"{device_source}")
    bytes_per_fit_and_row = SAFETY_FACTOR * estimate.itemsize * peak.per_row
    budget = max(device_room - BASELINE_BYTES, 0)  # what is left for the samples once JAX and the programs are in
    fits_that_fit = int(budget // (bytes_per_fit_and_row * peak.size))
    if peak.fits_per_call > 1 and fits_that_fit >= peak.starts:
        return f"sweep.batch_size: {cell}; expected sweep.batch_size ≤ {fits_that_fit // peak.starts}"
    largest = int(budget // (bytes_per_fit_and_row * peak.fits_per_call))
    return f"sample_sizes: {cell}; expected padded sample sizes up to about {largest} with these settings"
