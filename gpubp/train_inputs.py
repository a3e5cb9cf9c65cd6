"""What a training run reads and checks before it trains: the output paths, the checkpoint it
resumes (its settings checked against the run's before any data is read) and the data, split
into training and validation sets.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets as data
from . import plots
from .checkpoint import Checkpoint, check_overrides, check_resume, load_checkpoint
from .config import DEFAULT_BATCH, SMALL_DATA, SMALL_DATA_BATCH, TrainConfig
from .datasets import Dataset
from .errors import CheckpointMismatchError, DatasetError
from .filedata import load_file_dataset
from .files import check_outputs
from .idx import idx_paths
from .tables import fingerprint

__all__ = ["check_before_the_run", "check_resume_settings", "load_data"]

Log = Callable[[str], None]


def load_data(
    config: TrainConfig, ckpt: Checkpoint | None, progress: bool, log: Log
) -> tuple[data.Dataset, TrainConfig, tuple[np.ndarray, ...]]:
    """The dataset (the checkpoint's when ``auto`` resumes), its train/validation split, and
    ``config`` with the batch size chosen for the data when not given."""
    requested = config.dataset
    if ckpt is not None and requested == "auto":
        requested = ckpt.train_config.get("dataset", "auto")  # the data it was trained on
    if config.data is not None:
        ds = load_file_dataset(
            config.data,
            config.target,
            config.test_data,
            config.test_fraction,
            config.task,
            config.dtype,
            config.seed,
        )
        how = "" if config.task is None else " (--task)"
        log(f"data: {ds.describe()}{how}")
    else:
        ds = data.load_dataset(requested, config.data_dir, config.download, config.seed, progress)
        how = " (auto: the largest dataset found here)" if config.dataset == "auto" else ""
        log(f"dataset: {ds.describe()}{how}")
    if ds.x_test.ndim != 2 or ds.x_test.shape[1] != ds.x_train.shape[1]:  # found now, not after
        raise DatasetError(
            f"{ds.source}: the test set has {ds.x_test.shape[1:]} features per sample and the "
            f"training set {ds.x_train.shape[1]}; both must be the same width"
        )
    split = data.train_val_split(ds.x_train, ds.y_train, config.val_fraction, config.seed)
    if ds.file is not None:  # your own file: its rows held once, as the split's parts
        ds.x_train, ds.y_train = split[0], split[1]
    if config.batch_size is None:
        small = len(split[0]) < SMALL_DATA
        config = dataclasses.replace(
            config, batch_size=SMALL_DATA_BATCH if small else DEFAULT_BATCH
        )
    return ds, config, split


def check_resume_settings(
    ckpt: Checkpoint, config: TrainConfig, track_gradients: bool, override: Sequence[str]
) -> None:
    """:func:`~gpubp.checkpoint.check_resume` on what is known before the data is read: the
    dataset asked for (``auto``: the checkpoint's), a batch size left to the data (the
    checkpoint's) and the hidden widths (the input and output widths come with the data)."""
    saved = ckpt.train_config
    dataset = saved.get("dataset") if config.dataset == "auto" else config.dataset
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=saved.get("batch_size"))
    sizes = list(ckpt.meta["config"].get("layer_sizes", [0, 0]))
    stand_in: Any = types.SimpleNamespace(layer_sizes=[sizes[0], *config.layers, sizes[-1]])
    check_resume(ckpt, config, str(dataset), stand_in, track_gradients, override)
    _check_data_files(ckpt, config)


def _check_data_files(ckpt: Checkpoint, config: TrainConfig) -> None:
    """A run on a file resumes on the same file, unchanged (its size and SHA-256 as the
    checkpoint recorded them), with the same target, test rows and task."""
    saved = ckpt.train_config
    keys = ("data", "target", "test_data", "test_fraction", "task")
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(config, k)!r}"
        for k in keys
        if saved.get(k) != getattr(config, k)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"{ckpt.path} does not match the requested run ({'; '.join(diffs)}). Resume with "
            "the data options the checkpoint was written with, or start afresh without --resume"
        )
    for then in saved.get("data_files") or []:
        now = fingerprint(then["name"]) if os.path.isfile(then["name"]) else None
        if now is None or (now["size"], now["sha256"]) != (then["size"], then["sha256"]):
            raise CheckpointMismatchError(
                f"{then['name']} has changed since {ckpt.path} was written (then "
                f"{then['size']} bytes, SHA-256 {then['sha256'][:12]}...; now "
                + ("missing" if now is None else f"{now['size']} bytes, {now['sha256'][:12]}...")
                + "); resume on the data the run started with, or start afresh without --resume"
            )


def check_before_the_run(
    outputs: dict[str, str | os.PathLike[str] | None],
    resume: str | os.PathLike[str] | None,
    override: Sequence[str],
    rank0: bool,
) -> Checkpoint | None:
    """Check the overrides and the output paths (and a plot's name and matplotlib), and read the
    checkpoint resumed from, whose path becomes ``outputs["checkpoint"]`` when none is given
    (on rank 0): all before any data is loaded, so a run fails now, not after the training it
    would have saved."""
    check_overrides(override, resume)
    check_outputs(outputs, {"resume": resume})
    plot_path = outputs["plot_path"]
    if plot_path is not None:
        plots.check_png(plot_path)
        plots.require_matplotlib()
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None and outputs["checkpoint"] is None and rank0:
        outputs["checkpoint"] = resume  # a resumed run goes on writing its checkpoint
        check_outputs(outputs, {"resume": resume})
    return ckpt


def run_inputs(
    resume: str | os.PathLike[str] | None, config: TrainConfig, ds: Dataset | None = None
) -> dict[str, Any]:
    """The files a run reads, by option, which no output may overwrite: the checkpoint resumed
    from, ``--data`` and ``--test-data``, and once found (``ds``) a dataset's IDX files."""
    files: dict[str, Any] = {"resume": resume, "data": config.data, "test_data": config.test_data}
    if ds is not None and ds.name in data.DATASETS:
        files.update(idx_paths(Path(ds.source)))
    return {k: v for k, v in files.items() if v}
