"""Numba's compiled kernels are cached in the user's cache folder, never inside the package.

Inside an installed package (site-packages) the default ``__pycache__`` outlives a reinstall and
the empty ``gpubp`` folder it leaves shadows an editable install: ``gpubp info`` then fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpubp

pytest.importorskip("numba")

CODE = (
    "import numpy as np, gpubp\n"
    "m = gpubp.MLP([5, 7, 3], backend='numba', dtype='float32', seed=0)\n"
    "m.train_step(np.ones((4, 5)), np.array([0, 1, 2, 0]), gpubp.optim.SGD(lr=0.1))\n"
)


def _index_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.nbi"))


def test_kernels_are_cached_in_the_user_cache_not_the_package(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(sys.path))
    package = Path(gpubp.__file__).parent
    before = set(_index_files(package))
    subprocess.run([sys.executable, "-c", CODE], env=env, check=True, capture_output=True)
    assert _index_files(tmp_path / "cache" / "gpubp" / "numba")  # cached there...
    assert set(_index_files(package)) == before  # ...and nothing new inside the package


def test_numba_cache_dir_still_wins(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "mine"))
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", CODE], env=env, check=True, capture_output=True)
    assert _index_files(tmp_path / "mine")
    assert not (tmp_path / "cache" / "gpubp" / "numba").exists()


def test_every_module_with_cached_kernels_names_the_cache_folder():
    """A module whose kernels are cached on disk but left out of ``KERNEL_MODULES`` would keep
    a stale compiled caller of a changed kernel: every such module is listed."""
    from gpubp.backends.numba import cache

    here = Path(cache.__file__).parent
    jit = re.compile(r"^[^`\n]*njit\([^)]*cache=True", re.MULTILINE)  # code, not docs
    cached = {p.name for p in here.glob("*.py") if jit.search(p.read_text(encoding="utf-8"))}
    assert cached, "no module with cached kernels found: the check looks in the wrong place"
    assert cached <= set(cache.KERNEL_MODULES), sorted(cached - set(cache.KERNEL_MODULES))
