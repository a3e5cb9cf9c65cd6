"""One train step on the GPU: gpubp's cupy backend against PyTorch, cuBLAS alone and copy bandwidth.

Usage: python benchmarks/gpu_step.py OUTDIR [--quick]

For each shape of issue 7 (ReLU hidden layers, softmax + cross-entropy, plain SGD, float32 without
TF32) it first checks one gpubp step against the float64 reference, then times, interleaved
(A, B, C, A, B, C, ...) with CUDA events and reports medians:

- ``gpubp_graph``: gpubp's train step (CUDA graph), ``gpubp_eager``: the same kernels launched
  one by one (``graphs=False``), ``gpubp_fold``: the graph step with plain SGD folded into the
  gradient GEMM (``fold_sgd=True``);
- ``torch_eager`` (``SGD(foreach=True)``), ``torch_graph`` (the same step captured with
  ``torch.cuda.graph``), ``torch_compile`` (``torch.compile`` of the step), where PyTorch with
  CUDA is installed;
- ``gemm_floor``: the step's GEMMs alone through cuBLAS (what no elementwise fusion can beat),
  reported as TFLOP/s next to gpubp's;
- ``copy_GBps``: device-to-device copy bandwidth, and each fused elementwise kernel's bandwidth
  as a share of it.

Writes ``gpu_step.json`` and ``gpu_step.txt`` (a table of times and ratios) into OUTDIR.
Needs no network.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES: dict[str, tuple[list[int], int]] = {
    "mnist-small": ([784, 128, 10], 64),
    "mnist-mlp": ([784, 1024, 1024, 10], 1024),
    "wide": ([4096, 4096, 4096, 4096], 8192),
    "narrow-deep": ([64, 64, 64, 64, 64, 64, 16], 262144),
}
QUICK: dict[str, tuple[list[int], int]] = {
    "mnist-small": ([784, 128, 10], 64),
    "narrow-deep": ([64, 64, 64, 64, 64, 64, 16], 16384),
}
LR = 0.01


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


def timer(cp: Any) -> Callable[[Callable[[], None], int], float]:
    def run(fn: Callable[[], None], n: int) -> float:
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(n):
            fn()
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / n * 1e3  # microseconds per call

    return run


def gpubp_step(
    cp: Any, sizes: list[int], batch: int, graphs: bool, fold: bool = False
) -> Callable[[], None]:
    from gpubp.backends.cuda import CupyBackend
    from gpubp.optim import SGD

    be = CupyBackend(graphs=graphs, fold_sgd=fold)
    rng = np.random.default_rng(0)
    W = [
        cp.asarray(rng.normal(0, (2 / a) ** 0.5, (b, a)), "float32")
        for a, b in itertools.pairwise(sizes)
    ]
    bs = [cp.zeros(n, "float32") for n in sizes[1:]]
    x = cp.asarray(rng.normal(size=(batch, sizes[0])), "float32")
    y = cp.asarray(rng.integers(0, sizes[-1], batch))
    opt = SGD(lr=LR)
    state = opt.bind(object(), be, [w.shape for w in W] + [v.shape for v in bs], "float32")

    def step() -> None:
        be.train_step(W, bs, x, y, "relu", "softmax", "cross_entropy", opt, state)

    return step


def validate(sizes: list[int]) -> float:
    """Worst relative error of one gpubp configuration against the float64 reference."""
    from gpubp.check import check_configuration

    small = [min(n, 257) for n in sizes]
    res = check_configuration(
        "cupy", "float32", tuple(small), 33, "relu", "softmax", "cross_entropy"
    )
    if not res.ok:
        raise SystemExit(f"gpubp does not match the reference, not timing: {res.errors}")
    return res.worst


def torch_steps(sizes: list[int], batch: int) -> dict[str, Callable[[], None]]:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    layers: list[Any] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=True)
    x = torch.randn(batch, sizes[0], device=dev)
    y = torch.randint(0, sizes[-1], (batch,), device=dev)
    lossf = torch.nn.CrossEntropyLoss()

    def eager() -> None:
        opt.zero_grad(set_to_none=False)
        lossf(model(x), y).backward()
        opt.step()

    out: dict[str, Callable[[], None]] = {"torch_eager": eager}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        eager()
    out["torch_graph"] = g.replay
    try:
        compiled = torch.compile(eager)
        for _ in range(3):
            compiled()
        out["torch_compile"] = compiled
    except Exception as exc:  # no compiler toolchain: report, do not fail the run
        print(f"torch.compile unavailable: {exc}", file=sys.stderr)
    return out


def gemm_floor(cp: Any, sizes: list[int], batch: int) -> tuple[Callable[[], None], float]:
    """The step's GEMMs alone (forward, backward data, weight gradient) and their FLOPs."""
    from gpubp.backends.cuda import CupyBackend, launch

    be = CupyBackend()
    one = be.constants("float32")
    acts = [cp.ones((batch, n), "float32") for n in sizes]
    W = [cp.ones((b, a), "float32") for a, b in itertools.pairwise(sizes)]
    dW = [cp.empty_like(w) for w in W]
    L = len(W)
    flops = 0.0
    for i in range(L):
        flops += 2 * batch * sizes[i] * sizes[i + 1] * (3 if i > 0 else 2)

    def run() -> None:
        blas = be.cublas()  # gpubp's cuBLAS handle, on the current stream
        for i in range(L):
            launch.gemm(blas, False, True, acts[i], W[i], acts[i + 1], "ONE", "ZERO", one)
        for i in range(L - 1, -1, -1):
            launch.gemm(blas, True, False, acts[i + 1], acts[i], dW[i], "ONE", "ZERO", one)
            if i > 0:
                launch.gemm(blas, False, False, acts[i + 1], W[i], acts[i], "ONE", "ZERO", one)

    return run, flops


def bandwidth(cp: Any, run: Callable[[Callable[[], None], int], float]) -> dict[str, float]:
    """Copy bandwidth and the fused elementwise kernels' bandwidth, in GB/s."""
    from gpubp.backends.cuda import CupyBackend, launch

    be = CupyBackend()
    rows, n = 262144, 64
    a = cp.ones((rows, n), "float32")
    g = cp.ones((rows, n), "float32")
    b = cp.zeros(n, "float32")
    dst = cp.empty_like(a)
    nbytes = a.nbytes
    status = be.scratch_status()
    copy = lambda: dst.__setitem__(Ellipsis, a)  # noqa: E731
    bias_act = lambda: launch.bias_activation(be.kernel, a, b, "relu", status)  # noqa: E731
    hidden = lambda: launch.hidden_delta(be.kernel, g, a, "relu", status)  # noqa: E731
    results: dict[str, list[float]] = {"copy": [], "bias_activation": [], "hidden_delta": []}
    for _ in range(7):
        results["copy"].append(2 * nbytes / run(copy, 20) / 1e3)
        results["bias_activation"].append(2 * nbytes / run(bias_act, 20) / 1e3)
        results["hidden_delta"].append(3 * nbytes / run(hidden, 20) / 1e3)
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from gpubp.backends.cuda.backend import import_cupy

    cp = import_cupy()

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    run = timer(cp)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "compute_capability": dev.compute_capability,
        "kernels_git": kernels_hash(),
        "cupy": cp.__version__,
        "python": platform.python_version(),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        meta["torch"] = None
    report: dict[str, Any] = {"meta": meta, "shapes": {}}
    for label, (sizes, batch) in (QUICK if args.quick else SHAPES).items():
        worst = validate(sizes)
        fns: dict[str, Callable[[], None]] = {
            "gpubp_graph": gpubp_step(cp, sizes, batch, True),
            "gpubp_eager": gpubp_step(cp, sizes, batch, False),
            "gpubp_fold": gpubp_step(cp, sizes, batch, True, fold=True),
        }
        fns.update(torch_steps(sizes, batch))
        floor, flops = gemm_floor(cp, sizes, batch)
        fns["gemm_floor"] = floor
        for fn in fns.values():  # warm up: compile, capture, autotune
            for _ in range(3):
                fn()
        cp.cuda.Device().synchronize()
        n = max(3, min(200, int(2e5 / max(1, batch))))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(run(fn, n))
        med = {k: statistics.median(v) for k, v in times.items()}
        row: dict[str, Any] = {"sizes": sizes, "batch": batch, "check_worst": worst, "us": med}
        row["gpubp_TFLOPs"] = flops / med["gpubp_graph"] / 1e6
        row["gemm_floor_TFLOPs"] = flops / med["gemm_floor"] / 1e6
        row["ratios"] = {
            f"gpubp/{k}": med["gpubp_graph"] / med[k] for k in med if not k.startswith("gpubp_g")
        }
        report["shapes"][label] = row
        print(label, json.dumps(row["ratios"]), flush=True)
    report["bandwidth_GBps"] = bandwidth(cp, run)
    (out / "gpu_step.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_step.txt").write_text(table(report))
    print(table(report))
    return 0


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
