"""A new user's first hour on the command line: data folders, hints that name options the
command has, "did you mean", short usage errors, checkpoint/model mix-ups, the emulated GPU."""

from __future__ import annotations

import re

import pytest

from gpubp import cli

from .idx_files import write_fake_idx_dataset


def _parser(command: str):
    sub = next(
        a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    return sub.choices[command]


@pytest.fixture
def elsewhere(tmp_path, rng, monkeypatch):
    """MNIST in $GPUBP_DATA, an empty folder, and no cache: what an explicit --data-dir must not
    silently fall back from."""
    write_fake_idx_dataset(tmp_path / "env" / "mnist", rng, n_train=40, n_test=20)
    monkeypatch.setenv("GPUBP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize("dataset", ["mnist", "auto"])
def test_an_explicit_data_dir_without_the_files_is_an_error(elsewhere, dataset, capsys):
    argv = ["train", "--dataset", dataset, "--data-dir", str(elsewhere), "--epochs", "1"]
    assert cli.main([*argv, "--layers", "5", "--quiet", "--backend", "numpy"]) == 1
    err = capsys.readouterr().err
    assert str(elsewhere) in err and "--data-dir" in err
    assert "test accuracy" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "evaluate", "gradflow"])
def test_a_missing_dataset_hint_names_options_the_command_has(command, elsewhere, capsys):
    argv = {
        "train": ["train", "--dataset", "mnist", "--epochs", "1"],
        "evaluate": ["evaluate", "nowhere.npz", "--dataset", "mnist"],
        "gradflow": ["gradflow", "--dataset", "mnist", "--plot", ""],
    }[command]
    if command == "evaluate":  # a model that exists, so the dataset is what is missing
        import gpubp

        model = elsewhere.parent / "m.npz"
        gpubp.MLP([784, 3, 10], backend="numpy").save(model)
        argv[1] = str(model)
    assert cli.main([*argv, "--data-dir", str(elsewhere)]) == 1
    err = capsys.readouterr().err
    named = set(re.findall(r"(--[a-z][a-z-]+)", err))
    assert "--download" in named
    assert named <= set(_parser(command)._option_string_actions), named


# --- argparse errors: one usage line, "did you mean" ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["train", "--epocs", "3"], "--epochs"),
        (["train", "--dataset", "fashion"], "fashion-mnist"),
        (["trian"], "train"),
        (["evaluate", "m.npz", "--backend", "numbaa"], "numba"),
    ],
)
def test_a_mistyped_option_choice_or_command_gets_did_you_mean(argv, meant, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"did you mean {meant}?" in err
    assert len(err.strip().splitlines()) == 2, err  # one usage line, then the error


@pytest.mark.parametrize(
    ("argv", "status"),
    [  # README, Output: 2 the command line refused, 1 the run failed; one line, no traceback
        (["train", "--epochs", "0"], 2),
        (["gradflow", "--depth", "0"], 2),
        (["evaluate", "m.npz", "--backend", "nope"], 2),
        (["predict", "m.npz"], 2),
        (["check", "--backends", "nope"], 2),
        (["bench", "--load", "-1"], 2),
        (["train", "--dataset", "mnist", "--data-dir", "ABSENT"], 1),
        (["gradflow", "--dataset", "mnist", "--data-dir", "ABSENT"], 1),
        (["evaluate", "ABSENT/m.npz"], 1),
        (["predict", "ABSENT/m.npz", "--data", "x.csv"], 1),
    ],
)
def test_every_command_refuses_with_the_documented_status(argv, status, tmp_path, capsys):
    argv = [a.replace("ABSENT", str(tmp_path / "absent")) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    assert code == status
    err = capsys.readouterr().err
    assert f"gpubp {argv[0]}:" in err and "Traceback" not in err, err


def test_another_size_is_not_taken_for_a_typo(capsys):
    """``--dtype float16`` is refused with the choices, not "did you mean float64?"."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--dtype", "float16"])
    err = capsys.readouterr().err
    assert "float32" in err and "float64" in err and "did you mean" not in err


def test_a_bad_value_has_one_usage_line_before_the_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "0"])
    usage, error = capsys.readouterr().err.strip().splitlines()
    assert usage.startswith("usage: gpubp train") and "--help" in usage
    assert "--epochs" in error and "positive integer" in error


# --- help texts --------------------------------------------------------------------------------


def test_every_command_has_a_description_and_no_help_promises_a_duration():
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__.startswith("_Sub"))
    for name, parser in sub.choices.items():
        assert parser.description and len(parser.description) > 40, name
        for action in parser._actions:
            assert "few seconds" not in (action.help or ""), (name, action.dest)


# --- checkpoints, models, resumes --------------------------------------------------------------


@pytest.fixture
def run_files(tmp_path, rng):
    """A finished one-epoch run on a small MNIST-like set: its model and checkpoint."""
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=60, n_test=20)
    base = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--quiet"]
    files = {"model": tmp_path / "m.npz", "ckpt": tmp_path / "c.ckpt", "base": base}
    argv = [*base, "--epochs", "1", "--layers", "5", "--backend", "numpy"]
    assert cli.main([*argv, "--save", str(files["model"]), "--checkpoint", str(files["ckpt"])]) == 0
    return files


def test_a_checkpoint_where_a_model_goes_and_the_reverse_name_the_right_option(run_files, capsys):
    capsys.readouterr()
    assert cli.main(["evaluate", str(run_files["ckpt"])]) == 1
    err = capsys.readouterr().err
    assert "is a checkpoint" in err and f"--resume {run_files['ckpt']}" in err
    assert cli.main(["train", "--resume", str(run_files["model"])]) == 1
    err = capsys.readouterr().err
    assert "is a model file" in err and "--checkpoint" in err and "gpubp evaluate" in err


def test_a_resume_mismatch_is_refused_before_the_data_is_read(run_files, monkeypatch, capsys):
    from gpubp import datasets

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the mismatch was found")

    monkeypatch.setattr(datasets, "load_dataset", no_reading)
    argv = ["train", "--resume", str(run_files["ckpt"]), "--dataset", "fashion-mnist"]
    assert cli.main(argv) == 1
    assert "does not match" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run_files["ckpt"]), "--layers", "9"]) == 1
    err = capsys.readouterr().err
    assert "does not match" in err and "layer" in err


def test_a_resumed_run_says_which_time_is_this_sessions(run_files, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_files["ckpt"]), "--epochs", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"wall time [\d.]+ s in this session \(training [\d.]+ s over all", last)


# --- the emulated GPU ----------------------------------------------------------------------------


def test_info_lists_backends_in_autos_order_and_labels_the_emulator(monkeypatch, capsys):
    from gpubp.backends import get_backend

    monkeypatch.setenv("GPUBP_CUPY_MODULE", "cudaemu.cupy")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    backends = out.split("libraries:")[0]
    listed = re.findall(r"^  (cupy|numba|numpy) ", backends, re.M)
    auto = get_backend("auto").name
    assert listed[0] == auto and listed[-1] == "cupy", listed
    assert "emulated GPU" in backends


def test_info_says_how_to_turn_the_emulator_on(monkeypatch, capsys):
    monkeypatch.setenv("GPUBP_CUPY_MODULE", "cupy")  # the real one only: not installed here
    from gpubp.backends import backend_status

    if backend_status()["cupy"] is None:
        pytest.skip("a real GPU is here")
    assert cli.main(["info"]) == 0
    assert "GPUBP_CUPY_MODULE=cudaemu.cupy" in capsys.readouterr().out


def test_a_run_on_the_emulator_says_so():
    from gpubp.backends import backend_label, get_backend

    from .conftest import skip_unless_available

    skip_unless_available("cupy")
    be = get_backend("cupy")
    emulated = be.xp.__name__.startswith("cudaemu")
    assert ("emulated GPU: correctness only, not speed" in backend_label(be)) == emulated
    assert backend_label(get_backend("numpy")) == "numpy"


def test_backend_cupy_refused_says_how_to_run_the_emulator(monkeypatch, capsys):
    from gpubp import backends, datasets
    from gpubp.backends import backend_status

    monkeypatch.setenv("GPUBP_CUPY_MODULE", "cupy")  # the real one only
    monkeypatch.delitem(backends._instances, "cupy", raising=False)  # not an emulated one made
    if backend_status()["cupy"] is None:
        pytest.skip("a real GPU is here")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("data read"))
    assert cli.main(["train", "--backend", "cupy", "--dataset", "digits"]) == 1
    err = capsys.readouterr().err
    assert "GPUBP_CUPY_MODULE=cudaemu.cupy" in err and "--backend auto" in err
