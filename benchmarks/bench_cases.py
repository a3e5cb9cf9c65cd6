"""Cases and helpers of the pytest-benchmark suite (see ``conftest.py`` for how to run it)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp import get_backend
from gpubp.backends import available_backends
from gpubp.bench import STANDARD_SHAPES, BenchShape, parse_shape, validation_batch
from gpubp.check import TOLERANCE, rel_error


def _shapes() -> list[BenchShape]:
    spec = os.environ.get("GPUBP_BENCH_SHAPES", "")
    if not spec:
        return list(STANDARD_SHAPES.values())
    return [parse_shape(s.strip()) for s in spec.split(",") if s.strip()]


def _dtypes() -> list[str]:
    spec = os.environ.get("GPUBP_BENCH_DTYPES", "float32,float64")
    return [d.strip() for d in spec.split(",") if d.strip()]


@dataclass(frozen=True)
class Case:
    """One backend, dtype, network and batch size."""

    backend: str
    dtype: str
    shape: str
    sizes: tuple[int, ...]
    batch: int

    def __str__(self) -> str:
        return f"{self.backend}-{self.dtype}-{self.shape}"

    @property
    def be(self) -> Any:
        return get_backend(self.backend)

    @property
    def tol(self) -> float:
        return TOLERANCE[self.dtype]

    @property
    def check_batch(self) -> int:
        """Rows the reference checks (all of them unless that would take the reference long)."""
        return validation_batch(self.sizes, self.batch)

    def arrays(self, batch: int, seed: int = 0) -> dict[str, Any]:
        """NumPy arrays rounded to ``dtype``: inputs, parameters and deltas of ``batch`` rows."""
        rng = np.random.default_rng(seed)
        s, dt = self.sizes, self.dtype

        def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
            return rng.normal(0, scale, shape).astype(dt)

        L = len(s) - 1
        return {
            "x": normal(batch, s[0]),
            "W": [normal(s[i + 1], s[i], scale=np.sqrt(2 / s[i])) for i in range(L)],
            "b": [normal(s[i + 1], scale=0.1) for i in range(L)],
            "y": rng.integers(0, s[-1], batch),
            "z": normal(batch, s[-1], scale=3.0),
            # hidden activations after ReLU (about half exactly zero) and deltas per layer
            "a": [np.maximum(normal(batch, n), 0) for n in s[1:]],
            "d": [normal(batch, n, scale=1e-2) for n in s[1:]],
        }

    def device(self, a: Any) -> Any:
        """``a`` (or each array of a list) on the backend's device."""
        if isinstance(a, list):
            return [self.be.asarray(v) for v in a]
        return self.be.asarray(a)


def _cases() -> list[Case]:
    cases = []
    for name in available_backends():
        device = "cpu" if get_backend(name).xp is np else "gpu"
        for dtype in _dtypes():
            for shape in _shapes():
                batch = shape.batch(device)
                if batch is not None:
                    cases.append(Case(name, dtype, shape.name, shape.sizes, batch))
    return cases


CASES = _cases()


def assert_close(value: Any, expected: Any, tol: float, what: str, floor: float = 0.0) -> None:
    """The check every benchmark makes before it times anything: ``rel_error <= tol``."""
    err = rel_error(value, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.2e} against the reference > {tol:g}"


def run_and_record(
    benchmark: Any, case: Case, fn: Any, flops: float, nbytes: float, setup: Any = None
) -> None:
    """Time ``fn`` with the device synchronised inside the timed region; record GFLOP/s, GB/s.

    With ``setup``, every round is one call of ``fn`` after an untimed ``setup()`` (rounds enough
    for about a second), through ``benchmark.pedantic``.
    """
    be = case.be

    def timed() -> None:
        fn()
        be.synchronize()

    benchmark.group = f"{benchmark.name.split('[')[0]} {case.shape} {case.dtype}"
    benchmark.extra_info.update(
        shape=case.shape, sizes=list(case.sizes), batch=case.batch, flops=flops, bytes=nbytes
    )
    if setup is None:
        benchmark(timed)
    else:
        setup()
        t0 = time.perf_counter()
        timed()
        once = time.perf_counter() - t0
        rounds = max(5, min(500, int(1.0 / max(once, 1e-6))))
        benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["GFLOP/s"] = flops / median / 1e9
        benchmark.extra_info["GB/s"] = nbytes / median / 1e9
