"""Faults around a run: links planted at temporary names, failed and killed writes, a full disk,
a read-only folder, outputs that collide, data that does not fit, resuming with a new learning
rate. Each asserts the exact error class, its message, and that nothing else changed."""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpubp import MLP, cli, files
from gpubp import datasets as data
from gpubp.config import TrainConfig
from gpubp.errors import (
    CheckpointError,
    CheckpointMismatchError,
    DatasetError,
    OutputPathError,
    OutputWriteError,
)
from gpubp.npzfile import write_npz_atomic
from gpubp.train import load_checkpoint, train

from .test_fuzz_files import members, meta_of, rezip, with_meta


def small(**kw: Any) -> TrainConfig:
    base = dict(dataset="mnist", layers=(32,), batch_size=16, epochs=1, backend="numpy", seed=2)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def run(config: TrainConfig, lines: list[str] | None = None, **kw: Any) -> Any:
    return train(config, progress=False, log=(lines.append if lines is not None else print), **kw)


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training step runs."""

    def step(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a training step ran; the check should have come first")

    monkeypatch.setattr(MLP, "step", step)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at ``folder`` (skips the test when this process cannot mount one)."""
    folder.mkdir(exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


class _NoSpace:
    """A file whose writes fail as on a full disk."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def write(self, b: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _NoSpace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()


@contextlib.contextmanager
def full_disk(folder: Path, how: str, monkeypatch: Any):
    """``folder`` on a full disk: a 64 KiB tmpfs, or writes there failing with ENOSPC."""
    if how == "tmpfs":
        with tmpfs(folder, "size=64k") as f:
            yield f
        return
    folder.mkdir(exist_ok=True)
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: Any, **kw: Any) -> Any:
        fh = real_fdopen(fd, *args, **kw)
        where = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else ""
        return _NoSpace(fh) if where.startswith(str(folder)) else fh

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    yield folder


# --- temporary files -------------------------------------------------------------------------


WRITERS = {
    "model": lambda p: MLP([7, 5, 3], backend="numpy").save(p),
    "npz": lambda p: write_npz_atomic(p, {"a": np.arange(3.0)}),
    "json": lambda p: files.write_json(p, {"a": 1}),
    "download": lambda p: files.write_atomic(Path(p), b"payload"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_links_planted_at_temporary_names_are_not_followed(tmp_path, monkeypatch, writer):
    """Links at the names older versions used and at the first name mkstemp will try: the
    victims keep their bytes, the output is a regular file, the links stay links."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out.file"
    pid = os.getpid()
    planted = [tmp_path / f".out.file.{pid}.tmp", tmp_path / f".out.file.{pid}.part"]
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["guess1", "fresh2"]))
    planted.append(tmp_path / f".out.file.{pid}.guess1{files.TMP_SUFFIX}")
    for link in planted:
        link.symlink_to(victim)
    WRITERS[writer](out)
    assert victim.read_bytes() == b"precious"
    assert out.is_file() and not out.is_symlink() and out.stat().st_size > 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert all(link.is_symlink() for link in planted)
    assert listing(tmp_path) == sorted(["victim.txt", "out.file", *(p.name for p in planted)])


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("existing", [True, False])
def test_a_full_disk_removes_the_temp_file_and_keeps_the_target(
    tmp_path, monkeypatch, writer, existing
):
    folder = tmp_path / "full"
    with full_disk(folder, "simulated", monkeypatch):
        out = folder / "out.file"
        if existing:
            out.write_bytes(b"the previous version")
        with pytest.raises(OutputWriteError) as info:
            WRITERS[writer](out)
        assert info.value.errno == errno.ENOSPC
        message = str(info.value)
        assert str(out) in message and "is full" in message
        assert ("was not changed" if existing else "nothing was written") in message
        assert listing(folder) == (["out.file"] if existing else [])
        if existing:
            assert out.read_bytes() == b"the previous version"


def test_an_interrupted_write_removes_its_temp_file(tmp_path, monkeypatch):
    def interrupted(*args: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_npz_atomic(tmp_path / "m.npz", {"a": np.zeros(2)})
    assert listing(tmp_path) == []


def test_a_folder_as_target_is_refused(tmp_path):
    (tmp_path / "m.npz").mkdir()
    with pytest.raises(OutputWriteError, match="is a folder"):
        WRITERS["model"](tmp_path / "m.npz")
    assert listing(tmp_path / "m.npz") == []


def test_temp_files_of_killed_runs_are_removed_on_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [f".m.npz.{dead.pid}.k3j9x{files.TMP_SUFFIX}", f".m.npz.{dead.pid}.tmp"]
    stale.append(f".m.npz.{dead.pid}.part")
    kept = [
        f".m.npz.{os.getppid()}.alive{files.TMP_SUFFIX}",  # a live process's write
        f".other.npz.{dead.pid}.tmp",  # another target's
        "m.npz.notes",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 1000)
    link = tmp_path / f".m.npz.{dead.pid}.link{files.TMP_SUFFIX}"
    link.symlink_to(tmp_path / "m.npz.notes")  # not a regular file: left alone
    WRITERS["model"](tmp_path / "m.npz")
    assert listing(tmp_path) == sorted([*kept, link.name, "m.npz"])


# --- checks before the first epoch -----------------------------------------------------------


def test_colliding_outputs_are_refused_before_training(fake_mnist, tmp_path, no_training):
    ckpt = tmp_path / "run.ckpt"
    cases = [
        dict(save_path=ckpt, checkpoint=ckpt),
        dict(save_path=tmp_path / "a" / ".." / "run.ckpt", checkpoint=ckpt),
        dict(json_path=tmp_path / "x.json", save_path=tmp_path / "x.json"),
        dict(save_path=tmp_path),
        dict(json_path=fake_mnist),
    ]
    (tmp_path / "a").mkdir()
    before = listing(tmp_path)
    for kw in cases:
        with pytest.raises(OutputPathError):
            run(small(), [], **kw)
    assert listing(tmp_path) == before


def test_save_onto_the_checkpoint_resumed_from_is_refused(fake_mnist, tmp_path, monkeypatch):
    ckpt = tmp_path / "run.ckpt"
    run(small(), [], checkpoint=ckpt)
    before = ckpt.read_bytes()
    monkeypatch.setattr(MLP, "step", lambda *a: pytest.fail("trained"))
    with pytest.raises(OutputPathError, match="save_path"):
        run(small(epochs=2), [], resume=ckpt, save_path=ckpt)
    with pytest.raises(OutputPathError, match="the resume file it reads"):
        run(small(epochs=2), [], resume=ckpt, checkpoint=tmp_path / "new", json_path=ckpt)
    assert ckpt.read_bytes() == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("output", ["save_path", "json_path", "checkpoint"])
def test_a_read_only_folder_is_refused_before_training(fake_mnist, tmp_path, no_training, output):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount
        ctx: Any = tmpfs(folder, "size=64k,ro")
    else:
        folder.mkdir()
        folder.chmod(0o555)
        ctx = contextlib.nullcontext(folder)
    with ctx:
        with pytest.raises(OutputWriteError) as info:
            run(small(), [], **{output: folder / "out"})
        assert info.value.errno in (errno.EROFS, errno.EACCES)
        assert "not writable" in str(info.value) and output in str(info.value)
        assert listing(folder) == []


def test_lr_beyond_the_dtype_is_refused(fake_mnist, capsys, no_training):
    with pytest.raises(ValueError, match="infinite in float32"):
        small(lr=1e39)
    assert small(lr=1e39, dtype="float64").peak_lr == 1e39
    assert cli.main(["train", "--dataset", "mnist", "--lr", "1e39", "--quiet"]) == 2
    assert "lr=1e+39 is infinite in float32" in capsys.readouterr().err


def idx(arr: np.ndarray, code: int) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0D: ">f4"}[code]
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(
        struct.pack(">I", n) for n in arr.shape
    )
    return head + arr.astype(dt).tobytes()


def replace_file(folder: Path, stem: str, blob: bytes) -> None:
    (folder / f"{stem}.gz").write_bytes(gzip.compress(blob))


@pytest.mark.parametrize(
    ("stem", "blob", "message"),
    [
        ("train-labels-idx1-ubyte", idx(np.r_[np.zeros(119), -1], 0x09), "labels range"),
        ("t10k-labels-idx1-ubyte", idx(np.r_[np.zeros(39), 10], 0x08), "labels range"),
        ("train-labels-idx1-ubyte", idx(np.r_[np.zeros(119), 0.5], 0x0D), "whole numbers"),
        ("train-labels-idx1-ubyte", idx(np.r_[np.zeros(119), np.nan], 0x0D), "whole numbers"),
        ("t10k-images-idx3-ubyte", idx(np.full((40, 28, 28), np.nan), 0x0D), "NaN"),
        ("t10k-images-idx3-ubyte", idx(np.zeros((40, 27, 28)), 0x08), "same size"),
        ("t10k-images-idx3-ubyte", idx(np.zeros((39, 28, 28)), 0x08), "do not match"),
        ("train-images-idx3-ubyte", idx(np.zeros((120, 784)), 0x08), "do not match"),
    ],
)
def test_data_that_does_not_fit_is_refused_before_training(
    fake_mnist, no_training, stem, blob, message
):
    replace_file(fake_mnist / "mnist", stem, blob)
    with pytest.raises(DatasetError, match=message) as info:
        run(small(), [])
    assert type(info.value) is DatasetError and str(fake_mnist / "mnist") in str(info.value)


def test_test_set_of_another_width_is_refused_before_training(monkeypatch, no_training):
    rng = np.random.default_rng(0)
    ds = data.Dataset(
        "digits",
        rng.normal(size=(50, 8)).astype(np.float32),
        rng.integers(0, 3, 50),
        rng.normal(size=(10, 9)).astype(np.float32),
        rng.integers(0, 3, 10),
        ("a", "b", "c"),
        "made here",
    )
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: ds)
    with pytest.raises(DatasetError, match="same width"):
        run(small(dataset="digits"), [])


def test_a_partial_data_dir_is_an_error_not_a_fallback(fake_mnist, tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    shutil.copytree(fake_mnist / "mnist", partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="missing t10k-labels-idx1-ubyte"):
        data.find_dataset("mnist", partial)
    # a folder given explicitly is the only place looked: none there is not found, not found
    # elsewhere (an empty --data-dir once fell back to $GPUBP_DATA without a word)
    assert data.find_dataset("mnist", tmp_path / "empty") is None
    assert data.find_dataset("mnist") == fake_mnist / "mnist"


# --- failed writes after training ------------------------------------------------------------


@pytest.mark.parametrize("how", ["tmpfs", "simulated"])
def test_a_full_disk_at_save_keeps_the_trained_model(fake_mnist, tmp_path, monkeypatch, how):
    ckpt = tmp_path / "run.ckpt"
    with full_disk(tmp_path / "full", how, monkeypatch) as full:
        lines: list[str] = []
        with pytest.raises(OutputWriteError) as info:
            run(small(), lines, checkpoint=ckpt, save_path=full / "model.npz")
        assert listing(full) == []  # no temp file left behind
    rescued = tmp_path / "model.npz"  # next to the checkpoint
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert str(full / "model.npz") in message and "is full" in message
    assert f"written to {rescued} instead" in message and f"{ckpt} holds" in message
    assert any(f"written to {rescued} instead" in line for line in lines)
    saved = MLP.load(rescued, backend="numpy")
    for i, w in enumerate(saved.get_parameters()[0]):
        np.testing.assert_array_equal(w, load_checkpoint(ckpt).arrays[f"W{i}"])


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(fake_mnist, tmp_path, monkeypatch):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    ckpt = folder / "run.ckpt"
    run(small(), [], checkpoint=ckpt)
    before = ckpt.read_bytes()
    with full_disk(folder, "simulated", monkeypatch):
        with pytest.raises(OutputWriteError) as info:
            run(small(epochs=3), [], resume=ckpt)
    message = str(info.value)
    assert not message.startswith("[Errno") and info.value.errno == errno.ENOSPC
    assert f"could not write {ckpt}" in message and f"{ckpt} was not changed" in message
    assert "stopped after 2 epoch(s)" in message and f"--resume {ckpt}" in message
    assert ckpt.read_bytes() == before and listing(folder) == ["run.ckpt"]


def test_without_a_checkpoint_the_model_goes_to_the_current_folder(
    fake_mnist, tmp_path, monkeypatch
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "r.json").write_text("someone else's")  # not overwritten: a name of its own
    monkeypatch.chdir(cwd)
    with full_disk(tmp_path / "full", "simulated", monkeypatch) as full:
        with pytest.raises(OutputWriteError) as info:
            run(small(), [], save_path=full / "m.npz", json_path=full / "r.json")
    message = str(info.value)
    assert f"written to {cwd / 'm.npz'} instead" in message and "no checkpoint" in message
    rescued_json = f"r.rescued-{os.getpid()}.json"
    assert listing(cwd) == sorted(["m.npz", "r.json", rescued_json])
    assert MLP.load(cwd / "m.npz").layer_sizes == (784, 32, 10)
    assert json.loads((cwd / rescued_json).read_text())["epochs_done"] == 1
    assert (cwd / "r.json").read_text() == "someone else's"


def test_cli_full_disk_exits_1_naming_the_rescued_model(fake_mnist, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "run.ckpt"
    with full_disk(tmp_path / "full", "simulated", monkeypatch) as full:
        argv = ["train", "--dataset", "mnist", "--layers", "9", "--epochs", "1", "--quiet"]
        code = cli.main([*argv, "--checkpoint", str(ckpt), "--save", str(full / "m.npz")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"written to {tmp_path / 'm.npz'} instead" in err


# --- resuming --------------------------------------------------------------------------------


def test_resume_with_another_lr_needs_override(fake_mnist, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    run(small(optimizer="sgd", schedule="constant", lr=0.5), [], checkpoint=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointMismatchError, match="--override lr"):
        run(small(optimizer="sgd", schedule="constant", lr=0.05, epochs=2), [], resume=ckpt)
    assert ckpt.read_bytes() == before
    with pytest.raises(ValueError, match="cannot be overridden"):
        run(
            small(optimizer="sgd", schedule="constant", lr=0.05, epochs=2),
            [],
            resume=ckpt,
            override=["seed"],
        )
    with pytest.raises(ValueError, match="only applies when resuming"):
        run(small(), [], override=["lr"])  # not resuming
    lines: list[str] = []
    result = run(
        small(optimizer="sgd", schedule="constant", lr=0.05, epochs=2),
        lines,
        resume=ckpt,
        override=["lr"],
    )
    assert result.epochs_done == 2 and result.history["lr"] == [0.5, 0.05]
    assert any("the learning rate is now 0.05" in line for line in lines)
    assert load_checkpoint(ckpt).train_config["lr"] == 0.05  # the next resume matches it


def test_cli_resume_with_override_lr(fake_mnist, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    argv = ["train", "--dataset", "mnist", "--layers", "9", "--quiet", "--optimizer", "sgd"]
    assert cli.main([*argv, "--epochs", "1", "--checkpoint", str(ckpt)]) == 0
    again = ["train", "--resume", str(ckpt), "--epochs", "2", "--lr", "0.01", "--quiet"]
    assert cli.main(again) == 1
    assert "--override lr" in capsys.readouterr().err
    assert cli.main([*again, "--override", "lr"]) == 0
    assert "learning rate is now 0.01" in capsys.readouterr().out
    assert cli.main([*argv, "--override", "lr"]) == 2
    assert "only applies with --resume" in capsys.readouterr().err


def _rewrite_meta(path: Path, change: Any) -> None:
    blob = path.read_bytes()
    meta = meta_of(blob)
    change(meta)
    path.write_bytes(with_meta(blob, meta))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["position"].update(batch=10**6),
        lambda m: m["position"].update(batch=2, seen=5),
    ],
)
def test_a_position_outside_the_epoch_is_refused(fake_mnist, tmp_path, change):
    ckpt = tmp_path / "run.ckpt"
    run(small(), [], checkpoint=ckpt)
    _rewrite_meta(ckpt, change)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="not a place in an epoch"):
        run(small(epochs=2), [], resume=ckpt)
    assert ckpt.read_bytes() == before


def test_a_changed_mpi_rank_count_gets_a_note(fake_mnist, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    run(small(), [], checkpoint=ckpt)
    assert load_checkpoint(ckpt).train_config["mpi_ranks"] == 1
    _rewrite_meta(ckpt, lambda m: m["train"].update(mpi_ranks=4))
    lines: list[str] = []
    run(small(epochs=2), lines, resume=ckpt)
    assert any("over 4 MPI rank(s) and this one uses 1" in line for line in lines)


def test_an_interrupted_run_says_its_saved_model_is_partly_trained(
    fake_mnist, tmp_path, monkeypatch
):
    original, count = MLP.step, [0]

    def step(model: MLP, *args: Any) -> Any:
        count[0] += 1
        if count[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(model, *args)

    monkeypatch.setattr(MLP, "step", step)
    lines: list[str] = []
    result = run(small(epochs=2), lines, checkpoint=tmp_path / "c", save_path=tmp_path / "m.npz")
    assert result.interrupted and (tmp_path / "m.npz").is_file()
    assert any("only partly trained" in line and "0 epoch(s) of 2" in line for line in lines)


def test_a_checkpoint_with_nan_adam_state_is_refused_naming_it(fake_mnist, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    run(small(), [], checkpoint=ckpt)
    parts = members(ckpt.read_bytes())
    arr = np.load(io.BytesIO(parts["opt_exp_avg_sq_0.npy"]))
    arr[0, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, arr)
    parts["opt_exp_avg_sq_0.npy"] = buf.getvalue()
    ckpt.write_bytes(rezip(parts))
    with pytest.raises(CheckpointError, match="opt_exp_avg_sq_0 holds NaN"):
        run(small(epochs=2), [], resume=ckpt)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_the_umask_is_read_without_changing_it(mask, monkeypatch):
    """files._umask reads the mask (on Linux from /proc, so no other thread ever sees it
    changed) and gives what os.umask would."""
    from gpubp import files

    old = os.umask(mask)
    try:
        calls = []
        real = os.umask
        if os.path.exists("/proc/self/status"):
            monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
        assert files._umask() == mask
        assert calls == []
    finally:
        os.umask(old)
