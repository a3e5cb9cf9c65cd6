"""The CUDA backend on an emulated device, for machines without a GPU (CI, development).

:mod:`.cupy` is an emulated CuPy whose device memory is host memory: arrays, streams, capture
into graphs and their replay, CuPy's own cuBLAS wrappers (which refuse to run during capture, as
CuPy's do), a C-level cuBLAS (``cublasGemmEx`` by NumPy, honouring device pointer mode) for
gpubp's ctypes binding, and NCCL over MPI. :mod:`.kernels` compiles the real ``kernels/*.cu``
with a host C++ compiler behind ``kernels/emu/cuda_emu.h`` and runs them on the CPU. The backend
uses them when ``GPUBP_CUDA_EMULATOR=1``; both are strict about what a GPU would refuse or leave
undefined, so code that passes here fails on a GPU only for reasons the emulator cannot see
(cuBLAS itself, real concurrency, the memory model, rounding, speed).
"""
