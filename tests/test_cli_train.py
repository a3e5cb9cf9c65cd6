"""``gpubp train`` and ``gpubp gradflow`` from the command line: output, files, error paths."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import gpubp
from gpubp import cli
from gpubp import datasets as data
from gpubp.train import load_checkpoint

from .idx_files import write_fake_idx_dataset

SMALL = ["--layers", "13,7", "--batch-size", "16", "--quiet"]


@pytest.fixture
def data_dir(tmp_path, rng):
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=120, n_test=40)
    return tmp_path / "data"


def test_train_prints_accuracy_time_speed_and_backend(data_dir, tmp_path, capsys):
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "2", *SMALL]
    js = tmp_path / "run.json"
    assert cli.main([*argv, "--json", str(js), "--save", str(tmp_path / "m.npz")]) == 0
    out = capsys.readouterr().out
    assert "dataset: mnist: 120 training and 40 test samples" in out
    auto = gpubp.get_backend("auto").name
    for piece in ("test accuracy", "wall time", "samples/s", f"backend {auto} float32"):
        assert piece in out
    assert json.loads(js.read_text())["epochs_done"] == 2
    from gpubp import MLP

    assert MLP.load(tmp_path / "m.npz").layer_sizes == (784, 13, 7, 10)


def test_train_auto_says_which_dataset(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPUBP_DATA", str(data_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # hide a system-wide Fashion-MNIST, so MNIST is the largest dataset here
    fashion = dataclasses.replace(data.DATASETS["fashion-mnist"], system_dirs=())
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", fashion)
    assert cli.main(["train", "--epochs", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "dataset: mnist" in out and "auto: the largest dataset found here" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "512,abc"], "argument --layers: expected comma-separated positive widths"),
        (["--layers", "0"], "argument --layers"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--epochs", "two"], "argument --epochs: expected a positive integer"),
        (["--lr", "-1"], "argument --lr: expected a positive number"),
        (["--lr", "nan"], "argument --lr: expected a positive number"),
        (["--val-fraction", "1.5"], "argument --val-fraction: expected a number in [0, 1)"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        (["--dataset", "cifar"], "argument --dataset: invalid choice"),
        (["--backend", "tpu"], "argument --backend: invalid choice"),
    ],
)
def test_train_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_missing_dataset_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPUBP_DATA", raising=False)
    empty = tmp_path / "empty"
    assert cli.main(["train", "--dataset", "mnist", "--data-dir", str(empty), *SMALL]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "--download" in err


def test_train_unavailable_backend_says_why(data_dir, capsys):
    import gpubp

    missing = [n for n, why in gpubp.backend_status().items() if why is not None]
    if not missing:
        pytest.skip("needs a backend that cannot run here, and every backend runs here")
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--backend", missing[0]]
    assert cli.main([*argv, *SMALL]) == 1
    assert "cannot run here" in capsys.readouterr().err


def test_train_bad_resume_file(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--resume", str(bad)]
    assert cli.main([*argv, *SMALL]) == 1
    assert "bad.ckpt" in capsys.readouterr().err


def test_train_mismatched_resume(data_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "run.ckpt")
    base = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "1"]
    assert cli.main([*base, *SMALL, "--checkpoint", ckpt]) == 0
    argv = [*base, "--layers", "13,8", "--batch-size", "16", "--quiet", "--resume", ckpt]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "layers: checkpoint [13, 7], this run [13, 8]" in err


def _training_process(data_dir, ckpt):
    """A real ``gpubp train`` of 300 epochs writing ``ckpt``, returned once its second epoch
    is under way (epoch lines: stdout), with its command line and environment."""
    argv = [sys.executable, "-m", "gpubp", "train", "--dataset", "mnist"]
    argv += ["--data-dir", str(data_dir), "--layers", "13,7", "--batch-size", "16"]
    argv += ["--epochs", "300", "--checkpoint", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
    )
    assert proc.stdout is not None
    seen = ""
    while "epoch 2/300:" not in seen:
        line = proc.stdout.readline()
        assert line, f"gpubp train ended early: {seen[-2000:]}"
        seen += line
    return proc, argv, env


def test_ctrl_c_in_a_real_process_checkpoints_and_resumes(data_dir, tmp_path):
    """SIGINT to a running ``gpubp train``: exit status 130, a checkpoint, and a resume that
    finishes the run."""
    ckpt = tmp_path / "run.ckpt"
    proc, argv, env = _training_process(data_dir, ckpt)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in out and ckpt.exists()
    done = load_checkpoint(ckpt).meta["position"]["epoch"]
    assert 2 <= done < 300
    resumed = subprocess.run(
        [*argv, "--resume", str(ckpt), "--quiet"], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "300 epoch(s)" in resumed.stdout


def test_gradflow_command(data_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "gf.png", tmp_path / "gf.json"
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--depth", "3"]
    argv += ["--width", "9", "--steps", "2", "--plot", str(png), "--json", str(js), "--quiet"]
    assert cli.main(argv) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    runs = json.loads(js.read_text())["runs"]
    assert set(runs) == {"sigmoid", "tanh", "relu"}
    assert np.all(np.isfinite(runs["relu"]["dW"]))
    assert "layer" in capsys.readouterr().out


def test_gradflow_rejects_unknown_activation(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gradflow", "--activations", "sigmoid,swish"])
    assert "argument --activations" in capsys.readouterr().err


def test_train_rejects_negative_seed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--seed", "-1"])
    assert "argument --seed: expected an integer >= 0" in capsys.readouterr().err


def test_train_unwritable_checkpoint_folder_fails_at_once(data_dir, tmp_path, capsys):
    bad = str(tmp_path / "missing" / "run.ckpt")
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--checkpoint", bad]
    assert cli.main([*argv, *SMALL]) == 1
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "epoch" not in captured.out


def test_gradflow_diverging_lr_is_a_message(data_dir, capsys):
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--depth", "3"]
    argv += ["--width", "9", "--steps", "20", "--lr", "1e30", "--plot", "", "--quiet"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "smaller --lr" in err


# --- the first hour ----------------------------------------------------------------------------


def test_quiet_keeps_the_epoch_lines_and_the_summary_on_stdout(data_dir, capsys):
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "2", *SMALL]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "epoch 1/2: loss" in captured.out and "epoch 2/2: loss" in captured.out
    assert "test accuracy" in captured.out
    assert "\r" not in captured.out + captured.err


def test_progress_off_a_terminal_writes_no_bar(data_dir, capsys):
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "1"]
    assert cli.main([*argv, "--layers", "13,7", "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\x1b[K" not in captured.err
    assert "epoch 1/1: loss" in captured.out


def test_resume_takes_the_checkpoints_options(data_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "run.ckpt")
    base = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "1"]
    assert cli.main([*base, *SMALL, "--checkpoint", ckpt]) == 0
    capsys.readouterr()
    # no --layers, --batch-size, --dataset, --data-dir: all from the checkpoint
    assert cli.main(["train", "--resume", ckpt, "--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "[784, 13, 7, 10]" in out and "batch 16" in out
    assert load_checkpoint(ckpt).meta["position"]["epoch"] == 2


def test_resume_of_a_finished_run_says_so(data_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "run.ckpt")
    base = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "1"]
    assert cli.main([*base, *SMALL, "--checkpoint", ckpt]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", ckpt, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "the checkpoint has finished all 1 epochs; pass --epochs M > 1" in out
    assert "resuming from" not in out and "(training" not in out and "samples/s" not in out
    assert "test accuracy" in out


def test_plot_must_be_a_png(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--plot", "curves.jpg"])
    assert "argument --plot: expected a file name ending in .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["gradflow", "--plot", "gf.jpg"])
    assert "argument --plot" in capsys.readouterr().err


def test_unavailable_numba_is_said_in_the_command_lines_words(data_dir, monkeypatch, capsys):
    from gpubp import backends

    monkeypatch.setitem(backends._STATUS, "numba", lambda: "Numba is not installed")
    monkeypatch.delitem(backends._instances, "numba", raising=False)
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--backend", "numba"]
    assert cli.main([*argv, *SMALL]) == 1
    err = capsys.readouterr().err
    assert "Numba is not installed" in err and "--backend auto" in err
    assert "backend='auto'" not in err


def test_gradflow_checks_its_output_folder_before_training(data_dir, tmp_path, capsys):
    bad = str(tmp_path / "missing" / "gf.json")
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--depth", "2"]
    assert cli.main([*argv, "--steps", "2", "--plot", "", "--json", bad, "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "dataset:" not in captured.out


def test_gradflow_without_matplotlib_says_how_to_skip_the_plot(data_dir, hide_module, capsys):
    hide_module("matplotlib")
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--quiet"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "--plot ''" in captured.err and "leave out --plot" not in captured.err
    assert "dataset:" not in captured.out


def test_gradflow_quiet_keeps_one_line_per_activation(data_dir, capsys):
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--depth", "2"]
    argv += ["--width", "5", "--steps", "2", "--plot", "", "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("sigmoid", "tanh", "relu"):
        assert f"{name:10}: loss" in out


@pytest.mark.parametrize("command", ["train", "gradflow", "check"])
def test_help_shows_every_default_once(command):
    sub = next(
        a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    parser = sub.choices[command]  # type: ignore[attr-defined]
    text = parser.format_help()
    assert "None" not in text and "default: default" not in text
    for action in parser._actions:
        if action.default in (None, False) or action.dest == "help":
            continue
        assert action.help.count("default") == 1, (action.dest, action.help)


def test_first_step_is_announced_and_kept_out_of_the_speed(data_dir, monkeypatch):
    from gpubp import loop
    from gpubp.train import TrainConfig, train

    if "numba" not in gpubp.available_backends():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(loop, "_announced", set())
    monkeypatch.setattr(loop, "_kernels_cached", lambda name: False)  # as on a fresh machine
    lines: list[str] = []
    cfg = TrainConfig(
        dataset="mnist", data_dir=str(data_dir), layers=(13, 7), batch_size=16, epochs=2,
        backend="numba",
    )  # fmt: skip
    r = train(cfg, progress=False, log=lines.append)
    assert sum("compiling the numba kernels (first run only" in line for line in lines) == 1
    # the first step, and the first run of steps in one native call (one step): both compile
    assert 0 < r.first_step_seconds < r.train_seconds and r.first_step_samples == 2 * 16
    expected = (r.samples_trained - 32) / (r.train_seconds - r.first_step_seconds)
    assert r.samples_per_second == pytest.approx(expected)
    assert "after the first steps" in lines[-1]
    lines.clear()
    train(cfg, progress=False, log=lines.append)  # said once per process
    assert not any("compiling" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--save", "{d}"], "--save '{d}' is a folder"),
        (["--save", "{d}/m.npz", "--checkpoint", "{d}/m.npz"], "is the same file as --checkpoint"),
        (["--json", "{d}/none/r.json"], "--json '{d}/none/r.json': the folder"),
    ],
)
def test_train_names_the_options_of_bad_output_paths(tmp_path, argv, message, capsys):
    """The command line says --save, not the Python argument save_path=, and says it before
    any data is loaded or any epoch trained."""
    d = str(tmp_path)
    argv = [a.format(d=d) for a in argv]
    assert cli.main(["train", "--dataset", "digits", *argv, *SMALL]) == 1
    err = capsys.readouterr().err
    assert message.format(d=d) in err
    assert "save_path" not in err and "json_path" not in err and "epoch" not in err


def test_output_path_errors_carry_the_argument_and_its_option(tmp_path):
    """The library's message names the Python argument; the error carries the option too, so
    the command line words it without rewriting the text."""
    from gpubp.errors import MissingFolderError, OutputPathError
    from gpubp.files import check_outputs

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(OutputPathError) as info:
        check_outputs({"checkpoint": ckpt, "save_path": ckpt})
    err = info.value
    assert (err.argument, err.option, err.other, err.other_option) == (
        "save_path", "--save", "checkpoint", "--checkpoint"
    )  # fmt: skip
    assert str(err).startswith(f"save_path={str(ckpt)!r} is the same file as checkpoint;")
    assert err.command_line_message().startswith(
        f"--save {str(ckpt)!r} is the same file as --checkpoint;"
    )
    missing = tmp_path / "no" / "run.json"
    with pytest.raises(MissingFolderError) as info:
        check_outputs({"json_path": missing})
    assert isinstance(info.value, FileNotFoundError) and info.value.option == "--json"
    assert info.value.command_line_message().startswith(f"--json {str(missing)!r}: the folder")


# --- interrupts, closed pipes and the input options, for every command that reads or trains ----


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["train", "--dataset", "mnist", "--epochs", "1", *SMALL], "gpubp.train.train"),
        (["gradflow", "--dataset", "mnist", "--steps", "2", "--plot", "", "--quiet"], None),
        (["evaluate", "model.npz", "--dataset", "mnist"], "gpubp.model.MLP.load"),
    ],
)
def test_ctrl_c_outside_a_training_loop_is_one_line(argv, target, data_dir, monkeypatch, capsys):
    """Ctrl-C while the data loads, a model is read or anything else outside the loop that
    turns the first one into a checkpoint: exit status 130 and one line, no traceback."""

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    if target is None:
        monkeypatch.setattr(gpubp.gradflow, "gradflow", interrupted)
    else:
        module, _, name = target.rpartition(".")
        owner = gpubp.model.MLP if module.endswith("MLP") else __import__(module, fromlist=["x"])
        monkeypatch.setattr(owner, name, interrupted)
    assert cli.main([*argv, "--data-dir", str(data_dir)]) == 130
    err = capsys.readouterr().err
    assert f"gpubp {argv[0]}: interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_two_ctrl_c_in_a_real_process_end_in_one_line(data_dir, tmp_path):
    """The second Ctrl-C aborts at once, wherever it lands (the step, the checkpoint's write):
    exit status 130, no traceback, no temporary file, and a checkpoint, if any, that loads."""
    ckpt = tmp_path / "run.ckpt"
    proc, _, _ = _training_process(data_dir, ckpt)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    said = ""
    while "Ctrl-C: stopping" not in said:  # the first one was taken: a second now aborts
        line = proc.stderr.readline()
        assert line, f"no word of the first Ctrl-C: {said[-2000:]}"
        said += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (said + err)[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "gpubp train: interrupted (Ctrl-C)" in err, err[-2000:]  # the second one was taken
    assert sorted(p.name for p in tmp_path.iterdir()) in (["data"], ["data", "run.ckpt"])
    if ckpt.exists():
        load_checkpoint(ckpt)


@pytest.mark.parametrize("command", ["train", "gradflow", "evaluate"])
def test_a_closed_stdout_ends_every_command_quietly(command, data_dir, tmp_path):
    """``gpubp train ... | head -1``: the reader goes away; no traceback, no "Broken pipe"."""
    model = tmp_path / "m.npz"
    gpubp.MLP([784, 13, 10]).save(model)
    args = {
        "train": ["train", "--dataset", "mnist", "--epochs", "2", *SMALL],
        "gradflow": ["gradflow", "--dataset", "mnist", "--steps", "2", "--plot", "", "--quiet"],
        "evaluate": ["evaluate", str(model), "--dataset", "mnist"],
    }[command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubp", *args, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "Broken pipe" not in err, err[-2000:]
    said = [line for line in err.splitlines() if line.startswith(f"gpubp {command}:")]
    assert all(": warning:" in line for line in said), err[-2000:]  # no error was said
    assert proc.returncode == 1, err[-2000:]


def test_a_missing_input_file_names_its_option(data_dir, tmp_path, capsys):
    base = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), *SMALL]
    missing = tmp_path / "nope.ckpt"
    assert cli.main([*base, "--resume", str(missing)]) == 1
    assert f"--resume {missing}: no such file" in capsys.readouterr().err
    table = tmp_path / "nope.csv"
    model = tmp_path / "m.npz"
    gpubp.MLP([4, 3, 2]).save(model)
    for argv in (
        ["train", "--data", str(table), *SMALL],
        ["evaluate", str(model), "--data", str(table)],
        ["predict", str(model), "--data", str(table)],
    ):
        assert cli.main(argv) == 1
        assert f"gpubp {argv[0]}: --data {table}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--dataset", "auto", *SMALL],
        ["train", "--dataset", "mnist", *SMALL],
        ["evaluate", "MODEL", "--dataset", "mnist"],
    ],
)
def test_a_data_dir_that_is_no_folder_is_said_so(argv, tmp_path, capsys):
    model = tmp_path / "m.npz"
    gpubp.MLP([784, 3, 10]).save(model)
    argv = [str(model) if a == "MODEL" else a for a in argv]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for where, extra, said in (
        (tmp_path / "absent", [], "does not exist"),
        (a_file, [], "is not a folder"),
        (a_file, ["--download"], "is not a folder"),
    ):
        assert cli.main([*argv, "--data-dir", str(where), *extra]) == 1
        err = capsys.readouterr().err
        assert f"--data-dir {where} {said}" in err, err
        # --download is offered only where it would help: a dataset by name, a missing folder
        offered = "add --download" in err
        assert offered == (said == "does not exist" and "mnist" in argv), err


def test_digits_never_reads_the_data_dir(tmp_path, capsys):
    """A digits run (or its resume) whose --data-dir is gone still runs: digits comes with
    scikit-learn and is never looked for there."""
    pytest.importorskip("sklearn")
    argv = ["train", "--dataset", "digits", "--epochs", "1", *SMALL]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "gone")]) == 0
