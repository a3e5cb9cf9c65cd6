"""gpubp's CUDA kernels compiled for the CPU and launched like ``cupy.RawModule`` functions.

The same ``kernels/*.cu`` text that NVRTC compiles for the GPU (one family, its headers inlined,
:func:`gpubp.backends.cuda.catalogue.source`) is compiled by a host C++ compiler behind
``cudaemu/include/cuda_emu.h``, which gives the CUDA builtins the kernels use a C++ meaning. Every
instantiation the catalogue names is exported from one shared library per family, with its
parameter types, and launched through ctypes with the argument tuples the backend gives CuPy:

>>> mod = Module(source("hidden_delta"), name_expressions("hidden_delta"))   # doctest: +SKIP
>>> mod.get_function("gpubp::hidden_delta<float, 3>")((2,), (64,), (g, a, np.int64(n), status))

Libraries are built on first use and cached by the hash of everything that goes into them
(compiler, flags, header, source, names) under ``$GPUBP_EMU_CACHE`` (default
``~/.cache/gpubp/emu``). Variants: ``plain`` (fibers, optimised), ``threads`` (one OS thread per
CUDA thread), ``asan`` (fibers, AddressSanitizer + UndefinedBehaviorSanitizer, no recovery) and
``tsan`` (threads, ThreadSanitizer). ``asan`` loads only into a process that preloaded its
runtime (``LD_PRELOAD``, see :func:`sanitizer_runtime`); ``tsan`` does not run inside Python at
all (the interpreter crashes under it), so it is built into a C++ driver instead
(``include/sanitize_driver.h``, see :mod:`.sanitize`). ``$GPUBP_EMU_VARIANT`` sets the
default variant.

Blocks run one after another in forward, reverse or shuffled order (by default the order rotates
from launch to launch; :func:`block_order` fixes it), so a kernel whose result depends on the
order of its blocks is caught by comparing runs. Undefined behaviour the header detects (a
divergent or partial-warp shuffle, a barrier not every thread reaches, a deadlock) raises
:class:`EmulatorError` naming the kernel, block, thread and source line.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The C++ headers of the emulator (``cuda_emu.h``, ``sanitize_driver.h``).
INCLUDE = Path(__file__).resolve().parent / "include"
HEADER = INCLUDE / "cuda_emu.h"


def _has_fma() -> bool:
    """Whether this x86-64 CPU has the FMA3 instructions (``fma`` in ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and " fma " in f"{line} " for line in info)
    except OSError:
        return False


#: Rounding as NVRTC's: ``a*b+c`` contracted to one fused multiply-add wherever the compiler
#: sees it (NVRTC's default ``--fmad=true``; g++ in ISO C++ mode contracts nothing by default),
#: with the hardware FMA (x86-64 needs ``-mfma``; aarch64 has it always). A CPU without FMA
#: rounds every product and sum separately, as before (DESIGN.md, the emulated GPU).
FP_FLAGS: tuple[str, ...] = (
    "-ffp-contract=fast",
    *(("-mfma",) if platform.machine() in ("x86_64", "AMD64") and _has_fma() else ()),
)


#: Compiler flags of every variant, then the variant's own.
BASE_FLAGS: tuple[str, ...] = (
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-pthread",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unknown-pragmas",  # "#pragma unroll" is a hint; g++ has its own spelling
    # each library keeps its own statics (the __shared__ arrays, the emulator's state): without
    # these, g++ makes them process-wide unique symbols shared by every library loaded
    "-fno-gnu-unique",
    "-fvisibility=hidden",
    *FP_FLAGS,
)

VARIANTS: dict[str, tuple[str, ...]] = {
    "plain": ("-O2",),
    "threads": ("-O2", "-DEMU_THREADS=1"),
    "asan": (
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ),
    "tsan": ("-O1", "-g", "-fsanitize=thread", "-DEMU_THREADS=1"),
}
#: Block orders of a launch (the numbers of ``emu::Order`` in the header).
ORDERS: dict[str, int] = {"forward": 0, "reverse": 1, "shuffled": 2}

#: C parameter type -> NumPy scalar type (scalars) or element type (pointers).
_C_TYPES: dict[str, type] = {
    "float": np.float32,
    "double": np.float64,
    "int": np.int32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
}


class EmulatorError(RuntimeError):
    """A kernel did something undefined on a GPU (or the emulated launch was refused)."""


def compiler() -> str:
    """The C++ compiler used: ``$CXX`` or ``g++``."""
    return os.environ.get("CXX", "g++")


def compiler_missing() -> str | None:
    """``None`` if the C++ compiler is on the PATH, else why the emulated device cannot run."""
    if shutil.which(compiler()) is None:
        return (
            f"the CPU emulation of the CUDA kernels needs a C++17 compiler and {compiler()!r} is "
            "not on the PATH (apt-get install g++, or set CXX)"
        )
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$GPUBP_EMU_CACHE``, else ``$XDG_CACHE_HOME/gpubp/emu``
    (``~/.cache/gpubp/emu``)."""
    env = os.environ.get("GPUBP_EMU_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpubp" / "emu"


def translation_unit(code: str, name_expressions: Sequence[str]) -> str:
    """The C++ text of one library: the header, the family's source, the exported entries."""
    entries = ",\n".join(f'    ::emu::entry(&{n}, "{n}")' for n in name_expressions)
    return f'#include "cuda_emu.h"\n{code}\nEMU_EXPORT_ENTRIES(\n{entries})\n'


_VERSION: dict[str, str] = {}
_BUILD_LOCK = threading.Lock()


def _compiler_version() -> str:
    cxx = compiler()
    if cxx not in _VERSION:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
        _VERSION[cxx] = out.stdout.splitlines()[0] if out.stdout else cxx
    return _VERSION[cxx]


def build(code: str, name_expressions: Sequence[str], variant: str = "plain") -> Path:
    """The shared library of ``code`` exporting ``name_expressions`` (built if not cached)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not known; expected one of {list(VARIANTS)}")
    why = compiler_missing()
    if why is not None:
        raise EmulatorError(why)
    header = HEADER.read_text(encoding="utf-8")
    unit = translation_unit(code, name_expressions)
    flags = [*BASE_FLAGS, *VARIANTS[variant]]
    key = hashlib.sha256(
        "\0".join([_compiler_version(), *flags, header, unit]).encode()
    ).hexdigest()[:24]
    folder = cache_dir()
    lib = folder / f"{variant}-{key}.so"
    if lib.is_file():
        return lib
    with _BUILD_LOCK:
        if lib.is_file():
            return lib
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
            Path(tmp, "cuda_emu.h").write_text(header, encoding="utf-8")
            src = Path(tmp, "unit.cpp")
            src.write_text(unit, encoding="utf-8")
            out = Path(tmp, "lib.so")
            cmd = [compiler(), *flags, "-I", tmp, "-o", str(out), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise EmulatorError(
                    f"building the emulated kernels failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}"
                )
            os.replace(out, lib)  # atomic: a concurrent process sees a whole library or none
    return lib


def sanitizer_runtime(variant: str) -> str | None:
    """Path of the sanitizer runtime a process must preload (``LD_PRELOAD``) to load ``variant``."""
    name = {"asan": "libasan.so", "tsan": "libtsan.so"}.get(variant)
    if name is None:
        return None
    out = subprocess.run(
        [compiler(), f"-print-file-name={name}"], capture_output=True, text=True, check=False
    )
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


# --- launch order -------------------------------------------------------------------------------

_order = threading.local()
_launches = itertools.count()


def default_order() -> str:
    """The block order of launches that do not name one: ``rotate`` unless :func:`block_order`."""
    return getattr(_order, "value", None) or os.environ.get("GPUBP_EMU_ORDER", "rotate")


@contextlib.contextmanager
def block_order(order: str) -> Iterator[None]:
    """Within the block, launches take their blocks in ``order`` (forward, reverse, shuffled,
    or rotate: the three in turn, one per launch)."""
    if order not in (*ORDERS, "rotate"):
        raise ValueError(f"order={order!r}; expected one of {[*ORDERS, 'rotate']}")
    old = getattr(_order, "value", None)
    _order.value = order
    try:
        yield
    finally:
        _order.value = old


def _order_and_seed(order: str | None) -> tuple[int, int]:
    n = next(_launches)
    name = order or default_order()
    if name == "rotate":
        name = ("forward", "reverse", "shuffled")[n % 3]
    if name not in ORDERS:
        raise ValueError(f"order={name!r}; expected one of {[*ORDERS, 'rotate']}")
    return ORDERS[name], n


# --- modules and functions ----------------------------------------------------------------------


def _dims(value: Any, what: str) -> int:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not dims or any(int(d) != 1 for d in dims[1:]):
        raise EmulatorError(f"{what}={value!r}: gpubp's kernels use x only; expected (n,)")
    return int(dims[0])


class Function:
    """One kernel instantiation; ``fn(grid, block, args)`` runs it now, as a launch would."""

    def __init__(self, module: Module, index: int, name: str, params: list[str]) -> None:
        self.module = module
        self.index = index
        self.name = name
        self.params = params

    def _argument(self, k: int, param: str, arg: Any) -> ctypes._SimpleCData:
        where = f"{self.name}: argument {k} ({param})"
        if param.endswith("*"):
            elem = _C_TYPES[param.removeprefix("const ").removesuffix("*")]
            if type(arg) is np.uint64:
                return ctypes.c_void_p(int(arg))
            if isinstance(arg, np.ndarray):
                ptr, dtype, contiguous = arg.ctypes.data, arg.dtype, arg.flags.c_contiguous
            elif hasattr(arg, "data") and hasattr(getattr(arg, "data"), "ptr"):  # noqa: B009
                ptr, dtype = int(arg.data.ptr), np.dtype(arg.dtype)
                contiguous = bool(getattr(arg.flags, "c_contiguous", True))
            else:
                raise TypeError(f"{where}: expected a device array or numpy.uint64, got {arg!r}")
            if dtype != np.dtype(elem):
                raise TypeError(f"{where}: expected an array of {np.dtype(elem)}, got {dtype}")
            if not contiguous:
                raise TypeError(f"{where}: the array is not C-contiguous")
            return ctypes.c_void_p(ptr)
        want = _C_TYPES[param]
        if type(arg) is not want:
            raise TypeError(
                f"{where}: expected a numpy.{want.__name__} scalar (its width is the C "
                f"parameter's), got {type(arg).__module__}.{type(arg).__name__}"
            )
        return np.ctypeslib.as_ctypes_type(want)(arg)

    def __call__(
        self,
        grid: Any,
        block: Any,
        args: Sequence[Any],
        shared_mem: int = 0,
        stream: Any = None,
        *,
        order: str | None = None,
    ) -> None:
        if shared_mem:
            raise EmulatorError(f"{self.name}: dynamic shared memory is not used by gpubp")
        if len(args) != len(self.params):
            raise TypeError(
                f"{self.name} takes {len(self.params)} arguments ({', '.join(self.params)}), "
                f"got {len(args)}"
            )
        values = [self._argument(k, p, a) for k, (p, a) in enumerate(zip(self.params, args))]
        argv = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        code, seed = _order_and_seed(order)
        err = ctypes.create_string_buffer(4096)
        rc = self.module._launch(
            self.index,
            _dims(grid, "grid"),
            _dims(block, "block"),
            code,
            seed,
            argv,
            err,
            len(err),
        )
        if rc != 0:
            raise EmulatorError(err.value.decode(errors="replace"))


class Module:
    """Stands in for ``cupy.RawModule(code=..., name_expressions=...)`` on the CPU."""

    def __init__(
        self,
        code: str,
        name_expressions: Sequence[str],
        *,
        options: Sequence[str] = (),
        variant: str | None = None,
    ) -> None:
        variant = variant or os.environ.get("GPUBP_EMU_VARIANT", "plain")
        self.path = build(code, name_expressions, variant)
        self.variant = variant
        lib = ctypes.CDLL(str(self.path))
        lib.emu_count.restype = ctypes.c_int
        lib.emu_name.restype = ctypes.c_char_p
        lib.emu_name.argtypes = [ctypes.c_int]
        lib.emu_signature.restype = ctypes.c_char_p
        lib.emu_signature.argtypes = [ctypes.c_int]
        lib.emu_launch.restype = ctypes.c_int
        lib.emu_launch.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_ulonglong,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        self._lib = lib
        self._launch = lib.emu_launch
        self.functions: dict[str, Function] = {}
        for i in range(lib.emu_count()):
            name = lib.emu_name(i).decode()
            sig = lib.emu_signature(i).decode()
            params = sig.split(",") if sig else []
            self.functions[name] = Function(self, i, name, params)

    def get_function(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not one of the module's name expressions: {list(self.functions)}"
            ) from None
