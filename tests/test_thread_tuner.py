"""The thread count of each step, tuned from the step times (``gpubp.backends.numba.tuner``).

The tuner is fed synthetic step times (no clock: the machine's load is simulated by which count
is fast), and a real network is trained with counts switched under it: the results must be the
same bit for bit, since a step's count changes only how its work is partitioned.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp import optim

pytest.importorskip("numba")
from gpubp.backends.numba import NumbaBackend
from gpubp.backends.numba.tuner import ThreadTuner


def run(tuner: ThreadTuner, cost, steps: int, rows: int = 128) -> list[int]:
    """``steps`` steps whose time at ``n`` threads is ``cost(n) * rows`` (with a little
    deterministic jitter); the count each step ran at."""
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(steps):
        n = tuner.threads()
        counts.append(n)
        tuner.record(cost(n) * rows * (1.0 + 0.05 * rng.random()), rows)
    return counts


class Machine:
    """A simulated ``/proc/stat``: each reading is a second later, with ``busy`` cores kept busy
    by other processes in between."""

    def __init__(self, busy: float) -> None:
        self.busy, self.t = busy, 0.0

    def __call__(self) -> tuple[float, float, float]:
        self.t += 1.0
        return self.t, self.busy * self.t, 0.0


def test_a_quiet_machine_keeps_every_thread_and_probes_rarely():
    tuner = ThreadTuner(2, load=None)
    counts = run(tuner, {1: 1.6, 2: 1.0}.__getitem__, 20000)
    assert counts[-1] == 2 and tuner.current == 2
    assert counts.count(1) / len(counts) < 0.01  # the probes' share of the steps
    assert tuner.hold == tuner.longest


@pytest.mark.parametrize("told", [False, True], ids=["neighbours", "free-cores"])
def test_a_busy_core_moves_the_step_to_the_free_one_and_back(told):
    machine = Machine(0.0)
    tuner = ThreadTuner(2, load=machine if told else None)
    quiet = {1: 1.6, 2: 1.0}.__getitem__
    busy = {1: 1.7, 2: 3.5}.__getitem__  # the team waits for its thread on the busy core
    run(tuner, quiet, 3000)
    machine.busy = 1.0
    counts = run(tuner, busy, 200)
    first_one = counts.index(1)
    assert counts[-1] == 1 and counts[first_one:].count(2) <= tuner.window  # moved; one probe
    assert first_one <= 2 * tuner.window
    machine.busy = 0.0
    counts = run(tuner, quiet, 3 * tuner.longest)  # the other process ended
    assert tuner.current == 2 and counts[-1000:].count(2) > 950


@pytest.mark.parametrize("best", [1, 3, 6])
def test_the_count_goes_to_the_free_cores(best):
    """Of 8 cores, ``8 - best`` are busy: more threads than free cores are all equally slow
    (each waits for a busy core), so the free cores that Linux reports show the way."""
    tuner = ThreadTuner(8, load=Machine(8 - best))

    def cost(n):
        return (1.0 / n) if n <= best else (3.0 / best)

    counts = run(tuner, cost, 4000)
    assert tuner.current == best and counts[-1] == best


@pytest.mark.parametrize("best", [3, 7])
def test_neighbours_alone_climb_a_slope(best):
    """Without ``/proc/stat``, one thread fewer at a time, where each is faster."""
    tuner = ThreadTuner(8, load=None)
    counts = run(tuner, lambda n: 1.0 / n if n <= best else 1.0 / best + 0.2 * (n - best), 6000)
    assert tuner.current == best and counts[-1] == best


def test_one_thread_never_probes():
    tuner = ThreadTuner(1, load=None)
    assert set(run(tuner, lambda n: 1.0, 500)) == {1}


@pytest.mark.parametrize(
    ("sizes", "batch", "rule"),
    [([37, 129, 5], 1, "adam"), ([784, 300, 70, 10], 33, "sgd"), ([50, 500, 3], 200, "momentum")],
)
def test_steps_give_the_same_bits_at_any_count(rng, sizes, batch, rule, monkeypatch):
    """What lets the tuner switch counts under a run: every count gives the same numbers."""
    make = {
        "adam": lambda: optim.Adam(lr=1e-3),
        "sgd": lambda: optim.SGD(lr=0.05),
        "momentum": lambda: optim.SGD(lr=0.05, momentum=0.9),
    }[rule]
    X = rng.normal(0, 1, (batch * 6, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch * 6)
    got = []
    for threads in (1, 2, "switching"):
        be = NumbaBackend(threads=2 if threads == "switching" else threads)
        with monkeypatch.context() as m:
            if threads == "switching":  # alternate 2, 1, 2, ... under one optimizer state
                be.adaptive_threads = True
                m.setattr(ThreadTuner, "threads", lambda self: 1 + self.steps % 2)
            be.update_par_min = be.update_chunk = 64  # the update's parallel kernels too
            model = gpubp.MLP(sizes, activation="relu", backend=be, dtype="float32", seed=3)
            opt = make()
            for k in range(6):
                model.train_step(
                    X[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch], opt
                )
        if threads == "switching":  # the tuner did run every step
            assert [net.tuner.steps for net in be._nets.values()] == [6]
        got.append([p.copy() for p in (*model.parameters[0], *model.parameters[1])])
    assert ThreadTuner(2, load=None).threads() == 2  # the class put back as it was
    for a, b, c in zip(*got, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_a_job_started_beside_a_busy_process_moves_after_its_first_step():
    """Cores already busy when the count was chosen: the steps after the first run at the free
    cores Linux reported during it, not after a hold."""
    tuner = ThreadTuner(2, load=Machine(1.0))
    counts = run(tuner, {1: 1.7, 2: 10.0}.__getitem__, 300)
    assert counts[:2] == [2, 1] and set(counts[1:]) == {1}
    assert tuner.history[0] == (1, 1)


def test_a_busy_first_window_moves_where_the_first_step_could_not_tell():
    """No reading when the tuner was made (``/proc/stat`` unreadable for a moment): the first
    window's reading decides."""
    machine = Machine(1.0)
    calls = []

    def load():
        calls.append(1)
        return None if len(calls) == 1 else machine()

    tuner = ThreadTuner(2, load=load)
    counts = run(tuner, {1: 1.7, 2: 10.0}.__getitem__, 300)
    assert counts.index(1) == tuner.window and counts[-1] == 1


def test_a_quiet_first_step_keeps_every_thread():
    tuner = ThreadTuner(2, load=Machine(0.0))
    counts = run(tuner, {1: 1.6, 2: 1.0}.__getitem__, 100)
    assert counts[:64] == [2] * 64


def test_no_probe_above_the_free_cores():
    """On one thread beside a busy process, Linux says no core is free for a second thread:
    no step is spent probing it, until the other process ends."""
    machine = Machine(1.0)
    tuner = ThreadTuner(2, load=machine)
    busy = {1: 1.7, 2: 10.0}.__getitem__
    counts = run(tuner, busy, 5000)
    assert counts[tuner.window :].count(2) == 0
    machine.busy = 0.0
    counts = run(tuner, {1: 1.6, 2: 1.0}.__getitem__, 3 * tuner.longest)
    assert tuner.current == 2 and counts[-1000:].count(2) > 950


def test_neighbours_still_probe_where_linux_cannot_tell():
    """Without ``/proc/stat`` the tuner still finds its way back up by probing neighbours."""
    tuner = ThreadTuner(2, load=None)
    run(tuner, {1: 1.7, 2: 10.0}.__getitem__, 500)
    assert tuner.current == 1
    counts = run(tuner, {1: 1.6, 2: 1.0}.__getitem__, 3 * tuner.longest)
    assert tuner.current == 2 and counts[-1000:].count(2) > 950
