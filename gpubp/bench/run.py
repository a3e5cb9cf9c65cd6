"""One ``gpubp bench`` run: check every candidate, time them interleaved, fill the report."""

from __future__ import annotations

import gc
import sys
from typing import Any, TextIO

from .. import __version__
from ..check import TOLERANCE
from ..machine import environment, gpus, threads_limited
from .candidates import Candidate, Maker, gpu_status, make_candidates
from .problem import (
    ACTIVATION,
    CPU,
    GPU,
    LOSS,
    LR,
    OUTPUT,
    BenchConfig,
    BenchShape,
    Problem,
    make_problem,
    step_flops,
    validation_batch,
)
from .report import BenchReport, Row
from .timing import Progress, Stats, busy_processes, time_round_robin

#: A spread ``(q75 - q25) / median`` above this is flagged as too wide to trust.
SPREAD_WARN = 0.10


def command_line(config: BenchConfig) -> str:
    """A ``gpubp bench`` command that reruns ``config`` (without ``--json``/``--plot``)."""
    parts = ["gpubp bench", "--shapes", ",".join(s.name for s in config.shapes)]
    if config.backends is not None:
        parts += ["--backends", ",".join(config.backends)]
    parts += ["--dtypes", ",".join(config.dtypes)]
    parts += ["--repeats", str(config.repeats), "--min-time", f"{config.min_time:g}"]
    parts += ["--settle", f"{config.settle:g}"]
    parts += [] if config.torch else ["--no-torch"]
    parts += [] if config.memory else ["--no-memory"]
    parts += [] if config.seed == 0 else ["--seed", str(config.seed)]
    parts += [] if config.threads is None else ["--threads", str(config.threads)]
    parts += [] if config.load == 0 else ["--load", str(config.load)]
    return " ".join(parts)


def run_group(
    shape: BenchShape,
    batch: int,
    dtype: str,
    device: str,
    makers: list[Maker],
    report: BenchReport,
    progress: Progress,
    *,
    repeats: int,
    min_time: float,
    settle: float,
    memory: bool,
    seed: int,
) -> list[Row]:
    """Check, time and measure every candidate on one (shape, batch, dtype, device)."""
    vbatch = validation_batch(shape.sizes, batch)
    vproblem = make_problem(shape.sizes, vbatch, dtype, seed=seed)
    problem = vproblem if vbatch == batch else make_problem(shape.sizes, batch, dtype, seed, False)
    rows = [Row(shape.name, shape.sizes, batch, dtype, device, m.label, m.kind) for m in makers]
    cands = []
    for row, m in zip(rows, makers):
        progress.update(f"{m.label}: set up, check against the reference")
        c = _checked(m, row, vproblem, problem)
        if c is not None:
            cands.append(c)
        else:
            where = f"{m.label} on {shape.name} batch {batch} {dtype} ({device})"
            (report.absent if m.kind == "torch" else report.failures).append(
                f"{where}: {row.error}; not timed"
            )
    stats = time_round_robin(cands, repeats, min_time, progress, settle)
    cands.clear()  # free their buffers before the memory pass
    gc.collect()
    _fill_rows(rows, stats, report)
    if memory:
        _measure_memory(rows, makers, problem, progress)
    return rows


def _checked(m: Maker, row: Row, vproblem: Problem, problem: Problem) -> Candidate | None:
    """A fresh candidate checked against the reference on ``vproblem`` and set up on
    ``problem``; ``None`` (and ``row.error`` says why) if it fails or disagrees."""
    tol = TOLERANCE[row.dtype]
    c = m.make()
    try:
        c.setup(vproblem)
        row.validation_error = err = c.validate(vproblem)
        if not err <= tol:
            row.error = (
                f"disagrees with the float64 reference (batch {vproblem.batch}): relative error "
                f"{err:.2e} > {tol:g}"
            )
        elif problem is not vproblem:
            c.setup(problem)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    return c if row.error is None else None


def _fill_rows(rows: list[Row], stats: dict[str, Stats], report: BenchReport) -> None:
    """The rows' statistics, rates and ratios to the floor and to PyTorch; spread warnings."""
    ok = [r for r in rows if r.error is None]
    floors = [r.candidate for r in ok if r.kind == "floor"]
    # the GPU's GEMM+copy floor; on the CPU the fastest GEMM found (MKL's or NumPy's BLAS's)
    floor_label = next(
        (k for k in floors if "copy" in k),
        min(floors, key=lambda k: stats[k].median, default=None),
    )
    torches = [stats[r.candidate].median for r in ok if r.kind == "torch"]
    for row in ok:
        st = row.stats = stats[row.candidate]
        row.gflops = step_flops(row.sizes, row.batch) / st.median / 1e9
        row.samples_per_s = row.batch / st.median
        if floor_label is not None:
            row.x_floor = st.median / stats[floor_label].median
        if torches:
            row.x_torch = st.median / min(torches)
        if st.spread > SPREAD_WARN:
            report.warnings.append(
                f"{row.candidate} on {row.shape} batch {row.batch} {row.dtype} ({row.device}): "
                f"spread {100 * st.spread:.0f}% (interquartile range / median) is too wide to "
                "trust; rerun on a quieter machine or with more --repeats"
            )


def _measure_memory(
    rows: list[Row], makers: list[Maker], problem: Problem, progress: Progress
) -> None:
    """Peak memory of every checked candidate but the floors, each on a fresh instance."""
    for row, m in zip(rows, makers):
        if row.error is not None or m.kind == "floor":
            continue
        progress.update(f"{m.label}: peak memory")
        try:
            fresh = m.make()
            row.peak_bytes, row.peak_how = fresh.peak_bytes(problem)
            row.step_alloc_bytes = getattr(fresh, "step_bytes", None)
            del fresh
        except Exception as exc:
            row.peak_how = f"failed: {type(exc).__name__}: {exc}"
        gc.collect()


def run_bench(config: BenchConfig, progress_stream: TextIO | None = sys.stderr) -> BenchReport:
    """Run the benchmark described by ``config``; see the module docstring."""
    report = BenchReport(meta={**environment(), "gpubp": __version__})
    report.meta.update(
        workload=f"{ACTIVATION} hidden, {OUTPUT} + {LOSS}, SGD lr={LR}",
        repeats=config.repeats,
        min_time_s=config.min_time,
        settle_s=config.settle,
        threads=config.threads,
        load=config.load,
        command=command_line(config),
    )
    makers = make_candidates(config, report.absent, gpu_status())
    devices = [d for d in (CPU, GPU) if makers[d]]
    if GPU in devices:
        found, _ = gpus()
        report.meta["gpu"] = found[0][0] if found else "unknown"
    with threads_limited(config.threads) as limited, busy_processes(config.load):
        report.meta["threads_limited"] = limited
        if "PyTorch" in limited:
            report.meta["torch_threads"] = config.threads
        _run_groups(config, makers, devices, report, Progress(progress_stream))
    return report


def _run_groups(
    config: BenchConfig,
    makers: dict[str, list[Maker]],
    devices: list[str],
    report: BenchReport,
    progress: Progress,
) -> None:
    """Every (shape, batch, dtype, device) group of ``config``, then the sweep."""
    groups: list[tuple[BenchShape, int, str, str]] = []
    for shape in config.shapes:
        if GPU not in devices and shape.cpu_batch is None:
            report.absent.append(f"shape {shape.name}: runs on a GPU only, and none is here")
        for device in devices:
            batch = shape.batch(device)
            if batch is not None:
                groups.extend((shape, batch, dt, device) for dt in config.dtypes)
    try:
        for k, (shape, batch, dt, device) in enumerate(groups):
            progress.group(f"({k + 1}/{len(groups)}) {shape.name} batch {batch} {dt} {device}:")
            report.rows.extend(
                run_group(
                    shape,
                    batch,
                    dt,
                    device,
                    makers[device],
                    report,
                    progress,
                    repeats=config.repeats,
                    min_time=config.min_time,
                    settle=config.settle,
                    memory=config.memory,
                    seed=config.seed,
                )
            )
        if config.sweep_shape is not None:
            report.sweep = _sweep(config, makers, devices, report, progress)
    finally:
        progress.close()


def _sweep(
    config: BenchConfig,
    makers: dict[str, list[Maker]],
    devices: list[str],
    report: BenchReport,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Time per sample against batch size on ``config.sweep_shape`` (for ``--plot``).

    Fewer samples per point than the table (a third of ``repeats``, at least 3); on a GPU,
    PyTorch runs eager only (a capture and a compilation per batch size would dominate the run)
    and the floor is the GEMMs alone.
    """
    shape = config.sweep_shape
    assert shape is not None
    points = []
    dtype = config.dtypes[0]
    for device in devices:
        chosen = [m for m in makers[device] if m.in_sweep]
        for batch in config.sweep_batches[device]:
            progress.group(f"sweep {shape.name} batch {batch} {dtype} {device}:")
            rows = run_group(
                BenchShape(shape.name, shape.sizes, batch, batch),
                batch,
                dtype,
                device,
                chosen,
                report,
                progress,
                repeats=max(3, config.repeats // 3),
                min_time=config.min_time,
                settle=config.settle,
                memory=False,
                seed=config.seed,
            )
            for r in rows:
                if r.stats is not None:
                    points.append(
                        {
                            "shape": shape.name,
                            "sizes": list(shape.sizes),
                            "device": device,
                            "candidate": r.candidate,
                            "kind": r.kind,
                            "dtype": dtype,
                            "batch": batch,
                            "seconds_per_step": r.stats.median,
                            "seconds_per_sample": r.stats.median / batch,
                        }
                    )
    return points
