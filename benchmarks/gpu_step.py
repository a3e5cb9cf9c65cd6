"""One train step on the GPU: gpubp's cupy backend against PyTorch, cuBLAS alone and copy bandwidth.

Usage: python benchmarks/gpu_step.py OUTDIR [--quick | --tiny] [--no-compile]

For each standard shape of ``gpubp bench`` on a GPU (ReLU hidden layers, softmax +
cross-entropy, plain SGD, float32 without TF32), every variant is first checked against the
float64 reference, then timed interleaved by ``gpubp.bench`` (the same problem, check, flop
count and round-robin timing as ``gpubp bench``), and the medians are reported:

- ``gpubp_graph``: gpubp's train step (CUDA graph), ``gpubp_eager``: the same kernels launched
  one by one (``graphs=False``), ``gpubp_fold``: the graph step with plain SGD folded into the
  gradient GEMM (``fold_sgd=True``);
- ``torch_eager``, ``torch_graph`` (the step captured with ``torch.cuda.graph``),
  ``torch_compile`` (``torch.compile``), where PyTorch with CUDA is installed;
- ``gemm_floor``: the step's GEMMs alone through gpubp's own cuBLAS handle and the public
  wrapper ``launch.gemm`` (what no elementwise fusion can beat), reported as TFLOP/s next to
  gpubp's;
- ``copy_GBps``: device-to-device copy bandwidth, and each fused elementwise kernel's bandwidth
  (``launch.bias_activation``, ``launch.hidden_delta``) as a share of it.

``--no-compile`` leaves ``torch_compile`` out (a compile per shape costs about a minute);
``--tiny`` runs one small shape once, the rehearsal of ``benchmarks/device_run.py --emulated``.

What only this script has: its presets (``--quick``, ``--tiny``), the variants above, the bandwidth
probe, and ``gpu_step.json`` / ``gpu_step.txt`` (a table of times and ratios) in OUTDIR.
Needs no network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpubp.bench import (  # noqa: E402
    GPU,
    STANDARD_SHAPES,
    BackendCandidate,
    BenchReport,
    BenchShape,
    Candidate,
    FloorCandidate,
    Maker,
    Progress,
    TorchCandidate,
    cupy_module,
    run_group,
    step_flops,
    time_round_robin,
)
from gpubp.machine import torch_status  # noqa: E402

#: Every standard shape at its GPU batch size; ``--quick``: two small ones.
SHAPES: dict[str, int] = {
    name: s.gpu_batch for name, s in STANDARD_SHAPES.items() if s.gpu_batch is not None
}
QUICK: dict[str, int] = {"mnist-small": 64, "narrow-deep": 16384}
TINY: dict[str, int] = {"mnist-small": 64}
DTYPE = "float32"


def kernels_hash() -> str:
    try:
        tree = subprocess.run(
            ["git", "rev-parse", "HEAD:kernels"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "kernels"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return tree + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


class CublasFloor(FloorCandidate):
    """``gpubp.bench``'s floor with its GEMMs through gpubp's cuBLAS handle (``launch.gemm``)."""

    def __init__(self) -> None:
        from gpubp.backends.cuda import CupyBackend

        super().__init__(cupy_module(), GPU)
        self.label = "gemm_floor"
        self.be = CupyBackend()
        self.one = self.be.constants(DTYPE)

    def gemm(self, trans_a: bool, trans_b: bool, a: Any, b: Any, out: Any) -> None:
        from gpubp.backends.cuda import launch

        # gpubp's cuBLAS handle, on the current stream
        launch.gemm(self.be.cublas(), trans_a, trans_b, a, b, out, "ONE", "ZERO", self.one)


class Probe(Candidate):
    """One kernel launch timed alone, for its bandwidth: ``nbytes`` moved per call."""

    kind = "probe"
    device = GPU

    def __init__(self, label: str, fn: Callable[[], Any], nbytes: int) -> None:
        self.label, self.fn, self.nbytes = label, fn, nbytes

    def step(self) -> None:
        self.fn()

    def sync(self) -> None:
        cupy_module().cuda.Device().synchronize()


def named(label: str, make: Callable[[], Candidate]) -> Maker:
    """A :class:`Maker` whose candidates carry ``label``."""

    def fresh() -> Candidate:
        c = make()
        c.label = label
        return c

    return Maker(label, make().kind, fresh)


def makers(compile: bool = True) -> list[Maker]:
    """gpubp's three variants, PyTorch's (where it has CUDA; ``torch.compile`` only with
    ``compile``) and the cuBLAS floor."""
    from gpubp.backends.cuda import CupyBackend

    out = [
        named(
            label,
            lambda g=graphs, f=fold: BackendCandidate(
                "cupy", make=lambda: CupyBackend(graphs=g, fold_sgd=f)
            ),
        )
        for label, graphs, fold in (
            ("gpubp_graph", True, False),
            ("gpubp_eager", False, False),
            ("gpubp_fold", True, True),
        )
    ]
    torch, _ = torch_status()
    if torch is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        for mode in ("eager", "graph", "compile") if compile else ("eager", "graph"):
            out.append(named(f"torch_{mode}", lambda m=mode: TorchCandidate(torch, GPU, m)))
    out.append(Maker("gemm_floor", "floor", CublasFloor))
    return out


def bandwidth(repeats: int, rows: int = 262144) -> dict[str, float]:
    """Copy bandwidth and the fused elementwise kernels' bandwidth, in GB/s (``(rows, 64)``)."""
    from gpubp.backends.cuda import CupyBackend, launch

    cp = cupy_module()
    be = CupyBackend()
    n = 64
    a = cp.ones((rows, n), DTYPE)
    g = cp.ones((rows, n), DTYPE)
    b = cp.zeros(n, DTYPE)
    dst = cp.empty_like(a)
    status = be.scratch_status()
    probes = [
        Probe("copy", lambda: dst.__setitem__(Ellipsis, a), 2 * a.nbytes),
        Probe(
            "bias_activation",
            lambda: launch.bias_activation(be.kernel, a, b, "relu", status),
            2 * a.nbytes,
        ),
        Probe(
            "hidden_delta",
            lambda: launch.hidden_delta(be.kernel, g, a, "relu", status),
            3 * a.nbytes,
        ),
    ]
    stats = time_round_robin(probes, repeats, min_time=0.01)
    return {p.label: p.nbytes / stats[p.label].median / 1e9 for p in probes}


def measure(
    label: str, batch: int, repeats: int, report: BenchReport, compile: bool = True
) -> dict[str, Any]:
    """One shape: every variant checked and timed by ``gpubp.bench``; the row of the JSON."""
    base = STANDARD_SHAPES[label]
    shape = BenchShape(label, base.sizes, batch, batch)
    rows = run_group(
        shape,
        batch,
        DTYPE,
        GPU,
        makers(compile),
        report,
        Progress(sys.stderr),
        repeats=repeats,
        min_time=0.01,
        settle=0.0,
        memory=False,
        seed=0,
    )
    med = {r.candidate: r.stats.median * 1e6 for r in rows if r.stats is not None}
    checked = [r.validation_error for r in rows if r.validation_error is not None]
    flops = step_flops(shape.sizes, batch)
    row: dict[str, Any] = {"sizes": list(shape.sizes), "batch": batch, "us": med}
    row["check_worst"] = max(checked, default=None)
    if "gpubp_graph" in med and "gemm_floor" in med:
        row["gpubp_TFLOPs"] = flops / med["gpubp_graph"] / 1e6
        row["gemm_floor_TFLOPs"] = flops / med["gemm_floor"] / 1e6
        row["ratios"] = {
            f"gpubp/{k}": med["gpubp_graph"] / med[k] for k in med if not k.startswith("gpubp_g")
        }
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--tiny", action="store_true", help="one small shape once (a rehearsal)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args(argv)


def metadata() -> dict[str, Any]:
    cp = cupy_module()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    torch, _ = torch_status()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "compute_capability": dev.compute_capability,
        "kernels_git": kernels_hash(),
        "cupy": cp.__version__,
        "python": platform.python_version(),
        "torch": None if torch is None else torch.__version__,
        "command": " ".join([sys.executable, *sys.argv]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata()
    report = BenchReport(meta=meta)
    result: dict[str, Any] = {"meta": meta, "shapes": {}}
    shapes = TINY if args.tiny else QUICK if args.quick else SHAPES
    repeats = 1 if args.tiny else args.repeats
    for label, batch in shapes.items():
        row = measure(label, batch, repeats, report, compile=not args.no_compile)
        result["shapes"][label] = row
        print(label, json.dumps(row.get("ratios")), flush=True)
    result["bandwidth_GBps"] = bandwidth(repeats, rows=1024 if args.tiny else 262144)
    result["failures"], result["absent"] = report.failures, report.absent
    (out / "gpu_step.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_step.txt").write_text(table(result))
    print(table(result))
    for f in report.failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report.failures else 0


def table(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        f"gpubp GPU step benchmark  {m['date']}",
        f"device: {m['device']} (sm_{m['compute_capability']})",
        f"kernels/ git tree: {m['kernels_git']}",
        f"cupy {m['cupy']}  torch {m['torch']}  float32, TF32 off, ReLU + softmax CE, plain SGD",
        f"command: {m['command']}",
        "",
        "medians of interleaved repeats, microseconds per train step; ratio = gpubp_graph / column",
    ]
    cols = [
        "gpubp_graph",
        "gpubp_eager",
        "torch_eager",
        "torch_graph",
        "torch_compile",
        "gemm_floor",
    ]
    lines.append(f"{'shape':<12} {'batch':>7} " + " ".join(f"{c:>14}" for c in cols))
    for label, row in report["shapes"].items():
        cells = []
        for c in cols:
            us = row["us"].get(c)
            if us is None:
                cells.append(f"{'-':>14}")
            elif c == "gpubp_graph":
                cells.append(f"{us:>14.1f}")
            else:
                cells.append(f"{us:>7.1f} ({row['us']['gpubp_graph'] / us:4.2f}x)")
        lines.append(f"{label:<12} {row['batch']:>7} " + " ".join(cells))
    lines.append("")
    for label, row in report["shapes"].items():
        if "gpubp_TFLOPs" not in row:
            continue
        share = row["gpubp_TFLOPs"] / row["gemm_floor_TFLOPs"]
        lines.append(
            f"{label:<12} step {row['gpubp_TFLOPs']:.2f} TFLOP/s, GEMMs alone "
            f"{row['gemm_floor_TFLOPs']:.2f} TFLOP/s ({share:.0%})"
        )
    bw = report["bandwidth_GBps"]
    lines.append("")
    lines.append(f"device-to-device copy: {bw['copy']:.0f} GB/s")
    for k in ("bias_activation", "hidden_delta"):
        lines.append(f"{k:<16} {bw[k]:.0f} GB/s ({bw[k] / bw['copy']:.0%} of copy)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("CUPY_TF32", "0")
    sys.exit(main())
