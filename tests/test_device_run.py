"""The device run (``benchmarks/device_run.py``) without a GPU: its budget, its summary after every
phase, and its smoke phase on the emulated GPU (CI runs the whole script in ``.ci/run``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EMULATED_GPU, skip_unless_available

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["environment", "smoke", "check", "tests", "sanitizer", "benchmark"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_tiny_budget_skips_every_phase_and_names_it(tmp_path, capsys):
    run = _script("device_run")
    assert run.main(["--emulated", "--budget", "2", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["phases"]) == PHASES
    for name, phase in summary["phases"].items():
        assert phase["status"] == "skipped", name
        assert phase["reason"], name
    # the budget is why, except for a phase with no meaning on the emulated GPU
    assert "needs at least" in summary["phases"]["smoke"]["reason"]
    assert "emulated" in summary["phases"]["sanitizer"]["reason"]
    assert "smoke" in (tmp_path / "summary.txt").read_text()
    assert "== check: skipped" in capsys.readouterr().out


def test_the_summary_is_written_after_every_phase_and_the_budget_is_kept(tmp_path, monkeypatch):
    """A phase that uses up the budget: the next ones are skipped, and each phase finds the one
    before it already in summary.json (a run stopped at its limit still returns them)."""
    run = _script("device_run")
    clock = [0.0]
    monkeypatch.setattr(run.time, "monotonic", lambda: clock[0])
    seen: list[dict] = []

    def fake(name: str, cost: float):
        def phase(self, limit: float) -> dict:
            assert limit <= self.args.budget
            seen.append(json.loads((tmp_path / "summary.json").read_text())["phases"])
            clock[0] += cost
            return {"status": "passed"}

        return phase

    for name, cost in [("environment", 2), ("smoke", 5), ("check", 200)]:
        monkeypatch.setattr(run.Runner, f"phase_{name}", fake(name, cost))
    assert run.main(["--emulated", "--budget", "100", "--out", str(tmp_path)]) == 0
    assert [s["environment"]["status"] for s in seen] == ["pending", "passed", "passed"]
    assert seen[2]["smoke"]["status"] == "passed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [summary["phases"][n]["status"] for n in PHASES] == ["passed"] * 3 + ["skipped"] * 3
    assert "0 s of the budget left" in summary["phases"]["tests"]["reason"]


def test_a_device_run_tests_the_real_cupy_only_and_requires_graphs(tmp_path, monkeypatch):
    """On a device, no test may fall back to the emulator or skip the cupy backend unnoticed,
    and every phase runs with graphs required (unless --no-require-graphs)."""
    monkeypatch.delenv("GPUBP_CUDA_GRAPHS", raising=False)
    run = _script("device_run")
    env = run.Runner(run.parse_args(["--out", str(tmp_path)])).env
    assert env["GPUBP_CUPY_MODULE"] == "cupy" and env["GPUBP_REQUIRE_EMULATOR"] == "1"
    assert env["GPUBP_CUDA_GRAPHS"] == "require"
    env = run.Runner(run.parse_args(["--emulated", "--no-require-graphs"])).env
    assert env["GPUBP_CUPY_MODULE"] == "cudaemu.cupy" and "GPUBP_CUDA_GRAPHS" not in env


def test_no_git_is_a_fact_in_the_summary_not_a_crash(monkeypatch):
    run = _script("device_run")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(run.subprocess, "run", no_git)
    assert run.git_commit() == "unknown (git not found)"
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128))
    assert run.git_commit() == "unknown (not a git checkout)"


def test_a_missing_package_is_named_with_its_pip_install():
    run = _script("device_run")
    assert run.missing_module("ModuleNotFoundError: No module named 'cupy'").startswith(
        "pip install cupy-cuda12x"
    )
    assert run.missing_module("No module named 'pytest'") == "pip install pytest"
    assert run.missing_module("all fine") is None


def test_the_smoke_phase_captures_the_step_and_matches_eager_and_the_reference():
    skip_unless_available("cupy")
    ok, report = _script("device_probe").smoke()
    assert report["captured"] is True, report
    assert report["capture_graph"]["graph_steps"] == 2  # the first step of a shape is eager
    assert report["capture_eager"]["why_not"].startswith("CUDA graphs are off")
    assert ok, report


@pytest.mark.parametrize("tiny", [False, True])
def test_the_benchmark_takes_the_device_runs_options(tiny):
    gpu_step = _script("gpu_step")
    args = gpu_step.parse_args(["out", "--no-compile", *(["--tiny"] if tiny else ["--quick"])])
    assert args.no_compile and args.tiny == tiny
    assert set(gpu_step.TINY) <= set(gpu_step.QUICK)


def test_a_gpu_train_step_allocates_nothing_and_reads_nothing():
    """Counted on the emulated GPU (benchmarks/host_work.py): the batch is gathered into reused
    buffers, the step replays its graph, the losses take the slots of a block allocated once."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    counts = _script("host_work").measure(8, "adam", schedule=True)
    assert counts["graph_launch"] == 1 and counts["eager_launch"] == 0
    assert counts["alloc"] * 8 <= 1  # at most one block of losses (LOSS_BLOCK steps each)
    assert counts["get"] == 0 and counts["sync"] == 0


def test_a_gpu_train_step_reads_the_gathered_batch_in_place():
    """The gather fills the step's input buffers (Backend.batch_buffers): no staging copy of
    the batch into the step's own buffers (two ``a[...] = b`` per step before)."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    for optimizer in ("sgd", "adam"):
        counts = _script("host_work").measure(8, optimizer, schedule=False)
        assert counts["setitem"] == 0, counts


def test_a_steady_adam_step_uploads_nothing():
    """Adam's bias corrections are computed in the graph from a step counter on the device
    (adam_step_scalars, count_step): no hyper-parameter upload per step (one before)."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    counts = _script("host_work").measure(8, "adam", schedule=False)
    # (a new block of LOSS_BLOCK losses uploads the ledger's words: at most once in 8 steps)
    assert counts["memcpy"] * 8 <= 1 and counts["graph_launch"] == 1, counts


def test_a_steady_scheduled_step_uploads_nothing():
    """A cosine schedule's rate is computed in the graph from a global step counter on the
    device (schedule_lr): no upload per step for SGD or Adam (one before, the new rate)."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    for optimizer in ("sgd", "adam"):
        counts = _script("host_work").measure(8, optimizer, schedule=True)
        # (at most one upload for a new block of LOSS_BLOCK losses in 8 steps)
        assert counts["memcpy"] * 8 <= 1 and counts["graph_launch"] == 1, (optimizer, counts)


def test_a_data_parallel_gpu_step_reads_the_device_once():
    """benchmarks/host_work.py --distributed: one read per step (the loss, the stop flag and
    the update's verdict), no table or hyper-parameter block uploaded per step, and no
    allocation: the shard gathered into the step's input buffers (one upload, its row
    indices), the scaled gradients and loss share written straight into the reduced buffer
    (7 allocations and 6 copies into arrays per step before: the gathers and their uploaded
    indices, the loss copied and widened, the step's staging copies)."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    pytest.importorskip("mpi4py.MPI", reason="DataParallel needs mpi4py")
    for optimizer in ("sgd", "adam"):
        counts = _script("host_work").measure(8, optimizer, schedule=False, distributed=True)
        assert counts["get"] == 1 and counts["h2d"] == 1, counts
        assert counts["alloc"] == 0 and counts["memcpy"] == 0, counts
        # the two left: the stop flag's slots zeroed, the update's verdict beside the loss
        assert counts["setitem"] == 2, counts


def test_a_steady_scheduled_data_parallel_step_uploads_nothing():
    """Under DataParallel the update computes a cosine schedule's rate (schedule_lr) and Adam's
    step scalars on the device, as the single-device step does: no upload of hyper-parameters
    per step for SGD or Adam (one before, the new rate or Adam's scalars), and still one read.
    The one upload is the shard's row indices, gathered into the step's own input buffers as
    the single-device gather does (CuPy's ``X[idx]`` uploaded them twice, uncounted before)."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    pytest.importorskip("mpi4py.MPI", reason="DataParallel needs mpi4py")
    for optimizer in ("sgd", "adam"):
        for schedule in (True, False):
            counts = _script("host_work").measure(8, optimizer, schedule, distributed=True)
            assert counts["memcpy"] == 0 and counts["h2d"] == 1, (optimizer, schedule, counts)
            assert counts["get"] == 1, (optimizer, schedule, counts)


def test_losses_are_summed_on_the_device_to_the_hosts_bits():
    """The train steps add ``rows * loss`` to a float64 total on the device (record_loss, in
    the graph): no copy of the loss per step, nothing kept per step by LossSum, and one read
    giving the bits the host's sum of the same losses gives."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    skip_unless_available("cupy")
    counts = _script("host_work").measure(8, "sgd", schedule=False)
    # one device-to-device copy of the loss per step before; now at most one upload in 8 steps,
    # where a new block of LOSS_BLOCK losses starts (the test suite's earlier steps decide where)
    assert counts["memcpy"] * 8 <= 1, counts
    import numpy as np

    from cudaemu import _common
    from gpubp import MLP
    from gpubp.gather import BatchGather
    from gpubp.loop import LossSum
    from gpubp.optim import Adam

    rng = np.random.default_rng(1)
    model = MLP([6, 9, 3], backend="cupy", seed=0)
    be = model.backend
    X = be.asarray(rng.normal(size=(50, 6)), "float32")
    Y = be.asarray(rng.integers(0, 3, 50))
    gather = BatchGather(X, Y, 16, xp=be.xp, buffers=be.batch_buffers)
    losses, opt, values = LossSum(be, total=0.25), Adam(lr=1e-2), []
    for k in range(7):
        idx = rng.permutation(50)[: 16 - (k % 2)]  # two batch shapes: two graphs
        values.append((model.step(*gather(idx), opt), int(idx.shape[0])))
        losses.add(*values[-1])
    assert not losses.values  # nothing kept on the host
    before = _common.stats["get"]
    total = losses.read()
    assert _common.stats["get"] - before <= 3  # the total, and the status words (2)
    want = 0.25
    for v, w in values:
        want += float(v) * w
    assert total == want
