"""Model files and checkpoints: NumPy ``.npz`` archives with JSON metadata, written atomically,
read without pickle.

A model file (:meth:`gpubp.MLP.save`) holds ``W0.. b0..`` and ``meta`` (format, version, the
model's configuration). A checkpoint (:func:`gpubp.train.train`) adds the optimizer's slots
(``opt_<slot>_<i>``) and, in ``meta``, the run's settings, its position and its history.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CheckpointError, ModelFileError
from .files import write_atomic
from .npzfile import parse_json, read_checked_npz
from .optim import Optimizer

if TYPE_CHECKING:
    from .model import MLP

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "check_output_folders",
    "check_saved_shapes",
    "load_checkpoint",
    "parameter_arrays",
    "parse_meta",
    "read_npz",
    "save_checkpoint",
    "save_model",
    "write_json",
    "write_npz_atomic",
]

FORMAT = "gpubp-mlp"
FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "gpubp-checkpoint"


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
) -> None:
    """Write a model file: its configuration and parameters."""
    arrays = parameter_arrays(weights, biases)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_npz_atomic(path, arrays)


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
) -> None:
    """Write a checkpoint atomically (temp file, flush, fsync, rename); no pickle.

    ``train`` holds the run's settings (``optimizer`` names the optimizer's kind); ``position``
    where in the run it stands (epoch, batch, the shuffling RNG's state, the loss so far).
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
    return Checkpoint(os.fspath(path), meta, arrays)


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
