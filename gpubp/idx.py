"""The IDX format (MNIST's): reading one file, gzipped or not, and checking a dataset's arrays.

An IDX file is two zero bytes, a type code, the number of dimensions ``k``, ``k`` big-endian
uint32 sizes, then the data, row-major. A dataset in MNIST's layout is four such files in one
folder (:data:`IDX_NAMES`), each gzipped (``train-images-idx3-ubyte.gz``) or not
(``train-images-idx3-ubyte``). Where such folders are looked for and how they are fetched is
:mod:`gpubp.datasets`'s business.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .budget import check_memory
from .errors import DatasetError

__all__ = [
    "IDX_MAX_DIMS",
    "IDX_NAMES",
    "check_idx_arrays",
    "check_idx_headers",
    "check_idx_split",
    "idx_file",
    "idx_paths",
    "read_idx",
    "read_idx_header",
    "read_idx_in",
]

#: The four files of a dataset in MNIST's layout: train images and labels, test images and labels.
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_IDX_TYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


#: The most dimensions an IDX file may declare (datasets use 1 to 3; numpy allows 64).
IDX_MAX_DIMS = 16
_CHUNK = 1 << 20


def _read_up_to(stream: Any, n: int) -> bytes:
    """At most ``n`` bytes of ``stream``, read in chunks so that memory follows the data actually
    there, never what a header declares."""
    parts, left = [], n
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array, checking its header against its size.

    The format: two zero bytes, a type code, the number of dimensions ``k``, ``k`` big-endian
    uint32 sizes, then the data, row-major. The header is read and checked first; then exactly
    the bytes it declares are read (a gzip stream decompressed no further than the declared size
    plus one byte), so a file declaring more than it holds costs no more memory than it holds.

    Parameters
    ----------
    path : path-like
        The file; a regular file, gzipped (``1f 8b``) or not.

    Returns
    -------
    numpy.ndarray
        Shape ``(d_1, ..., d_k)`` as declared (``d_1 >= 1``), in native byte order.

    Raises
    ------
    DatasetError
        Naming the file: not a regular file, a damaged gzip stream, a bad header (magic, type,
        ``k`` outside 1..16), no samples, or a size other than the header declares.
    """
    path = Path(path)
    with files.open_regular(path, DatasetError) as raw:
        try:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream: Any = gzip.GzipFile(fileobj=raw) if gzipped else raw
            return _parse_idx(path, stream)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{path}: the gzip stream is damaged ({exc}); delete the file and fetch it again"
            ) from None


def _parse_idx(path: Path, stream: Any) -> np.ndarray:
    shape, dtype = _parse_header(path, stream)
    nbytes = dtype.itemsize
    for n in shape:  # Python ints: no overflow, however large the declared sizes
        nbytes *= n
    body = _read_up_to(stream, nbytes + 1)  # one byte more shows a file longer than declared
    if len(body) != nbytes:
        what = "truncated" if len(body) < nbytes else "longer than its header says"
        raise DatasetError(
            f"{path}: {what}: the header declares shape {shape} ({nbytes} bytes of data) but the "
            f"file holds {'more' if len(body) > nbytes else len(body)}; delete it and fetch it "
            "again"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _parse_header(path: Path, stream: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    head = _read_up_to(stream, 4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DatasetError(
            f"{path}: not an IDX file (bad magic number {head[:4].hex() or 'empty'})"
        )
    code, ndim = head[2], head[3]
    if code not in _IDX_TYPES:
        raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x}")
    if not 1 <= ndim <= IDX_MAX_DIMS:
        raise DatasetError(
            f"{path}: an IDX file with {ndim} dimensions; expected 1 to {IDX_MAX_DIMS}"
        )
    dims = _read_up_to(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(f"{path}: truncated in its header ({4 + len(dims)} bytes)")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if 0 in shape:
        raise DatasetError(
            f"{path}: its header declares shape {shape}; every size must be at least 1 (no "
            "samples, or samples of no pixels)"
        )
    return shape, np.dtype(_IDX_TYPES[code])


def read_idx_header(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """``(shape, dtype, data bytes)`` an IDX file's header declares, checked against the file's
    size (exactly, or for a gzip stream against deflate's most, about 1032:1) without reading
    its data. :class:`~gpubp.errors.DatasetError` naming the file otherwise."""
    path = Path(path)
    with files.open_regular(path, DatasetError) as raw:
        size = os.fstat(raw.fileno()).st_size
        try:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            shape, dtype = _parse_header(path, gzip.GzipFile(fileobj=raw) if gzipped else raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{path}: the gzip stream is damaged ({exc}); delete the file and fetch it again"
            ) from None
    nbytes = dtype.itemsize * math.prod(shape)
    header = 4 + 4 * len(shape)
    if (not gzipped and size != header + nbytes) or (gzipped and nbytes > 1032 * size + 1024):
        raise DatasetError(
            f"{path}: its header declares shape {shape} ({nbytes} bytes of data), which a file "
            f"of {size} bytes{' (gzipped)' if gzipped else ''} cannot hold; delete it and fetch "
            "it again"
        )
    return shape, dtype, nbytes


def check_idx_headers(folder: Path, stems: tuple[str, ...] = IDX_NAMES) -> None:
    """Check the headers of ``folder``'s IDX files ``stems`` (images and labels in pairs, as in
    :data:`IDX_NAMES`) against their sizes, against each other (``(N, rows, cols)`` images and
    ``(N,)`` labels, the same ``rows x cols`` in every split) and their data against the memory
    budget (:func:`gpubp.budget.check_memory`), before any data is read."""
    heads = {}
    for stem in stems:
        path = idx_file(folder, stem)
        if path is None:
            raise DatasetError(f"{folder}: no {stem} (gzipped or not)")
        heads[stem] = read_idx_header(path)
    sizes = set()
    for images, labels in zip(stems[::2], stems[1::2]):
        x, y = heads[images][0], heads[labels][0]
        if len(x) != 3 or len(y) != 1 or x[0] != y[0]:
            raise DatasetError(
                f"{folder}: {images} declares {x} and {labels} {y}: they do not match "
                "(expected images (N, rows, cols) and labels (N,) of the same N)"
            )
        sizes.add(x[1:])
    if len(sizes) > 1:
        raise DatasetError(
            f"{folder}: the splits' images have different sizes {sorted(sizes)}; both splits "
            "must have the same size (rows x cols)"
        )
    data = sum(h[2] for h in heads.values())
    pixels = sum(math.prod(heads[s][0]) for s in stems[::2])
    check_memory(  # the data as read, and its float32 features
        data + 4 * pixels,
        f"{folder}: its IDX files ({data} bytes of data declared)",
        error=DatasetError,
    )


def check_idx_split(
    folder: Path, x: np.ndarray, y: np.ndarray, split: str, classes: tuple[str, ...]
) -> None:
    """Raise :class:`~gpubp.errors.DatasetError` unless the images ``x`` ``(N, rows, cols)``
    have finite pixels and the labels ``y`` ``(N,)`` are whole numbers in
    ``[0, len(classes))``; ``split`` names them in the message (``train``, ``t10k``)."""
    n_classes = len(classes)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"{folder}: {split} images {x.shape} and labels {y.shape} do not match (expected "
            "images (N, rows, cols) and labels (N,))"
        )
    if x.size == 0:
        raise DatasetError(f"{folder}: {split} images {x.shape} hold no pixels")
    if x.dtype.kind == "f" and not (np.abs(x) <= np.finfo(np.float32).max).all():
        raise DatasetError(
            f"{folder}: {split} images hold NaN, infinite or out-of-range pixels (beyond "
            "float32's 3.4e38)"
        )
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.floor(y)).all()):
        raise DatasetError(
            f"{folder}: {split} labels are not all whole numbers; expected class indices "
            f"0-{n_classes - 1}"
        )
    if y.min() < 0 or y.max() >= n_classes:
        raise DatasetError(
            f"{folder}: {split} labels range from {y.min():g} to {y.max():g}; expected 0-"
            f"{n_classes - 1}"
        )


def check_idx_arrays(folder: Path, arrays: list[np.ndarray], classes: tuple[str, ...]) -> None:
    """Raise :class:`~gpubp.errors.DatasetError` unless ``arrays`` (train images, train labels,
    test images, test labels) fit together: each split as :func:`check_idx_split` wants, and
    the same ``rows x cols`` in both."""
    xtr, ytr, xte, yte = arrays
    check_idx_split(folder, xtr, ytr, "train", classes)
    check_idx_split(folder, xte, yte, "t10k", classes)
    if xtr.shape[1:] != xte.shape[1:]:
        raise DatasetError(
            f"{folder}: train images are {xtr.shape[1]}x{xtr.shape[2]} and test images "
            f"{xte.shape[1]}x{xte.shape[2]}; both splits must have the same size"
        )


def idx_file(folder: Path, stem: str) -> Path | None:
    """``folder``'s file ``stem``, gzipped (``stem.gz``, looked for first) or not; None if neither
    is a file there."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def idx_paths(folder: Path) -> dict[str, Path]:
    """The IDX files of a dataset in ``folder``, by a name for messages (``dataset's
    train-images-idx3-ubyte.gz``): the inputs no output may overwrite."""
    found = [folder / f"{stem}{gz}" for stem in IDX_NAMES for gz in (".gz", "")]
    return {f"dataset's {p.name}": p for p in found if p.is_file()}


def read_idx_in(folder: Path, stem: str) -> np.ndarray:
    """:func:`read_idx` of ``folder``'s file ``stem`` (gzipped or not), which must exist."""
    path = idx_file(folder, stem)
    if path is None:
        raise DatasetError(f"{folder}: no {stem} (gzipped or not)")
    return read_idx(path)
