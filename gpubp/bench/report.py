"""What a run measured (rows, JSON, the machine it ran on in ``meta``), the table and the plot."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .timing import Stats


@dataclass
class Row:
    """One candidate on one (shape, dtype, device) in the table."""

    shape: str
    sizes: tuple[int, ...]
    batch: int
    dtype: str
    device: str
    candidate: str
    kind: str
    validation_error: float | None = None
    stats: Stats | None = None
    gflops: float | None = None
    samples_per_s: float | None = None
    x_floor: float | None = None
    x_torch: float | None = None
    peak_bytes: int | None = None
    peak_how: str = ""
    step_alloc_bytes: int | None = None  # CPU: what one steady-state step allocates at its peak
    error: str | None = None


@dataclass
class BenchReport:
    """Everything one run measured, what was left out and why, and its warnings."""

    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "rows": [asdict(r) for r in self.rows],
            "sweep": self.sweep,
            "absent": self.absent,
            "warnings": self.warnings,
            "failures": self.failures,
        }


# --- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, spec)


def _threads(meta: dict[str, Any]) -> str:
    """The thread counts a run used, in words."""
    usable = f"{meta.get('usable_cores')} usable cores"
    if meta.get("threads") is None:
        return f"each library's default ({usable}; BLAS {meta.get('blas_threads') or '?'})"
    limited = ", ".join(["backends that take threads=", *meta.get("threads_limited", [])])
    return f"{meta['threads']} ({limited}; {usable})"


def format_table(report: BenchReport) -> str:
    """The report as a plain-text table with its notes, absences and warnings."""
    has_torch = any(r.kind == "torch" and r.stats is not None for r in report.rows)
    cols = [
        ("shape", 12, "<"),
        ("batch", 6, ">"),
        ("dtype", 7, "<"),
        ("dev", 3, "<"),
        ("candidate", 18, "<"),
        ("median ms", 9, ">"),
        ("min ms", 8, ">"),
        ("max ms", 8, ">"),
        ("spread", 6, ">"),
        ("samples/s", 10, ">"),
        ("GFLOP/s", 7, ">"),
        ("x floor", 7, ">"),
    ]
    if has_torch:
        cols.append(("x torch", 7, ">"))
    cols.append(("peak MiB", 8, ">"))
    header = " ".join(f"{name:{al}{w}}" for name, w, al in cols)
    lines = [header, "-" * len(header)]
    previous = None
    for r in report.rows:
        key = (r.shape, r.dtype, r.device)
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        if r.stats is None:
            cells = [r.shape, str(r.batch), r.dtype, r.device, r.candidate, "FAILED"]
            lines.append(" ".join(cells) + f": {r.error}")
            continue
        st = r.stats
        vals = [
            r.shape,
            str(r.batch),
            r.dtype,
            r.device,
            r.candidate,
            _fmt(1e3 * st.median, ".3f"),
            _fmt(1e3 * st.min, ".3f"),
            _fmt(1e3 * st.max, ".3f"),
            _fmt(100 * st.spread, ".0f") + "%",
            _fmt(r.samples_per_s, ".0f"),
            _fmt(r.gflops, ".1f"),
            _fmt(r.x_floor, ".2f"),
        ]
        if has_torch:
            vals.append(_fmt(r.x_torch, ".2f"))
        vals.append(_fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20, ".2f"))
        lines.append(" ".join(f"{v:{al}{w}}" for v, (_, w, al) in zip(vals, cols)))
    m = report.meta
    lines += [
        "",
        f"measured {m['date']} on {m['cpu']} ({m['cores']} logical cores"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"), Python {m['python']}, NumPy {m['numpy']} ({m['blas']})"
        + (f", PyTorch {m['torch']} ({m['torch_threads']} threads)" if m["torch"] else ""),
        f"step: {m['workload']}; {m['repeats']} interleaved samples of >= {m['min_time_s']:g} s "
        "each; ms per step; spread = (q75 - q25) / median",
        "GFLOP/s counts the step's GEMM flops only; x floor = median / the floor's median "
        "(GEMM+copy on a GPU, GEMM alone on the CPU); "
        + ("x torch = median / the fastest PyTorch row of the same device; " if has_torch else "")
        + "peak MiB = memory of a fresh setup and two steps (tracemalloc on the CPU, the memory "
        "pool on a GPU; '-' where not measurable)",
        f"threads: {_threads(m)}; load: {m.get('load', 0)} busy process(es) beside the run",
        f"command: {m.get('command', '')}",
    ]
    if report.absent:
        lines += ["", "absent here:"] + [f"  - {a}" for a in report.absent]
    if report.failures:
        lines += ["", "FAILED:"] + [f"  - {f}" for f in report.failures]
    if report.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report.warnings]
    return "\n".join(lines)


def plot_sweep(report: BenchReport, path: str) -> None:
    """Time per sample against batch size, log-log, one line per candidate and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    kinds = {}
    for p in report.sweep:
        key = (p["candidate"], p["device"])
        lines.setdefault(key, []).append((p["batch"], p["seconds_per_sample"]))
        kinds[key] = p["kind"]
    for (cand, dev), pts in lines.items():
        pts.sort()
        style = {"floor": "--", "torch": ":"}.get(kinds[(cand, dev)], "-")
        ax.plot(
            [b for b, _ in pts],
            [1e6 * s for _, s in pts],
            style,
            marker="o",
            label=f"{cand} ({dev})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("microseconds per sample (one train step / batch)")
    shape = report.sweep[0]["shape"] if report.sweep else ""
    ax.set_title(f"gpubp bench: {shape} train step, {report.meta['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    from ..files import write_atomic  # atomic, and no planted link followed

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    write_atomic(path, lambda fh: fig.savefig(fh, format=fmt))
    plt.close(fig)
