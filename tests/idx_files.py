"""Small IDX datasets made on the spot, for the data and training tests (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (uint8 or int32) in the IDX format: magic, dimensions, big-endian data."""
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(
        struct.pack(">I", n) for n in arr.shape
    )
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_fake_idx_dataset(
    folder: Path, rng: np.random.Generator, n_train: int = 30, n_test: int = 10
) -> dict[str, np.ndarray]:
    """The four gzipped MNIST-layout files of random 28x28 images and labels 0-9."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for stem, arr in parts.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    return parts
