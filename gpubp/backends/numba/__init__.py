"""The Numba backend: GEMMs from the fastest BLAS found (:mod:`.gemm`) with fused ``@njit``
kernels between them (:mod:`.kernels`, :mod:`.optim_kernels`), on one thread setting."""

from .backend import NumbaBackend

__all__ = ["NumbaBackend"]
