"""Hostile options and concurrent use: sizes from options checked against the memory budget
before anything that large is allocated (gpubp.budget), batch buffers no larger than the data,
and one thread at a time in a model's training calls.

Every refusal is a gpubp error naming the option or argument, with the number and how to raise
the limit (``GPUBP_MEMORY_LIMIT``), and costs far less than the size it refuses.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from gpubp import MLP, cli
from gpubp.budget import check_memory, memory_limit, parse_size
from gpubp.errors import ConcurrentUseError, MemoryBudgetError
from gpubp.gather import BatchGather
from gpubp.optim import Adam

from .idx_files import write_fake_idx_dataset


@pytest.fixture
def data_dir(tmp_path, rng):
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=60, n_test=20)
    return tmp_path / "data"


def traced(call):
    """``call()``'s exception and the peak of memory traced while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as info:
            call()
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the budget -------------------------------------------------------------------------------


def test_the_limit_and_its_override(monkeypatch):
    monkeypatch.delenv("GPUBP_MEMORY_LIMIT", raising=False)
    limit, source = memory_limit()
    assert limit is None or (limit > 1 << 20 and "machine" in source)
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "1.5G")
    assert memory_limit()[0] == 3 << 29
    assert parse_size("512MiB") == 512 << 20 and parse_size("4096") == 4096
    for bad in ("", "-1G", "lots", "nanG", "1e30T"):
        with pytest.raises(ValueError, match="GPUBP_MEMORY_LIMIT"):
            parse_size(bad)
    with pytest.raises(MemoryBudgetError, match=r"GPUBP_MEMORY_LIMIT=1\.9G") as info:
        check_memory((3 << 29) + 1, "the thing", "make it smaller")
    assert "the thing needs about 1.5 GiB" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)


@pytest.mark.parametrize("sizes", [[4, 10**9, 3], [4, 100_000, 100_000, 3], [4, *[8] * 200_000, 3]])
def test_a_network_beyond_the_budget_is_refused_before_it_is_built(sizes, monkeypatch):
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "256M")
    exc, peak = traced(lambda: MLP(sizes, backend="numpy"))
    assert type(exc) is MemoryBudgetError and "layer_sizes" in str(exc)
    assert peak < 64 << 20  # the sizes list itself, no parameters


def test_a_batch_size_beyond_the_data_allocates_the_data_only():
    X = np.arange(20.0).reshape(10, 2)
    Y = np.arange(10)
    gather = BatchGather(X, Y, 10**12)
    xb, yb = gather(np.array([3, 1, 9]))
    assert gather._bufs is not None and gather._bufs[0].shape == (10, 2)
    np.testing.assert_array_equal(xb, X[[3, 1, 9]])
    np.testing.assert_array_equal(yb, Y[[3, 1, 9]])


def test_fit_with_an_enormous_batch_size_trains_on_all_the_data(rng):
    x = rng.normal(size=(40, 5))
    y = rng.integers(0, 3, 40)
    big, whole = MLP([5, 6, 3], backend="numpy"), MLP([5, 6, 3], backend="numpy")
    tracemalloc.start()
    try:
        big.fit(x, y, epochs=2, batch_size=10**12, progress=False, shuffle=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole.fit(x, y, epochs=2, batch_size=40, progress=False, shuffle=False)
    for a, b in zip(big.get_parameters()[0], whole.get_parameters()[0]):
        np.testing.assert_array_equal(a, b)
    assert peak < 16 << 20


def test_train_refuses_layers_beyond_the_budget(data_dir, capsys, monkeypatch):
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "256M")
    base = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--quiet"]
    for layers in ("1000000000", "100000,100000"):
        assert cli.main([*base, "--layers", layers]) == 1
        err = capsys.readouterr().err
        assert "--layers" in err and "GPUBP_MEMORY_LIMIT=" in err and "Traceback" not in err


def test_train_takes_a_batch_size_beyond_the_data(data_dir, tmp_path, capsys):
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--layers", "5"]
    assert cli.main([*argv, "--batch-size", "1000000000000", "--epochs", "1", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--depth", "100000"], ["--width", "1000000000"]])
def test_gradflow_refuses_sizes_beyond_the_budget(option, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "512M")
    argv = ["gradflow", *option, "--plot", "", "--data-dir", str(tmp_path / "none"), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert option[0] in err and "GPUBP_MEMORY_LIMIT=" in err and "Traceback" not in err


# --- one thread at a time --------------------------------------------------------------------


class _HeldAdam(Adam):
    """Adam whose first bind signals ``inside`` and waits for ``release``: a fit held inside
    its first step while another thread calls in."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.inside, self.release = threading.Event(), threading.Event()

    def bind(self, *args, **kwargs):
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(30)
        return super().bind(*args, **kwargs)


def test_a_second_thread_is_refused_while_one_trains(rng):
    model = MLP([5, 7, 3], backend="numpy", seed=1)
    x, y = rng.normal(size=(32, 5)), rng.integers(0, 3, 32)
    held = _HeldAdam()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            model.fit(x, y, epochs=2, batch_size=8, optimizer=held, progress=False)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert held.inside.wait(30)
        before = model.get_parameters()
        calls = {
            "train_step": lambda: model.train_step(x[:4], y[:4], Adam()),
            "fit": lambda: model.fit(x, y, epochs=1, progress=False),
            "set_parameters": lambda: model.set_parameters(*before),
        }
        for name, call in calls.items():
            with pytest.raises(ConcurrentUseError, match=f"^{name}: .*another thread"):
                call()
    finally:
        held.release.set()
        thread.join(60)
    assert not errors
    W, b = model.get_parameters()
    assert all(np.isfinite(a).all() for a in W + b)
    model.train_step(x[:4], y[:4], Adam())  # free again once the fit returned


# --- outputs are never inputs ----------------------------------------------------------------


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("option", "target"),
    [
        ("--save", "train-images-idx3-ubyte.gz"),
        ("--checkpoint", "t10k-labels-idx1-ubyte.gz"),
        ("--json", "hardlink"),
        ("--plot", "symlink.png"),
    ],
)
def test_train_never_writes_over_a_dataset_file(data_dir, tmp_path, capsys, option, target):
    folder = data_dir / "mnist"
    (folder / "hardlink").hardlink_to(folder / "train-labels-idx1-ubyte.gz")
    (tmp_path / "symlink.png").symlink_to(folder / "t10k-images-idx3-ubyte.gz")
    path = tmp_path / target if target.startswith("symlink") else folder / target
    before = _snapshot(data_dir)
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--layers", "5"]
    assert cli.main([*argv, "--epochs", "1", "--quiet", option, str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{option} " in err and "dataset's" in err and "destroy" in err
    assert _snapshot(data_dir) == before


def test_evaluate_never_writes_its_json_over_its_inputs(data_dir, tmp_path, capsys):
    model = tmp_path / "m.npz"
    MLP([784, 5, 10], backend="numpy").save(model)
    saved = model.read_bytes()
    data_file = data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    before = _snapshot(data_dir)
    base = ["evaluate", str(model), "--dataset", "mnist", "--data-dir", str(data_dir)]
    for target, words in ((model, "model file"), (data_file, "dataset's")):
        assert cli.main([*base, "--json", str(target)]) == 1
        err = capsys.readouterr().err
        assert "--json" in err and words in err and "destroy" in err
    assert model.read_bytes() == saved and _snapshot(data_dir) == before


def test_bench_checks_its_json_before_it_runs_and_writes_it_atomically(tmp_path, capsys):
    tiny = ["bench", "--shapes", "5-4-3@2", "--backends", "numpy", "--repeats", "3"]
    tiny += ["--min-time", "0", "--settle", "0", "--no-progress", "--no-torch"]
    missing = tmp_path / "no" / "such" / "bench.json"
    assert cli.main([*tiny, "--json", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert "--json" in err and "does not exist" in err and "median" not in out  # nothing ran
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "bench.json"
    link.symlink_to(victim)  # a planted link: replaced, never written through
    assert cli.main([*tiny, "--json", str(link)]) == 0
    assert victim.read_text() == "keep me" and not link.is_symlink()
    assert "rows" in link.read_text()


def test_the_output_check_writes_real_bytes_and_follows_no_link(tmp_path, monkeypatch):
    from gpubp import files
    from gpubp.errors import OutputWriteError

    dangling = tmp_path / "out.json"
    dangling.symlink_to(tmp_path / "gone" / "nowhere.json")  # the write replaces the link
    files.check_outputs({"json_path": dangling})

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "write", full)  # a full disk with inodes left
    with pytest.raises(OutputWriteError, match="full"):
        files.check_outputs({"json_path": tmp_path / "x.json"})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.json")]


# --- checkpoints and optimizer state --------------------------------------------------------


def test_a_resume_never_takes_download_from_the_checkpoint(data_dir, tmp_path, monkeypatch):
    """A checkpoint saying download=true: the resume's settings leave it out, so nothing is
    fetched unless --download is typed."""
    from gpubp.checkpoint import load_checkpoint, resume_settings
    from gpubp.config import TrainConfig
    from gpubp.train import train

    ckpt = tmp_path / "run.ckpt"
    config = TrainConfig(dataset="mnist", data_dir=str(data_dir), layers=(5,), epochs=1)
    train(config, checkpoint=ckpt, progress=False, log=lambda _: None)
    loaded = load_checkpoint(ckpt)
    loaded.meta["train"]["download"] = True
    assert "download" not in resume_settings(loaded)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"step": 10**400}, "2\\*\\*53"),
        ({"exp_avg_sq": -1.0}, "negative"),
        ({"exp_avg": np.nan}, "finite"),
        ({"exp_avg_sq": np.inf}, "finite"),
    ],
)
def test_load_state_dict_checks_the_invariants_and_changes_nothing(change, words, rng):
    model = MLP([4, 6, 3], backend="numpy", seed=0)
    opt = Adam(lr=0.01)
    x, y = rng.normal(size=(8, 4)), rng.integers(0, 3, 8)
    model.train_step(x, y, opt)
    saved = opt.state_dict()
    before = opt.state_dict()
    for key, value in change.items():
        if key == "step":
            saved["step"] = value
        else:
            saved[key][1].flat[0] = value
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(saved, model, model.backend, model.parameter_shapes, model.dtype)
    after = opt.state_dict()
    assert after["step"] == before["step"]
    for slot in opt.slots:
        for a, b in zip(after[slot], before[slot]):
            np.testing.assert_array_equal(a, b)


# --- downloads -------------------------------------------------------------------------------


class _Body:
    """A fake HTTP response: ``chunk`` bytes per read, ``times`` reads (None: forever)."""

    def __init__(self, chunk: bytes, times: int | None = None, length: int | None = None):
        self.chunk, self.left = chunk, times
        self.headers = {} if length is None else {"Content-Length": str(length)}

    def read(self, n: int) -> bytes:
        if self.left is not None:
            if self.left == 0:
                return b""
            self.left -= 1
        return self.chunk[:n]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_downloads_are_https_only_bounded_and_fail_as_dataset_errors(monkeypatch):
    import http.client
    import urllib.error

    from gpubp import fetch
    from gpubp.errors import DatasetError

    def never(url, timeout):  # pragma: no cover - must not be reached
        raise AssertionError("opened")

    monkeypatch.setattr(fetch, "_open", never)
    with pytest.raises(DatasetError, match="https only"):
        fetch.fetch("http://example.invalid/x.gz")

    def raises(exc: Exception):
        def opener(url, timeout):
            raise exc

        return opener

    cases = {
        "more than": lambda url, timeout: _Body(bytes(1 << 16)),  # a body that never ends
        "declares": lambda url, timeout: _Body(b"", 0, length=1 << 40),
        "IncompleteRead": raises(http.client.IncompleteRead(b"")),
        "URLError": raises(urllib.error.URLError("no route")),
        "TimeoutError": raises(TimeoutError("timed out")),
    }
    for words, opener in cases.items():
        monkeypatch.setattr(fetch, "_open", opener)
        with pytest.raises(DatasetError, match=words) as info:
            fetch.fetch("https://example.invalid/x.gz", max_bytes=1 << 20)
        assert "https://example.invalid/x.gz" in str(info.value)
    clock = iter(range(0, 10**6, 5))  # a byte every 5 s: stopped at the deadline
    monkeypatch.setattr(fetch.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(fetch, "_open", lambda url, timeout: _Body(b"x"))
    with pytest.raises(DatasetError, match="not done after 600 s"):
        fetch.fetch("https://example.invalid/x.gz")


def test_a_redirect_to_http_is_refused():
    from gpubp.errors import DatasetError
    from gpubp.fetch import _HttpsOnlyRedirects

    class Req:
        full_url = "https://example.invalid/a"

    with pytest.raises(DatasetError, match="not https"):
        _HttpsOnlyRedirects().redirect_request(Req(), None, 302, "", {}, "http://evil/a")


def test_an_endless_download_ends_in_a_gpubp_error_within_the_budget(tmp_path, monkeypatch):
    from gpubp import datasets, fetch
    from gpubp.errors import DatasetNotFoundError

    monkeypatch.setattr(fetch, "_open", lambda url, timeout: _Body(bytes(1 << 16)))
    exc, peak = traced(lambda: datasets.download("mnist", tmp_path / "dl", progress=False))
    assert type(exc) is DatasetNotFoundError and "more than" in str(exc)
    assert peak < 128 << 20 and not any((tmp_path / "dl").iterdir())
    assert all(u.startswith("https://") for s in datasets.DATASETS.values() for u in s.urls)


# --- what evaluate prints ----------------------------------------------------------------------


def test_evaluate_escapes_what_a_model_file_says(data_dir, tmp_path, capsys):
    model = MLP([784, 5, 10], backend="numpy")
    model.dataset = "mnist\x1b[2J\r\ntest accuracy 1.0000 (loss 0.0000) \u202e"
    path = tmp_path / "m.npz"
    model.save(path)
    argv = ["evaluate", str(path), "--dataset", "mnist", "--data-dir", str(data_dir)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith("test accuracy")  # no faked line
    for raw in ("\x1b", "\r", "\u202e"):
        assert raw not in out and raw not in err
    assert "\\x1b[2J" in out


@pytest.mark.parametrize(
    ("kwargs", "dataset", "words"),
    [
        ({}, "../../etc/passwd", "no dataset gpubp knows"),
        ({"output": "sigmoid", "loss": "binary_cross_entropy"}, "mnist", "cannot be scored"),
    ],
)
def test_evaluate_refuses_models_it_cannot_score_with_a_gpubp_error(
    data_dir, tmp_path, capsys, kwargs, dataset, words
):
    model = MLP([784, 5, 10], backend="numpy", **kwargs)
    model.dataset = dataset
    path = tmp_path / "m.npz"
    model.save(path)
    assert cli.main(["evaluate", str(path), "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert words in err and str(path) in err and "Traceback" not in err


# --- the rest of the probe's raw tracebacks ---------------------------------------------------


def test_a_validation_fraction_that_leaves_no_training_data_is_refused(data_dir, capsys):
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--quiet"]
    assert cli.main([*argv, "--val-fraction", "0.9999"]) == 1
    err = capsys.readouterr().err
    assert "--val-fraction" in err and "none to train on" in err and "Traceback" not in err


def test_pytorch_interop_checks_sizes_and_devices_first(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "1G")
    huge = torch.nn.Sequential(torch.nn.Linear(10**6, 10**6, device="meta"))
    exc, peak = traced(lambda: MLP.from_torch(huge, backend="numpy"))
    assert type(exc) is MemoryBudgetError and peak < 16 << 20
    small = torch.nn.Sequential(torch.nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        MLP.from_torch(small, backend="numpy")
    with pytest.raises(ValueError, match="device='nope'"):
        MLP([3, 4, 2], backend="numpy").to_torch(device="nope")


def test_gradflow_never_writes_over_a_dataset_file(data_dir, capsys):
    target = data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"
    before = _snapshot(data_dir)
    argv = ["gradflow", "--dataset", "mnist", "--data-dir", str(data_dir), "--plot", ""]
    assert cli.main([*argv, "--json", str(target), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--json" in err and "dataset's" in err and _snapshot(data_dir) == before
