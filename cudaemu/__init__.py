"""CUDA and CuPy emulated on the CPU: gpubp's GPU code checked on machines without a GPU.

Test infrastructure of the repository, not part of the installed ``gpubp`` (the wheel leaves it
out); the tests and CI import it from the repository root.

:mod:`.cupy` is an emulated CuPy whose device memory is host memory: arrays, streams, capture
into graphs and their replay, CuPy's own cuBLAS wrappers (which refuse to run during capture, as
CuPy's do), a C-level cuBLAS (``cublasGemmEx`` by NumPy, honouring device pointer mode) for
gpubp's ctypes binding, and NCCL over MPI. :mod:`.kernels` compiles the real ``kernels/*.cu``
(as ``gpubp.backends.cuda.catalogue.source`` gives them) with a host C++ compiler behind
``include/cuda_emu.h`` and runs them on the CPU; :mod:`.sanitize` builds every kernel into a C++
program under ThreadSanitizer or AddressSanitizer (``include/sanitize_driver.h``).

gpubp's ``cupy`` backend runs on it when the emulated CuPy is injected in place of ``cupy``
(``python -m`` puts the repository root, where this folder is, on the import path; for the
``gpubp`` command set ``PYTHONPATH`` to the root)::

    GPUBP_CUPY_MODULE=cudaemu.cupy python -m gpubp check --backends cupy
    GPUBP_CUPY_MODULE=cudaemu.cupy GPUBP_EMU_DEVICES=2 PYTHONPATH=$PWD \
        mpirun -n 2 gpubp train --distributed --backend cupy

or, in Python, ``CupyBackend(cupy=cudaemu.cupy)``. The tests inject it wherever there is no GPU
(``tests/conftest.py``).

The emulated CuPy and the kernel emulator are strict about what a GPU would refuse or leave
undefined, so code that passes here fails on a GPU only for reasons the emulator cannot see
(cuBLAS itself, real concurrency, the memory model, rounding, speed).
"""
