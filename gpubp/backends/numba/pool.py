"""One OpenMP thread pool for the whole step: the GEMM provider's and the Numba kernels'.

MKL is told to thread with GNU OpenMP (``MKL_Set_Threading_Layer``, in :mod:`.gemm`) and Numba's
parallel kernels run on its ``omp`` threading layer, which is the same ``libgomp``: the GEMMs and
the update passes share one team of threads, so a pass never waits for the other library's
threads to stop spinning (two pools side by side were measured 3-8x slower on 2 cores). Where
Numba's ``omp`` layer cannot load (no ``libgomp``), Numba picks another layer and the pools are
two; a layer the user chose (``NUMBA_THREADING_LAYER``) wins.

How long an idle thread spins before it sleeps decides how the step shares the machine.
Measured on 2 cores, 3 epochs of the default job, quiet / beside one busy process: libgomp's
default spin (300,000) 2.7 s / 40 s (a team that spins waits a whole time slice for its member
on the busy core, at every GEMM); 100,000: 2.6 s / 29 s; 10,000: 3.2 s / 9.0 s; threads that
sleep at once (``OMP_WAIT_POLICY=PASSIVE``): 5.0 s / 4.3 s; one thread: 3.9 s quiet. gpubp sets
``GOMP_SPINCOUNT=10000`` unless it is set (read when ``libgomp`` starts; a user who owns the
machine can raise it, one who shares it can pass ``threads=1``).
"""

from __future__ import annotations

import importlib.util
import os

import numba
from numba.core import config


def _omp_available() -> bool:
    return importlib.util.find_spec("numba.np.ufunc.omppool") is not None


os.environ.setdefault("GOMP_SPINCOUNT", "10000")

#: Whether the Numba kernels run on GNU OpenMP (the pool MKL is told to use).
OMP: bool = not os.environ.get("NUMBA_THREADING_LAYER") and _omp_available()
if OMP:
    config.THREADING_LAYER = "omp"  # type: ignore[attr-defined]  # read when the first parallel kernel starts the threads


def set_threads(n: int) -> None:
    """Threads of the parallel kernels called from this thread (at most Numba's pool size)."""
    most = int(config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(int(n), most)))


def get_threads() -> int:
    """Threads of the parallel kernels called from this thread."""
    return int(numba.get_num_threads())
