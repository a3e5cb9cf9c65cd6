"""``gpubp bench --job``: the whole-job benchmark's options, its floor, its table, and one quick
run end to end (digits, one epoch, every contender installed here; no timing asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest

from gpubp import cli
from gpubp.bench import cli as bench_cli
from gpubp.bench import job, job_worker
from gpubp.bench.timing import Stats


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _args(**kw):
    base = dict(job="all", quick=False, epochs=None, rounds=1, data_dir=None, threads=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(job="cifar"), "--job: unknown dataset 'cifar'"),
        (dict(job="digits", epochs=0), "--epochs: 0 must be at least 1"),
        (dict(job="digits", rounds=0), "--rounds: 0 must be at least 1"),
    ],
)
def test_bad_job_options_are_named(kw, message, capsys):
    with pytest.raises(ValueError, match=message):
        bench_cli.job_specs(_args(**kw))
    argv = ["bench", "--job", kw["job"], "--no-progress"]
    argv += [f"--{k}={v}" for k, v in kw.items() if k in ("epochs", "rounds")]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_all_jobs_are_those_that_can_run_here(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPUBP_DATA", raising=False)
    monkeypatch.setattr(job.data, "find_dataset", lambda name, data_dir=None: None)
    monkeypatch.setattr(bench_cli, "find_dataset", lambda name, data_dir=None: None)
    if not _has("sklearn"):
        with pytest.raises(ValueError, match="no job can run here"):
            bench_cli.job_specs(_args())
        return
    specs, absent = bench_cli.job_specs(_args())
    assert [(s.dataset, s.epochs) for s in specs] == [("digits", 15)]
    assert any("fashion-mnist job: its files were not found" in a for a in absent)
    quick, _ = bench_cli.job_specs(_args(quick=True))
    assert [(s.dataset, s.epochs) for s in quick] == [("digits", 1)]


def test_the_floor_counts_full_and_partial_batches(monkeypatch):
    seen = []

    def fake_time(cands, repeats, min_time, progress=None, settle=0.0):
        (c,) = cands
        seen.append(c.A[0].shape[0])  # the batch size the floor was set up with
        return {c.label: Stats.of([1e-3 * c.A[0].shape[0]])}

    monkeypatch.setattr(job, "time_round_robin", fake_time)
    total, per_step = job.gemm_floor([5, 7, 3], 4, 10, 3)  # 10 = 2 x 4 + 2
    assert sorted(seen) == [2, 4]
    assert per_step == pytest.approx({4: 4e-3, 2: 2e-3})
    assert total == pytest.approx(3 * (2 * 4e-3 + 2e-3))
    total, per_step = job.gemm_floor([5, 7, 3], 5, 10, 2)  # no partial batch
    assert set(per_step) == {5} and total == pytest.approx(2 * 2 * 5e-3)


def test_the_table_gives_the_ratios_to_gpubp_and_to_the_floor():
    rows = [
        job.JobRow("gpubp", "gpubp (numba)", [2.0, 3.0, 2.5], [0.9, 0.91, 0.9]),
        job.JobRow("torch", "PyTorch", [5.0], [0.89]),
        job.JobRow("sklearn", "scikit-learn", error="exit status 1: boom"),
    ]
    result = job.JobResult(job.JobSpec("digits", 2), [64, 8, 10], 32, 100, 8, 2.0, {}, rows)
    text = job.format_job(result)
    lines = {line.split("  ")[0]: line.split() for line in text.splitlines()[2:]}
    assert lines["gpubp (numba)"][-4:] == ["2.50", "1.00", "1.25", "0.9000"]
    assert lines["PyTorch"][-4:] == ["5.00", "2.00", "2.50", "0.8900"]
    assert "failed: exit status 1: boom" in text
    assert text.splitlines()[-1].split()[-4:] == ["2.00", "0.80", "1.00", "-"]


def test_the_worker_refuses_a_bad_command_line(capsys):
    assert job_worker.main(["caffe", "{}"]) == 2
    assert "usage" in capsys.readouterr().out


def test_contenders_that_cannot_run_are_skipped_with_a_reason(monkeypatch):
    real = importlib.util.find_spec
    missing = {"jax", "torch"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    names, absent = job.available_contenders()
    assert names[0] == "gpubp" and not {"jax", "torch", "torch-fused", "torch-compile"} & set(names)
    text = "\n".join(absent)
    assert "jax (JAX jit, hand-written Adam): JAX is not installed (pip install jax)" in text
    assert "torch-fused (PyTorch eager, Adam(fused=True)): PyTorch is not installed" in text
    names, absent = job.available_contenders(["gpubp", "jax"])  # only those asked about
    assert names == ["gpubp"] and len(absent) == 1
    missing.clear()
    monkeypatch.setattr(job.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    if _has("torch"):
        assert "needs a C++ compiler" in job.contender_status("torch-compile")
    names, absent = job.available_contenders(torch=False, sklearn=False)
    assert "torch (PyTorch eager, default Adam): left out by --no-torch" in absent
    assert any(a.startswith("sklearn") and "--no-sklearn" in a for a in absent)
    assert not {"torch", "torch-compile", "sklearn"} & set(names)


def test_a_contender_far_below_gpubps_accuracy_is_named():
    rows = [
        job.JobRow("gpubp", "gpubp (numba)", [2.0], [0.90]),
        job.JobRow("jax", "JAX", [1.0], [0.85]),
        job.JobRow("torch", "PyTorch", [3.0], [0.89]),
    ]
    result = job.JobResult(job.JobSpec("digits", 1), [64, 8, 10], 32, 100, 4, 1.0, {}, rows)
    notes = [line for line in job.format_job(result).splitlines() if line.startswith("note")]
    assert notes == ["note: JAX reaches a lower test accuracy than gpubp"]


@pytest.mark.skipif(not _has("sklearn"), reason="the digits job needs scikit-learn")
def test_quick_job_runs_every_contender_end_to_end(tmp_path, capsys):
    """Every contender but torch.compile (a minute of compiling), one thread each, beside one
    busy process."""
    out = tmp_path / "job.json"
    argv = ["bench", "--job", "--quick", "--no-progress", "--json", str(out), "--load", "1"]
    argv += ["--threads", "1", "--contenders", "gpubp,torch,torch-fused,jax,sklearn"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "digits: [64, 512, 256, 10]" in text and "x floor" in text
    assert "load: 1 busy process(es)" in text and "threads: 1 for every contender" in text
    record = json.loads(out.read_text())
    assert record["meta"]["load"] == 1 and record["meta"]["threads"] == 1
    assert "--load 1 --threads 1" in record["meta"]["command"]
    (run,) = record["jobs"]
    assert run["spec"]["epochs"] == 1 and run["batch"] == 32 and run["floor_seconds"] > 0
    assert run["spec"]["threads"] == 1
    rows = {r["contender"]: r for r in run["rows"]}
    expected = {"gpubp", "sklearn"} | ({"torch", "torch-fused"} if _has("torch") else set())
    expected |= {"jax"} if _has("jax") else set()
    assert set(rows) == expected
    absent = " ".join(record["absent"])
    for name in {"torch", "torch-fused", "jax"} - expected:
        assert f"{name} (" in absent and "not installed" in absent
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        (seconds,) = row["seconds"]
        (acc,) = row["accuracy"]
        assert seconds > 0
        assert 0.6 < acc <= 1.0, (name, acc)  # one epoch of digits learns, whoever trains it
        if name != "sklearn" or _has("threadpoolctl"):
            assert row["threads"] == 1, (name, row["threads"])
    assert rows["gpubp"]["epoch_seconds"][0] >= rows["gpubp"]["seconds"][0]
    assert np.isfinite(run["floor_step_seconds"]["32"])


def test_quick_leaves_torch_compile_out_unless_named(monkeypatch, capsys):
    seen = []

    def fake_run_job(spec, contenders, rounds, progress=None, load=0):
        seen.append((list(contenders), load, spec.threads))
        rows = [job.JobRow(c, c, [1.0], [0.9]) for c in contenders]
        return job.JobResult(spec, [64, 8, 10], 32, 100, 4, 1.0, {32: 0.25}, rows)

    monkeypatch.setattr(bench_cli, "run_job", fake_run_job)
    assert cli.main(["bench", "--job", "digits", "--quick", "--no-progress", "--load", "2"]) == 0
    (contenders, load, threads), *_ = seen
    assert "torch-compile" not in contenders and contenders[0] == "gpubp" and load == 2
    assert threads is None
    assert "torch-compile: left out by --quick" in capsys.readouterr().out
    argv = ["bench", "--job", "digits", "--quick", "--no-progress", "--contenders", "gpubp"]
    assert cli.main([*argv, "--threads", "3"]) == 0
    assert seen[-1] == (["gpubp"], 0, 3)
    assert "--contenders gpubp --threads 3" in capsys.readouterr().out


_NOTHING_LOADED_INSIDE_THE_CLOCK = """
import gc, json, sys
from numba.core.registry import CPUDispatcher
import gpubp.train
from gpubp.bench import job_worker

def kernels():
    return [o for o in gc.get_objects() if isinstance(o, CPUDispatcher)
            and o.py_func.__module__.startswith("gpubp")]

real, new = gpubp.train.train, []
def timed(*args, **kw):  # the worker's clock runs inside this call
    if sys.argv[2] == "busy":  # from here on the thread tuner finds one core free, every step
        from gpubp.backends.numba.tuner import ThreadTuner
        ThreadTuner.threads = lambda self: 1
    before = {id(k): set(k.overloads) for k in kernels()}
    result = real(*args, **kw)
    new.extend(k.py_func.__qualname__ for k in kernels()
               if set(k.overloads) - before.get(id(k), set()))
    return result
gpubp.train.train = timed
threads = json.loads(sys.argv[1])
answer = job_worker.run_gpubp(job_worker.job_config({"dataset": "digits", "epochs": 2}), threads)
loaded = sorted(k.py_func.__qualname__ for k in kernels() if k.overloads)
print(json.dumps({"new": new, "seconds": answer["train_seconds"], "label": answer["label"],
                  "loaded": loaded}))
"""


@pytest.mark.parametrize(
    ("threads", "busy"),
    [(1, "quiet"), (None, "quiet"), (None, "busy")],
    ids=["one-thread", "default-tuned", "tuned-to-one-thread"],
)
def test_the_gpubp_worker_warms_up_every_kernel_the_timed_job_calls(threads, busy):
    """The worker's warm-up takes the job's own paths, so no kernel is compiled or loaded from
    the cache while the job is timed, in a fresh process (its first calls of each kernel).
    Warmed up by one ``train_step``, the runs of steps in one native call were first called
    inside the clock: 5 s of compiling counted as training, with a cold cache. ``busy``: the
    thread tuner takes every timed step on one thread, as beside a busy process (the one-thread
    update kernel must be warm too)."""
    pytest.importorskip("numba")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _NOTHING_LOADED_INSIDE_THE_CLOCK, json.dumps(threads), busy],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["seconds"] > 0 and "numba" in answer["label"], answer
    assert "adam_steps" in answer["loaded"], answer  # the job's kernel ran: there was a check
    assert answer["new"] == [], f"first called inside the clock: {answer['new']}"
