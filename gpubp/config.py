"""What a training run computes: :class:`TrainConfig`, its options checked.

:func:`gpubp.train.train` takes a :class:`TrainConfig`; ``gpubp train`` builds one from its
options. What a checkpoint records of it, and what a resume takes back, is
:mod:`gpubp.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import datasets as data
from ._checks import (
    check_fraction,
    check_int,
    check_non_negative_number,
    check_positive_int,
    check_positive_number,
    positive_int,
)
from .activations import HIDDEN_ACTIVATIONS
from .optim import Optimizer, make_optimizer
from .schedules import SCHEDULES, Schedule

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "SMALL_DATA",
    "SMALL_DATA_BATCH",
    "TrainConfig",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "adamw")
#: The learning rate each optimizer starts from when ``lr`` is not given.
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_BATCH = 128
SMALL_DATA_BATCH = 32
SMALL_DATA = 10_000


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes.

    Parameters
    ----------
    dataset : str
        ``auto`` (the largest dataset found locally), ``fashion-mnist``, ``mnist`` or ``digits``.
    layers : sequence of int
        Hidden widths; input and output widths come from the dataset.
    activation : str
        Hidden activation: ``relu``, ``leaky_relu``, ``tanh``, ``sigmoid`` or ``identity``.
    optimizer : str
        ``sgd``, ``momentum`` (SGD, momentum 0.9), ``adam`` or ``adamw``.
    lr : float or None
        Peak learning rate; ``None`` takes :data:`DEFAULT_LR` for the optimizer.
    weight_decay : float or None
        ``None`` takes the optimizer's default (0.01 for AdamW, else 0).
    schedule : str
        ``cosine``: ``lr_t = lr (1 + cos(pi t / T)) / 2`` over all ``T`` steps; or ``constant``.
    batch_size : int or None
        ``None`` picks :data:`SMALL_DATA_BATCH` for datasets under :data:`SMALL_DATA` training
        samples (so they still get enough steps), else :data:`DEFAULT_BATCH`.
    epochs : int
    val_fraction : float
        Fraction of the training set held out for validation, in ``[0, 1)``.
    backend, dtype : str
        As for :class:`~gpubp.MLP`.
    seed : int
        Seeds the initialisation, the validation split and the shuffling.
    data_dir : str or None
        Where to look for IDX files first (then ``$GPUBP_DATA``, the cache, system folders).
    download : bool
        Fetch a missing MNIST / Fashion-MNIST (checksums verified) into the cache.
    data : str or None
        Train on this file instead of a dataset: CSV, TSV, ``.npz`` (``X``, ``y``), ``.npy``
        pairs or Parquet (see :mod:`gpubp.tables` and :mod:`gpubp.filedata`).
    target : str or None
        The target column of ``data`` (default: a column named ``y``, ``target``, ``label`` or
        ``class``, else the last); for ``.npy``, the labels file.
    test_data : str or None
        The test rows, from another file with the same columns.
    test_fraction : float or None
        Without ``test_data``: the seeded share of ``data``'s rows held out as the test set
        (default 0.2).
    task : str or None
        ``classification`` or ``regression``; default: from the target (floats: regression).
    """

    dataset: str = "auto"
    layers: tuple[int, ...] = (512, 256)
    activation: str = "relu"
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str = "cosine"
    batch_size: int | None = None
    epochs: int = 15
    val_fraction: float = 0.1
    backend: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    data_dir: str | None = None
    download: bool = False
    data: str | None = None
    target: str | None = None
    test_data: str | None = None
    test_fraction: float | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if self.dataset not in ("auto", *data.DATASET_NAMES):
            raise ValueError(
                f"dataset={self.dataset!r} is not known; expected one of auto, "
                f"{', '.join(data.DATASET_NAMES)}"
            )
        if not self.layers or not all(positive_int(n) for n in self.layers):
            raise ValueError(
                f"layers={list(self.layers)!r}: expected one or more positive hidden widths, "
                "e.g. 512,256"
            )
        self.layers = tuple(int(n) for n in self.layers)
        if self.activation not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is not supported; expected one of "
                f"{', '.join(HIDDEN_ACTIVATIONS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={self.optimizer!r} is not supported; expected one of "
                f"{', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule={self.schedule!r} is not supported; expected one of "
                f"{', '.join(SCHEDULES)}"
            )
        if self.batch_size is not None:  # None: chosen from the data
            check_positive_int("batch_size", self.batch_size)
        check_positive_int("epochs", self.epochs)
        if self.lr is not None:
            check_positive_number("lr", self.lr)
            _check_finite_in_dtype("lr", self.lr, self.dtype)
        if self.weight_decay is not None:
            check_non_negative_number("weight_decay", self.weight_decay)
        check_fraction("val_fraction", self.val_fraction)
        check_int("seed", self.seed)
        if self.seed < 0:  # numpy's generators take seeds >= 0
            raise ValueError(f"seed={self.seed!r}: expected an integer >= 0")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir={self.data_dir!r:.80}: expected a folder's path or None")
        if not isinstance(self.download, bool):
            raise ValueError(f"download={self.download!r:.80}: expected True or False")
        self._check_data()

    def _check_data(self) -> None:
        """The options of a run on your own file, which only make sense with ``data``."""
        if self.data is None:
            names = ("target", "test_data", "test_fraction", "task")
            given = [k for k in names if getattr(self, k) is not None]
            if given:
                option = "--" + given[0].replace("_", "-")
                raise ValueError(f"{given[0]}= ({option}) only applies with data= (--data PATH)")
            return
        if self.dataset != "auto":
            raise ValueError(
                f"dataset={self.dataset!r} (--dataset) and data={self.data!r} (--data): pass one "
                "of them, not both"
            )
        if self.test_data is not None and self.test_fraction is not None:
            raise ValueError(
                "pass test_data= (--test-data) or test_fraction= (--test-fraction), not both"
            )
        if self.test_fraction is not None:
            check_fraction("test_fraction", self.test_fraction)
        if self.task not in (None, "classification", "regression"):
            raise ValueError(
                f"task={self.task!r} is not known; expected classification or regression"
            )

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def make_optimizer(self) -> Optimizer:
        kwargs: dict[str, Any] = {"lr": self.peak_lr}
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        return make_optimizer(self.optimizer, **kwargs)

    def lr_schedule(self, total_steps: int) -> Schedule:
        """The run's learning-rate schedule over ``total_steps`` global steps."""
        return Schedule(self.schedule, self.peak_lr, total_steps)

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The learning rate for global step ``step`` (0-based) of ``total_steps``."""
        return self.lr_schedule(total_steps).at(step)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d


def _check_finite_in_dtype(name: str, value: float, dtype: str) -> None:
    """Raise :class:`ValueError` when ``value`` overflows to infinity in ``dtype`` (the
    arithmetic the run does), e.g. ``lr=1e39`` with float32."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r} is not supported; expected float32 or float64")
    with np.errstate(over="ignore"):
        in_dtype = np.dtype(dtype).type(value)
    if not np.isfinite(in_dtype):
        largest = float(np.finfo(dtype).max)
        raise ValueError(
            f"{name}={value!r} is infinite in {dtype} (the largest {dtype} is {largest:.4g}); "
            f"choose a smaller {name}"
        )
