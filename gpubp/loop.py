"""The one epoch loop behind :meth:`gpubp.MLP.fit`, :func:`gpubp.train.train` and
:func:`gpubp.gradflow.gradflow`: draw the order, slice the batches, run the step, show progress,
honour a stop request, hand each finished epoch to the caller (each batch's rows are gathered by
:class:`gpubp.gather.BatchGather`).

Output follows one rule everywhere: a live bar (redrawn in place) on stderr only when stderr is a
terminal, and one plain line per epoch through ``echo`` (stdout), so a log file gets the epoch
lines and no carriage returns.

Losses stay as the backend returns them (device scalars on a GPU) in a :class:`LossSum`, read only
when the bar is redrawn or the epoch ends, so the loop never waits for the device per step.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .backends import Backend
from .errors import ConcurrentUseError

__all__ = [
    "EpochEnd",
    "EpochLoop",
    "LossSum",
    "OneCaller",
    "Position",
    "Progress",
    "StopRequest",
]

Echo = Callable[[str], None]

#: Backends whose first step compiles kernels, announced once per process.
#: About how long one run of a backend's many-step call (``EpochLoop.run``'s ``steps``) takes,
#: and the most batches one takes: progress and a stop request are seen between runs.
RUN_SECONDS = 0.1
MAX_RUN = 64

_COMPILING = {"numba": "compiling the numba kernels (first run only; later runs use the cache)"}
_announced: set[str] = set()


def _kernels_cached(name: str) -> bool:
    """Whether the backend's compiled kernels are on disk already (then nothing is said)."""
    if name != "numba":
        return False
    from .backends.numba.cache import cache_dir

    return any(cache_dir().rglob("kernels.*.nbi"))


class OneCaller:
    """One thread at a time in an object's mutating calls: a second thread is refused at once
    with :class:`~gpubp.errors.ConcurrentUseError` (never blocked, never interleaved: two
    threads updating the same parameters in place would mix their updates, NaN included). The
    thread inside may call in again (``fit`` runs ``step``). Pickles as a fresh, free guard.
    ``with guard("fit"):`` holds it; a per-step caller may use :attr:`lock` and
    :meth:`refusal` inline."""

    def __init__(self, what: str = "model") -> None:
        self.what = what
        self.lock = threading.RLock()  # reentrant: the holder may call in again

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what,))

    def __call__(self, call: str) -> _Held:
        return _Held(self, call)

    def refusal(self, call: str) -> ConcurrentUseError:
        return ConcurrentUseError(
            f"{call}: this {self.what} is being trained or updated by another thread; one "
            f"{self.what} takes one fit, train_step or set_parameters at a time: wait for "
            "that call to return, or give each thread its own model"
        )


class _Held:
    """``with guard(call):``: the guard's lock held inside, or the refusal raised."""

    __slots__ = ("call", "guard")

    def __init__(self, guard: OneCaller, call: str) -> None:
        self.guard, self.call = guard, call

    def __enter__(self) -> None:
        if not self.guard.lock.acquire(blocking=False):
            raise self.guard.refusal(self.call)

    def __exit__(self, *exc: object) -> None:
        self.guard.lock.release()


class LossSum:
    """Batch losses weighted by batch size, summed when read.

    The values stay as the backend returned them (device scalars on a GPU) until :meth:`read`,
    which sums every pending one in a single synchronisation, so a training loop that reads the
    running loss only when its progress bar is redrawn never waits for the device per step. At
    most ``fold`` values are kept pending: the next :meth:`add` reads them first (one
    synchronisation per ``fold`` steps), so an epoch of 10^6 steps without a progress bar keeps
    ``fold`` device scalars alive, not one per step. The sum is the same whenever it is read.

    Where the backend sums the losses where its steps run (``backend.open_loss_sum``: the CuPy
    backend's steps add ``rows * loss`` to a float64 total on the device, in step order, as this
    class does), the values it added are not kept at all, and :meth:`read` is one transfer of the
    total, the same bits as the host's sum. A value it did not add (another backend's, or a step
    before this sum was opened) is summed here and added after the device's total.
    """

    #: Pending values at most (see the class docstring).
    FOLD = 4096

    def __init__(self, backend: Backend, total: float = 0.0, fold: int = FOLD) -> None:
        self.backend = backend
        self.total = float(total)
        self.fold = int(fold)
        self.values: list[Any] = []
        self.weights: list[int] = []
        self.device = backend.open_loss_sum(self.total)
        self._on_device = False  # some value was added by the device

    def add(self, value: Any, weight: int) -> None:
        if self.device is not None and self.device.holds(value, weight):
            self._on_device = True  # already in the device's total: nothing to keep
            return
        if len(self.values) >= self.fold:
            self.read()
        self.values.append(value)
        self.weights.append(weight)

    def describe(self, n: int) -> Callable[[], str]:
        """For a progress bar: the text of the mean loss over ``n`` samples, read when shown."""
        return lambda: f"loss {self.read() / max(n, 1):.4f}"

    def read(self) -> float:
        """The weighted sum so far (a synchronisation point: a deferred error is raised here)."""
        if self._on_device:  # the device's total started at self.total and holds its values
            assert self.device is not None
            self.total = self.device.read()
            self.device = self.backend.open_loss_sum(self.total)  # the next values from here
            self._on_device = False
        if self.values:
            # one value at a time, in order: the same sum whenever it is read (a resumed run
            # reproduces an uninterrupted one bit for bit)
            for v, w in zip(self.backend.read_losses(self.values), self.weights):
                self.total += v * w
            self.values, self.weights = [], []
        return self.total


class Progress:
    """One epoch's progress: a bar on stderr redrawn at most ten times a second when ``live``,
    and the line ``"<label>: <summary>"`` through ``echo`` when it closes.

    ``info`` may be a callable, called only when the bar is redrawn (reading a loss from a GPU
    waits for it, which must not happen on every step).
    """

    def __init__(
        self, label: str, total: int, *, live: bool, echo: Echo | None, width: int = 30
    ) -> None:
        self.label, self.total, self.live, self.echo = label, max(total, 1), live, echo
        self.width = width
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.drawn = False

    def update(self, done: int, info: str | Callable[[], str] = "") -> None:
        now = time.perf_counter()
        if not self.live or (now - self.last < 0.1 and done < self.total):
            return
        self.last, self.drawn = now, True
        if callable(info):
            info = info()
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {info} {now - self.t0:.1f}s")
        sys.stderr.flush()

    def close(self, summary: str) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        if self.echo is not None:
            self.echo(f"{self.label}: {summary}")


def live_bar(progress: bool) -> bool:
    """Whether to redraw a bar in place: asked for, and stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(progress and callable(isatty) and isatty())


class StopRequest:
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

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Position:
    """Where a run stands: ``epoch`` epochs finished, ``batch`` batches and ``seen`` samples
    into the next one."""

    epoch: int = 0
    batch: int = 0
    seen: int = 0


@dataclass
class EpochEnd:
    """A finished epoch, as handed to the caller's ``end_epoch``."""

    epoch: int  # 1-based
    loss: float  # mean training loss over the epoch's samples
    seconds: float  # the steps' time (synchronised), without what ``end_epoch`` does
    t0: float  # ``time.perf_counter()`` when the epoch began


class EpochLoop:
    """``epochs`` passes over ``n`` samples in batches of ``batch_size``.

    Counters (over this loop's life): ``train_seconds`` and ``samples`` for every step, and with
    ``time_first_step``, ``first_step_seconds`` and ``first_step_samples`` for the first one
    alone, which also compiles kernels or captures graphs and so is kept out of the speed (see
    :attr:`speed`).
    """

    def __init__(
        self,
        backend: Backend,
        n: int,
        batch_size: int,
        epochs: int,
        *,
        progress: bool,
        echo: Echo | None,
        label: Callable[[int], str] | None = None,
        position: Position | None = None,
        loss_sum: float = 0.0,
        time_first_step: bool = False,
    ) -> None:
        self.backend, self.n, self.batch_size, self.epochs = backend, n, batch_size, epochs
        self.n_batches = math.ceil(n / batch_size)
        self.live, self.echo = live_bar(progress), echo
        self.label = label or (lambda e: f"epoch {e}/{epochs}")
        self.pos = position or Position()
        self.losses = LossSum(backend, loss_sum)
        self.train_seconds = self.first_step_seconds = 0.0
        self.samples = self.first_step_samples = 0
        self._first = True
        self._time_first = time_first_step
        self._run = 1  # the batches the next run of ``steps`` may take (see run)
        self._first_run = True  # the first run of ``steps`` compiles its kernels

    @property
    def step_index(self) -> int:
        """The global index (0-based) of the step about to run."""
        return self.pos.epoch * self.n_batches + self.pos.batch

    @property
    def speed(self) -> float:
        """Samples per second over the steps after the first (all of them if only one ran)."""
        seconds = self.train_seconds - self.first_step_seconds
        samples = self.samples - self.first_step_samples
        if seconds <= 0 or samples <= 0:
            seconds, samples = self.train_seconds, self.samples
        return samples / seconds if seconds > 0 else 0.0

    def _run_step(self, step: Callable[[Any], Any], idx: Any) -> Any:
        if not self._first:
            return step(idx)
        self._first = False
        name = self.backend.name
        if name in _COMPILING and name not in _announced and self.echo is not None:
            _announced.add(name)
            if not _kernels_cached(name):
                self.echo(_COMPILING[name])
        if not self._time_first:
            return step(idx)
        t0 = time.perf_counter()
        value = step(idx)
        self.backend.synchronize()  # on a GPU one wait per run, not per step
        self.first_step_seconds = time.perf_counter() - t0
        self.first_step_samples = int(idx.shape[0])
        return value

    def _run_steps(
        self, steps: Callable[[Any, int, int], Sequence[Any] | None], order: Any, bs: int
    ) -> tuple[Sequence[Any] | None, int]:
        """One run of ``steps`` over the full batches from the current one (at most
        ``self._run``, which follows the time a run takes); its losses, counted in, and the
        batches asked for."""
        pos = self.pos
        count = min(self._run, self.n // bs - pos.batch)
        if count < 1:
            return (), 0
        t0 = time.perf_counter()
        values = steps(order, pos.batch, count)
        spent = time.perf_counter() - t0
        if values is None:
            return None, count
        if self._time_first and self._first_run:  # it compiles: kept out of the speed too
            self._first_run = False
            self.first_step_seconds += spent
            self.first_step_samples += bs * len(values)
        for v in values:
            self.losses.add(v, bs)
        pos.seen += bs * len(values)
        pos.batch += len(values)
        if len(values) == count:
            grow = RUN_SECONDS / max(spent, 1e-9) * count
            self._run = max(1, min(MAX_RUN, int(grow)))
        return values, count

    def run(
        self,
        step: Callable[[Any], Any],
        draw_order: Callable[[], Any],
        end_epoch: Callable[[EpochEnd], str],
        *,
        stop: Callable[[], bool] = lambda: False,
        save: Callable[[bool, bool], None] | None = None,
        steps: Callable[[Any, int, int], Sequence[Any] | None] | None = None,
    ) -> bool:
        """Train until ``epochs`` are done or ``stop()`` says so; True if stopped early.

        ``draw_order()`` gives the order of an epoch's samples (host indices, drawn even when
        the epoch resumes part-way); ``step(idx)`` trains on one batch and returns its loss
        unread; ``end_epoch`` records a finished epoch and returns its summary line;
        ``save(mid_epoch, stopped)`` is called after each epoch and when stopped part-way.
        ``steps(order, first, count)``, where given, trains on up to ``count`` full batches
        from batch ``first`` of ``order`` at once (a backend's
        :meth:`~gpubp.backends.Backend.train_steps`) and returns their losses; the batches it
        leaves go to ``step``, and all of them once it returns None. Runs of them are sized
        to take about :data:`RUN_SECONDS`, so the progress and ``stop()`` are seen as often as
        that.
        """
        pos, be, bs = self.pos, self.backend, self.batch_size
        while pos.epoch < self.epochs:
            order = be.asarray(draw_order())
            bar = Progress(
                self.label(pos.epoch + 1), self.n_batches, live=self.live, echo=self.echo
            )
            t0, seen_before = time.perf_counter(), pos.seen
            alone = self._first  # the next batch goes to step: the first, or one steps left
            while pos.batch < self.n_batches and not stop():
                if steps is not None and not alone:
                    values, asked = self._run_steps(steps, order, bs)
                    if values is None:  # never on this backend or data: every step alone
                        steps, values = None, ()
                    alone = len(values) < asked
                    if values:
                        bar.update(pos.batch, self.losses.describe(pos.seen))
                        continue
                idx = order[pos.batch * bs : (pos.batch + 1) * bs]
                self.losses.add(self._run_step(step, idx), int(idx.shape[0]))
                pos.seen += int(idx.shape[0])
                pos.batch += 1
                alone = False
                bar.update(pos.batch, self.losses.describe(pos.seen))
            complete = pos.batch == self.n_batches
            # wait for the queued steps: reading the epoch's losses does (one transfer on a GPU)
            if complete:
                total = self.losses.read()
            else:
                be.synchronize()
            self.train_seconds += time.perf_counter() - t0
            self.samples += pos.seen - seen_before
            if not complete:  # stopped inside the epoch
                bar.close(f"interrupted at batch {pos.batch}/{self.n_batches}")
                if save is not None:
                    save(True, True)
                return True
            end = EpochEnd(pos.epoch + 1, total / max(pos.seen, 1), 0.0, t0)
            end.seconds = time.perf_counter() - t0
            pos.epoch, pos.batch, pos.seen = pos.epoch + 1, 0, 0
            self.losses = LossSum(be)
            bar.close(end_epoch(end))
            stopped = stop() and pos.epoch < self.epochs
            if save is not None:
                save(False, stopped)
            if stopped:
                return True
        return False
