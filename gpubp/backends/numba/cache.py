"""Where Numba keeps gpubp's compiled kernels: the user's cache folder, never the package.

Numba's default for ``@njit(cache=True)`` is a ``__pycache__`` folder beside the module, which
for an installed gpubp is inside site-packages. A later ``pip install -e .`` removes the package
but leaves that folder, and the empty ``gpubp`` folder left behind then shadows the editable
install (``gpubp info`` fails with an ImportError). So the cache goes to
``$XDG_CACHE_HOME/gpubp/numba`` (``~/.cache/gpubp/numba``); ``NUMBA_CACHE_DIR``, Numba's own
setting, still wins. Imported by :mod:`.kernels` before any kernel is defined (Numba reads
``config.CACHE_DIR`` when a cached function is made, so this works even when Numba was imported
first).
"""

from __future__ import annotations

import os
from pathlib import Path

from numba.core import config

from .gemm import PROVIDER


def cache_dir() -> Path:
    """The folder gpubp's Numba kernels are cached in."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # one folder per GEMM provider: a kernel names its GEMM symbol, whose arguments are the
    # same for both, but a cached kernel must never outlive a change of library unnoticed
    return Path(base) / "gpubp" / "numba" / (PROVIDER.name if PROVIDER else "matmul")


if not os.environ.get("NUMBA_CACHE_DIR"):
    config.CACHE_DIR = str(cache_dir())  # type: ignore[attr-defined]
