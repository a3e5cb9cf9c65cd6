"""Checks a run makes before its first epoch that need the data or the checkpoint: splits that
fit together, a checkpoint position inside the epoch, settings a resume may override, and the
notes a resume prints when it cannot repeat the first session bit for bit."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .config import OVERRIDABLE, TrainConfig
from .datasets import Dataset
from .errors import CheckpointError, DatasetError
from .io import Checkpoint

__all__ = ["check_overrides", "check_position", "check_widths", "resume_notes"]


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


def check_widths(ds: Dataset) -> None:
    """Raise :class:`~gpubp.errors.DatasetError` when the test set's width differs from the
    training set's (found now, not at the evaluation after training)."""
    if ds.x_test.ndim != 2 or ds.x_test.shape[1] != ds.x_train.shape[1]:
        raise DatasetError(
            f"{ds.source}: the test set has {ds.x_test.shape[1:]} features per sample and the "
            f"training set {ds.x_train.shape[1]}; both must be the same width"
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
        from .config import DEFAULT_LR

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
