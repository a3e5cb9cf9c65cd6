"""``threads=``: ``get_backend(name, threads=N)``, ``use_backend`` with a backend object, and
``--threads N`` of ``gpubp train``, ``gpubp gradflow`` and ``gpubp bench`` (no timing asserted)."""

from __future__ import annotations

import json

import pytest

import gpubp
from gpubp import cli

from .conftest import skip_unless_available
from .idx_files import write_fake_idx_dataset


@pytest.fixture
def numba_name() -> str:
    skip_unless_available("numba")
    return "numba"


def test_get_backend_with_threads_is_a_backend_of_its_own(numba_name):
    shared = gpubp.get_backend(numba_name)
    two = gpubp.get_backend(numba_name, threads=2)
    assert two is not shared and two.threads == 2 and two.name == "numba"
    assert gpubp.get_backend(numba_name, threads=2) is two  # one instance per count
    assert gpubp.get_backend(numba_name, threads=1).threads == 1
    assert gpubp.get_backend(numba_name) is shared  # the shared one is untouched


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_get_backend_refuses_a_bad_thread_count(numba_name, bad):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        gpubp.get_backend(numba_name, threads=bad)


def test_a_backend_without_a_thread_count_refuses_one():
    with pytest.raises(ValueError, match="the numpy backend takes no thread count"):
        gpubp.get_backend("numpy", threads=2)


def test_use_backend_with_an_object_answers_its_name_and_auto(numba_name):
    two = gpubp.get_backend(numba_name, threads=2)
    with gpubp.use_backend(two) as be:
        assert be is two
        assert gpubp.get_backend("auto") is two and gpubp.get_backend(numba_name) is two
        assert gpubp.get_backend("numpy").name == "numpy"  # other names: as before
        with gpubp.use_backend("numpy"):
            assert gpubp.get_backend("auto").name == "numpy"
            assert gpubp.get_backend(numba_name) is two  # still the outer block's
    assert gpubp.get_backend(numba_name) is not two


@pytest.mark.parametrize("command", ["train", "gradflow", "bench"])
@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_threads_option_refuses_bad_values_by_name(command, value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--threads", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: expected a positive integer" in err and repr(value) in err


@pytest.fixture
def data_dir(tmp_path, rng):
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=120, n_test=40)
    return tmp_path / "data"


@pytest.mark.parametrize("command", ["train", "gradflow"])
def test_threads_on_numpy_is_refused_naming_the_option(command, data_dir, capsys):
    argv = [command, "--backend", "numpy", "--threads", "2", "--data-dir", str(data_dir)]
    assert cli.main([*argv, "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err
    assert f"gpubp {command}: --threads: the numpy backend takes no thread count" in err


def test_train_threads_reach_the_backend(numba_name, data_dir, monkeypatch, capsys):
    seen = []

    def fake_train(config, **kw):
        seen.append(gpubp.get_backend(config.backend))  # what MLP(backend=...) gets
        raise KeyboardInterrupt

    monkeypatch.setattr(gpubp.train, "train", fake_train)
    argv = ["train", "--backend", numba_name, "--threads", "1", "--data-dir", str(data_dir)]
    assert cli.main([*argv, "--dataset", "mnist"]) == 130  # the fake's Ctrl-C, said in a line
    (be,) = seen
    assert be.name == "numba" and be.threads == 1


def test_train_and_gradflow_run_with_threads(numba_name, data_dir, tmp_path, capsys):
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--threads", "1"]
    argv += ["--layers", "13", "--epochs", "1", "--quiet", "--backend", numba_name]
    assert cli.main(argv) == 0
    assert "backend numba" in capsys.readouterr().out
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--depth", "2"]
    argv += ["--steps", "3", "--plot", "", "--quiet", "--threads", "1"]
    assert cli.main([*argv, "--backend", numba_name]) == 0
    runs = gpubp.gradflow.gradflow(
        activations=["relu"], depth=2, width=8, dataset="mnist", data_dir=str(data_dir),
        steps=2, plot_path=None, progress=False, log=lambda line: None, backend=numba_name,
        threads=1,
    )  # fmt: skip
    assert len(runs["relu"]["dW"]) == 3


def test_step_bench_with_threads_and_load(numba_name, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--shapes", "13-7-5@3", "--repeats", "3", "--min-time", "0"]
    argv += ["--settle", "0", "--no-progress", "--no-memory", "--no-torch"]
    argv += ["--backends", "numba,numpy", "--threads", "1", "--load", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "threads: 1 (backends that take threads=" in text and "load: 1 busy" in text
    record = json.loads(out.read_text())
    assert record["meta"]["threads"] == 1 and record["meta"]["load"] == 1
    assert "--threads 1 --load 1" in record["meta"]["command"]
    assert {r["candidate"] for r in record["rows"]} >= {"numba", "numpy"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--load", "-1"], "argument --load: expected an integer >= 0, got '-1'"),
        (["--load", "x"], "argument --load: expected an integer >= 0, got 'x'"),
        (["--job", "--contenders", "caffe"], "argument --contenders: expected comma-separated"),
    ],
)
def test_bench_load_and_contenders_refuse_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_threads_above_the_usable_cores_are_taken_with_a_note(
    numba_name, data_dir, monkeypatch, capsys
):
    from gpubp import machine

    seen = []

    def fake_train(config, **kw):
        seen.append(gpubp.get_backend(config.backend).threads)
        raise KeyboardInterrupt

    monkeypatch.setattr(gpubp.train, "train", fake_train)
    monkeypatch.setattr(machine, "usable_cores", lambda: 1)
    argv = ["train", "--backend", numba_name, "--threads", "3", "--data-dir", str(data_dir)]
    assert cli.main([*argv, "--dataset", "mnist"]) == 130
    assert seen == [3]  # what was asked for
    err = capsys.readouterr().err
    assert "note: --threads 3 is more than the 1 core(s) this process may use" in err
    assert "--threads 1 or fewer" in err
