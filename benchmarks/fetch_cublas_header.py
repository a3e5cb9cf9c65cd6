"""Fetch ``cublas_api.h`` of CUDA 12 and 13 from NVIDIA's cuBLAS wheels, for the prototype test.

Usage: python benchmarks/fetch_cublas_header.py DIR [--spec REQUIREMENT ...]

For each wheel (default: ``nvidia-cublas-cu12`` and ``nvidia-cublas>=13``, those CuPy's ``[ctk]``
extras install; 444-581 MB, a few seconds each on CI) ``pip download --no-deps`` fetches it into
a temporary folder, only its ``include/cublas_api.h`` is extracted under ``DIR``, the wheel is
deleted, and the headers' paths are printed joined by ``os.pathsep``, so that CI can run::

    export GPUBP_CUBLAS_HEADER="$(python benchmarks/fetch_cublas_header.py /tmp/cublas-header)"

A header already under ``DIR`` is not downloaded again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: The cuBLAS wheels of CuPy's ``[ctk]`` extras: CUDA 12 and CUDA 13 (the headers differ in place).
SPECS: tuple[str, ...] = ("nvidia-cublas-cu12", "nvidia-cublas>=13")


def _member(names: list[str]) -> str | None:
    return next((n for n in names if n.endswith("/include/cublas_api.h")), None)


def fetch(dest: Path, spec: str) -> Path:
    """The path of ``spec``'s ``cublas_api.h`` under ``dest``, downloaded if not there yet."""
    folder = dest / spec.replace(">", "").replace("=", "").replace("<", "")
    found = sorted(folder.rglob("cublas_api.h")) if folder.is_dir() else []
    if found:
        return found[0]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--only-binary=:all:", "--dest", tmp, spec]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SystemExit(f"pip download {spec} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = _member(wheel.namelist())
            if member is None:
                raise SystemExit(f"{wheels[0].name} holds no include/cublas_api.h")
            wheel.extract(member, folder)
    return folder / member


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to extract the headers into")
    parser.add_argument(
        "--spec", action="append", help=f"pip requirement to fetch (default: {', '.join(SPECS)})"
    )
    args = parser.parse_args()
    paths = [str(fetch(args.dest.resolve(), spec)) for spec in args.spec or SPECS]
    print(os.pathsep.join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
