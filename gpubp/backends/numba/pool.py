"""One OpenMP thread pool for the whole step: the GEMM provider's and the Numba kernels'.

MKL is told to thread with GNU OpenMP (``MKL_Set_Threading_Layer``, in :mod:`.gemm`) and Numba's
parallel kernels run on its ``omp`` threading layer, which is the same ``libgomp``: the GEMMs and
the update passes share one team of threads, so a pass never waits for the other library's
threads to stop spinning (two pools side by side were measured 3-8x slower on 2 cores). Where
Numba's ``omp`` layer cannot load (no ``libgomp``), Numba picks another layer and the pools are
two; a layer the user chose (``NUMBA_THREADING_LAYER``) wins.

How long an idle thread spins before it sleeps decides how the step shares the machine.
Measured on 2 cores, 3 epochs of the default job, quiet / beside one busy process, with a fixed
count of 2 threads: libgomp's default spin (300,000) 2.7 s / 40 s (a team that spins waits a
whole time slice for its member on the busy core, at every GEMM); 100,000: 2.6 s / 29 s;
10,000: 3.2 s / 9.0 s; threads that sleep at once (``OMP_WAIT_POLICY=PASSIVE``): 5.0 s / 4.3 s.
Since the step's thread count is tuned from its times (:mod:`.tuner`), a busy core no longer
holds a team of two: the spin then only trades a little quiet speed against the tuner's
probes. With the tuner (2026-12-06, same machine), 3 epochs quiet / busy: 10,000: 2.4 s /
3.4-3.5 s; 100,000: 2.2 s / 3.6-3.8 s; 300,000: 2.1-2.3 s / 4.1-4.3 s; the 15-epoch job quiet:
11.1-11.5 s at 10,000, 10.6-10.9 s at 100,000. gpubp sets ``GOMP_SPINCOUNT=100000`` unless it
is set (read when ``libgomp`` starts).
"""

from __future__ import annotations

import importlib.util
import os

import numba
from numba.core import config


def _omp_available() -> bool:
    return importlib.util.find_spec("numba.np.ufunc.omppool") is not None


os.environ.setdefault("GOMP_SPINCOUNT", "100000")

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
