"""Training runs on real data, checkpoints that resume exactly, and gradient-flow diagnostics.

This is ``gpubp train`` and ``gpubp gradflow`` as a Python API::

    from gpubp.train import TrainConfig, train
    result = train(TrainConfig(dataset="digits", epochs=20), checkpoint="run.ckpt")
    print(result.test_accuracy)

A run loads the dataset once, standardises it, holds out a seeded validation split, puts the data
on the backend's device once, and trains in shuffled mini-batches with a learning rate that
follows the chosen schedule step by step. The network trains on the standardised data; at the end
the model takes on the standardisation as its :attr:`~gpubp.MLP.preprocessing`, written for raw
inputs (:func:`gpubp.evaluate.dataset_preprocessing`), with the dataset's and labels' names, and
the test accuracy is measured on the raw test images through it: the number a saved model gives
on raw data. A checkpoint written each epoch (and on Ctrl-C) holds
everything the run depends on: parameters, optimizer state, the position in the epoch, the
shuffling RNG and the history, so ``resume`` ends with the same parameters as a run that was never
interrupted (same backend, same BLAS threads).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import datasets as data
from .backends import backend_label, backend_status, get_backend
from .budget import check_network
from .checkpoint import (
    Checkpoint,
    check_position,
    check_resume,
    load_checkpoint,
    resume_notes,
    resume_settings,
    save_checkpoint,
)
from .config import (
    DEFAULT_BATCH,
    DEFAULT_LR,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
)
from .distributed import DataParallel
from .errors import CheckpointError, CheckpointMismatchError, OutputWriteError
from .evaluate import dataset_preprocessing, raw_test_split
from .filedata import take_on_file_data
from .files import check_outputs
from .gather import BatchGather
from .gradflow import PROBE_SAMPLES, gradflow, gradient_norms
from .loop import EpochEnd, EpochLoop, Position, StopRequest
from .model import MLP
from .outputs import TrainResult, final_line, graphs_line, write_outputs
from .train_inputs import check_before_the_run, check_resume_settings, load_data, run_inputs

# TrainConfig and its names are re-exported: the README writes gpubp.train.TrainConfig
__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "gradflow",
    "gradient_norms",
    "load_checkpoint",
    "resume_settings",
    "train",
]

#: Where Ctrl-C writes its checkpoint when the run was given no ``checkpoint`` path.
INTERRUPT_CHECKPOINT = "gpubp-interrupted.ckpt"
#: Training samples whose accuracy is measured after each epoch (the "training" curve).
TRAIN_EVAL_SAMPLES = 10_000

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def _silent(msg: str) -> None:
    pass


# --- the run ---------------------------------------------------------------------------------


class _Run:
    """One training run's state: the data on the device, the model, the optimizer, the epoch
    loop, the history and the counters, and what to do at the end of an epoch."""

    def __init__(
        self,
        config: TrainConfig,
        ds: data.Dataset,
        split: tuple[np.ndarray, ...],
        track_gradients: bool,
        checkpoint: str | os.PathLike[str] | None,
        log: Log,
        comm: Any,
    ) -> None:
        self.config, self.ds, self.log, self.comm = config, ds, log, comm
        self.track_gradients, self.checkpoint = track_gradients, checkpoint
        x_tr, y_tr, x_val, y_val = split
        regression = ds.file is not None and ds.file.task == "regression"
        sizes = [ds.n_features, *config.layers, 1 if regression else ds.n_classes]
        batch = min(config.batch_size or DEFAULT_BATCH, len(x_tr))
        fix = "choose smaller layers (--layers) or batch_size (--batch-size)"
        slots = len(config.make_optimizer().slots)
        check_network(sizes, np.dtype(config.dtype).itemsize, batch, slots, fix)
        self.model = model = MLP(  # a regression: one identity output and MSE
            sizes,
            activation=config.activation,
            output="identity" if regression else "softmax",
            loss="mse" if regression else "cross_entropy",
            backend=config.backend,
            dtype=config.dtype,
            seed=config.seed,
        )
        self.optimizer = config.make_optimizer()
        keys = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")
        self.history: dict[str, list[Any]] = {k: [] for k in keys}
        if track_gradients:
            self.history.update(delta_norm=[], dW_norm=[])
        self.rng = np.random.default_rng([config.seed, 1])  # the shuffling stream
        self.epoch_rng_state = self.rng.bit_generator.state  # where this epoch's order came from
        self.counters: dict[str, float] = {"train_seconds": 0.0, "samples": 0.0}
        be = model.backend
        self.X = be.asarray(model.check_x(x_tr, "training data"))  # on the device once
        self.Y = be.asarray(model.check_y(y_tr, len(x_tr), "training labels"))
        self.X_val = self.Y_val = None
        if len(x_val):
            self.X_val = be.asarray(model.check_x(x_val, "validation data"))
            self.Y_val = be.asarray(model.check_y(y_val, len(x_val), "validation labels"))
        self.probe = (x_tr[:PROBE_SAMPLES], y_tr[:PROBE_SAMPLES])
        self.n = len(x_tr)
        self.dp = None
        if comm is not None:
            self.dp = DataParallel(comm, model)
            note = self.dp.note or "BLAS threads as set"
            log(f"data parallel over {comm.size} MPI rank(s); {note}")
        self.start = Position()
        self.loss_sum = 0.0
        self.resumed = False
        #: the standardisation of ``ds`` on raw inputs: the model takes it on at the end of the
        #: run (it trains on data standardised beforehand, with no per-step cost)
        self.preprocessing = dataset_preprocessing(ds)

    def resume_from(self, ckpt: Checkpoint, override: Sequence[str] = ()) -> None:
        """Continue where ``ckpt`` stopped (checked against this run first; the settings named
        in ``override`` may differ)."""
        name = self.ds.name if self.ds.file is None else "auto"  # a file: its fingerprints
        check_resume(ckpt, self.config, name, self.model, self.track_gradients, override)
        saved = ckpt.preprocessing
        if saved is not None and not saved.equals(self.preprocessing, rtol=1e-6):
            raise CheckpointMismatchError(
                f"{ckpt.path} was trained on data standardised with other statistics than "
                f"{self.ds.name}'s here ({saved.description} against "
                f"{self.preprocessing.description}); the dataset's files have changed. Resume "
                "with the data it was trained on, or start afresh without --resume"
            )
        pos = ckpt.meta["position"]
        check_position(ckpt, pos, self.n, int(self.config.batch_size or DEFAULT_BATCH))
        ckpt.restore(self.model, self.optimizer)
        self.resumed = True
        self.start = Position(pos["epoch"], pos["batch"], pos["seen"])
        self.loss_sum = pos["loss_sum"]
        try:
            self.rng.bit_generator.state = pos["rng_state"]
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{ckpt.path}: the shuffling RNG state is invalid ({exc})"
            ) from None
        saved_history = ckpt.meta["history"]
        self.history = {k: list(saved_history.get(k, [])) for k in self.history}
        self.counters.update({k: float(v) for k, v in ckpt.meta["counters"].items()})
        saved_backend = ckpt.train_config.get("backend")
        if self.start.epoch >= self.config.epochs:
            return  # nothing left to do: train() says so
        self.log(
            f"resuming from {ckpt.path}: epoch {self.start.epoch + 1}, batch {self.start.batch}"
        )
        for line in resume_notes(ckpt, self.config, override, self.comm):
            self.log(line)
        if saved_backend not in (None, self.model.backend.name):
            self.log(
                f"note: the checkpoint was written by the {saved_backend} backend and this run "
                f"uses {self.model.backend.name}; the result will agree within float tolerance, "
                "not bit for bit"
            )

    def describe(self) -> list[str]:
        """The lines that introduce the run: the model and its training, and where ``auto``
        took the numpy backend, why not numba."""
        c, m = self.config, self.model
        lines = [
            f"model: {list(m.layer_sizes)} {c.activation}, {m.n_parameters:,} "
            f"parameters | {c.optimizer} lr {c.peak_lr:g} ({c.schedule}) | batch "
            f"{c.batch_size} | backend {backend_label(m.backend)} {m.dtype.name}"
        ]
        why_numba = backend_status()["numba"]
        if c.backend in (None, "auto") and m.backend.name == "numpy" and why_numba:
            lines.append(
                f"note: auto took the numpy backend: {why_numba}; numba trains several times faster"
            )
        return lines

    @property
    def finished(self) -> bool:
        return self.start.epoch >= self.config.epochs

    def run_epochs(self, progress: bool) -> bool:
        """Run the remaining epochs; True if stopped by Ctrl-C (a checkpoint is written)."""
        config, model, X, Y, opt = self.config, self.model, self.X, self.Y, self.optimizer
        self.loop = loop = EpochLoop(
            model.backend,
            self.n,
            int(config.batch_size or DEFAULT_BATCH),
            config.epochs,
            progress=progress,
            echo=self.log,
            position=dataclasses.replace(self.start),
            loss_sum=self.loss_sum,
            time_first_step=True,
        )
        total_steps = config.epochs * loop.n_batches
        schedule = config.lr_schedule(total_steps)
        quiet_rank = self.comm is not None and self.comm.rank != 0
        # reused buffers, no allocation per step (on the device too)
        gather = BatchGather(
            X, Y, loop.batch_size, xp=model.backend.xp, buffers=model.backend.batch_buffers
        )
        self.graphs_before = model.backend.capture_report()
        with StopRequest(also_sigterm=self.comm is not None, announce=not quiet_rank) as stop:
            dp = self.dp

            def step(idx: Any) -> Any:
                # lr, and the schedule, which the CUDA step computes on the device
                opt.follow(schedule, loop.step_index)
                if dp is None:
                    return model.step(*gather(idx), opt)
                return dp.step(X, Y, idx, opt, stop=stop.requested)

            def steps(order: Any, first: int, count: int) -> list[float] | None:
                at = loop.step_index
                lrs = [schedule.at(at + i) for i in range(count)]
                return model.steps(X, Y, order, first, count, loop.batch_size, opt, lrs)

            def draw_order() -> np.ndarray:
                self.epoch_rng_state = self.rng.bit_generator.state
                return self.rng.permutation(self.n)

            def stopping() -> bool:  # under MPI, every rank stops after the same step
                return dp.stop_agreed if dp is not None else stop.requested

            return loop.run(
                step,
                draw_order,
                self.end_epoch,
                stop=stopping,
                save=self.save,
                steps=steps if dp is None else None,
            )

    def end_epoch(self, end: EpochEnd) -> str:
        """Record a finished epoch in the history; its summary line."""
        h, model, opt = self.history, self.model, self.optimizer
        h["epoch"].append(end.epoch)
        h["loss"].append(end.loss)
        h["lr"].append(opt.lr)
        train_ev = model.evaluate(self.X[:TRAIN_EVAL_SAMPLES], self.Y[:TRAIN_EVAL_SAMPLES])
        if train_ev["accuracy"] is not None:  # None: a regression, which has no accuracy
            h["accuracy"].append(train_ev["accuracy"])
        if self.X_val is not None:
            ev = model.evaluate(self.X_val, self.Y_val)
            h["val_loss"].append(ev["loss"])
            if ev["accuracy"] is not None:
                h["val_accuracy"].append(ev["accuracy"])
        h["seconds"].append(time.perf_counter() - end.t0)
        if self.track_gradients:
            norms = gradient_norms(model, *self.probe)
            h["delta_norm"].append(norms["delta"])
            h["dW_norm"].append(norms["dW"])
        if self.dp is not None:
            self.dp.check_in_sync(f"epoch {end.epoch}")
        parts = [f"loss {h['loss'][-1]:.4f}"]
        if h["accuracy"]:
            parts.append(f"train acc {h['accuracy'][-1]:.4f}")
        if self.X_val is not None:
            parts.append(f"val loss {h['val_loss'][-1]:.4f}")
        if h["val_accuracy"]:
            parts.append(f"val acc {h['val_accuracy'][-1]:.4f}")
        parts.append(f"{h['seconds'][-1]:.1f} s")
        return "  ".join(parts)

    def all_counters(self) -> dict[str, float]:
        """The run's counters: those of the checkpoint resumed from plus this process's."""
        out = dict(self.counters)
        loop = getattr(self, "loop", None)
        if loop is not None:
            for key, value in (
                ("train_seconds", loop.train_seconds),
                ("samples", loop.samples),
                ("first_step_seconds", loop.first_step_seconds),
                ("first_step_samples", loop.first_step_samples),
            ):
                out[key] = out.get(key, 0.0) + value
        return out

    def save(self, mid_epoch: bool, stopped: bool) -> None:
        """Write the checkpoint (after an epoch, and when stopped: then always somewhere)."""
        quiet_rank = self.comm is not None and self.comm.rank != 0
        if self.checkpoint is None and stopped and not quiet_rank:
            self.checkpoint = INTERRUPT_CHECKPOINT  # Ctrl-C always leaves something to resume
        if self.checkpoint is None:
            return
        pos, loop = self.loop.pos, self.loop
        rng_state = self.epoch_rng_state if mid_epoch else self.rng.bit_generator.state
        train_cfg = self.config.as_dict()
        train_cfg["dataset"] = self.ds.name  # "auto" resolved, so a resume finds the same data
        if self.ds.file is not None:  # your own file: "auto", and what the file was
            train_cfg["dataset"] = "auto"
            train_cfg["data_files"] = self.ds.file.fingerprints
        train_cfg["track_gradients"] = bool(self.track_gradients)  # the history depends on it
        train_cfg["backend"] = self.model.backend.name  # bit-for-bit resumes need the same one
        train_cfg["mpi_ranks"] = 1 if self.comm is None else int(self.comm.size)
        position = {
            "epoch": pos.epoch,
            "batch": pos.batch,
            "rng_state": dict(rng_state),
            "loss_sum": loop.losses.read(),
            "seen": pos.seen,
        }
        try:
            save_checkpoint(
                self.checkpoint,
                self.model,
                self.optimizer,
                train_cfg,
                position,
                self.history,
                self.all_counters(),
                self.preprocessing,
            )
        except OutputWriteError as exc:  # say where the run stands and how to go on
            raise OutputWriteError(
                exc.errno,
                f"{exc}; training stopped after {pos.epoch} epoch(s) and {pos.batch} batch(es) of "
                f"the next: make room and continue with --resume {self.checkpoint} (from the "
                "last checkpoint written), or pass another --checkpoint",
            ) from None

    def finish(self, interrupted: bool) -> TrainResult:
        """The run's result: its model takes on the preprocessing of raw inputs (as it is
        saved), the dataset's and labels' names, and is scored on the raw test split unless the
        run was ``interrupted`` (then stop promptly: mpirun allows little time after SIGTERM)."""
        c, ds = self.all_counters(), self.ds
        result = TrainResult(
            model=self.model,
            config=self.config,
            dataset=ds.name,
            history=self.history,
            epochs_done=len(self.history["epoch"]),
            samples_trained=int(c["samples"]),
            train_seconds=c["train_seconds"],
            first_step_seconds=c.get("first_step_seconds", 0.0),
            first_step_samples=int(c.get("first_step_samples", 0)),
            interrupted=interrupted,
            checkpoint=None if self.checkpoint is None else os.fspath(self.checkpoint),
        )
        model = self.model  # from here on a model of raw inputs, as it is saved
        model.preprocessing = self.preprocessing
        model.dataset, model.labels = ds.name, tuple(ds.classes) or None
        if ds.file is not None:
            take_on_file_data(model, ds.file)
        if interrupted:
            where = result.checkpoint
            self.log(
                f"interrupted after {result.epochs_done} epoch(s); checkpoint written to {where}"
            )
            self.log(f"continue with the same command plus: --resume {where}")
        else:
            x_raw = ds.x_test_raw  # the raw test inputs the loader kept: no second read
            if x_raw is None:  # a Dataset built by hand
                x_raw = raw_test_split(ds.name, ds.source if ds.name in data.DATASETS else None).x
            ev = model.evaluate(x_raw, ds.y_test)
            result.test_loss, result.test_accuracy = ev["loss"], ev["accuracy"]
            if ev["accuracy"] is None:  # a regression: the MSE loss is half the mean square
                result.extra["test_rmse"] = float(np.sqrt(2.0 * float(ev["loss"] or 0.0)))
        before = getattr(self, "graphs_before", None)
        if before is not None:  # a backend with CUDA graphs: whether this run's steps were
            graphs = self.model.backend.capture_report(since=before)
            if graphs is not None:
                result.extra["cuda_graphs"] = graphs
                self.log(graphs_line(graphs))
        if self.comm is not None:
            result.extra["mpi_ranks"] = self.comm.size
        if self.resumed:  # the training time and samples/s count every session since epoch 1
            result.extra["sessions"] = "over all sessions of this run"
        return result


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
    override: Sequence[str] = (),
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
        Continue from this checkpoint; it must match ``config`` (``epochs`` may grow). A
        checkpoint that has finished ``config.epochs`` is only evaluated.
    json_path, plot_path, save_path : path, optional
        Write the run's record as JSON, loss/accuracy curves as a PNG, the final model
        (:meth:`MLP.save`).
    track_gradients : bool
        Record per-layer ``||delta^l||`` and ``||dW^l||`` after each epoch (see
        :func:`gradient_norms`) in ``history["delta_norm"]`` and ``history["dW_norm"]``.
    progress : bool
        Redraw a live progress bar on stderr when it is a terminal (the epoch lines go to
        ``log`` either way).
    log : callable
        Receives the run's report lines, one per epoch among them (default: print to stdout).
    comm : gpubp.distributed.MPICommunicator, optional
        Train data-parallel over its ranks (see :mod:`gpubp.distributed`): every rank calls
        ``train`` with the same arguments; rank 0 alone logs and writes files.
    override : sequence of str
        Settings a resumed run may change from its checkpoint's
        (:data:`~gpubp.checkpoint.OVERRIDABLE`: ``lr``), e.g. to continue a diverged run with a
        smaller learning rate.

    Everything checkable is checked before the first epoch: output folders exist and are
    writable, outputs are distinct files (else :class:`~gpubp.errors.OutputPathError`, which
    carries the argument's command-line option), the dataset's splits fit together. A trained
    model that cannot be written is written to a second place (next to the checkpoint, the
    current folder, the temporary folder); :class:`~gpubp.errors.OutputWriteError` says where.
    """
    t_start = time.perf_counter()
    if comm is not None and comm.rank != 0:  # one voice and one writer: rank 0
        log, progress = _silent, False
        checkpoint = json_path = plot_path = save_path = None
    outputs = dict(checkpoint=checkpoint, save_path=save_path, json_path=json_path)
    outputs["plot_path"] = plot_path
    ckpt = check_before_the_run(outputs, resume, override, rank0=comm is None or comm.rank == 0)
    if ckpt is not None:  # the settings first, before any data is read; the widths after
        check_resume_settings(ckpt, config, track_gradients, override)
    get_backend(config.backend)  # one that cannot run here is refused before the data is read
    check_outputs(outputs, run_inputs(resume, config))  # no output may overwrite an input
    ds, config, split = load_data(config, ckpt, progress, log)
    check_outputs(outputs, run_inputs(resume, config, ds))  # (the dataset's files, found)
    run = _Run(config, ds, split, track_gradients, outputs["checkpoint"], log, comm)
    if ckpt is not None:
        run.resume_from(ckpt, override)
    for line in run.describe():
        log(line)
    trained = not run.finished
    if not trained:
        n = config.epochs
        log(f"the checkpoint has finished all {n} epochs; pass --epochs M > {n} to train further")
    result = run.finish(run.run_epochs(progress) if trained else False)
    result.wall_seconds = time.perf_counter() - t_start
    log(final_line(result, len(ds.x_test), trained))
    write_outputs(result, save_path, json_path, plot_path, log)
    return result
