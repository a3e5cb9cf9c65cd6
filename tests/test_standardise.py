"""Loading and standardising IDX datasets in float32 in one pass, against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from gpubp import datasets, preprocessing

from .idx_files import write_fake_idx_dataset


def _old_pipeline(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """What loading did before: cast, scale, then standardise in place, each in float32."""
    x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_statistics_match_float64_numpy(rng, monkeypatch, dtype, chunk):
    # chunk boundaries inside the images too
    monkeypatch.setattr(preprocessing, "_PIXEL_CHUNK", chunk)
    images = rng.integers(0, 256, (101, 3, 11)).astype(dtype)
    images[0, 0, :4] = (0, 255, 255, 0)  # the extremes present
    mean, std = preprocessing.pixel_statistics(images)
    ref = images.astype(np.float64) / 255.0
    assert mean == pytest.approx(float(ref.mean()), rel=1e-14)
    assert std == pytest.approx(float(ref.std()), rel=1e-12)


def test_statistics_of_a_constant_image_are_exact():
    mean, std = preprocessing.pixel_statistics(np.full((3, 5, 5), 200, dtype=np.uint8))
    assert mean == 200 / 255 and std == 0.0


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_conversion_gives_the_float32_values_of_the_old_pipeline_bit_for_bit(rng, dtype):
    images = rng.integers(0, 256, (1, 28, 28)).astype(dtype)  # a batch of one
    more = rng.integers(0, 256, (37, 5, 3)).astype(dtype)
    for x in (images, more):
        mean, std = preprocessing.pixel_statistics(x)
        got = preprocessing.pixels_to_float32(x, mean, std)
        assert got.dtype == np.float32 and got.shape == (x.shape[0], x[0].size)
        np.testing.assert_array_equal(got, _old_pipeline(x, mean, std))
    np.testing.assert_array_equal(
        preprocessing.pixels_to_float32(more),
        more.reshape(37, -1).astype(np.float32) / np.float32(255),
    )


def test_load_dataset_standardises_with_the_training_statistics(tmp_path, rng):
    parts = write_fake_idx_dataset(tmp_path / "mnist", rng, n_train=53, n_test=7)
    ds = datasets.load_dataset("mnist", data_dir=tmp_path)
    train = parts["train-images-idx3-ubyte"]
    ref = train.astype(np.float64) / 255.0
    assert ds.normalization["mean"] == pytest.approx(float(ref.mean()), rel=1e-14)
    assert ds.normalization["std"] == pytest.approx(float(ref.std()), rel=1e-12)
    mean, std = ds.normalization["mean"], ds.normalization["std"]
    np.testing.assert_array_equal(ds.x_train, _old_pipeline(train, mean, std))
    np.testing.assert_array_equal(
        ds.x_test, _old_pipeline(parts["t10k-images-idx3-ubyte"], mean, std)
    )
    assert ds.x_train.dtype == np.float32 and ds.x_train.flags.c_contiguous
    raw = datasets.load_idx_dataset("mnist", data_dir=tmp_path)  # not standardised: x / 255
    np.testing.assert_array_equal(raw.x_train, _old_pipeline(train, 0.0, 1.0))
    assert raw.normalization == {}
