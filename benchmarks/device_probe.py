"""The in-process phases of ``benchmarks/device_run.py``: ``environment`` and ``smoke``.

Usage: python benchmarks/device_probe.py {environment,smoke} RESULT.json

Each writes a JSON object to ``RESULT.json`` (the orchestrator merges it into its phase entry)
and exits 0 when the phase passed, 1 when it failed. Run by ``device_run.py`` in a child process,
so that a hang or a crash costs that phase only.

- ``environment``: the versions and the loaded paths of CuPy, the CUDA runtime, NVRTC, libcublas
  and NCCL, read from the process's own memory map after each has been used once (a kernel
  compiled, a GEMM run, NCCL imported), so the paths are the copies really loaded, not guesses.
- ``smoke``: one small problem (float32, ReLU + softmax cross-entropy, SGD with momentum),
  three train steps with the CUDA graph and three eagerly, every warning an error; the graph's
  parameters against the eager ones and against the float64 reference, and ``"captured"``:
  whether the steps really ran as a graph (the backend's :meth:`capture_report`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Shared libraries whose loaded path the environment phase reports (name prefix -> key).
LIBRARIES: dict[str, str] = {
    "libcudart": "cudart",
    "libnvrtc": "nvrtc",
    "libcublas.so": "cublas",
    "libcublasLt": "cublasLt",
    "libnccl": "nccl",
    "libcuda.so": "driver",
}


def loaded_libraries() -> dict[str, list[str]]:
    """The paths of the :data:`LIBRARIES` this process has loaded (``/proc/self/maps``)."""
    found: dict[str, list[str]] = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                base = os.path.basename(path)
                for prefix, key in LIBRARIES.items():
                    if path.startswith("/") and base.startswith(prefix):
                        paths = found.setdefault(key, [])
                        if path not in paths:
                            paths.append(path)
    except OSError as exc:  # not Linux
        found["error"] = [str(exc)]
    return found


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # reported, never fatal: this phase describes, it does not judge
        return f"error: {type(exc).__name__}: {exc}"


def environment() -> tuple[bool, dict[str, Any]]:
    """Versions and loaded paths; fails only when the cupy backend cannot run at all."""
    import platform

    import numpy as np

    import gpubp
    from gpubp.backends.cuda.cupy_module import cupy_module_name, import_cupy

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gpubp": gpubp.__version__,
        "cupy_module": cupy_module_name(),
        "cupy_backend": gpubp.backend_status()["cupy"] or "available",
    }
    try:
        cp = import_cupy()
    except Exception as exc:
        info["cupy"] = f"error: {type(exc).__name__}: {exc}"
        return False, info
    info["cupy"] = getattr(cp, "__version__", "?")
    info["cupy_path"] = getattr(cp, "__file__", "?")
    info["cuda_runtime"] = _try(lambda: cp.cuda.runtime.runtimeGetVersion())
    info["cuda_driver"] = _try(lambda: cp.cuda.runtime.driverGetVersion())
    info["nvrtc"] = _try(lambda: list(cp.cuda.nvrtc.getVersion()))
    info["device"] = _try(lambda: _device_name(cp))
    info["first_use"] = _try(lambda: _use_once(cp))
    info["nccl"] = _try(lambda: _nccl_version(cp))
    info["libraries"] = loaded_libraries()
    info["cublas_gpubp_calls"] = _try(_cublas_path)
    info["nvidia_smi"] = _try(_nvidia_smi)
    return info["cupy_backend"] == "available", info


def _cublas_path() -> str:
    """The libcublas gpubp's binding calls: CuPy's own copy (a stand-in brings its own)."""
    from gpubp.backends.cuda import cublas
    from gpubp.backends.cuda.cupy_module import injected

    if injected():
        return "the stand-in's own"
    path, why = cublas.cupy_cublas()
    return path or f"none: {why}"


def _nvidia_smi() -> str:
    """``nvidia-smi``'s name, driver and memory of each GPU, or why there is none."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    query = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    done = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20)
    return (done.stdout or done.stderr).strip()


def _device_name(cp: Any) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return f"{name} (sm_{cp.cuda.Device().compute_capability})"


def _use_once(cp: Any) -> str:
    """One forward layer through the backend: NVRTC compiles a kernel, cuBLAS runs a GEMM."""
    import numpy as np

    from gpubp.backends.cuda import CupyBackend

    be = CupyBackend()
    W, b = cp.ones((3, 5), np.float32), cp.zeros(3, np.float32)
    out = be.forward_layer(cp.ones((2, 5), np.float32), W, b, "relu")
    return f"ok (forward layer gives {float(out.sum().get()):g}, expected 30)"


def _nccl_version(cp: Any) -> Any:
    import importlib

    nccl = getattr(cp.cuda, "nccl", None)
    if nccl is None:
        nccl = importlib.import_module(f"{cp.__name__}.cuda.nccl")
    get = getattr(nccl, "get_version", None)
    return get() if get is not None else "imported (no get_version)"


def smoke() -> tuple[bool, dict[str, Any]]:
    """Three steps as a graph, three eagerly, the reference; every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _smoke()


def _smoke() -> tuple[bool, dict[str, Any]]:
    import numpy as np

    from gpubp import reference as ref
    from gpubp.backends.cuda import CupyBackend
    from gpubp.backends.cuda.cupy_module import import_cupy
    from gpubp.check import TOLERANCE, random_problem, rel_error
    from gpubp.optim import SGD

    cp = import_cupy()
    sizes, batch, dtype = (33, 65, 10), 64, "float32"
    act, out, loss = "relu", "softmax", "cross_entropy"
    W0, b0, x, y = random_problem(sizes, batch, loss, out, np.random.default_rng(0))
    W0 = [w.astype(dtype).astype(np.float64) for w in W0]  # the reference starts where they do
    b0 = [v.astype(dtype).astype(np.float64) for v in b0]
    x = x.astype(dtype).astype(np.float64)
    shapes = [w.shape for w in W0] + [v.shape for v in b0]
    params: dict[str, list[np.ndarray]] = {}
    report: dict[str, Any] = {}
    for mode in ("graph", "eager"):
        # the graph step as GPUBP_CUDA_GRAPHS says (require, in the device run)
        be = CupyBackend(graphs=None if mode == "graph" else False)
        W = [cp.asarray(w, dtype) for w in W0]
        b = [cp.asarray(v, dtype) for v in b0]
        opt = SGD(lr=0.1, momentum=0.9)
        state = opt.bind(None, be, shapes, dtype)
        xd, yd = cp.asarray(x, dtype), cp.asarray(y)
        for _ in range(3):
            be.train_step(W, b, xd, yd, act, out, loss, opt, state)
        be.synchronize()
        params[mode] = [be.to_numpy(p).astype(np.float64) for p in [*W, *b]]
        report[f"capture_{mode}"] = be.capture_report()
    opt = SGD(lr=0.1, momentum=0.9)
    rstate: dict[str, Any] = {"step": 0, **{s: [np.zeros(t) for t in shapes] for s in opt.slots}}
    Wr, br = W0, b0
    for _ in range(3):
        _, Wr, br, rstate = ref.train_step(Wr, br, x, y, act, out, loss, opt, rstate)
    graph = params["graph"]
    report["graph_vs_eager"] = max(rel_error(g, e) for g, e in zip(graph, params["eager"]))
    report["graph_vs_reference"] = max(rel_error(g, r) for g, r in zip(graph, [*Wr, *br]))
    report["tolerance"] = TOLERANCE[dtype]
    report["captured"] = bool(report["capture_graph"]["captured"])
    ok = (
        report["captured"]
        and report["graph_vs_eager"] <= TOLERANCE[dtype]
        and report["graph_vs_reference"] <= TOLERANCE[dtype]
    )
    if not report["captured"]:
        report["reason"] = f"the step was not captured: {report['capture_graph']['reasons']}"
    elif not ok:
        report["reason"] = "parameters differ beyond the tolerance"
    return ok, report


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("environment", "smoke"):
        print("usage: device_probe.py {environment,smoke} RESULT.json", file=sys.stderr)
        return 2
    phase, result = argv
    try:
        ok, report = environment() if phase == "environment" else smoke()
    except Exception as exc:
        import traceback

        ok, report = False, {"reason": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    Path(result).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
