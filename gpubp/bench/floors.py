"""The floors: the step's GEMMs alone, through NumPy's BLAS or cuBLAS (:class:`FloorCandidate`,
optionally with the elementwise bytes copied) and through the Numba backend's GEMM provider
(:class:`ProviderFloorCandidate`: the fastest GEMM found here)."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np

from ..backends import to_numpy
from ..check import rel_error
from .candidate import Candidate, cupy_module
from .problem import (
    CPU,
    GPU,
    Problem,
    elementwise_bytes,
)


class FloorCandidate(Candidate):
    """The step's GEMMs alone, through ``xp.matmul(..., out=)`` into preallocated outputs.

    With ``copy=True`` each step also copies :func:`elementwise_bytes` bytes device to device
    (half read, half written), the time the elementwise work needs at the copy bandwidth.
    """

    kind = "floor"

    def __init__(self, xp: Any, device: str, copy: bool = False) -> None:
        self.xp, self.device, self.copy = xp, device, copy
        blas = "NumPy BLAS" if device == CPU else "cuBLAS"
        self.label = "floor: GEMM+copy" if copy else f"floor: {blas} GEMM"

    def setup(self, problem: Problem) -> None:
        xp, dt, B, s = self.xp, problem.dtype, problem.batch, problem.sizes
        rng = np.random.default_rng(1)
        L = len(s) - 1

        def rand(*shape: int) -> Any:
            return xp.asarray(rng.normal(0, 1, shape).astype(dt))

        self.A = [rand(B, s[i]) for i in range(L)]  # a^0..a^{L-1}
        self.W = [rand(s[i + 1], s[i]) for i in range(L)]
        self.D = [rand(B, s[i + 1]) for i in range(L)]  # delta^1..delta^L
        self.Z = [xp.empty((B, s[i + 1]), dtype=dt) for i in range(L)]
        self.G = [xp.empty((B, s[i]), dtype=dt) for i in range(L)]
        self.dW = [xp.empty((s[i + 1], s[i]), dtype=dt) for i in range(L)]
        if self.copy:
            n = max(1, elementwise_bytes(s, B, np.dtype(dt).itemsize) // 2)
            self.src = xp.ones(n, dtype=np.uint8)
            self.dst = xp.empty(n, dtype=np.uint8)

    def gemm(self, trans_a: bool, trans_b: bool, a: Any, b: Any, out: Any) -> None:
        """``out = op(a) @ op(b)``; a subclass may call another GEMM (cuBLAS through gpubp)."""
        self.xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)

    def step(self) -> None:
        L = len(self.W)
        for i in range(L):
            self.gemm(False, True, self.A[i], self.W[i], self.Z[i])
        for i in range(L - 1, -1, -1):
            self.gemm(True, False, self.D[i], self.A[i], self.dW[i])
            if i > 0:
                self.gemm(False, False, self.D[i], self.W[i], self.G[i])
        if self.copy:
            self.xp.copyto(self.dst, self.src)

    def sync(self) -> None:
        if self.device == GPU:
            cupy_module().cuda.Device().synchronize()

    def validate(self, problem: Problem) -> float:
        self.step()
        self.sync()

        def f(a: Any) -> np.ndarray:
            return to_numpy(a).astype(np.float64)

        worst = 0.0
        for i in range(len(self.W)):
            A, W, D = f(self.A[i]), f(self.W[i]), f(self.D[i])
            worst = max(worst, rel_error(self.Z[i], A @ W.T), rel_error(self.dW[i], D.T @ A))
            if i > 0:
                worst = max(worst, rel_error(self.G[i], D @ W))
        if self.copy and not bool((self.dst == 1).all()):
            worst = math.inf
        return worst


class ProviderFloorCandidate(FloorCandidate):
    """The step's GEMMs alone through the Numba backend's GEMM provider (MKL where installed):
    the fastest GEMM found here, the floor the step is measured against."""

    def __init__(self) -> None:
        from ..backends.numba import gemm, layers

        super().__init__(np, CPU)
        assert gemm.PROVIDER is not None
        self._matmul = layers.matmul
        self.provider = gemm.PROVIDER.name
        self.label = f"floor: {self.provider} GEMM"

    def gemm(self, trans_a: bool, trans_b: bool, a: Any, b: Any, out: Any) -> None:
        self._matmul(a, b, out, trans_a, trans_b)


def provider_floor() -> ProviderFloorCandidate | None:
    """The floor through the GEMM provider, or None where the Numba backend has none."""
    if importlib.util.find_spec("numba") is None:
        return None
    from ..backends.numba import gemm

    return None if gemm.PROVIDER is None else ProviderFloorCandidate()
