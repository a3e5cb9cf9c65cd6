"""CUDA C++ sources of gpubp's GPU kernels, installed as ``gpubp.kernels``.

The sources are read at run time through :func:`gpubp.kernel_sources.read_kernel` (which uses
``importlib.resources``) and compiled lazily by the CuPy backend; importing gpubp never needs a
GPU or a compiler.
"""
