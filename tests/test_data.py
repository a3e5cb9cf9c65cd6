"""The IDX reader, dataset lookup, verification and splitting (data made in the tests)."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from gpubp import datasets
from gpubp.errors import DatasetError, DatasetNotFoundError
from gpubp.idx import read_idx

from .idx_files import idx_bytes, write_fake_idx_dataset


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, rng, compress):
    arr = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    raw = idx_bytes(arr)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_read_idx_big_endian_ints(tmp_path, rng):
    arr = rng.integers(-1000, 1000, (7,), dtype=np.int32)
    path = tmp_path / "y.idx"
    path.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(path), arr)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "longer than its header"),
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX element type"),
        (lambda b: b[:6], "truncated in its header"),
        (lambda b: b"", "bad magic"),
    ],
    ids=["truncated", "trailing", "magic", "type", "header", "empty"],
)
def test_read_idx_rejects_corrupt_files(tmp_path, rng, mangle, message):
    raw = idx_bytes(rng.integers(0, 256, (4, 2, 2), dtype=np.uint8))
    path = tmp_path / "bad.idx"
    path.write_bytes(mangle(raw))
    with pytest.raises(DatasetError, match=message):
        read_idx(path)


def test_read_idx_rejects_a_damaged_gzip(tmp_path, rng):
    packed = gzip.compress(idx_bytes(rng.integers(0, 256, (50, 8), dtype=np.uint8)))
    path = tmp_path / "bad.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DatasetError, match="gzip stream is damaged"):
        read_idx(path)


def test_load_from_data_dir_normalises(tmp_path, rng):
    parts = write_fake_idx_dataset(tmp_path / "mnist", rng)
    ds = datasets.load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (30, 784) and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.y_test, parts["t10k-labels-idx1-ubyte"])
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-4


def test_env_variable_is_searched(tmp_path, rng, monkeypatch):
    write_fake_idx_dataset(tmp_path / "mnist", rng)
    monkeypatch.setenv("GPUBP_DATA", str(tmp_path))
    assert datasets.find_dataset("mnist") == tmp_path / "mnist"


def test_missing_dataset_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPUBP_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.load_dataset("mnist", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and "--download" in msg


def test_mismatched_images_and_labels(tmp_path, rng):
    folder = tmp_path / "mnist"
    write_fake_idx_dataset(folder, rng)
    labels = rng.integers(0, 10, 29).astype(np.uint8)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DatasetError, match="do not match"):
        datasets.load_dataset("mnist", data_dir=tmp_path)


def test_verify_accepts_pinned_and_rejects_other_bytes(monkeypatch):
    payload = b"not really mnist"
    pinned = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(datasets.DATASETS["mnist"].sha256, "train-labels-idx1-ubyte.gz", pinned)
    datasets.verify("mnist", "train-labels-idx1-ubyte.gz", payload)
    with pytest.raises(DatasetError, match="sha256"):
        datasets.verify("mnist", "train-labels-idx1-ubyte.gz", payload + b"!")
    with pytest.raises(DatasetError, match="no checksum"):
        datasets.verify("mnist", "unknown.gz", payload)


def test_debian_fashion_mnist_matches_pinned_content_digests():
    folder = datasets.find_dataset("fashion-mnist")
    if folder is None or str(folder) != "/usr/share/datasets/fashion-mnist":
        pytest.skip("Debian's dataset-fashion-mnist is not installed here")
    for stem, expected in datasets.DATASETS["fashion-mnist"].content_sha256.items():
        raw = gzip.decompress((folder / f"{stem}.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == expected


def test_split_covers_everything(rng):
    x = np.arange(103, dtype=np.float32)[:, None]
    y = np.arange(103)
    _xt, yt, xv, yv = datasets.train_val_split(x, y, 0.2, seed=3)
    assert len(xv) == 21 and sorted(np.concatenate([yt, yv]).tolist()) == list(range(103))
    with pytest.raises(ValueError, match="val_fraction"):
        datasets.train_val_split(x, y, 1.0)
