"""What a training run produces (:class:`TrainResult`) and writes at its end (the model, the JSON
record, the curves), and how a failed write keeps the trained model: it is written to a second
place and the error says where.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plots
from .backends import backend_label
from .config import TrainConfig
from .errors import OutputWriteError
from .files import write_json
from .model import MLP

__all__ = ["TrainResult", "fallback_paths", "final_line", "write_outputs"]

Log = Callable[[str], None]


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
    #: the first step of each process, kept out of the speed: it compiles kernels (numba) or
    #: captures graphs (cupy)
    first_step_seconds: float = 0.0
    first_step_samples: int = 0
    wall_seconds: float = 0.0
    interrupted: bool = False
    checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        """Training speed without the first step of each process (see ``first_step_seconds``),
        or over every step when the first was all there was."""
        seconds = self.train_seconds - self.first_step_seconds
        samples = self.samples_trained - self.first_step_samples
        if seconds <= 0 or samples <= 0:
            seconds, samples = self.train_seconds, self.samples_trained
        return samples / seconds if seconds > 0 else 0.0

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
            "first_step_seconds": self.first_step_seconds,
            "wall_seconds": self.wall_seconds,
            "samples_per_second": self.samples_per_second,
            "checkpoint": self.checkpoint,
            "history": self.history,
            **self.extra,
        }


def final_line(result: TrainResult, n_test: int, trained: bool) -> str:
    """The run's last line: the test score on ``n_test`` samples (or why there is none), the
    time (with the training's speed when the process ``trained``), the backend."""
    if result.interrupted:
        test = "test evaluation skipped (interrupted)"
    elif "test_rmse" in result.extra:  # a regression: the error in the target's units
        test = (
            f"test RMSE {result.extra['test_rmse']:.4g} (loss {result.test_loss:.4g}) on "
            f"{n_test} {result.dataset} test rows"
        )
    else:
        test = (
            f"test accuracy {result.test_accuracy:.4f} (loss {result.test_loss:.4f}) on "
            f"{n_test} {result.dataset} test samples"
        )
    resumed = "sessions" in result.extra  # the training counts every session, the wall one
    timing = f"wall time {result.wall_seconds:.1f} s" + (" in this session" if resumed else "")
    if trained:
        timing += f" (training {result.train_seconds:.1f} s"
        if resumed:
            timing += f" {result.extra['sessions']}"
        if result.first_step_seconds > 0:
            timing += f", of which the first steps {result.first_step_seconds:.1f} s"
        timing += f"; {result.samples_per_second:,.0f} samples/s"
        if result.first_step_seconds > 0:
            timing += " after the first steps"
        timing += ")"
    model, ranks = result.model, result.extra.get("mpi_ranks")
    return (
        f"{test} | {result.epochs_done} epoch(s), {timing} | backend "
        f"{backend_label(model.backend)} {model.dtype.name}"
        + (f" x {ranks} MPI ranks" if ranks is not None else "")
    )


def graphs_line(report: dict[str, Any]) -> str:
    """The run's line on CUDA graphs, from :meth:`CupyBackend.capture_report`."""
    counts = f"{report['graph_steps']} step(s) replayed as a graph, {report['eager_steps']} eager"
    if report["captured"]:
        first = "the first step of each batch shape and parameter set is eager"
        return f"CUDA graphs: captured ({counts}; {first})"
    return f"CUDA graphs: NOT captured ({counts}): {report['why_not']}"


def fallback_paths(
    path: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None
) -> list[Path]:
    """Where an output that could not be written at ``path`` is written instead, in order: next
    to the checkpoint, in the current folder, in the temporary folder (each under ``path``'s
    file name, or ``<stem>.rescued-<pid><suffix>`` where that exists: no file is overwritten)."""
    name = Path(path).name
    folders = [Path(checkpoint).parent] if checkpoint is not None else []
    folders += [Path.cwd(), Path(tempfile.gettempdir())]
    avoid = {os.path.realpath(path)}
    if checkpoint is not None:
        avoid.add(os.path.realpath(checkpoint))
    out: list[Path] = []
    for folder in folders:
        candidate = folder / name
        if os.path.lexists(candidate):  # never overwrite a file there: a name of its own
            candidate = folder / f"{Path(name).stem}.rescued-{os.getpid()}{Path(name).suffix}"
        real = os.path.realpath(candidate)
        if real not in avoid and not os.path.lexists(candidate):
            avoid.add(real)
            out.append(candidate)
    return out


def _write_with_fallback(
    what: str,
    path: str | os.PathLike[str],
    write: Callable[[str | os.PathLike[str]], None],
    checkpoint: str | None,
    log: Log,
) -> tuple[str | None, OSError | None]:
    """``write(path)``, else ``write`` to each :func:`fallback_paths` in turn; where it went
    (None: nowhere) and the first error."""
    try:
        write(path)
        return os.fspath(path), None
    except OSError as exc:
        first = exc
    log(f"error: {first}")
    for candidate in fallback_paths(path, checkpoint):
        try:
            write(candidate)
        except OSError as exc:
            log(f"error: the {what} could not be written to {candidate} either: {exc}")
            continue
        log(f"the {what} was written to {candidate} instead of {os.fspath(path)}")
        return os.fspath(candidate), first
    return None, first


def write_outputs(
    result: TrainResult,
    save_path: str | os.PathLike[str] | None,
    json_path: str | os.PathLike[str] | None,
    plot_path: str | os.PathLike[str] | None,
    log: Log,
) -> None:
    """Write the model, the run's record and the curves; raise
    :class:`~gpubp.errors.OutputWriteError` after trying them all if any failed, saying what
    was written where and what is still intact (the checkpoint)."""
    model, history, config = result.model, result.history, result.config
    failures: list[str] = []
    first: OSError | None = None
    if save_path is not None:
        where, error = _write_with_fallback(
            "trained model", save_path, model.save, result.checkpoint, log
        )
        if where is not None:
            log(f"model saved to {where} (load it with gpubp.MLP.load)")
            if result.interrupted:
                log(
                    f"note: the run was interrupted after {result.epochs_done} epoch(s) of "
                    f"{config.epochs}; the model saved to {where} is only partly trained"
                )
        if error is not None:
            first = first or error
            failures.append(
                f"the trained model could not be written to {os.fspath(save_path)} ({error}); "
                + (f"it was written to {where} instead" if where else "nor anywhere else")
            )
    if json_path is not None:
        where, error = _write_with_fallback(
            "run record",
            json_path,
            lambda p: write_json(p, result.summary()),
            result.checkpoint,
            log,
        )
        if where is not None:
            log(f"run record written to {where}")
        if error is not None:
            first = first or error
            failures.append(
                f"the run record could not be written to {os.fspath(json_path)} ({error})"
                + (f"; it was written to {where} instead" if where else "")
            )
    if plot_path is not None and history["epoch"]:
        try:
            plots.training_curves(
                history,
                plot_path,
                title=f"{result.dataset}: {list(model.layer_sizes)} {config.activation}, "
                f"{config.optimizer}, {model.backend.name}",
                test_accuracy=result.test_accuracy,
            )
            log(f"loss and accuracy curves written to {plot_path}")
        except OSError as exc:
            first = first or exc
            failures.append(f"the curves could not be written to {os.fspath(plot_path)} ({exc})")
    if failures:
        intact = (
            f"the checkpoint {result.checkpoint} holds the trained run and is intact"
            if result.checkpoint is not None
            else "no checkpoint was written (pass --checkpoint to keep one)"
        )
        code = first.errno if first is not None and first.errno else errno.EIO
        raise OutputWriteError(code, "; ".join(failures) + f"; {intact}")
