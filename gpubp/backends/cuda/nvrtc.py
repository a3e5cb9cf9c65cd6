"""Compile CUDA C++ with NVRTC through ctypes: no GPU, no CuPy, no CUDA toolkit needed.

NVRTC ships on PyPI (``pip install nvidia-cuda-nvrtc``, or ``nvidia-cuda-nvrtc-cu12``); this
module finds its shared library in the wheel and compiles to a cubin for a named architecture.
It is what the CI test uses to compile every kernel instantiation on machines without a GPU;
the CuPy backend itself compiles through ``cupy.RawModule``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import NvrtcError


def find_nvrtc() -> str | None:
    """Path of an NVRTC shared library: the PyPI wheels first, then ``CUDA_HOME``/``CUDA_PATH``.

    ``GPUBP_NVRTC`` names a library explicitly. ``None`` if none is found.
    """
    explicit = os.environ.get("GPUBP_NVRTC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    dirs: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        # nvidia-cuda-nvrtc 13.x: nvidia/cu13/lib; the 12.x wheels: nvidia/cuda_nvrtc/lib
        dirs += [*sorted(Path(root).glob("cu*/lib")), Path(root) / "cuda_nvrtc" / "lib"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs += [Path(os.environ[var]) / "lib64", Path(os.environ[var]) / "lib"]
    pattern = "nvrtc64_*.dll" if sys.platform == "win32" else "libnvrtc.so*"
    for d in dirs:
        for lib in sorted(d.glob(pattern), reverse=True):
            if "builtins" not in lib.name:
                return str(lib)
    return None


@dataclass
class CompileResult:
    """What NVRTC gave back for one program."""

    arch: str
    log: str
    cubin: bytes
    lowered: dict[str, str] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.log.splitlines() if "warning" in line.lower()]


class Nvrtc:
    """A loaded NVRTC library."""

    def __init__(self, path: str | None = None) -> None:
        path = path or find_nvrtc()
        if path is None:
            raise FileNotFoundError(
                "NVRTC was not found; install it with pip install nvidia-cuda-nvrtc (CUDA 13) or "
                "nvidia-cuda-nvrtc-cu12 (CUDA 12), or set GPUBP_NVRTC to libnvrtc.so's path"
            )
        self.path = path
        self._lib = ctypes.CDLL(path)
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return major.value, minor.value

    def _check(self, status: int, what: str, log: str = "") -> None:
        if status != 0:
            text = self._lib.nvrtcGetErrorString(status).decode()
            raise NvrtcError(f"NVRTC {what} failed: {text}" + (f"\n{log}" if log else ""))

    def compile(
        self,
        source: str,
        name: str,
        name_expressions: Iterable[str],
        arch: str,
        options: Sequence[str] = (),
    ) -> CompileResult:
        """Compile ``source`` to a cubin for ``arch`` (``"sm_90"``), instantiating every name.

        Raises :class:`NvrtcError` with the log if compilation fails or a name does not resolve.
        """
        lib = self._lib
        prog = ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
            ),
            "createProgram",
        )
        try:
            exprs = list(name_expressions)
            for e in exprs:
                self._check(lib.nvrtcAddNameExpression(prog, e.encode()), f"addNameExpression {e}")
            opts = [f"--gpu-architecture={arch}", *options]
            argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            status = lib.nvrtcCompileProgram(prog, len(opts), argv)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            self._check(status, f"compile of {name} for {arch}", log)
            lowered = {}
            for e in exprs:
                out = ctypes.c_char_p()
                self._check(
                    lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(out)),
                    f"getLoweredName {e}",
                    log,
                )
                lowered[e] = (out.value or b"").decode()
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "getCUBIN", log)
            return CompileResult(arch, log, cubin.raw, lowered)
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
