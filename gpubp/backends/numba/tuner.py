"""How many threads a step gets, chosen from the step times themselves.

A step's GEMMs and parallel passes split their work into equal parts, one per thread, and wait
for the slowest. On a machine that other processes share, a thread whose core is busy runs
only part of the time, and the whole team waits for it at every GEMM: measured on 2 cores with
one busy process beside it, the default job ran 2.2x slower on both cores than on one. How many
cores are free is not known in advance and changes while a job runs, so the step counts are
tried instead: the step times at the current count and at a neighbouring one (one thread fewer
or more) are compared, and the faster count is kept.

- A *probe* runs :attr:`ThreadTuner.window` steps at another count; the median time per row of
  those steps is compared with the current count's (medians, so a stray slow step does not
  decide). A count at least :data:`GAIN` faster is taken, and the probe goes on in the same
  direction. The count tried is the number of cores other processes left free since the last
  decision, where Linux tells it (``/proc/stat``, :func:`~gpubp.backends.cores.free_cores`)
  and it differs from the current count; else a neighbour, one fewer or one more, in turn.
  (Past the free cores, more threads are about equally slow, each waits a time slice for its
  busy core, so neighbours alone could not find the way down from many cores.) Where Linux
  says the current count is what is free, only one thread fewer is tried: a probe above the
  free cores is skipped (on 2 cores beside a busy process, each such probe ran its 8 steps
  about 10x slower).
- A job started beside a busy process starts at the free cores: where Linux says fewer cores
  than the count were free during the first step, the next steps run at that many; where it
  could not tell then, the first probe comes right after the first :attr:`ThreadTuner.window`
  steps if fewer were free during them, else after :attr:`ThreadTuner.shortest` steps. (It
  used to run its first 64 steps on a team that waits for its busy core: 1.9 s of the default
  job's 3 epochs.)
- Between probes the current count *holds* for ``hold`` steps; a probe that does not win
  doubles ``hold`` (up to :attr:`ThreadTuner.longest`), so on a quiet machine the probes cost
  well under 1% of the steps. When the current count's recent median slows by :data:`ALARM`
  (another process started), ``hold`` drops back and a probe starts at once.

The counts change only the partition of the work: with MKL in its strict reproducible mode
(the only provider whose counts are tuned; with OpenBLAS the count stays fixed) and the
elementwise passes (per element, whatever the chunks), a step's results are the same at every
count (``tests/test_thread_tuner.py`` checks it bit for bit).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from ..cores import cpu_times, free_cores

Reading = tuple[float, float, float]

#: A count must be at least this much faster (per row, median) to be taken.
GAIN = 0.93
#: The current count's recent median this much slower than when it was chosen starts a probe.
ALARM = 1.3


class ThreadTuner:
    """The thread count of each step of one network and batch size, from ``1`` to ``most``.

    Call :meth:`threads` before a step and :meth:`record` with its time and rows after it.
    """

    #: Steps per measurement (a probe, and the recent median of the current count).
    window: int = 8
    #: Steps the current count holds after it is chosen, before the first probe.
    shortest: int = 64
    #: The longest hold between probes (on 2 cores about 2 seconds of the default job).
    longest: int = 1024

    def __init__(self, most: int, load: Callable[[], Reading | None] | None = cpu_times) -> None:
        self.most = max(1, int(most))
        self._load = load
        self._mark: Reading | None = None
        self._take_mark()
        self.current = self.most
        self.hold = self.shortest
        self.direction = -1  # the next probe: one thread fewer (-1) or more (+1)
        self.probe: int | None = None
        self.baseline: float | None = None  # the current count's median per row when chosen
        self._recent: list[float] = []  # the current count's last per-row times
        self._probe_times: list[float] = []
        self._since = 0  # steps since the current count was chosen or last probed
        self.steps = 0
        #: ``(step, count)`` at the last 100 changes of the current count
        self.history: list[tuple[int, int]] = []

    def threads(self) -> int:
        """The count for the next step."""
        return self.probe if self.probe is not None else self.current

    def run_length(self) -> int:
        """How many steps from now on run at :meth:`threads`'s count before the tuner may
        change it (at least 1): steps taken in one call must not straddle a change."""
        if self.probe is not None:
            return max(1, self.window - len(self._probe_times))
        if self.most == 1:
            return 1 << 30
        if len(self._recent) < self.window:
            return self.window - len(self._recent)
        return max(1, self.hold - self._since)

    def record(self, seconds: float, rows: int) -> None:
        """Note that the step just run took ``seconds`` for ``rows`` rows."""
        t = seconds / max(1, rows)
        self.steps += 1
        if self.steps == 1 and self._start_at_free_cores():
            return
        if self.probe is not None:
            self._probe_times.append(t)
            if len(self._probe_times) >= self.window:
                self._decide()
            return
        self._recent.append(t)
        if len(self._recent) > self.window:
            del self._recent[0]
        self._since += 1
        if self.most == 1 or len(self._recent) < self.window:
            return
        now = statistics.median(self._recent)
        if self.baseline is None:
            self.baseline = now
            target = self._free_target()
            if target is not None and target < self.current:  # cores were busy from the start
                self._start_probe(target)
                return
        elif now > self.baseline * ALARM:  # slower than when chosen: the machine changed
            self.hold, self.baseline = self.shortest, now
            self._start_probe()
            return
        if self._since >= self.hold:
            self._start_probe()

    def _take_mark(self) -> None:
        """Start the interval :meth:`_free_target` reads the free cores over."""
        self._mark = self._load() if self._load is not None else None

    def _changed(self) -> None:
        """Note the current count's change in :attr:`history`."""
        self.history = [*self.history[-99:], (self.steps, self.current)]

    def _start_at_free_cores(self) -> bool:
        """After the first step (its time says nothing of the count: it loads or compiles the
        kernels): where Linux says fewer cores than the count were free during it, the next
        steps start at that many, and the tuner measures from there. Whether it moved."""
        target = self._free_target()
        if target is None:  # no reading over the first step: the first window's decides
            self._take_mark()
        if target is None or target >= self.current:
            return False
        self.current = target
        self._changed()
        self._take_mark()
        return True

    def _start_probe(self, target: int | None = None) -> None:
        """Probe ``target`` (default: the free cores where Linux tells them) where it is not
        the current count; where the current count is the free cores, one thread fewer (more
        threads than free cores would each wait for a busy core: that probe is skipped, and
        the count holds twice as long); else a neighbour, one fewer or one more, in turn."""
        self._probe_times = []
        if target is None:
            target = self._free_target()
        if target is not None and target != self.current:
            self.direction = 1 if target > self.current else -1
            self.probe = target
            return
        if target is not None:
            if self.current == 1:  # nothing below, and no core free above: hold on
                self._since = 0
                self._take_mark()
                self.hold = min(self.longest, self.hold * 2)
                return
            self.direction = -1
        if not 1 <= self.current + self.direction <= self.most:
            self.direction = -self.direction
        self.probe = self.current + self.direction

    def _free_target(self) -> int | None:
        """The cores other processes left free since the last decision (rounded, 1 to
        :attr:`most`), where that can be told."""
        if self._load is None or self._mark is None:
            return None
        now = self._load()
        free = None if now is None else free_cores(self._mark, now, self.most)
        if free is None:
            return None
        return max(1, min(self.most, int(free + 0.5)))

    def _decide(self) -> None:
        assert self.probe is not None
        tried = statistics.median(self._probe_times)
        mine = statistics.median(self._recent) if self._recent else float("inf")
        self._since = 0
        self._take_mark()
        if tried <= mine * GAIN:  # take it, and look further the same way
            self.current, self.baseline = self.probe, tried
            self._recent = self._probe_times[-self.window :]
            self._changed()
            self.hold = self.shortest
            self.probe = None
            if 1 <= self.current + self.direction <= self.most:
                self._start_probe()
            return
        self.probe = None
        self.direction = -self.direction  # next time the other neighbour
        self.hold = min(self.longest, self.hold * 2)
