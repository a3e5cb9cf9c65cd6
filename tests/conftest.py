"""Shared fixtures: one test body per backend and dtype, reproducible per-test random data.

A backend that cannot run here (no GPU, not installed, not built yet) is skipped with the reason
:func:`gpubp.backend_status` gives, never failed, so the same suite runs on a laptop and on a GPU
machine and covers every backend that the machine can run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zlib

import numpy as np
import pytest

import gpubp
from cudaemu.kernels import compiler_missing
from gpubp.backends import BACKEND_NAMES

from .idx_files import write_fake_idx_dataset

DTYPES: tuple[str, ...] = ("float32", "float64")


def _real_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # a broken driver: no GPU for the tests
        return False


#: The CPU emulation of CuPy (cudaemu/ at the repository root, not part of the package).
EMULATOR_MODULE = "cudaemu.cupy"

# Without a GPU the ``cupy`` backend runs on the emulated device (the kernels compiled for the
# CPU, CuPy emulated over NumPy), injected in place of cupy with GPUBP_CUPY_MODULE: the same
# test bodies then run it against the reference, and child processes (the CLI, mpirun) inherit
# it. GPUBP_CUPY_MODULE in the environment decides instead (=cupy: the real one only).
if "GPUBP_CUPY_MODULE" not in os.environ and not _real_gpu():
    os.environ["GPUBP_CUPY_MODULE"] = EMULATOR_MODULE
EMULATED_GPU: bool = os.environ.get("GPUBP_CUPY_MODULE") == EMULATOR_MODULE


@functools.cache
def _status() -> dict[str, str | None]:
    # asked once per session: finding out whether a GPU is there can cost an import of CuPy
    return gpubp.backend_status()


def skip_unless_available(name: str) -> None:
    """``pytest.skip`` with the registry's own reason when backend ``name`` cannot run here.

    Where CI requires the emulated GPU (``GPUBP_REQUIRE_EMULATOR=1``), a ``cupy`` backend that
    cannot run fails instead: the GPU code must never go untested unnoticed.
    """
    why = _status()[name]
    if why is not None:
        if name == "cupy" and EMULATED_GPU and compiler_missing() is not None:
            why = f"{why}: {compiler_missing()}"  # what the emulated device lacks here
        if name == "cupy" and os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1":
            pytest.fail(f"GPUBP_REQUIRE_EMULATOR=1 but backend 'cupy' cannot run: {why}")
        pytest.skip(f"backend {name!r} is not available here: {why}")


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Every backend name gpubp knows; those that cannot run here are skipped, not failed."""
    skip_unless_available(request.param)
    return request.param


@pytest.fixture
def backend(backend_name: str) -> gpubp.backends.Backend:
    """The backend object for :func:`backend_name`."""
    return gpubp.get_backend(backend_name)


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> str:
    """``"float32"`` or ``"float64"`` (names, as gpubp.check and MLP take them)."""
    return request.param


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's node id: the same data on every run, other data in
    every test (``zlib.crc32`` rather than ``hash``, which Python salts per process)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """An int derived from the node id, for APIs that take a seed instead of a generator."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def hide_module(monkeypatch: pytest.MonkeyPatch):
    """``hide_module("matplotlib")``: importing that package (or a submodule) raises
    ImportError for the rest of the test, as if it were not installed."""
    import builtins

    real_import = builtins.__import__

    def hide(prefix: str) -> None:
        def blocked(name: str, *args: object, **kwargs: object) -> object:
            if name.startswith(prefix):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", blocked)

    return hide


@pytest.fixture
def fake_mnist(tmp_path, rng, monkeypatch):
    """A random MNIST-layout dataset (120 training, 40 test images) found via ``GPUBP_DATA``."""
    root = tmp_path / "data"
    write_fake_idx_dataset(root / "mnist", rng, n_train=120, n_test=40)
    monkeypatch.setenv("GPUBP_DATA", str(root))
    return root


#: A schedule's steps as the device-schedule tests take them: ``(global step, or None for a
#: rate set by hand; whether the batch is the short one)``, through a short batch, a rate set
#: by hand, a jump of the global step (a resumed run), the last step and beyond.
SCHEDULE_PLAN = [(0, 0), (1, 0), (2, 1), (3, 0), (None, 0), (4, 0), (6, 0), (7, 0), (8, 0), (30, 0)]


def set_scheduled_rate(opt, sched, t, follow: bool) -> None:
    """The rate of step ``t`` of :data:`SCHEDULE_PLAN`: 0.003 by hand where ``t`` is None, else
    the optimizer following ``sched`` (``follow``) or the host setting ``sched.at(t)``."""
    if t is None:
        opt.lr = 0.003
    elif follow:
        opt.follow(sched, t)
    else:
        opt.lr = sched.at(t)
