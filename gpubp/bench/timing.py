"""Timing: interleaved round-robin samples with a settle pause, their statistics, and the busy
processes of ``--load``.

The one timing loop of the project's benchmarks: :meth:`Candidate.timed` runs ``n`` steps with
the device synchronised inside the timed region; :func:`time_round_robin` calibrates, warms up
and takes the samples of every candidate interleaved.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TextIO

import numpy as np

DEFAULT_REPEATS, QUICK_REPEATS = 21, 7
DEFAULT_MIN_TIME, QUICK_MIN_TIME = 0.05, 0.01
#: Seconds to wait before each sample, for the previous candidate's spinning threads to sleep.
DEFAULT_SETTLE = 0.15
#: Seconds the busy processes of :func:`busy_processes` get to start spinning.
LOAD_START = 0.2


class Steps(Protocol):
    """What :func:`run_steps` runs: a step, and a wait for the device's queued work."""

    def step(self) -> None: ...

    def sync(self) -> None: ...


class Timed(Protocol):
    """What :func:`time_round_robin` times (a :class:`~gpubp.bench.Candidate`, for one)."""

    label: str

    def timed(self, n: int) -> float: ...

    def reset(self) -> None: ...


@dataclass
class Stats:
    """Seconds per step over the samples, and their relative interquartile spread."""

    median: float
    min: float
    max: float
    spread: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        s = np.asarray(samples, dtype=np.float64)
        q25, med, q75 = np.percentile(s, [25, 50, 75])
        return cls(float(med), float(s.min()), float(s.max()), float((q75 - q25) / med), list(s))


class Progress:
    """A one-line progress report on ``stream``: redrawn in place on a terminal, else one line
    per group of candidates."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.t0 = time.perf_counter()
        self.last = 0.0

    def group(self, text: str) -> None:
        self.prefix = text
        if self.stream is not None and not self.tty:
            self.stream.write(f"gpubp bench: {text}\n")
            self.stream.flush()
        self.update("")

    def update(self, text: str) -> None:
        now = time.perf_counter()
        if not self.tty or self.stream is None or now - self.last < 0.1:
            return
        self.last = now
        line = f"gpubp bench [{now - self.t0:5.0f}s] {self.prefix} {text}"
        self.stream.write("\r\033[K" + line[:150])
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()


def run_steps(c: Steps, n: int) -> float:
    """Seconds for ``n`` steps of ``c``, the device synchronised inside the timed region.

    The default of :meth:`Candidate.timed`; a candidate that runs elsewhere (a worker process)
    times itself there.
    """
    c.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        c.step()
    c.sync()
    return time.perf_counter() - t0


def time_round_robin(
    cands: Sequence[Timed],
    repeats: int,
    min_time: float,
    progress: Progress | None = None,
    settle: float = 0.0,
) -> dict[str, Stats]:
    """Per candidate, :class:`Stats` of seconds per step over ``repeats`` samples.

    Each candidate is warmed up and calibrated to ``n`` steps per sample (at least ``min_time``
    seconds); then sample ``r`` of every candidate is taken before sample ``r + 1`` of any, the
    order reversed every other round, each sample after a reset of the parameters
    (:meth:`Candidate.reset`), a pause of ``settle`` seconds and one untimed re-warming step.
    A sample is :meth:`Candidate.timed` (``n`` steps) divided by ``n``.
    """
    steps: dict[str, int] = {}
    for c in cands:
        c.timed(2)  # warm-up: first-call costs (allocation, compilation, capture)
        once = sorted(c.timed(1) for _ in range(3))[1]  # the median: robust to a stall
        steps[c.label] = max(1, math.ceil(min_time / max(once, 1e-9)))
    samples: dict[str, list[float]] = {c.label: [] for c in cands}
    for r in range(repeats):
        order = list(cands) if r % 2 == 0 else list(reversed(cands))
        for c in order:
            if progress is not None:
                progress.update(f"{c.label}: sample {r + 1}/{repeats}")
            c.reset()
            if settle:
                time.sleep(settle)
            c.timed(1)
            n = steps[c.label]
            samples[c.label].append(c.timed(n) / n)
    return {label: Stats.of(s) for label, s in samples.items()}


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """Inside, ``n`` other processes spin on the CPU (``while True: pass``), as other work on
    a shared machine would; they are killed on the way out."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    try:
        if procs:
            time.sleep(LOAD_START)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
