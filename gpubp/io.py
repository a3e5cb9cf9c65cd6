"""Model files and checkpoints: NumPy ``.npz`` archives with JSON metadata, written atomically,
read without pickle.

A model file (:meth:`gpubp.MLP.save`) holds ``W0.. b0..`` and ``meta`` (format, version, the
model's configuration, and ``preprocessing``, ``dataset``, ``labels``). A model that carries
input preprocessing adds ``input_shift`` and ``input_scale`` (float64, one value per input;
:mod:`gpubp.preprocessing`). A checkpoint (:func:`gpubp.train.train`) adds the optimizer's slots
(``opt_<slot>_<i>``) and, in ``meta``, the run's settings, its position and its history.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CheckpointError, ModelFileError, NoPreprocessingWarning
from .files import write_atomic
from .npzfile import INPUT_MEMBERS, parse_json, read_checked_npz
from .optim import Optimizer
from .preprocessing import Preprocessing

if TYPE_CHECKING:
    from .model import MLP

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT",
    "FORMAT_VERSION",
    "PREPROCESSING_MEMBERS",
    "Checkpoint",
    "check_output_folders",
    "check_saved_shapes",
    "load_checkpoint",
    "parameter_arrays",
    "parse_meta",
    "preprocessing_entries",
    "read_model_info",
    "read_npz",
    "read_preprocessing",
    "save_checkpoint",
    "save_model",
    "write_json",
    "write_npz_atomic",
]

FORMAT = "gpubp-mlp"
FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "gpubp-checkpoint"
#: The arrays that hold a model's input preprocessing, ``x' = (x - input_shift) * input_scale``.
PREPROCESSING_MEMBERS = INPUT_MEMBERS  # the reader knows their shape: one per input
_ABSENT = object()  # a metadata key that is not there (None is JSON's null)


def check_output_folders(**paths: str | os.PathLike[str] | None) -> None:
    """Raise :class:`FileNotFoundError` for a path whose folder does not exist, naming the
    argument: called before a run, so it fails now rather than after the training it would have
    saved."""
    for what, path in paths.items():
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{what}={os.fspath(path)!r}: the folder {folder} does not exist; create it or "
                "choose another path"
            )


def write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON atomically (temp file, fsync, rename)."""
    write_atomic(Path(path), (json.dumps(record, indent=2) + "\n").encode())


def parameter_arrays(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> dict[str, Any]:
    """``{"W0": ..., "b0": ...}``: how parameters are named in every file."""
    arrays: dict[str, np.ndarray] = {f"W{i}": w for i, w in enumerate(weights)}
    arrays.update({f"b{i}": b for i, b in enumerate(biases)})
    return arrays


def save_model(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    preprocessing: Preprocessing | None = None,
    dataset: str | None = None,
    labels: Sequence[str] | None = None,
) -> None:
    """Write a model file: its configuration, parameters, input preprocessing (``None``: the
    model has none, recorded as such), and the dataset and label names it was trained on."""
    arrays = parameter_arrays(weights, biases)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config}
    meta.update(preprocessing_entries(arrays, preprocessing))
    meta["dataset"] = dataset
    meta["labels"] = None if labels is None else list(labels)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_npz_atomic(path, arrays)


def preprocessing_entries(
    arrays: dict[str, np.ndarray], preprocessing: Preprocessing | None
) -> dict[str, Any]:
    """Add ``input_shift``/``input_scale`` to ``arrays`` (when there is a preprocessing) and
    return the metadata entry that goes with them: ``{"preprocessing": {...} or None}``."""
    if preprocessing is None:
        return {"preprocessing": None}
    arrays["input_shift"] = np.array(preprocessing.shift, dtype=np.float64)
    arrays["input_scale"] = np.array(preprocessing.scale, dtype=np.float64)
    return {"preprocessing": preprocessing.meta()}


def read_preprocessing(
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    path: Any,
    warn_if_absent: bool = True,
) -> Preprocessing | None:
    """The input preprocessing stored in a model file or checkpoint, checked; ``None`` if it
    has none.

    ``arrays`` as :func:`read_npz` gives them, which has checked every member's dtype, shape
    (``(n_inputs,)`` for these two) and finiteness. ``meta["preprocessing"]`` says whether
    there is one: a dict (then both ``input_shift`` and ``input_scale`` must be there) or
    ``None`` (then neither may be). A file without the key was written before models carried their
    preprocessing: it loads, with a :class:`~gpubp.errors.NoPreprocessingWarning` when
    ``warn_if_absent``, unless it holds the two arrays. Anything else is a
    :class:`~gpubp.errors.ModelFileError` naming the file and what is wrong.
    """
    present = [name for name in PREPROCESSING_MEMBERS if name in arrays]
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
        missing = next(n for n in PREPROCESSING_MEMBERS if n not in arrays)
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


def write_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` atomically (see
    :func:`gpubp.files.write_atomic`: an unpredictable temporary name that follows no link,
    fsync, rename)."""
    write_atomic(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def read_npz(
    path: str | os.PathLike[str], error: type[ModelFileError] = ModelFileError
) -> dict[str, np.ndarray]:
    """All arrays of a gpubp ``.npz`` file, loaded without pickle.

    Each member's name, dtype (float32/float64; ``meta`` uint8), shape and size are checked
    against the metadata before its data is read, and the values are checked finite
    (:func:`gpubp.npzfile.read_checked_npz`).

    Parameters
    ----------
    path : path-like
        A model file or checkpoint; it must be a regular file.
    error : type, optional
        The :class:`~gpubp.errors.ModelFileError` subclass to raise (``CheckpointError`` for a
        checkpoint).

    Returns
    -------
    dict
        ``meta`` (uint8 JSON), ``W<i>`` ``(n_{i+1}, n_i)``, ``b<i>`` ``(n_{i+1},)``, and where
        present ``input_shift`` / ``input_scale`` ``(n_0,)`` and ``opt_<slot>_<j>``.

    Raises
    ------
    ModelFileError
        (``error``) naming ``path``, for anything missing, malformed, oversized, non-finite or
        not a regular file.
    """
    return read_checked_npz(path, error)


def parse_meta(
    arrays: dict[str, np.ndarray],
    path: Any,
    expected: str,
    error: type[ModelFileError] = ModelFileError,
) -> dict[str, Any]:
    """The JSON metadata stored in ``arrays["meta"]``, checked for format and version."""
    raw = arrays.get("meta")
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise error(f"{path}: no gpubp metadata; was it written by MLP.save?")
    meta = parse_json(raw.tobytes(), path, error)
    if not isinstance(meta, dict) or meta.get("format") != expected:
        raise error(f"{path}: not a {expected} file")
    if meta.get("version") != FORMAT_VERSION:
        raise error(
            f"{path}: format version {meta.get('version')!r}; this gpubp reads version "
            f"{FORMAT_VERSION}"
        )
    if not isinstance(meta.get("config"), dict):
        raise error(f"{path}: the metadata has no configuration")
    return meta


def check_saved_shapes(
    arrays: dict[str, np.ndarray],
    cfg: dict[str, Any],
    path: Any,
    error: type[ModelFileError] = ModelFileError,
) -> None:
    """Compare the stored arrays with ``layer_sizes`` before any model is built, so a file whose
    metadata claims enormous layers cannot make ``load`` allocate them."""
    sizes = cfg.get("layer_sizes")
    if not isinstance(sizes, list) or len(sizes) < 2:
        raise error(f"{path}: the saved configuration has no valid layer_sizes")
    for i in range(len(sizes) - 1):
        W, b = arrays.get(f"W{i}"), arrays.get(f"b{i}")
        if W is None or b is None:
            raise error(f"{path}: missing the parameter arrays of layer {i} (W{i}, b{i})")
        if W.shape != (sizes[i + 1], sizes[i]) or b.shape != (sizes[i + 1],):
            raise error(
                f"{path}: layer {i} holds W{i} of shape {W.shape} and b{i} of shape {b.shape}; "
                f"layer_sizes "
                f"{sizes} says ({sizes[i + 1]}, {sizes[i]}) and ({sizes[i + 1]},)"
            )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MLP,
    optimizer: Optimizer,
    train: dict[str, Any],
    position: dict[str, Any],
    history: dict[str, list[Any]],
    counters: dict[str, float],
    preprocessing: Preprocessing | None = None,
) -> None:
    """Write a checkpoint atomically (temp file, flush, fsync, rename); no pickle.

    ``train`` holds the run's settings (``optimizer`` names the optimizer's kind); ``position``
    where in the run it stands (epoch, batch, the shuffling RNG's state, the loss so far);
    ``preprocessing`` the input preprocessing the run's model carries (as in a model file).
    """
    arrays = parameter_arrays(*model.get_parameters())
    state = optimizer.state_dict()
    for slot in optimizer.slots:
        for i, a in enumerate(state.get(slot, [])):
            arrays[f"opt_{slot}_{i}"] = a
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "config": model.config(),
        "train": train,
        "optimizer": {"kind": train["optimizer"], "step": state["step"]},
        "position": position,
        "history": history,
        "counters": counters,
    }
    meta.update(preprocessing_entries(arrays, preprocessing))
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_npz_atomic(path, arrays)


@dataclass
class Checkpoint:
    """A checkpoint read back: its metadata and arrays, checked for internal consistency."""

    path: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def train_config(self) -> dict[str, Any]:
        return dict(self.meta["train"])

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The input preprocessing the run's model carries (``None``: none, or a checkpoint
        written before checkpoints recorded it)."""
        return read_preprocessing(self.arrays, self.meta, self.path, False)

    def restore(self, model: MLP, optimizer: Optimizer) -> None:
        """Load parameters and optimizer state (everything checked before anything changes)."""
        L = model.n_layers
        weights = [self.arrays[f"W{i}"] for i in range(L)]
        biases = [self.arrays[f"b{i}"] for i in range(L)]
        opt = self.meta["optimizer"]
        shapes = model.parameter_shapes
        saved: dict[str, Any] = {"step": opt["step"]}
        for slot in optimizer.slots:
            saved[slot] = [self.arrays.get(f"opt_{slot}_{i}") for i in range(len(shapes))]
        try:
            probe = type(optimizer)()  # validate the optimizer state on a throwaway first
            probe.load_state_dict(saved, model, model.backend, shapes, model.dtype)
            model.set_parameters(weights, biases)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        optimizer.load_state_dict(saved, model, model.backend, shapes, model.dtype)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint written by :func:`gpubp.train.train`; never unpickles.

    Raises :class:`~gpubp.errors.CheckpointError` (a :class:`~gpubp.errors.ModelFileError`)
    naming ``path`` for a missing, malformed or inconsistent file: a member or metadata field of
    the wrong type or out of range, non-float or non-finite parameters or optimizer state.
    """
    arrays = read_npz(path, CheckpointError)
    meta = parse_meta(arrays, path, CHECKPOINT_FORMAT, CheckpointError)
    for key in ("train", "optimizer", "position", "history", "counters"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{path}: the checkpoint has no valid {key!r} section")
    check_checkpoint_meta(meta, path)
    check_saved_shapes(arrays, meta["config"], path, CheckpointError)
    ckpt = Checkpoint(os.fspath(path), meta, arrays)
    _ = ckpt.preprocessing  # checked now: a bad block fails the load, not the end of the run
    return ckpt


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_checkpoint_meta(meta: dict[str, Any], path: Any) -> None:
    """Raise :class:`~gpubp.errors.CheckpointError` for a field of the checkpoint's metadata
    of the wrong type or out of range (what a resume reads from it, checked before it starts)."""
    from .config import TrainConfig, resume_settings  # config imports this module

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the checkpoint is damaged or not gpubp's")

    pos, opt = meta["position"], meta["optimizer"]
    for key in ("epoch", "batch", "seen"):
        if not _count(pos.get(key)):
            raise bad(f"position.{key} must be an int >= 0, got {pos.get(key)!r:.80}")
    if not _finite(pos.get("loss_sum")):
        raise bad(f"position.loss_sum must be a finite number, got {pos.get('loss_sum')!r:.80}")
    if not isinstance(pos.get("rng_state"), dict):
        raise bad("the checkpoint has no shuffling RNG state")
    if not _count(opt.get("step")):
        raise bad(f"optimizer.step must be an int >= 0, got {opt.get('step')!r:.80}")
    if opt.get("kind") != meta["train"].get("optimizer"):
        raise bad(f"optimizer.kind {opt.get('kind')!r:.80} is not the run's optimizer")
    for key, value in meta["counters"].items():
        if not _finite(value) or value < 0:
            raise bad(f"counters.{key} must be a finite number >= 0, got {value!r:.80}")
    for key, value in meta["history"].items():
        if not isinstance(value, list):
            raise bad(f"history.{key} must be a list")
    settings = resume_settings(Checkpoint(os.fspath(path), meta, {}))
    settings.pop("track_gradients", None)
    try:
        TrainConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise bad(f"its training settings are invalid ({str(exc)[:200]})") from None
