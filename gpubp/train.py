"""Training runs on real data, checkpoints that resume exactly, and gradient-flow diagnostics.

This is ``gpubp train`` and ``gpubp gradflow`` as a Python API::

    from gpubp.train import TrainConfig, train
    result = train(TrainConfig(dataset="digits", epochs=20), checkpoint="run.ckpt")
    print(result.test_accuracy)

A run loads the dataset once, standardises it, holds out a seeded validation split, puts the data
on the backend's device once, and trains in shuffled mini-batches with a learning rate that
follows the chosen schedule step by step. A checkpoint written each epoch (and on Ctrl-C) holds
everything the run depends on: parameters, optimizer state, the position in the epoch, the
shuffling RNG and the history, so ``resume`` ends with the same parameters as a run that was never
interrupted (same backend, same BLAS threads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from . import data, plots, reference
from .activations import HIDDEN_ACTIVATIONS
from .backends import get_backend
from .errors import CheckpointMismatchError, ModelFileError
from .model import (
    MLP,
    _check_positive_int,
    _check_saved_shapes,
    _LossSum,
    _Progress,
    parse_meta,
    read_npz,
    write_npz_atomic,
)
from .optim import Optimizer, make_optimizer

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "gradflow",
    "gradient_norms",
    "load_checkpoint",
    "train",
]

CHECKPOINT_FORMAT = "gpubp-checkpoint"
#: Where Ctrl-C writes its checkpoint when the run was given no ``checkpoint`` path.
INTERRUPT_CHECKPOINT = "gpubp-interrupted.ckpt"
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "adamw")
#: The learning rate each optimizer starts from when ``lr`` is not given.
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
DEFAULT_BATCH = 128
SMALL_DATA_BATCH = 32
SMALL_DATA = 10_000
#: Training samples whose accuracy is measured after each epoch (the "training" curve).
TRAIN_EVAL_SAMPLES = 10_000
#: Samples of the fixed batch on which gradient norms are measured.
PROBE_SAMPLES = 512
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

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def _silent(msg: str) -> None:
    pass


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

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if self.dataset not in ("auto", *data.DATASET_NAMES):
            raise ValueError(
                f"dataset={self.dataset!r} is not known; expected one of auto, "
                f"{', '.join(data.DATASET_NAMES)}"
            )
        if not self.layers or any(
            isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1
            for n in self.layers
        ):
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
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if not (value is None and name == "batch_size"):  # None: chosen from the data
                _check_positive_int(name, value)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay is not None and not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def make_optimizer(self) -> Optimizer:
        kwargs: dict[str, Any] = {"lr": self.peak_lr}
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        return make_optimizer(self.optimizer, **kwargs)

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The learning rate for global step ``step`` (0-based) of ``total_steps``."""
        if self.schedule == "constant":
            return self.peak_lr
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass
class TrainResult:
    """What a run produced; ``history`` holds one entry per completed epoch in each list."""

    model: MLP
    config: TrainConfig
    dataset: str
    history: dict[str, list[Any]]
    test_loss: float | None = None
    test_accuracy: float | None = None
    epochs_done: int = 0
    samples_trained: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    interrupted: bool = False
    checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples_trained / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record of the run (configuration, history, results)."""
        return {
            "config": self.config.as_dict(),
            "dataset": self.dataset,
            "backend": self.model.backend.name,
            "dtype": self.model.dtype.name,
            "layer_sizes": list(self.model.layer_sizes),
            "epochs_done": self.epochs_done,
            "interrupted": self.interrupted,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "samples_per_second": self.samples_per_second,
            "checkpoint": self.checkpoint,
            "history": self.history,
            **self.extra,
        }


# --- gradient norms --------------------------------------------------------------------------


def gradient_norms(model: MLP, x: Any, y: Any) -> dict[str, list[float]]:
    """Per-layer ``||delta^l||`` and ``||dC/dW^l||`` (Frobenius) on the batch ``(x, y)``.

    Computed by the float64 reference from the model's current parameters, so the numbers are
    the same whichever backend trains the model. ``delta^l`` ``(B, n_l)`` is the error of layer
    ``l`` for the batch-mean loss; ``dC/dW^l = delta^l.T @ a^{l-1}``. Lists run from layer 1
    (next to the input) to layer ``L``.
    """
    weights, biases = model.get_parameters()
    _, acts, deltas = reference.backprop(
        weights, biases, x, y, model.activation, model.output, model.loss
    )
    return {
        "delta": [float(np.linalg.norm(d)) for d in deltas],
        "dW": [
            float(np.linalg.norm(reference.parameter_gradients(d, a)[0]))
            for d, a in zip(deltas, acts)
        ],
    }


# --- checkpoints -----------------------------------------------------------------------------


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


def _position_meta(
    epoch: int, batch: int, rng_state: dict[str, Any], loss_sum: float, seen: int
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "batch": batch,
        "rng_state": rng_state,
        "loss_sum": loss_sum,
        "seen": seen,
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MLP,
    optimizer: Optimizer,
    config: TrainConfig,
    dataset: str,
    position: dict[str, Any],
    history: dict[str, list[Any]],
    counters: dict[str, float],
    track_gradients: bool = False,
) -> None:
    """Write a checkpoint atomically (temp file, flush, fsync, rename); no pickle."""
    weights, biases = model.get_parameters()
    arrays: dict[str, np.ndarray] = {f"W{i}": w for i, w in enumerate(weights)}
    arrays.update({f"b{i}": b for i, b in enumerate(biases)})
    state = optimizer.state_dict()
    for slot in optimizer.slots:
        for i, a in enumerate(state.get(slot, [])):
            arrays[f"opt_{slot}_{i}"] = a
    train_cfg = config.as_dict()
    train_cfg["dataset"] = dataset  # "auto" resolved, so a resume finds the same data
    train_cfg["track_gradients"] = bool(track_gradients)  # the history's lists depend on it
    train_cfg["backend"] = model.backend.name  # bit-for-bit resumes need the same backend
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "config": model.config(),
        "train": train_cfg,
        "optimizer": {"kind": config.optimizer, "step": state["step"]},
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

    def check_matches(
        self, config: TrainConfig, dataset: str, model: MLP, track_gradients: bool = False
    ) -> None:
        """Raise :class:`CheckpointMismatchError` naming every setting that differs."""
        want = _effective(config.as_dict())
        want["dataset"] = dataset
        want["track_gradients"] = bool(track_gradients)
        have = _effective(self.train_config)
        diffs = [
            f"{key}: checkpoint {have.get(key)!r}, this run {want[key]!r}"
            for key in RESUME_KEYS
            if have.get(key) != want[key]
        ]
        saved_model = self.meta["config"]
        if list(saved_model.get("layer_sizes", [])) != list(model.layer_sizes):
            diffs.append(
                f"layer_sizes: checkpoint {saved_model.get('layer_sizes')}, this run "
                f"{list(model.layer_sizes)}"
            )
        done = int(self.meta["position"]["epoch"])
        if config.epochs < done:
            diffs.append(
                f"epochs: the checkpoint has finished {done} epoch(s), this run asks for only "
                f"{config.epochs} (--epochs may grow, not shrink)"
            )
        if diffs:
            raise CheckpointMismatchError(
                f"{self.path} does not match the requested run ("
                + "; ".join(diffs)
                + "). Resume with the options the checkpoint was written with, or start "
                "afresh without --resume"
            )

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
            raise ModelFileError(f"{self.path}: {exc}") from None
        optimizer.load_state_dict(saved, model, model.backend, shapes, model.dtype)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint written by :func:`train`; never unpickles.

    Raises :class:`~gpubp.errors.ModelFileError` for a missing, malformed or inconsistent file.
    """
    arrays = read_npz(path)
    meta = parse_meta(arrays, path, CHECKPOINT_FORMAT)
    for key, kind in (
        ("train", dict),
        ("optimizer", dict),
        ("position", dict),
        ("history", dict),
        ("counters", dict),
    ):
        if not isinstance(meta.get(key), kind):
            raise ModelFileError(f"{path}: the checkpoint has no valid {key!r} section")
    pos = meta["position"]
    for key in ("epoch", "batch", "seen"):
        if not isinstance(pos.get(key), int) or pos[key] < 0:
            raise ModelFileError(f"{path}: position.{key} must be an int >= 0")
    if not isinstance(pos.get("rng_state"), dict):
        raise ModelFileError(f"{path}: the checkpoint has no shuffling RNG state")
    _check_saved_shapes(arrays, meta["config"], path)
    return Checkpoint(os.fspath(path), meta, arrays)


# --- Ctrl-C ----------------------------------------------------------------------------------


class _StopRequest:
    """Turns the first Ctrl-C into a request to stop after the current step (a second one
    interrupts at once). Only in the main thread, where Python delivers signals."""

    def __init__(self, also_sigterm: bool = False, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        # mpirun turns Ctrl-C into SIGTERM for its ranks: under MPI that is a stop request too
        self._signals = [signal.SIGINT, *([signal.SIGTERM] if also_sigterm else [])]
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            sys.stderr.write(
                "\nCtrl-C: stopping after this step and writing a checkpoint "
                "(press Ctrl-C again to abort at once)\n"
            )

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- the run ---------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    save_path: str | os.PathLike[str] | None = None,
    track_gradients: bool = False,
    progress: bool = True,
    log: Log = _print,
    comm: Any = None,
) -> TrainResult:
    """Train an MLP classifier on a real dataset and evaluate it on the test set.

    Parameters
    ----------
    config : TrainConfig
        What to train and how.
    checkpoint : path, optional
        Written atomically after every epoch, and on Ctrl-C (then the run stops cleanly with
        ``result.interrupted``). Defaults to ``resume`` when resuming.
    resume : path, optional
        Continue from this checkpoint; it must match ``config`` (``epochs`` may grow).
    json_path, plot_path, save_path : path, optional
        Write the run's record as JSON, loss/accuracy curves as a PNG, the final model
        (:meth:`MLP.save`).
    track_gradients : bool
        Record per-layer ``||delta^l||`` and ``||dW^l||`` after each epoch (see
        :func:`gradient_norms`) in ``history["delta_norm"]`` and ``history["dW_norm"]``.
    progress : bool
        Draw a progress bar per epoch on stderr.
    log : callable
        Receives the run's report lines (default: print to stdout).
    comm : gpubp.distributed.MPICommunicator, optional
        Train data-parallel over its ranks (see :mod:`gpubp.distributed`): every rank calls
        ``train`` with the same arguments; rank 0 alone logs and writes files.
    """
    t_start = time.perf_counter()
    if comm is not None and comm.rank != 0:  # one voice and one writer: rank 0
        log, progress = _silent, False
        checkpoint = json_path = plot_path = save_path = None
    for what, path in (
        ("checkpoint", checkpoint),
        ("json_path", json_path),
        ("plot_path", plot_path),
        ("save_path", save_path),
    ):  # fail now, not after the training it would have saved
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{what}={os.fspath(path)!r}: the folder {folder} does not exist; create it or "
                "choose another path"
            )
    if plot_path is not None:
        plots.require_matplotlib()  # fail before training, not after
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None and checkpoint is None and (comm is None or comm.rank == 0):
        checkpoint = resume
    requested = config.dataset
    if ckpt is not None and requested == "auto":
        requested = ckpt.train_config.get("dataset", "auto")  # the data it was trained on
    ds = data.load_dataset(requested, config.data_dir, config.download, config.seed, progress)
    how = " (auto: the largest dataset found here)" if config.dataset == "auto" else ""
    log(f"dataset: {ds.describe()}{how}")
    x_tr, y_tr, x_val, y_val = data.train_val_split(
        ds.x_train, ds.y_train, config.val_fraction, config.seed
    )
    if config.batch_size is None:
        small = len(x_tr) < SMALL_DATA
        config = dataclasses.replace(
            config, batch_size=SMALL_DATA_BATCH if small else DEFAULT_BATCH
        )
    model = MLP(
        [ds.n_features, *config.layers, ds.n_classes],
        activation=config.activation,
        backend=config.backend,
        dtype=config.dtype,
        seed=config.seed,
    )
    optimizer = config.make_optimizer()
    history: dict[str, list[Any]] = {
        k: [] for k in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")
    }
    if track_gradients:
        history.update(delta_norm=[], dW_norm=[])
    rng = np.random.default_rng([config.seed, 1])  # the shuffling stream
    epoch, batch, loss_sum, seen = 0, 0, 0.0, 0
    counters = {"train_seconds": 0.0, "samples": 0.0}
    if ckpt is not None:
        ckpt.check_matches(config, ds.name, model, track_gradients)
        ckpt.restore(model, optimizer)
        pos = ckpt.meta["position"]
        epoch, batch, loss_sum, seen = pos["epoch"], pos["batch"], pos["loss_sum"], pos["seen"]
        try:
            rng.bit_generator.state = pos["rng_state"]
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{resume}: the shuffling RNG state is invalid ({exc})") from None
        saved_history = ckpt.meta["history"]
        history = {k: list(saved_history.get(k, [])) for k in history}
        counters.update({k: float(v) for k, v in ckpt.meta["counters"].items()})
        log(f"resuming from {resume}: epoch {epoch + 1}, batch {batch}")
        saved_backend = ckpt.train_config.get("backend")
        if saved_backend not in (None, model.backend.name):
            log(
                f"note: the checkpoint was written by the {saved_backend} backend and this run "
                f"uses {model.backend.name}; the result will agree within float tolerance, "
                "not bit for bit"
            )
    losses = _LossSum(model.backend, loss_sum)  # read (a GPU sync) only when shown or saved
    dp = None
    if comm is not None:
        from .distributed import DataParallel

        dp = DataParallel(comm, model)
        log(f"data parallel over {comm.size} MPI rank(s); {dp.note or 'BLAS threads as set'}")
    log(
        f"model: {list(model.layer_sizes)} {config.activation}, {model.n_parameters:,} "
        f"parameters | {config.optimizer} lr {config.peak_lr:g} ({config.schedule}) | batch "
        f"{config.batch_size} | backend {model.backend.name} {model.dtype.name}"
    )
    be = model.backend
    X = be.asarray(model._check_x(x_tr, "training data"))  # on the device once
    Y = be.asarray(model._check_y(y_tr, len(x_tr), "training labels"))
    X_eval, Y_eval = X[:TRAIN_EVAL_SAMPLES], Y[:TRAIN_EVAL_SAMPLES]
    X_val = Y_val = None
    if len(x_val):
        X_val = be.asarray(model._check_x(x_val, "validation data"))
        Y_val = be.asarray(model._check_y(y_val, len(x_val), "validation labels"))
    probe = (x_tr[:PROBE_SAMPLES], y_tr[:PROBE_SAMPLES])
    n, bs = len(x_tr), int(config.batch_size or DEFAULT_BATCH)
    n_batches = math.ceil(n / bs)
    total_steps = config.epochs * n_batches
    interrupted = False

    def write_checkpoint(rng_state: Mapping[str, Any], interrupted: bool = False) -> None:
        nonlocal checkpoint
        if checkpoint is None and interrupted and not quiet_rank:
            checkpoint = INTERRUPT_CHECKPOINT  # Ctrl-C always leaves something to resume from
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                model,
                optimizer,
                config,
                ds.name,
                _position_meta(epoch, batch, dict(rng_state), losses.read(), seen),
                history,
                counters,
                track_gradients,
            )

    def step(idx: Any) -> float:
        if dp is None:
            return model._step(X[idx], Y[idx], optimizer)
        return dp.step(X, Y, idx, optimizer, stop=stop.requested)

    def stopping() -> bool:  # under MPI, every rank stops after the same step
        return dp.stop_agreed if dp is not None else stop.requested

    quiet_rank = comm is not None and comm.rank != 0
    with _StopRequest(also_sigterm=comm is not None, announce=not quiet_rank) as stop:
        while epoch < config.epochs:
            epoch_rng_state = rng.bit_generator.state  # this epoch's order is drawn from here
            order = be.asarray(rng.permutation(n))
            bar = _Progress(f"epoch {epoch + 1}/{config.epochs}", n_batches, enabled=progress)
            t0, seen_before = time.perf_counter(), seen
            while batch < n_batches and not stopping():
                optimizer.lr = config.learning_rate(epoch * n_batches + batch, total_steps)
                idx = order[batch * bs : (batch + 1) * bs]
                losses.add(step(idx), int(idx.shape[0]))
                seen += int(idx.shape[0])
                batch += 1
                bar.update(batch, losses.describe(seen))
            be.synchronize()
            counters["train_seconds"] += time.perf_counter() - t0
            counters["samples"] += seen - seen_before
            if batch < n_batches:  # stopped by Ctrl-C inside the epoch
                bar.close(f"interrupted at batch {batch}/{n_batches}")
                write_checkpoint(epoch_rng_state, interrupted=True)
                interrupted = True
                break
            history["epoch"].append(epoch + 1)
            history["loss"].append(losses.read() / max(seen, 1))
            history["lr"].append(optimizer.lr)
            history["accuracy"].append(model.evaluate(X_eval, Y_eval)["accuracy"])
            if X_val is not None:
                ev = model.evaluate(X_val, Y_val)
                history["val_loss"].append(ev["loss"])
                history["val_accuracy"].append(ev["accuracy"])
            history["seconds"].append(time.perf_counter() - t0)
            if track_gradients:
                norms = gradient_norms(model, *probe)
                history["delta_norm"].append(norms["delta"])
                history["dW_norm"].append(norms["dW"])
            epoch, batch, seen = epoch + 1, 0, 0
            losses = _LossSum(be)
            if dp is not None:
                dp.check_in_sync(f"epoch {epoch}")
            bar.close(_epoch_summary(history))
            if stopping():
                interrupted = epoch < config.epochs
            write_checkpoint(rng.bit_generator.state, interrupted=interrupted)
            if interrupted:
                break

    result = TrainResult(
        model=model,
        config=config,
        dataset=ds.name,
        history=history,
        epochs_done=epoch,
        samples_trained=int(counters["samples"]),
        train_seconds=counters["train_seconds"],
        interrupted=interrupted,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
    )
    result.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if interrupted:  # no test evaluation: stop promptly (mpirun allows little time after SIGTERM)
        log(f"interrupted after {epoch} epoch(s); checkpoint written to {checkpoint}")
        log(f"continue with the same command plus: --resume {checkpoint}")
    else:
        ev = model.evaluate(ds.x_test, ds.y_test)
        result.test_loss, result.test_accuracy = ev["loss"], ev["accuracy"]
    result.wall_seconds = time.perf_counter() - t_start
    test = (
        "test evaluation skipped (interrupted)"
        if interrupted
        else f"test accuracy {result.test_accuracy:.4f} (loss {result.test_loss:.4f}) on "
        f"{len(ds.x_test)} {ds.name} test samples"
    )
    log(
        f"{test} | {epoch} epoch(s), wall time "
        f"{result.wall_seconds:.1f} s (training {result.train_seconds:.1f} s, "
        f"{result.samples_per_second:,.0f} samples/s) | backend {model.backend.name} "
        f"{model.dtype.name}" + (f" x {comm.size} MPI ranks" if comm is not None else "")
    )
    if comm is not None:
        result.extra["mpi_ranks"] = comm.size
    if save_path is not None:
        model.save(save_path)
        log(f"model saved to {save_path} (load it with gpubp.MLP.load)")
    if json_path is not None:
        _write_json(json_path, result.summary())
        log(f"run record written to {json_path}")
    if plot_path is not None and history["epoch"]:
        plots.training_curves(
            history,
            plot_path,
            title=f"{ds.name}: {list(model.layer_sizes)} {config.activation}, "
            f"{config.optimizer}, {model.backend.name}",
            test_accuracy=result.test_accuracy,
        )
        log(f"loss and accuracy curves written to {plot_path}")
    return result


def _epoch_summary(history: dict[str, list[Any]]) -> str:
    parts = [f"loss {history['loss'][-1]:.4f}", f"train acc {history['accuracy'][-1]:.4f}"]
    if history["val_accuracy"]:
        parts.append(f"val loss {history['val_loss'][-1]:.4f}")
        parts.append(f"val acc {history['val_accuracy'][-1]:.4f}")
    parts.append(f"{history['seconds'][-1]:.1f} s")
    return "  ".join(parts)


def _write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``record`` as JSON atomically (temp file and rename)."""
    data.write_atomic(Path(path), (json.dumps(record, indent=2) + "\n").encode())


# --- gradient flow ---------------------------------------------------------------------------


def gradflow(
    activations: Sequence[str] = ("sigmoid", "tanh", "relu"),
    depth: int = 8,
    width: int = 64,
    dataset: str = "auto",
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 0.05,
    backend: str = "auto",
    seed: int = 0,
    data_dir: str | None = None,
    plot_path: str | os.PathLike[str] | None = "gradflow.png",
    json_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Log = _print,
) -> dict[str, dict[str, list[float]]]:
    """Train one network per activation briefly and measure gradient norms layer by layer.

    Each network has ``depth`` hidden layers of ``width`` units, is trained for ``steps``
    mini-batch SGD steps, and is measured on a fixed batch at initialisation and after training
    (:func:`gradient_norms`). With sigmoid, ``f' <= 1/4`` shrinks ``||delta^l||`` roughly
    geometrically towards the input, so the first layers barely learn; ReLU keeps it level.

    Returns ``{activation: {"delta", "dW", "delta_init", "dW_init"}}``, lists from layer 1.
    """
    for name in activations:
        if name not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"activations: {name!r} is not supported; expected names from "
                f"{', '.join(HIDDEN_ACTIVATIONS)}"
            )
    if not activations:
        raise ValueError("activations: give at least one, e.g. sigmoid,tanh,relu")
    for arg, value in (("depth", depth), ("width", width), ("steps", steps)):
        _check_positive_int(arg, value)
    if plot_path is not None:
        plots.require_matplotlib()
    ds = data.load_dataset(dataset, data_dir, False, seed, progress)
    log(f"dataset: {ds.describe()}")
    rng = np.random.default_rng(seed)
    probe = rng.choice(len(ds.x_train), size=min(PROBE_SAMPLES, len(ds.x_train)), replace=False)
    xp_, yp_ = ds.x_train[probe], ds.y_train[probe]
    be = get_backend(backend)
    X, Y = be.asarray(ds.x_train), be.asarray(ds.y_train)  # on the device once, for every run
    runs: dict[str, dict[str, list[float]]] = {}
    for name in activations:
        model = MLP(
            [ds.n_features, *([width] * depth), ds.n_classes],
            activation=name,
            backend=be,
            seed=seed,
        )
        init = gradient_norms(model, xp_, yp_)
        opt = make_optimizer("sgd", lr=lr)
        order = np.random.default_rng([seed, 2])
        bar = _Progress(f"{name:10}", steps, enabled=progress)
        losses = _LossSum(model.backend)
        for k in range(steps):
            idx = model.backend.asarray(order.integers(0, len(ds.x_train), batch_size))
            losses.add(model._step(X[idx], Y[idx], opt), 1)
            bar.update(k + 1, losses.describe(k + 1))
        total = losses.read()
        after = gradient_norms(model, xp_, yp_)
        runs[name] = {
            "delta": after["delta"],
            "dW": after["dW"],
            "delta_init": init["delta"],
            "dW_init": init["dW"],
        }
        last = after["dW"][-1]
        ratio = after["dW"][0] / last if last > 0 else float("nan")  # a dead ReLU net: 0
        bar.close(
            f"loss {total / steps:.4f}  ||dW^1|| / ||dW^L|| = {ratio:.2e} after {steps} steps"
        )
    log(_gradflow_table(runs))
    title = (
        f"gradient flow on {ds.name}: {depth} hidden layers of {width}, "
        f"after {steps} SGD steps (lr {lr:g}, batch {batch_size})"
    )
    if plot_path is not None:
        plots.gradient_flow(runs, plot_path, title=title)
        log(f"gradient-flow picture written to {plot_path}")
    if json_path is not None:
        _write_json(
            json_path,
            {
                "dataset": ds.name,
                "depth": depth,
                "width": width,
                "steps": steps,
                "lr": lr,
                "batch_size": batch_size,
                "runs": runs,
            },
        )
        log(f"gradient norms written to {json_path}")
    return runs


def _gradflow_table(runs: dict[str, dict[str, list[float]]]) -> str:
    names = list(runs)
    n_layers = len(next(iter(runs.values()))["dW"])
    lines = ["||dC/dW^l|| after training, by layer (1 = next to the input):"]
    lines.append(f"{'layer':>6} " + " ".join(f"{n:>11}" for n in names))
    for layer in range(n_layers):
        cells = " ".join(f"{runs[n]['dW'][layer]:11.3e}" for n in names)
        lines.append(f"{layer + 1:>6} {cells}")
    return "\n".join(lines)
