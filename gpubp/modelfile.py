"""Model files: what :meth:`gpubp.MLP.save` writes and :meth:`gpubp.MLP.load` reads, on plain
arrays and dicts (the model itself is built by ``MLP.load``).

A model file is a :data:`~gpubp.npzfile.FORMAT` ``.npz`` (:mod:`gpubp.npzfile`) holding
``W0.. b0..`` and ``meta``: format, version, the model's configuration, and ``preprocessing``,
``dataset``, ``labels``. A model that carries input preprocessing adds ``input_shift`` and
``input_scale`` (float64, one value per input; :mod:`gpubp.preprocessing`). A checkpoint
(:mod:`gpubp.checkpoint`) stores its parameters and preprocessing the same way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ModelFileError, NoPreprocessingWarning
from .npzfile import (
    FORMAT,
    FORMAT_VERSION,
    INPUT_MEMBERS,
    parse_meta,
    read_npz,
    saved_parameters,
    write_npz,
)
from .preprocessing import Preprocessing

__all__ = ["model_arrays", "read_model", "read_model_info", "read_preprocessing", "save_model"]

_ABSENT = object()  # a metadata key that is not there (None is JSON's null)


def model_arrays(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    preprocessing: Preprocessing | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The members ``W<i>``, ``b<i>`` (and ``input_shift``, ``input_scale`` when there is a
    preprocessing), and the metadata entry that goes with them,
    ``{"preprocessing": {...} or None}``: how every file stores a model."""
    arrays: dict[str, np.ndarray] = {f"W{i}": w for i, w in enumerate(weights)}
    arrays.update({f"b{i}": b for i, b in enumerate(biases)})
    if preprocessing is None:
        return arrays, {"preprocessing": None}
    arrays["input_shift"] = np.array(preprocessing.shift, dtype=np.float64)
    arrays["input_scale"] = np.array(preprocessing.scale, dtype=np.float64)
    return arrays, {"preprocessing": preprocessing.meta()}


def save_model(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    preprocessing: Preprocessing | None = None,
    dataset: str | None = None,
    labels: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    target: str | None = None,
) -> None:
    """Write a model file atomically: its configuration, parameters, input preprocessing
    (``None``: the model has none, recorded as such), and the dataset and label names it was
    trained on."""
    arrays, entry = model_arrays(weights, biases, preprocessing)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config, **entry}
    meta["dataset"] = dataset
    meta["labels"] = None if labels is None else list(labels)
    if features is not None or target is not None:  # a model trained on a file's columns
        meta["features"] = None if features is None else list(features)
        meta["target"] = target
    write_npz(path, meta, arrays)


def read_model(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """``(meta, weights, biases, arrays)`` of a model file, every member checked as it was read
    (:func:`gpubp.npzfile.read_npz`), the format and version checked, every layer's parameters
    present: all before a model is built, so a file whose metadata claims enormous layers
    cannot make ``MLP.load`` allocate them."""
    arrays = read_npz(path)
    meta = parse_meta(arrays, path, FORMAT)
    weights, biases = saved_parameters(arrays, meta, path)
    return meta, weights, biases, arrays


def read_preprocessing(
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    path: Any,
    warn_if_absent: bool = True,
) -> Preprocessing | None:
    """The input preprocessing stored in a model file or checkpoint, checked; ``None`` if it
    has none.

    ``arrays`` as :func:`~gpubp.npzfile.read_npz` gives them, which has checked every member's
    dtype, shape (``(n_inputs,)`` for these two) and finiteness. ``meta["preprocessing"]`` says
    whether there is one: a dict (then both ``input_shift`` and ``input_scale`` must be there)
    or ``None`` (then neither may be). A file without the key was written before models carried
    their preprocessing: it loads, with a :class:`~gpubp.errors.NoPreprocessingWarning` (for
    the caller of the caller of this function) when ``warn_if_absent``, unless it holds the two
    arrays. Anything else is a :class:`~gpubp.errors.ModelFileError` naming the file and what
    is wrong.
    """
    present = [name for name in INPUT_MEMBERS if name in arrays]
    declared = meta.get("preprocessing", _ABSENT)
    if declared is not None and declared is not _ABSENT and not isinstance(declared, dict):
        raise ModelFileError(
            f"{path}: the metadata's 'preprocessing' entry is {type(declared).__name__}; "
            "expected an object or null"
        )
    if not present:
        if isinstance(declared, dict):
            raise ModelFileError(
                f"{path}: the metadata declares an input preprocessing but the file holds "
                "neither input_shift nor input_scale; the file is incomplete, save the model "
                "again"
            )
        if declared is _ABSENT and warn_if_absent:
            warnings.warn(
                f"{path} carries no input preprocessing (it was written before gpubp saved it "
                "with the model): inputs go to the network as given, so standardise them as "
                "they were in training, or save the model again with this version",
                NoPreprocessingWarning,
                stacklevel=3,
            )
        return None
    if len(present) == 1:
        missing = next(n for n in INPUT_MEMBERS if n not in arrays)
        raise ModelFileError(
            f"{path}: holds {present[0]} but not {missing}; an input preprocessing needs both "
            "(the file is damaged or was assembled by hand)"
        )
    if declared is None:
        raise ModelFileError(
            f"{path}: holds input_shift and input_scale but its metadata says the model has "
            "no preprocessing; the file is inconsistent"
        )
    info = declared if isinstance(declared, dict) else {}
    kind, description = info.get("kind", "custom"), info.get("description", "")
    if not isinstance(kind, str) or not isinstance(description, str):
        raise ModelFileError(f"{path}: the preprocessing's kind and description must be text")
    return Preprocessing(arrays["input_shift"], arrays["input_scale"], kind, description)


def read_model_info(
    meta: dict[str, Any], n_outputs: int, path: Any
) -> tuple[str | None, tuple[str, ...] | None]:
    """``(dataset, labels)`` recorded in a model file's metadata (``None`` where absent),
    checked: a name, and one label name per output."""
    dataset, labels = meta.get("dataset"), meta.get("labels")
    if dataset is not None and not isinstance(dataset, str):
        raise ModelFileError(f"{path}: the metadata's 'dataset' must be a name or null")
    if labels is None:
        return dataset, None
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise ModelFileError(f"{path}: the metadata's 'labels' must be a list of names or null")
    if len(labels) != n_outputs:
        raise ModelFileError(
            f"{path}: the metadata names {len(labels)} labels for a model with {n_outputs} outputs"
        )
    return dataset, tuple(labels)


def read_column_names(
    meta: dict[str, Any], n_inputs: int, path: Any
) -> tuple[tuple[str, ...] | None, str | None]:
    """``(features, target)``: the column names a model trained on a file records (``None``
    where absent), checked: one feature name per input, a target name."""
    features, target = meta.get("features"), meta.get("target")
    if target is not None and not isinstance(target, str):
        raise ModelFileError(f"{path}: the metadata's 'target' must be a name or null")
    if features is None:
        return None, target
    if not isinstance(features, list) or not all(isinstance(v, str) for v in features):
        raise ModelFileError(f"{path}: the metadata's 'features' must be a list of names or null")
    if len(features) != n_inputs:
        raise ModelFileError(
            f"{path}: the metadata names {len(features)} features for a model with {n_inputs} "
            "inputs"
        )
    return tuple(features), target


def load_model(cls: Any, path: str | os.PathLike[str], backend: Any) -> Any:
    """``cls`` (:class:`gpubp.MLP`) built from the model file ``path`` on ``backend``: its
    configuration, parameters, preprocessing, dataset, label, feature and target names (see
    :meth:`gpubp.MLP.load`)."""
    meta, weights, biases, arrays = read_model(path)
    try:
        model = cls(backend=backend, **meta["config"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: the saved configuration is invalid: {exc}") from None
    pre = read_preprocessing(arrays, meta, path)
    model.dataset, model.labels = read_model_info(meta, model.n_outputs, path)
    model.features, model.target = read_column_names(meta, model.n_inputs, path)
    try:
        model.set_parameters(weights, biases)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    model.preprocessing = pre
    return model
