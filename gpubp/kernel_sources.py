"""Finding the CUDA sources installed with the package (``gpubp.kernels``), by importlib.resources.

The top-level ``kernels/`` folder of the source tree is installed as the ``gpubp.kernels``
package, in the wheel as in an editable install, so the same code finds it either way.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path


def kernel_root() -> Traversable:
    """The folder holding the CUDA sources.

    When ``gpubp`` is imported straight from a source checkout, the checkout's own ``kernels/``
    folder (which an editable install of another checkout must not shadow); otherwise the
    installed ``gpubp.kernels`` package.
    """
    checkout = Path(__file__).resolve().parent.parent / "kernels"
    if (checkout / "activations.cuh").is_file() and (checkout / "__init__.py").is_file():
        return checkout
    try:
        return resources.files("gpubp.kernels")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "gpubp's CUDA sources are missing: neither the gpubp.kernels package nor a kernels/ "
            "folder beside the source tree exists. Reinstall gpubp (pip install gpubp)"
        ) from None


def kernel_files() -> list[str]:
    """Names of the installed CUDA sources (``*.cu``, ``*.cuh``), sorted."""
    root = kernel_root()
    return sorted(
        p.name for p in root.iterdir() if p.is_file() and p.name.endswith((".cu", ".cuh"))
    )


def read_kernel(name: str) -> str:
    """The text of the installed CUDA source ``name`` (for example ``"activations.cuh"``)."""
    path = kernel_root() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"CUDA source {name!r} is not installed with gpubp; "
            f"found: {', '.join(kernel_files())}. "
            "Reinstall the package (pip install --force-reinstall gpubp)"
        )
    return path.read_text(encoding="utf-8")
