"""``gpubp bench`` and the pytest-benchmark suite still run (tiny shapes, no timing asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpubp import bench, cli
from gpubp.backends.numpy_backend import NumpyBackend
from gpubp.check import TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--shapes", "13-7-5@3,9-6-4-3@17", "--repeats", "3", "--min-time", "0", "--settle", "0"]
TINY += ["--no-progress"]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_bench_runs_checks_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, "--dtypes", "float32,float64", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "floor: NumPy BLAS GEMM" in text and "numpy" in text and "median ms" in text
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    labels = {r["candidate"] for r in rows}
    assert {"numpy", "floor: NumPy BLAS GEMM"} <= labels
    assert {(r["shape"], r["dtype"]) for r in rows} == {
        (s, d) for s in ("13-7-5@3", "9-6-4-3@17") for d in ("float32", "float64")
    }
    for r in rows:
        assert r["error"] is None
        assert 0 <= r["validation_error"] <= TOLERANCE[r["dtype"]]
        st = r["stats"]
        assert len(st["samples"]) == 3
        assert st["min"] <= st["median"] <= st["max"]
        assert r["x_floor"] is not None and r["gflops"] > 0
    numpy_rows = [r for r in rows if r["candidate"] == "numpy"]
    for r in numpy_rows:
        # parameters alone are this many bytes; the footprint of a step holds at least them
        params = sum(a * b + b for a, b in zip(r["sizes"][:-1], r["sizes"][1:]))
        assert r["peak_bytes"] >= params * np.dtype(r["dtype"]).itemsize
        assert r["peak_how"] == "tracemalloc" and r["step_alloc_bytes"] >= 0
    assert data["meta"]["command"].startswith("gpubp bench --shapes 13-7-5@3,9-6-4-3@17")
    # every GPU-only part says why it is absent
    absent = " ".join(data["absent"])
    if bench.gpu_status() is not None:
        assert "GPU floors" in absent
    if _has("torch"):
        assert "torch" in labels and "x torch" in text.splitlines()[0]
    else:
        assert "PyTorch is not installed" in absent and "x torch" not in text.splitlines()[0]


def test_bench_without_torch_says_why(monkeypatch, capsys):
    monkeypatch.setattr(
        bench.candidates, "torch_status", lambda: (None, "PyTorch is not installed (test)")
    )
    assert cli.main(["bench", *TINY, "--no-memory"]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert "x floor" in header and "x torch" not in header
    assert "PyTorch rows and the 'x torch' column: PyTorch is not installed (test)" in text


def test_bench_reports_a_wrong_backend_and_does_not_time_it(monkeypatch, capsys):
    def forgets_the_derivative(self, delta_next, W_next, a, activation, *, out=None, scratch=None):
        return np.matmul(delta_next, W_next, out=out)

    monkeypatch.setattr(NumpyBackend, "hidden_delta", forgets_the_derivative)
    assert cli.main(["bench", *TINY, "--no-torch"]) == 1
    text = capsys.readouterr().out
    assert "FAILED" in text and "disagrees with the float64 reference" in text


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--dtypes", "float16", "--dtypes: 'float16' is not supported"),
        ("--backends", "tensorflow", "--backends: unknown backend 'tensorflow'"),
        ("--shapes", "784x128", "--shapes: '784x128' is not a shape"),
        ("--shapes", "5-1@4", "needs at least 2"),
        ("--repeats", "2", "--repeats: 2 is too few"),
    ],
)
def test_bench_bad_options_name_the_option(option, value, message, capsys):
    assert cli.main(["bench", option, value, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_round_robin_interleaves_and_synchronises():
    log: list[str] = []

    class Fake(bench.Candidate):
        def __init__(self, label):
            self.label = label

        def step(self):
            log.append(self.label)

        def sync(self):
            log.append(self.label + ".sync")

    stats = bench.time_round_robin([Fake("a"), Fake("b")], repeats=4, min_time=0.0)
    assert set(stats) == {"a", "b"} and all(len(s.samples) == 4 for s in stats.values())
    # every run of steps is bracketed by synchronisations of the same candidate
    for i, e in enumerate(log):
        if not e.endswith("sync"):
            assert log[i - 1] in (e, e + ".sync") and log[i + 1] in (e, e + ".sync")
    steps = [e for e in log if not e.endswith("sync")]
    assert steps[:10] == ["a"] * 5 + ["b"] * 5  # warm-up (2) and calibration (3) of each
    # then each round is one re-warming and one timed step of each, in alternating order
    rounds = [steps[i : i + 4] for i in range(10, len(steps), 4)]
    assert rounds == [["a", "a", "b", "b"], ["b", "b", "a", "a"]] * 2


def test_floor_copy_moves_the_elementwise_bytes():
    # counted by hand for [13, 7, 5], batch 3, float32: bias + activation 2*3*(7+5), softmax
    # 2*3*5, hidden Hadamard 3*3*7, bias gradients 3*(7+5), SGD 3*(13*7+7 + 7*5+5) elements,
    # and 3 int64 labels
    assert bench.elementwise_bytes((13, 7, 5), 3, 4) == (72 + 30 + 63 + 36 + 414) * 4 + 24
    # the GPU floor's copy term, exercised here with NumPy standing in for CuPy
    problem = bench.make_problem((13, 7, 5), 3, "float32", with_reference=False)
    floor = bench.FloorCandidate(np, "cpu", copy=True)
    floor.setup(problem)
    assert floor.label == "floor: GEMM+copy" and floor.src.nbytes == 2484 // 2
    floor.dst[...] = 0
    assert floor.validate(problem) <= TOLERANCE["float32"]
    assert (floor.dst == 1).all()


def test_reset_puts_the_initial_parameters_back():
    problem = bench.make_problem((13, 7, 5), 3, "float64")
    c = bench.BackendCandidate("numpy")
    c.setup(problem)
    for _ in range(3):
        c.step()
    assert not np.array_equal(c.W[0], problem.W[0])
    c.reset()
    for p, p0 in zip([*c.W, *c.b], [*problem.W, *problem.b]):
        np.testing.assert_array_equal(p, p0)
    assert c.validate(problem) <= TOLERANCE["float64"]


def test_stats_and_flop_count():
    st = bench.Stats.of([4.0, 1.0, 2.0, 3.0, 100.0])
    assert (st.median, st.min, st.max) == (3.0, 1.0, 100.0)
    assert st.spread == pytest.approx((4.0 - 2.0) / 3.0)
    # forward + weight gradient for both layers, backward delta for the second only
    assert bench.step_flops((3, 4, 2), 5) == 2 * 5 * 3 * 4 * 2 + 2 * 5 * 4 * 2 * 3


def test_problem_rows_stay_off_the_relu_kink():
    p = bench.make_problem((20, 30, 3), 50, "float32", seed=1)
    z = p.x.astype(np.float64) @ p.W[0].astype(np.float64).T + p.b[0]
    assert p.x.shape == (50, 20) and np.abs(z).min() > 0
    assert bench.rows_clear_of_kinks(p.W, p.b, p.x).all()
    # a row placed exactly on a kink is rejected
    x = p.x.copy()
    x[0] = 0
    b = [v.copy() for v in p.b]
    b[0][0] = 0
    assert not bench.rows_clear_of_kinks(p.W, b, x)[0]


@pytest.mark.skipif(not _has("matplotlib"), reason="matplotlib is not installed")
def test_bench_plot_sweeps_batch_sizes(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    out_json = tmp_path / "bench.json"
    args = ["bench", *TINY, "--no-torch", "--no-memory", "--quick", "--plot", str(png)]
    args += ["--plot-shape", "13-7-5@3", "--json", str(out_json)]
    assert cli.main(args) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    sweep = json.loads(out_json.read_text())["sweep"]
    assert {p["batch"] for p in sweep} == set(bench.QUICK_SWEEP_BATCHES["cpu"])
    assert {p["candidate"] for p in sweep} >= {"numpy", "floor: NumPy BLAS GEMM"}


@pytest.mark.skipif(not _has("matplotlib"), reason="matplotlib is not installed")
def test_quick_plot_sweeps_the_shape_asked_for(tmp_path):
    """Without --plot-shape, --quick --plot sweeps the network of --shapes, not mnist-mlp."""
    png, out_json = tmp_path / "sweep.png", tmp_path / "bench.json"
    args = ["bench", *TINY, "--no-torch", "--no-memory", "--quick", "--plot", str(png)]
    assert cli.main([*args, "--backends", "numpy", "--json", str(out_json)]) == 0
    sweep = json.loads(out_json.read_text())["sweep"]
    assert {(p["shape"], tuple(p["sizes"])) for p in sweep} == {("13-7-5@3", (13, 7, 5))}
    args = ["--shapes", "all", "--plot", "x.png", "--plot-shape", "9-4@2"]
    parsed = argparse.ArgumentParser()
    bench.add_arguments(parsed)
    assert bench.config_from_args(parsed.parse_args(args)).sweep_shape.name == "9-4@2"
    assert bench.config_from_args(parsed.parse_args(args[:4])).sweep_shape.name == "mnist-mlp"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert cli.main(["bench", *TINY, "--plot", "x.png"]) == 2
    assert "pip install 'gpubp[plot]'" in capsys.readouterr().err


@pytest.mark.skipif(not _has("pytest_benchmark"), reason="pytest-benchmark is not installed")
def test_pytest_benchmark_suite_runs(tmp_path):
    """The suite in benchmarks/ on tiny shapes, once per benchmark (no timing)."""
    env = dict(os.environ, GPUBP_BENCH_SHAPES="13-7-5@3,9-4@2", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def _script(name: str):
    """A script of benchmarks/ imported as a module (without running it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_scripts_import_and_parse_their_options():
    gpu_step = _script("gpu_step")  # needs a GPU to run, not to import
    args = gpu_step.parse_args(["out", "--quick", "--repeats", "3"])
    assert (args.outdir, args.quick, args.repeats) == ("out", True, 3)
    assert gpu_step.SHAPES == {n: s.gpu_batch for n, s in bench.STANDARD_SHAPES.items()}
    assert set(gpu_step.QUICK) <= set(bench.STANDARD_SHAPES)
    assert issubclass(gpu_step.CublasFloor, bench.FloorCandidate)  # the floor's GEMMs, once
    cpu = _script("train_step_cpu")
    args = cpu.parse_args(["--shapes", "mnist-small", "--rounds", "3", "--jit"])
    assert (args.shapes, args.rounds, args.jit, args.settle) == (
        ["mnist-small"],
        3,
        True,
        bench.DEFAULT_SETTLE,
    )
    assert "wide" not in cpu.SHAPES  # GPU only
    with pytest.raises(SystemExit):
        cpu.parse_args(["--shapes", "wide"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_provider_floor_computes_the_same_gemms(dtype):
    """The floor through the GEMM provider (MKL where installed) does the step's GEMMs, checked
    against the reference like every candidate, and is named by its provider."""
    from gpubp.bench.candidates import provider_floor

    floor = provider_floor()
    if floor is None:
        pytest.skip("no GEMM provider callable from the Numba kernels here")
    problem = bench.make_problem((37, 19, 5), 3, dtype, with_reference=False)
    floor.setup(problem)
    assert floor.label == f"floor: {floor.provider} GEMM"
    assert floor.validate(problem) <= TOLERANCE[dtype]
