"""``gpubp bench``: every backend side by side with PyTorch and with the hardware floor.

One run times, on the same problem and interleaved round-robin (so drift from other work on
the machine hits every candidate alike), one full training step of

- every gpubp backend that can run here (``numpy``, ``numba``, ``cupy`` as they appear);
- PyTorch where it is installed: eager on the CPU; on a GPU eager, the same step captured in a
  CUDA graph, and ``torch.compile``;
- the floor: the GEMMs of the same step alone (forward ``a @ W.T`` per layer, the backward
  delta ``delta @ W`` per layer except the first, the weight gradient ``delta.T @ a`` per
  layer) through the same BLAS / cuBLAS into preallocated outputs; on a GPU also the same
  GEMMs plus a device-to-device copy that moves as many bytes as the step's elementwise work
  must (see :func:`elementwise_bytes`).

The step: hidden ReLU, softmax output, cross-entropy on integer labels, plain SGD. Before
anything is timed, every candidate's first step is compared with the float64 reference
(:mod:`gpubp.reference`): the loss and the change of every parameter; the floor's GEMMs are
compared with float64 products. A candidate that disagrees is reported and not timed.

Each timed sample runs a candidate for at least ``min_time`` seconds (``n`` steps, the device
synchronised inside the timed region) after a pause of ``settle`` seconds and one untimed step
that re-warms its caches. The pause matters on a small machine: after a call, OpenBLAS keeps a
worker thread spinning for about 0.1 s, which would take a core from whichever candidate runs
next (PyTorch's OpenMP threads, measured here, barely spin). The
table gives the median, min and max over the samples, and the spread
``(q75 - q25) / median``. Peak memory is measured in a separate, untimed pass.

Layout, each module importing only those before it: :mod:`.timing` (the round-robin loop, the
settle pause, statistics), :mod:`.problem` (shapes, the problem and its reference check, the
flop and byte counts, :class:`BenchConfig`), :mod:`.candidates` (what is timed), :mod:`.report`
(table, JSON, plot), :mod:`.run` (one run), :mod:`.job_worker` and :mod:`.job` (``--job``),
:mod:`.cli` (the options and the command). The machine's description comes from
:mod:`gpubp.machine`. ``benchmarks/`` builds on the same pieces.
"""

from __future__ import annotations

from .candidates import (
    BackendCandidate,
    Candidate,
    FloorCandidate,
    Maker,
    TorchCandidate,
    cupy_module,
    gpu_status,
    make_candidates,
)
from .cli import add_arguments, config_from_args, main
from .problem import (
    ACTIVATION,
    CPU,
    GPU,
    LOSS,
    LR,
    OUTPUT,
    QUICK_SWEEP_BATCHES,
    STANDARD_SHAPES,
    SWEEP_BATCHES,
    VALIDATION_FLOPS,
    VALIDATION_ROWS,
    BenchConfig,
    BenchShape,
    Problem,
    elementwise_bytes,
    make_problem,
    parse_shape,
    rows_clear_of_kinks,
    step_flops,
    validation_batch,
    validation_error,
)
from .report import BenchReport, Row, format_table, plot_sweep
from .run import SPREAD_WARN, command_line, run_bench, run_group
from .timing import (
    DEFAULT_MIN_TIME,
    DEFAULT_REPEATS,
    DEFAULT_SETTLE,
    QUICK_MIN_TIME,
    QUICK_REPEATS,
    Progress,
    Stats,
    run_steps,
    time_round_robin,
)

__all__ = [
    "ACTIVATION",
    "CPU",
    "DEFAULT_MIN_TIME",
    "DEFAULT_REPEATS",
    "DEFAULT_SETTLE",
    "GPU",
    "LOSS",
    "LR",
    "OUTPUT",
    "QUICK_MIN_TIME",
    "QUICK_REPEATS",
    "QUICK_SWEEP_BATCHES",
    "SPREAD_WARN",
    "STANDARD_SHAPES",
    "SWEEP_BATCHES",
    "VALIDATION_FLOPS",
    "VALIDATION_ROWS",
    "BackendCandidate",
    "BenchConfig",
    "BenchReport",
    "BenchShape",
    "Candidate",
    "FloorCandidate",
    "Maker",
    "Problem",
    "Progress",
    "Row",
    "Stats",
    "TorchCandidate",
    "add_arguments",
    "command_line",
    "config_from_args",
    "cupy_module",
    "elementwise_bytes",
    "format_table",
    "gpu_status",
    "main",
    "make_candidates",
    "make_problem",
    "parse_shape",
    "plot_sweep",
    "rows_clear_of_kinks",
    "run_bench",
    "run_group",
    "run_steps",
    "step_flops",
    "time_round_robin",
    "validation_batch",
    "validation_error",
]
