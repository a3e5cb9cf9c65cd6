"""A saved model scored on a dataset's raw test split: ``gpubp evaluate`` as a Python API.

What "raw" means, per dataset (what a user has before any scaling):

==============  ==============================================  ============
dataset         raw input                                       ``RAW_SCALE``
==============  ==============================================  ============
mnist           the IDX files' pixel values, uint8 0..255         255
fashion-mnist   the IDX files' pixel values, uint8 0..255         255
digits          scikit-learn's ``load_digits().data``, 0..16      16
==============  ==============================================  ============

:mod:`gpubp.datasets` divides raw values by ``RAW_SCALE`` and then standardises with the training
set's global mean and deviation (``Dataset.normalization``); :func:`dataset_preprocessing` gives
that whole map on raw values as the :class:`~gpubp.preprocessing.Preprocessing` a model of
``gpubp train`` carries, ``x' = (x - RAW_SCALE * mean) / (RAW_SCALE * std)``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import datasets as data
from ._checks import printable
from .errors import ModelFileError, NoPreprocessingWarning
from .model import MLP
from .preprocessing import Preprocessing

__all__ = ["RAW_SCALE", "RawSplit", "dataset_preprocessing", "evaluate_model", "raw_test_split"]

#: What :mod:`gpubp.datasets` divides each dataset's raw values by before standardising them.
RAW_SCALE: dict[str, float] = {"mnist": 255.0, "fashion-mnist": 255.0, "digits": 16.0}
_RAW_UNITS: dict[str, str] = {
    "mnist": "pixel values 0..255",
    "fashion-mnist": "pixel values 0..255",
    "digits": "pixel intensities 0..16 (load_digits().data)",
}


@dataclass
class RawSplit:
    """A dataset's test split as raw inputs ``x`` ``(N, d)`` and int64 labels ``y`` ``(N,)``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    source: str


def raw_test_split(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> RawSplit:
    """The test split of ``name`` (``mnist``, ``fashion-mnist`` or ``digits``), unscaled.

    IDX datasets are looked for where :func:`gpubp.datasets.find_dataset` looks (``data_dir``
    first; fetched there with ``download`` when missing); digits is the same stratified split
    :func:`gpubp.datasets.load_dataset` makes.
    """
    if name == "digits":
        ds = data.load_digits_dataset()
        assert ds.x_test_raw is not None  # the loader keeps the intensities 0..16
        return RawSplit(name, ds.x_test_raw, ds.y_test, ds.classes, ds.source)
    if name not in data.DATASETS:
        raise ValueError(
            f"dataset={name!r} is not known; expected one of {', '.join(data.DATASET_NAMES)}"
        )
    x, y, folder = data.read_test_split(name, data_dir, download)
    return RawSplit(name, x, y, data.DATASETS[name].classes, str(folder))


def dataset_preprocessing(ds: data.Dataset) -> Preprocessing:
    """The standardisation :func:`gpubp.datasets.load_dataset` applied to ``ds``, as a map on raw
    inputs (see the module's table): ``x' = (x - r mean) / (r std)`` with ``r = RAW_SCALE``."""
    if ds.file is not None:  # your own file: each feature's own statistics
        pre: Preprocessing = ds.file.preprocessing
        return pre
    r = RAW_SCALE.get(ds.name, 1.0)
    mean, std = ds.normalization["mean"] * r, ds.normalization["std"] * r
    units = _RAW_UNITS.get(ds.name, "the values gpubp.datasets loads")
    return Preprocessing.affine(
        mean,
        std,
        ds.n_features,
        "standardize",
        f"gpubp train's standardisation of {ds.name}; raw inputs are {units}; "
        f"x' = (x - {mean:.6g}) / {std:.6g}",
    )


def evaluate_model(
    model: MLP,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    where: str = "the model",
    download: bool = False,
) -> dict[str, Any]:
    """Loss and accuracy of ``model`` on ``dataset``'s raw test split (default: the dataset the
    model was trained on), through the model's own preprocessing; ``download`` fetches a
    missing MNIST or Fashion-MNIST first.

    Raises :class:`~gpubp.errors.ModelFileError` when the model cannot take the dataset (input
    width, too few outputs); warns when it carries no preprocessing
    (:class:`~gpubp.errors.NoPreprocessingWarning`), or was trained on another dataset or with
    other label names (``UserWarning``).
    """
    name = dataset or model.dataset
    if name is None:
        raise ModelFileError(
            f"{where} does not say which dataset it was trained on; pass the dataset to score "
            f"it on (one of {', '.join(data.DATASET_NAMES)})"
        )
    if dataset is None and model.target is not None and name not in data.DATASET_NAMES:
        raise ModelFileError(
            f"{where} was trained on your own file ({printable(name):.80}), not on a built-in "
            f"dataset; score it on a file: gpubp evaluate {where} --data PATH "
            "(gpubp.predict.evaluate_file in Python)"
        )
    if name not in data.DATASET_NAMES:  # a model file's string: no path, no arbitrary text
        raise ModelFileError(
            f"{where} says it was trained on {name!r:.80}, which is no dataset gpubp knows; "
            f"pass the dataset to score it on (one of {', '.join(data.DATASET_NAMES)})"
        )
    split = raw_test_split(name, data_dir, download)
    n_features, n_classes = split.x.shape[1], len(split.classes)
    trained = f"it was trained on {model.dataset}" if model.dataset else "another dataset?"
    if model.n_inputs != n_features:
        raise ModelFileError(
            f"{where} takes {model.n_inputs} inputs but {name}'s test images have {n_features} "
            f"features ({trained}); score it on a dataset of its input width"
        )
    if model.n_outputs < n_classes:
        raise ModelFileError(
            f"{where} has {model.n_outputs} outputs but {name} has {n_classes} classes ({trained})"
        )
    if model.preprocessing is None:
        warnings.warn(
            f"{where} carries no input preprocessing: the raw test images go to the network "
            "as they are, so the accuracy may be far below the training run's",
            NoPreprocessingWarning,
            stacklevel=2,
        )
    if model.dataset is not None and model.dataset != name:
        warnings.warn(f"{where} was trained on {model.dataset}, not {name}", stacklevel=2)
    elif model.labels is not None and tuple(model.labels) != tuple(split.classes):
        warnings.warn(
            f"{where}'s label names {list(model.labels)} are not {name}'s {list(split.classes)}",
            stacklevel=2,
        )
    try:
        ev = model.evaluate(split.x, split.y)
    except ValueError as exc:  # e.g. a sigmoid/BCE model, whose targets are not class labels
        raise ModelFileError(
            f"{where} ({model.output} outputs, {model.loss} loss) cannot be scored on {name}'s "
            f"class labels: {exc}"
        ) from None
    return {
        "dataset": name,
        "test_samples": len(split.y),
        "accuracy": ev["accuracy"],
        "loss": ev["loss"],
        "trained_on": model.dataset,
        "preprocessing": None if model.preprocessing is None else model.preprocessing.meta(),
        "layer_sizes": list(model.layer_sizes),
        "backend": model.backend.name,
        "dtype": model.dtype.name,
    }
