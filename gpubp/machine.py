"""What this machine offers gpubp: CPU, cores, BLAS and its threads, libraries, GPUs.

The one place that probes the environment: ``gpubp info`` prints it, and ``gpubp bench``
records it beside every measurement. :func:`threads_limited` sets the thread count of BLAS and
PyTorch for a benchmark's contenders. Nothing here imports PyTorch or CuPy unless asked.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from .backends.cores import usable_cores

__all__ = [
    "LIBRARIES",
    "blas",
    "cpu_name",
    "environment",
    "gpus",
    "threads_limited",
    "torch_status",
    "usable_cores",
    "version",
]

#: The distributions ``gpubp info`` lists (optional ones say "not installed").
LIBRARIES = (
    "numpy",
    "numba",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "scikit-learn",
    "matplotlib",
    "torch",
    "jax",
)


def version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else what Python knows)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_provider() -> str:
    """The Numba backend's GEMM provider, its version and threads (or why there is none)."""
    if importlib.util.find_spec("numba") is None:
        return "none: the numba backend is not installed (pip install 'gpubp[numba,fast]')"
    from .backends.numba import gemm

    return gemm.describe()


def _threadpool_info() -> list[dict[str, Any]]:
    """threadpoolctl's view of the loaded thread pools, where threadpoolctl is installed."""
    if importlib.util.find_spec("threadpoolctl") is None:
        return []
    from threadpoolctl import threadpool_info

    info: list[dict[str, Any]] = threadpool_info()
    return info


def blas() -> dict[str, Any]:
    """NumPy's BLAS: ``name``, ``version`` and ``threads`` (None where it cannot be asked:
    the thread count needs threadpoolctl)."""
    out: dict[str, Any] = {"name": "unknown", "version": "", "threads": None}
    try:
        cfg: Any = np.show_config(mode="dicts")
        dep = cfg["Build Dependencies"]["blas"]
        out.update(name=dep.get("name", "unknown"), version=dep.get("version", ""))
    except Exception:  # numpy < 1.25 has no dict mode
        pass
    pools = [p for p in _threadpool_info() if p.get("user_api") == "blas"]
    if pools:
        out["threads"] = int(pools[0]["num_threads"])
    return out


@contextlib.contextmanager
def threads_limited(threads: int | None) -> Iterator[list[str]]:
    """Inside, BLAS (NumPy's and any other loaded, through threadpoolctl where installed) and
    PyTorch (where imported) use at most ``threads`` threads; yields the names of those limited.
    ``None``: leave them alone."""
    limited: list[str] = []
    with contextlib.ExitStack() as stack:
        if threads is not None and importlib.util.find_spec("threadpoolctl") is not None:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=threads, user_api="blas"))
            limited.append("BLAS")
        torch = sys.modules.get("torch")
        if threads is not None and torch is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
            limited.append("PyTorch")
        yield limited


def torch_status() -> tuple[Any, str | None]:
    """``(torch, None)`` if PyTorch imports, else ``(None, reason)``."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch is not installed (pip install torch)"
    try:
        import torch
    except Exception as exc:  # a broken install: say so, never crash the caller
        return None, f"PyTorch does not import: {type(exc).__name__}: {exc}"
    return torch, None


def gpus() -> tuple[list[tuple[str, float]], str | None]:
    """``([(name, GiB), ...], None)`` for the CUDA GPUs CuPy sees, or ``([], why none)``."""
    try:
        from .backends.cuda.cupy_module import import_cupy

        cupy = import_cupy()
        found = []
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            found.append((props["name"].decode(), props["totalGlobalMem"] / 2**30))
    except ImportError:
        return [], "CuPy not installed, so no GPU is used"
    except Exception as exc:
        return [], f"none usable ({type(exc).__name__}: {exc})"
    return found, None


def environment(torch: bool = True) -> dict[str, Any]:
    """The machine and library versions a measurement was taken with (``torch``: also
    PyTorch's version and threads, importing it where installed)."""
    info = blas()
    env: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "numpy": np.__version__,
        "blas": f"{info['name']} {info['version']}".strip(),
        "blas_threads": info["threads"],
    }
    if torch:
        module, _ = torch_status()
        env["torch"] = None if module is None else module.__version__
        env["torch_threads"] = None if module is None else module.get_num_threads()
    return env
