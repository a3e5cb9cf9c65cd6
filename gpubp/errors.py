"""Exceptions raised by gpubp; each message says what was wrong, what was expected, what to do."""

from __future__ import annotations

import os
from collections.abc import Mapping


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (not installed, no GPU, not built yet).

    ``backend``: the name asked for; ``why``: the reason; ``available``: the backends that can
    run here. ``str()`` words the way out for Python (``backend='auto'``);
    :meth:`command_line_message` for the command line (``--backend auto``).
    """

    def __init__(self, backend: str, why: str, available: list[str]) -> None:
        self.backend, self.why, self.available = backend, why, list(available)
        super().__init__(self._text("backend='auto'"))

    def _text(self, auto: str) -> str:
        return (
            f"backend={self.backend!r} cannot run here: {self.why}. Available now: "
            f"{', '.join(self.available)}; pass {auto} to take the best of them"
        )

    def command_line_message(self) -> str:
        """The message with the command line's option, ``--backend auto``."""
        return self._text("--backend auto")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss or gradient; the parameters were kept."""


class ModelFileError(ValueError):
    """A saved model or checkpoint file is missing parts, malformed, or does not match."""


class NoPreprocessingWarning(UserWarning):
    """A model file written before models carried their preprocessing: its inputs are used as
    given, so they must be preprocessed as they were in training."""


class CheckpointError(ModelFileError):
    """A checkpoint file is missing parts, malformed, or holds values a run cannot resume from
    (a :class:`ModelFileError`, so ``except ModelFileError`` still catches it)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written by a run with other settings than the one resuming it."""


class DatasetError(ValueError):
    """A dataset file is corrupt, truncated, or not what its checksum says."""


class OutputWriteError(OSError):
    """A result could not be written (a full disk, a read-only folder); the message names the
    file, says what was written where instead and what is still intact. ``errno`` is the
    underlying error's."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message, without "[Errno N]"


class OutputPathError(ValueError):
    """Output paths that cannot work: one file given for two outputs, a folder where a file is
    to be written, an input given as an output. Raised before a run starts.

    The error names the argument that gave the path; a command line names its option instead
    (:meth:`command_line_message`).

    Attributes
    ----------
    argument : str
        The argument that gave the path, e.g. ``save_path``.
    option : str or None
        The command-line option that sets it, e.g. ``--save`` (None where there is none).
    path : str
        The path.
    other, other_option : str or None
        The argument (and its option) of the other path it clashes with, if any.
    """

    def __init__(
        self,
        argument: str,
        path: str | os.PathLike[str],
        problem: str,
        other: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        options = options or {}
        self.argument, self.path, self.other = argument, os.fspath(path), other
        self.option = options.get(argument)
        self.other_option = None if other is None else options.get(other)
        #: what is wrong, after the path: ``{other}`` stands for the other path's name
        self.problem = problem
        super().__init__(self._say(f"{argument}=", other))

    def _say(self, name: str, other: str | None) -> str:
        # a plain replace, not str.format: a problem without another path may quote a folder
        problem = self.problem if other is None else self.problem.replace("{other}", other)
        return f"{name}{self.path!r}{problem}"

    def command_line_message(self) -> str:
        """The message in a command line's words: ``--save 'm.npz' is a folder; ...``."""
        if self.option is None:
            return str(self)
        return self._say(f"{self.option} ", self.other_option or self.other)


class MissingFolderError(OutputPathError, FileNotFoundError):
    """An output's folder does not exist (an :class:`OutputPathError` and a
    :class:`FileNotFoundError`). Raised before a run starts."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is nowhere it was looked for; the message lists where and how to get it."""


class DeviceOutOfMemoryError(MemoryError):
    """The GPU has too little free memory for a step; the message gives the bytes asked for and a
    batch size that would fit."""


class MemoryBudgetError(ValueError, MemoryError):
    """An input (a file's declared shapes, an option such as ``--batch-size`` or ``--layers``)
    asks for more memory than this machine can hold; refused before anything is allocated. The
    message gives the bytes, the limit and how to raise it (``GPUBP_MEMORY_LIMIT``). A
    :class:`ValueError` (a bad argument) and a :class:`MemoryError`."""


class ConcurrentUseError(RuntimeError):
    """A model is already being trained or updated by another thread; one model takes one
    training call at a time (use one model per thread)."""


class DistributedError(RuntimeError):
    """MPI is missing, or the ranks disagree (parameters out of sync)."""


class GraphCaptureError(RuntimeError):
    """The train step could not be captured as a CUDA graph where graphs were required
    (``GPUBP_CUDA_GRAPHS=require``, ``CupyBackend(graphs="require")``); the message names the
    first call that broke the capture. Nothing was updated."""


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than ``CUBLAS_STATUS_SUCCESS``."""


class NvrtcError(RuntimeError):
    """NVRTC refused a program; the message holds its log."""


class PlotUnavailableError(ImportError):
    """matplotlib is needed for a plot and is not installed."""
