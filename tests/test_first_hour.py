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
