"""A training run on your own file (``gpubp train --data``): the task, the labels, the split and
the standardisation, as a :class:`~gpubp.datasets.Dataset`.

The task comes from the target column (:func:`infer_task`): integers, strings and booleans are
class labels (classification: softmax output, cross-entropy), floats are values (regression:
one identity output, MSE). Class labels are numbered in sorted order (:func:`encode_labels`)
and their names travel with the model. The features are standardised per column with the
training rows' mean and deviation, ``x' = (x - mean) / std``, which the model carries as its
:attr:`~gpubp.MLP.preprocessing` for raw inputs; a regression target is standardised as well,
``y' = (y - mu) / sigma``, and the last layer takes that back at the end
(:func:`unscale_output`: ``W^L <- sigma W^L``, ``b^L <- sigma b^L + mu``), so the saved model
predicts in the target's units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Dataset
from .errors import DatasetError
from .preprocessing import Preprocessing
from .tables import Table, fingerprint, read_table

__all__ = [
    "TASKS",
    "FileData",
    "encode_labels",
    "infer_task",
    "load_file_dataset",
    "take_on_file_data",
    "unscale_output",
]

TASKS: tuple[str, ...] = ("classification", "regression")


@dataclass
class FileData:
    """What a run on a file knows beyond its arrays: the task, the column names, the feature
    standardisation, a regression target's ``mu`` and ``sigma``, and the files' fingerprints
    (:func:`gpubp.tables.fingerprint`) that a checkpoint records."""

    task: str
    features: tuple[str, ...]
    target: str
    preprocessing: Preprocessing
    target_shift: float = 0.0
    target_scale: float = 1.0
    fingerprints: list[dict[str, Any]] = field(default_factory=list)


def infer_task(y: np.ndarray, task: str | None = None) -> str:
    """``task`` if given, else ``regression`` for a float target and ``classification`` for
    integers, strings and booleans."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not known; expected one of {', '.join(TASKS)}")
        return task
    return "regression" if y.dtype.kind == "f" else "classification"


def encode_labels(
    y: np.ndarray, classes: tuple[str, ...] | None = None, where: str = "the target"
) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(codes, names)``: int64 codes ``(N,)`` into the sorted label names (``classes``: the
    names to use, a model's; a label not among them is a :class:`DatasetError` naming it)."""
    names = np.array([_label_name(v) for v in y.tolist()])
    if classes is None:
        found, codes = np.unique(names, return_inverse=True)
        return codes.astype(np.int64), tuple(str(c) for c in found)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [i for i, n in enumerate(names) if n not in index]
    if unknown:
        raise DatasetError(
            f"{where}, row {unknown[0] + 1}: the label {names[unknown[0]]!r} is not one the model "
            f"knows ({', '.join(classes)})"
        )
    return np.array([index[n] for n in names], dtype=np.int64), tuple(classes)


def _label_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def load_file_dataset(
    data: str | os.PathLike[str],
    target: str | None = None,
    test_data: str | os.PathLike[str] | None = None,
    test_fraction: float | None = None,
    task: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Dataset:
    """``data`` as a :class:`~gpubp.datasets.Dataset`: the training rows standardised in place,
    the test rows (``test_data``, or a seeded ``test_fraction``, default 0.2) raw, in ``dtype``;
    ``Dataset.file`` holds the :class:`FileData`."""
    table = read_table(data, target, dtype)
    assert table.y is not None and table.target is not None  # need_target
    prints = [fingerprint(data)]
    if test_data is not None:
        test = read_table(test_data, table.target, dtype, table.features)
        prints.append(fingerprint(test_data))
        x_train, y_train, x_test, y_test = table.x, table.y, test.x, test.y
        assert y_test is not None
    else:
        fraction = 0.2 if test_fraction is None else test_fraction
        x_train, y_train, x_test, y_test = _split(table, fraction, seed)
    kind = infer_task(y_train, task)
    if kind == "classification":
        y_train, classes = encode_labels(y_train, None, f"{data}: the target {table.target!r}")
        y_test, _ = encode_labels(y_test, classes, f"{test_data or data}: the target")
        if len(classes) < 2:
            raise DatasetError(
                f"{data}: the target {table.target!r} holds one class ({classes[0]}); a "
                "classifier needs two or more (for values, pass --task regression)"
            )
        shift, scale = 0.0, 1.0
    else:
        classes = ()
        y_train, y_test, shift, scale = _regression_targets(data, table.target, y_train, y_test)
    pre = Preprocessing.standardize(
        x_train,
        description=f"gpubp train --data {Path(data).name}: each feature's training mean and "
        "deviation",
    )
    x_train -= pre.shift.astype(dtype)  # in place: the training rows are held once
    x_train *= pre.scale.astype(dtype)
    info = FileData(kind, table.features, table.target, pre, shift, scale, prints)
    ds = Dataset(Path(data).name, x_train, y_train, x_test, y_test, classes, os.fspath(data))
    ds.x_test_raw, ds.file = x_test, info
    return ds


def _split(
    table: Table, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded ``fraction`` of the rows as the test set; the rest, in file order, to train."""
    assert table.y is not None
    n = len(table.x)
    n_test = round(n * fraction)
    if not 0 < n_test < n:
        raise DatasetError(
            f"{table.source}: {n} rows and a test fraction of {fraction:g} leave "
            f"{n_test} test rows; pass a --test-fraction that leaves rows for both, or --test-data"
        )
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng([seed, 2]).permutation(n)[:n_test]] = True
    return table.x[~test], table.y[~test], table.x[test], table.y[test]


def _regression_targets(
    data: Any, name: str, y_train: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Float targets: the training ones standardised (float64 ``(N,)``), the test ones raw, and
    ``(mu, sigma)``."""
    if y_train.dtype.kind not in "biuf" or y_test.dtype.kind not in "biuf":
        raise DatasetError(
            f"{data}: the target {name!r} holds text; regression needs numbers (or pass "
            "--task classification)"
        )
    y = y_train.astype(np.float64)
    mu, sigma = float(y.mean()), float(y.std()) or 1.0
    return (y - mu) / sigma, y_test.astype(np.float64), mu, sigma


def unscale_output(weights: list[np.ndarray], biases: list[np.ndarray], info: FileData) -> None:
    """Fold a regression target's standardisation into the last layer, in place:
    ``W^L <- sigma W^L`` and ``b^L <- sigma b^L + mu``, so ``a^L`` is in the target's units."""
    weights[-1] *= info.target_scale
    biases[-1] *= info.target_scale
    biases[-1] += info.target_shift


def take_on_file_data(model: Any, info: FileData) -> None:
    """At the end of a run on a file: ``model`` (a :class:`gpubp.MLP`) records the feature and
    target names, and a regression's last layer takes on the target's units
    (:func:`unscale_output`)."""
    model.features, model.target = tuple(info.features), info.target
    if info.task == "regression":
        weights, biases = model.get_parameters()
        unscale_output(weights, biases, info)
        model.set_parameters(weights, biases)
