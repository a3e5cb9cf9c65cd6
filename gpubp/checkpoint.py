"""Checkpoints, and what a resume may take from them.

A checkpoint (:func:`gpubp.train.train`) is a :data:`~gpubp.npzfile.CHECKPOINT_FORMAT` ``.npz``
(:mod:`gpubp.npzfile`): the model's parameters and preprocessing stored as in a model file
(:mod:`gpubp.modelfile`), the optimizer's slots (``opt_<slot>_<i>``) and, in ``meta``, the run's
settings, its position and its history. It records the :class:`~gpubp.config.TrainConfig` it was
written with: :func:`resume_settings` reads it back (what ``--resume`` takes for the options not
given) and :func:`check_resume` refuses a resume whose settings differ, except those a resume
may override (:data:`OVERRIDABLE`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import BACKEND_NAMES
from .config import DEFAULT_LR, TrainConfig
from .errors import CheckpointError, CheckpointMismatchError
from .model import MLP
from .modelfile import model_arrays, read_preprocessing
from .npzfile import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    parse_meta,
    read_npz,
    saved_parameters,
    write_npz,
)
from .optim import Optimizer
from .preprocessing import Preprocessing

__all__ = [
    "OVERRIDABLE",
    "RESUME_KEYS",
    "Checkpoint",
    "check_overrides",
    "check_position",
    "check_resume",
    "load_checkpoint",
    "resume_notes",
    "resume_settings",
    "save_checkpoint",
]

#: Settings a checkpoint must share with the run that resumes it (epochs may grow).
RESUME_KEYS: tuple[str, ...] = (
    "track_gradients",
    "dataset",
    "layers",
    "activation",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "batch_size",
    "val_fraction",
    "dtype",
    "seed",
)
#: Settings a resume may change from its checkpoint's when asked (``--override lr``): a run
#: that diverged can continue with a smaller learning rate.
OVERRIDABLE: tuple[str, ...] = ("lr",)


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
    weights, biases = model.get_parameters()
    arrays, entry = model_arrays(weights, biases, preprocessing)
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
        **entry,
    }
    write_npz(path, meta, arrays)


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
        weights, biases = saved_parameters(self.arrays, self.meta, self.path, CheckpointError)
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
    _check_meta(meta, path)
    saved_parameters(arrays, meta, path, CheckpointError)
    for name, arr in arrays.items():  # the second moments of Adam are sums of squares
        if name.startswith("opt_exp_avg_sq_") and not (arr >= 0).all():
            raise CheckpointError(
                f"{path}: {name} holds negative values; Adam's exp_avg_sq is a mean of squares "
                "(>= 0): the checkpoint is damaged"
            )
    ckpt = Checkpoint(os.fspath(path), meta, arrays)
    _ = ckpt.preprocessing  # checked now: a bad block fails the load, not the end of the run
    return ckpt


#: The largest count a checkpoint may hold (epochs, batches, samples, optimizer steps): exact
#: in float64, so Adam's ``beta ** step`` and every position sum stay finite and exact.
MAX_COUNT = 2**53
#: The run's history: one number per finished epoch (``val_*`` none without validation), and
#: with --track-gradients one list of per-layer norms per epoch.
_EPOCH_ENTRIES = ("epoch", "loss", "lr", "seconds")
#: one per finished epoch, or none (validation; accuracy, which a regression has not)
_VAL_ENTRIES = ("accuracy", "val_loss", "val_accuracy")
_NORM_ENTRIES = ("delta_norm", "dW_norm")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _uint(value: Any, bits: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**bits


def _pcg64_state(state: Any) -> bool:
    """Whether ``state`` is a PCG64 state NumPy takes: 128-bit ``state`` and ``inc``, a
    ``has_uint32`` flag and a 32-bit ``uinteger``."""
    inner = state.get("state") if isinstance(state, dict) else None
    return (
        isinstance(inner, dict)
        and state.get("bit_generator") == "PCG64"
        and all(_uint(inner.get(key), 128) for key in ("state", "inc"))
        and _uint(state.get("has_uint32"), 1)
        and _uint(state.get("uinteger"), 32)
    )


def _check_history(meta: dict[str, Any], bad: Any) -> None:
    """Each history entry a list of finite numbers (lists of one per layer for the norms), one
    per finished epoch (``val_*``: or none): what a resumed run appends to and plots."""
    epochs, n_layers = meta["position"]["epoch"], len(meta["config"]["layer_sizes"]) - 1
    history = meta["history"]
    for key, value in history.items():
        if key not in (*_EPOCH_ENTRIES, *_VAL_ENTRIES, *_NORM_ENTRIES):
            raise bad(f"history holds an unknown entry {key!r:.40}")
        if key in _NORM_ENTRIES:
            ok = isinstance(value, list) and all(
                isinstance(row, list) and len(row) == n_layers and all(map(_finite, row))
                for row in value
            )
        else:
            ok = isinstance(value, list) and all(map(_finite, value))
        if not ok:
            raise bad(f"history.{key} must be a list of finite numbers")
    for key in (*_EPOCH_ENTRIES, *_VAL_ENTRIES, *_NORM_ENTRIES):
        n = len(history.get(key, []))
        if n != epochs and not (n == 0 and key not in _EPOCH_ENTRIES):
            raise bad(f"history.{key} holds {n} entries for {epochs} finished epoch(s)")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_meta(meta: dict[str, Any], path: Any) -> None:
    """Raise :class:`~gpubp.errors.CheckpointError` for a field of the checkpoint's metadata
    of the wrong type or out of range (what a resume reads from it, checked before it starts)."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the checkpoint is damaged or not gpubp's")

    pos, opt = meta["position"], meta["optimizer"]
    for key in ("epoch", "batch", "seen"):
        if not _count(pos.get(key)):
            raise bad(f"position.{key} must be an int in [0, 2**53], got {pos.get(key)!r:.80}")
    if not _finite(pos.get("loss_sum")):
        raise bad(f"position.loss_sum must be a finite number, got {pos.get('loss_sum')!r:.80}")
    if not _pcg64_state(pos.get("rng_state")):
        raise bad("position.rng_state is not a PCG64 state (128-bit state and inc)")
    if not _count(opt.get("step")):
        raise bad(f"optimizer.step must be an int in [0, 2**53], got {opt.get('step')!r:.80}")
    if opt.get("kind") != meta["train"].get("optimizer"):
        raise bad(f"optimizer.kind {opt.get('kind')!r:.80} is not the run's optimizer")
    for key, value in meta["counters"].items():
        if not _finite(value) or value < 0:
            raise bad(f"counters.{key} must be a finite number >= 0, got {value!r:.80}")
    _check_history(meta, bad)
    train = meta["train"]
    if train.get("backend", "auto") not in ("auto", *BACKEND_NAMES):
        raise bad(f"train.backend {train.get('backend')!r:.80} is not a backend's name")
    if not _count(train.get("mpi_ranks", 1)):
        raise bad(f"train.mpi_ranks must be a count, got {train.get('mpi_ranks')!r:.80}")
    settings = _settings(meta["train"])
    settings.pop("track_gradients", None)
    try:
        config = TrainConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise bad(f"its training settings are invalid ({str(exc)[:200]})") from None
    if list(config.layers) != list(meta["config"]["layer_sizes"][1:-1]):
        raise bad(f"train.layers {list(config.layers)!r:.80} are not its model's hidden widths")
    if not _count(config.batch_size or 0):
        raise bad(f"train.batch_size must be at most 2**53, got {config.batch_size!r:.80}")


# --- resuming --------------------------------------------------------------------------------


def _settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The settings a resume takes from a checkpoint: never ``download`` (a file must not open
    network connections that were not asked for)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {"track_gradients"}
    out = {k: v for k, v in saved.items() if k in fields and k != "download"}
    if "layers" in out:
        out["layers"] = tuple(out["layers"])
    return out


def resume_settings(ckpt: Checkpoint) -> dict[str, Any]:
    """The :class:`~gpubp.config.TrainConfig` fields and ``track_gradients`` a checkpoint was
    written with: what ``gpubp train --resume`` takes for every option not given."""
    return _settings(ckpt.train_config)


def _effective(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the defaults ``lr=None`` and ``weight_decay=None`` spelled out, so that
    typing a default explicitly does not count as a different run."""
    out = dict(settings)
    opt = out.get("optimizer")
    if out.get("lr") is None and opt in DEFAULT_LR:
        out["lr"] = DEFAULT_LR[opt]
    if out.get("weight_decay") is None:
        out["weight_decay"] = 0.01 if opt == "adamw" else 0.0
    out.setdefault("track_gradients", False)
    return out


def check_resume(
    ckpt: Checkpoint,
    config: TrainConfig,
    dataset: str,
    model: MLP,
    track_gradients: bool,
    override: Collection[str] = (),
) -> None:
    """Raise :class:`CheckpointMismatchError` naming every setting that differs, except those
    named in ``override`` (from :data:`OVERRIDABLE`)."""
    want = _effective(config.as_dict())
    want["dataset"] = dataset
    want["track_gradients"] = bool(track_gradients)
    have = _effective(ckpt.train_config)
    diffs = [
        f"{key}: checkpoint {have.get(key)!r}, this run {want[key]!r}"
        for key in RESUME_KEYS
        if have.get(key) != want[key] and key not in override
    ]
    saved_model = ckpt.meta["config"]
    if list(saved_model.get("layer_sizes", [])) != list(model.layer_sizes):
        diffs.append(
            f"layer_sizes: checkpoint {saved_model.get('layer_sizes')}, this run "
            f"{list(model.layer_sizes)}"
        )
    done = int(ckpt.meta["position"]["epoch"])
    if config.epochs < done:
        diffs.append(
            f"epochs: the checkpoint has finished {done} epoch(s), this run asks for only "
            f"{config.epochs} (--epochs may grow, not shrink)"
        )
    lr_differs = have.get("lr") != want["lr"]
    if diffs:
        raise CheckpointMismatchError(
            f"{ckpt.path} does not match the requested run ("
            + "; ".join(diffs)
            + "). Resume with the options the checkpoint was written with, or start "
            "afresh without --resume"
            + ("; to change the learning rate, add --override lr" if lr_differs else "")
        )


def check_overrides(override: Sequence[str], resume: str | os.PathLike[str] | None) -> None:
    """Raise :class:`ValueError` for an ``override`` not in :data:`OVERRIDABLE`, or given
    without ``resume`` (there is nothing to override then)."""
    if isinstance(override, str):
        raise ValueError(f"override must be a list of names such as ['lr'], got {override!r}")
    unknown = [name for name in override if name not in OVERRIDABLE]
    if unknown:
        raise ValueError(
            f"override={list(override)!r}: {', '.join(map(repr, unknown))} cannot be "
            f"overridden; expected names from {', '.join(OVERRIDABLE)}"
        )
    if override and resume is None:
        raise ValueError(
            f"override={list(override)!r} only applies when resuming: pass resume "
            "(--resume) or leave it out"
        )


def check_position(ckpt: Checkpoint, pos: dict[str, Any], n: int, batch_size: int) -> None:
    """Raise :class:`~gpubp.errors.CheckpointError` unless the checkpoint's position lies inside
    an epoch of ``n`` samples in batches of ``batch_size``."""
    n_batches = max(math.ceil(n / batch_size), 1)
    if pos["batch"] >= n_batches or pos["seen"] != min(pos["batch"] * batch_size, n):
        raise CheckpointError(
            f"{ckpt.path}: position batch {pos['batch']} (seen {pos['seen']}) is not a place "
            f"in an epoch of {n_batches} batches of {batch_size}; the checkpoint is damaged "
            "or belongs to other data"
        )


def resume_notes(
    ckpt: Checkpoint, config: TrainConfig, override: Sequence[str], comm: Any
) -> list[str]:
    """What a resume should say: a setting changed by ``override``, a changed MPI rank count."""
    notes = []
    saved = ckpt.train_config
    if "lr" in override:
        before = saved.get("lr") or DEFAULT_LR.get(str(saved.get("optimizer")), "default")
        notes.append(
            f"note: --override lr: the learning rate is now {config.peak_lr:g} (the checkpoint "
            f"was trained with {before:g}); the run no longer repeats an uninterrupted one"
        )
    ranks = saved.get("mpi_ranks")
    now = 1 if comm is None else int(comm.size)
    if isinstance(ranks, int) and ranks != now:
        notes.append(
            f"note: the checkpoint was written by a run over {ranks} MPI rank(s) and this one "
            f"uses {now}: each batch's gradient is summed in another order, so the result "
            "agrees within float tolerance, not bit for bit"
        )
    return notes
