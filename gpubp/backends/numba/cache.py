"""Where Numba keeps gpubp's compiled kernels: the user's cache folder, never the package.

Numba's default for ``@njit(cache=True)`` is a ``__pycache__`` folder beside the module, which
for an installed gpubp is inside site-packages. A later ``pip install -e .`` removes the package
but leaves that folder, and the empty ``gpubp`` folder left behind then shadows the editable
install (``gpubp info`` fails with an ImportError). So the cache goes to
``$XDG_CACHE_HOME/gpubp/numba/<provider>-<hash of the kernel modules>`` (under
``~/.cache/gpubp/numba``); ``NUMBA_CACHE_DIR``, Numba's own setting, still wins. Imported by
:mod:`.kernels` before any kernel is defined (Numba reads ``config.CACHE_DIR`` when a cached
function is made, so this works even when Numba was imported first).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from numba.core import config

from ...files import user_cache_dir
from .gemm import PROVIDER

#: The modules whose compiled functions are cached. Numba checks only the source file of the
#: function it loads, not of the kernels inlined into it from other modules, so the folder is
#: named by a hash of all of them (and by the GEMM provider the kernels call): a change to any
#: starts a fresh cache.
KERNEL_MODULES = (
    "exp.py",
    "kernels.py",
    "layers.py",
    "optim_kernels.py",
    "checked.py",
    "many.py",
    "multistep.py",
    "gemm.py",
    "pool.py",
)


def _sources_hash() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in KERNEL_MODULES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    """The folder gpubp's Numba kernels are cached in."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    provider = PROVIDER.name if PROVIDER else "matmul"
    return user_cache_dir() / "numba" / f"{provider}-{_sources_hash()}"


if not os.environ.get("NUMBA_CACHE_DIR"):
    config.CACHE_DIR = str(cache_dir())  # type: ignore[attr-defined]
