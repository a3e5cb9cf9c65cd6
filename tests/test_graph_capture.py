"""A CUDA-graph capture that cannot fail silently: required graphs raise naming the call that
broke the capture, the default mode runs eagerly and records why, and runs report it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gpubp.backends.cuda import graph as graph_module
from gpubp.check import random_problem
from gpubp.errors import GraphCaptureError
from gpubp.optim import SGD

from .conftest import skip_unless_available


@pytest.fixture
def cupy_backend_class():
    skip_unless_available("cupy")
    from gpubp.backends.cuda import CupyBackend

    return CupyBackend


def _steps(be, n: int = 3):
    """``n`` train steps of a small problem (float32, labels, SGD); the last loss and params."""
    cp = be.xp
    W, b, x, y = random_problem((7, 13, 3), 5, "cross_entropy", "softmax", np.random.default_rng(1))
    Wd = [cp.asarray(w, "float32") for w in W]
    bd = [cp.asarray(v, "float32") for v in b]
    opt = SGD(lr=0.1)
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    xd, yd = cp.asarray(x, "float32"), cp.asarray(y)
    value = None
    for _ in range(n):
        value, *_ = be.train_step(Wd, bd, xd, yd, "relu", "softmax", "cross_entropy", opt, state)
    return value, [be.to_numpy(p) for p in [*Wd, *bd]], state


def host_read_in_the_step(monkeypatch):
    """Inject a capture-breaking call: a device-to-host read at the end of the recorded step
    (legal eagerly, illegal while capturing)."""
    finish = graph_module.launch.finish_step

    def finish_and_read(kernels, status):
        finish(kernels, status)
        status.get()  # the offending call

    monkeypatch.setattr(graph_module.launch, "finish_step", finish_and_read)


def test_required_graphs_raise_naming_the_call_that_broke_the_capture(
    cupy_backend_class, monkeypatch
):
    host_read_in_the_step(monkeypatch)
    be = cupy_backend_class(graphs="require")
    with pytest.raises(GraphCaptureError) as err:
        _steps(be, 2)  # the first step runs eagerly, the second is captured
    message = str(err.value)
    assert "GPUBP_CUDA_GRAPHS=require" in message
    assert "status.get()" in message and "finish_and_read" in message  # the offending call
    assert "gpubp/backends/cuda/graph.py" in message  # and where gpubp made it
    report = be.capture_report()
    assert report["mode"] == "require" and not report["captured"]
    assert report["failures"] and "status.get()" in report["failures"][0]


def test_required_graphs_by_the_environment(cupy_backend_class, monkeypatch):
    host_read_in_the_step(monkeypatch)
    monkeypatch.setenv("GPUBP_CUDA_GRAPHS", "require")
    with pytest.raises(GraphCaptureError):
        _steps(cupy_backend_class(), 2)
    monkeypatch.setenv("GPUBP_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match=r"GPUBP_CUDA_GRAPHS='sometimes'.*require"):
        cupy_backend_class()


def test_the_default_mode_runs_eagerly_and_records_why(cupy_backend_class, monkeypatch):
    clean_loss, clean_params, _ = _steps(cupy_backend_class(graphs=True), 3)
    host_read_in_the_step(monkeypatch)
    be = cupy_backend_class(graphs=True)  # not required, even where the environment says so
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        loss, params, state = _steps(be, 3)
    report = be.capture_report()
    assert report == {**report, "mode": "on", "captured": False, "graph_steps": 0}
    assert report["eager_steps"] == 3 and state["step"] == 3
    assert "status.get()" in report["failures"][0]
    assert report["why_not"].startswith("the capture failed")
    # the eager steps computed what the captured ones do
    assert float(loss) == float(clean_loss)
    for p, q in zip(params, clean_params):
        np.testing.assert_array_equal(p, q)


def test_a_clean_step_is_captured_and_reported(cupy_backend_class):
    be = cupy_backend_class(graphs="require")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = be.capture_report()
        _steps(be, 3)
    assert be.capture_report(since=before) == {
        "mode": "require", "captured": True, "graph_steps": 2, "eager_steps": 1, "failures": []
    }  # fmt: skip
    off = cupy_backend_class(graphs=False).capture_report()
    assert not off["captured"] and "off" in off["why_not"]


def test_gpubp_train_prints_and_records_whether_steps_were_captured(
    cupy_backend_class, fake_mnist, capsys
):
    from gpubp.config import TrainConfig
    from gpubp.train import train

    lines: list[str] = []
    config = TrainConfig(dataset="mnist", layers=(13,), batch_size=16, epochs=1, backend="cupy")
    result = train(config, progress=False, log=lines.append)
    graphs = result.extra["cuda_graphs"]
    assert graphs["captured"] and graphs["graph_steps"] == 6 - 1  # 7 batches: 6 of 16, one of 12
    assert any(line.startswith("CUDA graphs: captured (5 step(s)") for line in lines), lines
    assert result.summary()["cuda_graphs"] == graphs


def test_every_loss_keeps_its_own_slot_across_loss_blocks(cupy_backend_class, monkeypatch):
    """The losses come from blocks of LOSS_BLOCK slots, each slot handed out once: losses kept
    unread over several blocks still read as they were when each step ran."""
    from gpubp.backends.cuda import status as status_module

    monkeypatch.setattr(status_module, "LOSS_BLOCK", 2)
    be = cupy_backend_class(graphs=True)
    cp = be.xp
    W, b, x, y = random_problem((7, 13, 3), 5, "cross_entropy", "softmax", np.random.default_rng(2))
    Wd = [cp.asarray(w, "float32") for w in W]
    bd = [cp.asarray(v, "float32") for v in b]
    opt = SGD(lr=0.5)
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    xd, yd = cp.asarray(x, "float32"), cp.asarray(y)
    kept, at_once = [], []
    for _ in range(7):
        value, *_ = be.train_step(Wd, bd, xd, yd, "relu", "softmax", "cross_entropy", opt, state)
        kept.append(value)
        at_once.append(float(value))
    assert len(set(at_once)) == 7  # every step's loss differs, so a shared slot would show
    assert be.read_losses(kept) == at_once


def test_the_hyperparameter_ring_waits_only_for_a_copy_still_queued(cupy_backend_class):
    """A slot is reused after its copy finished: its event is asked, and waited for only when
    the copy is still queued; one event per slot, recorded again (no event made per upload)."""
    from types import SimpleNamespace

    from gpubp.backends.cuda.context import HostRing

    be = cupy_backend_class()
    made, waits, pending = [], [], [False]

    class Event:
        def __init__(self, **kwargs):
            made.append(self)

        def record(self, stream):
            pass

        @property
        def done(self):
            return not pending[0]

        def synchronize(self):
            waits.append(self)

    cuda = SimpleNamespace(alloc_pinned_memory=be.xp.cuda.alloc_pinned_memory, Event=Event,
                           get_current_stream=be.xp.cuda.get_current_stream)  # fmt: skip
    ring = HostRing(SimpleNamespace(cuda=cuda), slots=2)
    dst = be.xp.zeros(16, np.float64)
    for k in range(5):
        pending[0] = k == 4  # the copy of the slot's last use is still queued at the 5th upload
        ring.upload(np.full(16, float(k)), dst)
        np.testing.assert_array_equal(dst.get(), np.full(16, float(k)))
    assert len(made) == 2 and waits == [made[0]]
