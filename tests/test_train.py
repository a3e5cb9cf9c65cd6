"""Training runs: determinism, exact resume (also after Ctrl-C), checkpoints, gradient norms,
JSON and plots. Data is made in the tests (random IDX files) or is scikit-learn's digits."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest

from gpubp import MLP, reference
from gpubp.errors import CheckpointMismatchError, ModelFileError
from gpubp.train import TrainConfig, gradflow, gradient_norms, load_checkpoint, train


def quiet(_: str) -> None:
    pass


def small_config(backend: str = "numpy", **kw):
    base = dict(
        dataset="mnist",
        layers=(13, 7),  # widths that are not multiples of anything
        optimizer="adam",
        batch_size=16,  # 108 training samples: 6 full batches and one of 12
        epochs=3,
        backend=backend,
        seed=5,
    )
    base.update(kw)
    return TrainConfig(**base)


def run(config, **kw):
    return train(config, progress=False, log=quiet, **kw)


def params(model):
    weights, biases = model.get_parameters()
    return weights + biases


def assert_same_parameters(a, b):
    for x, y in zip(params(a), params(b)):
        np.testing.assert_array_equal(x, y)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(dataset="cifar"), "dataset='cifar' is not known"),
        (dict(layers=()), "layers"),
        (dict(layers=(16, 0)), "positive hidden widths"),
        (dict(activation="softmax"), "activation='softmax'"),
        (dict(optimizer="rmsprop"), "optimizer='rmsprop'"),
        (dict(schedule="step"), "schedule='step'"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(epochs=-1), "epochs must be a positive int"),
        (dict(lr=float("nan")), "lr must be a positive number"),
        (dict(lr=-0.1), "lr must be a positive number"),
        (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
        (dict(val_fraction=1.0), "val_fraction must be in"),
    ],
)
def test_bad_configuration_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_cosine_schedule_starts_at_peak_and_decays_to_zero():
    cfg = TrainConfig(optimizer="sgd", lr=0.2)
    assert cfg.learning_rate(0, 100) == pytest.approx(0.2)
    assert cfg.learning_rate(50, 100) == pytest.approx(0.1)
    assert cfg.learning_rate(100, 100) == pytest.approx(0.0, abs=1e-15)
    assert TrainConfig(schedule="constant", lr=0.3).learning_rate(77, 100) == 0.3


# --- runs ------------------------------------------------------------------------------------


def test_same_seed_same_numbers(fake_mnist, backend_name):
    a = run(small_config(backend_name))
    b = run(small_config(backend_name))
    assert_same_parameters(a.model, b.model)
    assert a.history["loss"] == b.history["loss"]
    assert a.test_accuracy == b.test_accuracy
    c = run(small_config(backend_name, seed=6))
    assert a.history["loss"] != c.history["loss"]


def test_history_and_result_are_complete(fake_mnist):
    r = run(small_config(val_fraction=0.1))
    h = r.history
    assert h["epoch"] == [1, 2, 3]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"):
        assert len(h[key]) == 3, key
    assert all(np.isfinite(h["loss"]))
    assert r.samples_trained == 3 * 108 and r.samples_per_second > 0
    assert 0.0 <= r.test_accuracy <= 1.0 and r.epochs_done == 3 and not r.interrupted
    # the cosine schedule: the last step's rate is small but not yet zero
    assert 0 < h["lr"][-1] < h["lr"][0] <= 1e-3


def test_data_goes_to_the_device_once(fake_mnist, monkeypatch):
    from gpubp.backends.numpy_backend import NumpyBackend

    sizes: list[int] = []
    original = NumpyBackend.asarray

    def spy(self, x, dtype=None):
        sizes.append(int(np.size(x)))
        return original(self, x, dtype)

    monkeypatch.setattr(NumpyBackend, "asarray", spy)
    run(small_config(val_fraction=0.1))
    n_train_values = 108 * 784  # the training images, staged once for the whole run
    assert sizes.count(n_train_values) == 1


def test_digits_learns(tmp_path):
    pytest.importorskip("sklearn")
    r = run(TrainConfig(dataset="digits", layers=(64,), epochs=5, seed=1))
    assert r.dataset == "digits" and r.config.batch_size == 32  # small data: the small batch
    assert r.test_accuracy > 0.85  # ten classes: chance is 0.1


# --- checkpoints and resume ------------------------------------------------------------------


class _InterruptAfter:
    """Send this process SIGINT (as Ctrl-C does) during training step ``n``, whether the step
    runs alone (``MLP.step``) or in a run of steps in one native call (``MLP.steps``, which is
    then cut to end at step ``n``: the signal lands when the call returns)."""

    def __init__(self, monkeypatch, n):
        self.count, self.n = 0, n
        original, original_run = MLP.step, MLP.steps

        def step(model, x, y, optimizer):
            self.count += 1
            if self.count == self.n:
                os.kill(os.getpid(), signal.SIGINT)
            return original(model, x, y, optimizer)

        def steps(model, X, y, order, first, count, batch_size, optimizer, lrs):
            left = self.n - self.count
            if 0 < left < count:
                count, lrs = left, lrs[:left]
            took = original_run(model, X, y, order, first, count, batch_size, optimizer, lrs)
            if took:
                crossed = self.count < self.n <= self.count + len(took)
                self.count += len(took)
                if crossed:
                    os.kill(os.getpid(), signal.SIGINT)
            return took

        monkeypatch.setattr(MLP, "step", step)
        monkeypatch.setattr(MLP, "steps", steps)


@pytest.mark.parametrize("stop_at", [4, 7, 15])  # mid-epoch; end of epoch 1 (7 batches); later
@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(
    fake_mnist, tmp_path, monkeypatch, backend_name, stop_at, optimizer
):
    cfg = small_config(backend_name, optimizer=optimizer, val_fraction=0.1)
    full = run(cfg)

    ckpt = tmp_path / "run.ckpt"
    # (Python's default handler, or SIG_IGN where the suite was started as a background job)
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        _InterruptAfter(m, stop_at)
        first = run(cfg, checkpoint=ckpt)
    assert first.interrupted and ckpt.exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert load_checkpoint(ckpt).meta["position"]["epoch"] == (stop_at - 1) // 7 + (
        stop_at % 7 == 0
    )

    resumed = run(cfg, resume=ckpt)
    assert not resumed.interrupted and resumed.epochs_done == 3
    assert_same_parameters(full.model, resumed.model)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["val_accuracy"] == full.history["val_accuracy"]
    assert resumed.samples_trained == full.samples_trained


def test_resume_from_every_epoch_checkpoint(fake_mnist, tmp_path):
    cfg = small_config()
    full = run(cfg, checkpoint=tmp_path / "a.ckpt")
    # a checkpoint written after the last epoch resumes to the same (finished) model
    again = run(cfg, resume=tmp_path / "a.ckpt")
    assert again.epochs_done == 3
    assert_same_parameters(full.model, again.model)
    # a shorter run, extended: same parameters as running the longer schedule? No: the cosine
    # schedule depends on the total, so only a constant schedule extends exactly
    const = small_config(schedule="constant", epochs=3)
    whole = run(const)
    run(small_config(schedule="constant", epochs=1), checkpoint=tmp_path / "c.ckpt")
    extended = run(const, resume=tmp_path / "c.ckpt")
    assert_same_parameters(whole.model, extended.model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(layers=(13, 8)), "layers"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(batch_size=8), "batch_size"),
        (dict(seed=6), "seed"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_mismatched_checkpoint_is_refused(fake_mnist, tmp_path, change, message):
    ckpt = tmp_path / "run.ckpt"
    run(small_config(epochs=1), checkpoint=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointMismatchError, match=message) as info:
        run(small_config(**change), resume=ckpt)
    assert "without --resume" in str(info.value)
    assert ckpt.read_bytes() == before  # a refused resume writes nothing


def test_bad_checkpoint_files_are_refused(fake_mnist, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ModelFileError, match="no such file"):
        run(small_config(), resume=missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ModelFileError):
        run(small_config(), resume=garbage)
    model_file = tmp_path / "model.npz"
    MLP([784, 13, 7, 10]).save(model_file)
    with pytest.raises(ModelFileError, match=r"a model file .*not a checkpoint.*MLP\.load"):
        run(small_config(), resume=model_file)
    ckpt = tmp_path / "run.ckpt"
    run(small_config(epochs=1), checkpoint=ckpt)
    with pytest.raises(ModelFileError, match=f"a checkpoint .*--resume {re.escape(str(ckpt))}"):
        MLP.load(ckpt)  # the other way round: a checkpoint is not a model file
    for cut in (0.5, 0.98):  # a truncated copy is said to be truncated, whatever is missing
        short = tmp_path / f"short-{cut}.ckpt"
        data = ckpt.read_bytes()
        short.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(ModelFileError, match="truncated or damaged"):
            run(small_config(), resume=short)
    arrays = dict(np.load(ckpt))
    arrays["opt_exp_avg_0"] = arrays["opt_exp_avg_0"][:3]  # a truncated optimizer slot
    np.savez(tmp_path / "bad.ckpt.npz", **arrays)
    with pytest.raises(ModelFileError, match="exp_avg"):
        run(small_config(), resume=tmp_path / "bad.ckpt.npz")


def test_checkpoint_write_is_atomic(fake_mnist, tmp_path, monkeypatch):
    """A crash while a checkpoint is being written leaves the previous one intact."""
    ckpt = tmp_path / "run.ckpt"
    run(small_config(epochs=1), checkpoint=ckpt)
    before = ckpt.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        run(small_config(epochs=2), checkpoint=ckpt)
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- gradient norms, JSON, plots -------------------------------------------------------------


def test_gradient_norms_match_the_reference_gradients(rng):
    model = MLP([9, 17, 5, 3], activation="tanh", seed=3)
    x = rng.normal(size=(11, 9))
    y = rng.integers(0, 3, 11)
    norms = gradient_norms(model, x, y)
    weights, biases = model.get_parameters()
    _, dWs, _ = reference.gradients(weights, biases, x, y, "tanh", "softmax", "cross_entropy")
    np.testing.assert_allclose(norms["dW"], [np.linalg.norm(g) for g in dWs], rtol=1e-12)
    # the output error of softmax + cross-entropy: (softmax(z) - onehot) / B
    out = reference.forward(weights, biases, x, "tanh", "softmax")
    expected = np.linalg.norm((out - np.eye(3)[y]) / 11)
    assert norms["delta"][-1] == pytest.approx(expected, rel=1e-12)


def test_track_gradients_and_json(fake_mnist, tmp_path):
    path = tmp_path / "run.json"
    r = run(small_config(), track_gradients=True, json_path=path)
    assert len(r.history["dW_norm"]) == 3 and all(len(n) == 3 for n in r.history["dW_norm"])
    record = json.loads(path.read_text())
    assert record["backend"] == "numpy" and record["dataset"] == "mnist"
    assert record["history"]["delta_norm"] == r.history["delta_norm"]
    assert record["test_accuracy"] == r.test_accuracy
    assert record["config"]["layers"] == [13, 7]


def test_plot_is_written(fake_mnist, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    run(small_config(val_fraction=0.2), plot_path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_training(fake_mnist, tmp_path, hide_module):
    from gpubp.plots import PlotUnavailableError

    hide_module("matplotlib")
    with pytest.raises(PlotUnavailableError, match=r"pip install 'gpubp\[plot\]'"):
        run(small_config(), plot_path=tmp_path / "x.png", checkpoint=tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()


def test_gradflow_shows_sigmoid_starving_the_first_layers(fake_mnist, tmp_path):
    pytest.importorskip("matplotlib")
    runs = gradflow(
        activations=["sigmoid", "relu"],
        depth=8,
        width=32,
        dataset="mnist",
        steps=3,
        plot_path=tmp_path / "gf.png",
        json_path=tmp_path / "gf.json",
        progress=False,
        log=quiet,
    )
    assert (tmp_path / "gf.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        json.loads((tmp_path / "gf.json").read_text())["runs"]["relu"]["dW"] == runs["relu"]["dW"]
    )
    for name in ("sigmoid", "relu"):
        assert len(runs[name]["delta"]) == 9 and len(runs[name]["dW_init"]) == 9
    # sigmoid: f' <= 1/4 per layer, so the error signal collapses towards the input
    sig, relu = runs["sigmoid"]["delta_init"], runs["relu"]["delta_init"]
    assert sig[0] / sig[-1] < 1e-3
    assert relu[0] / relu[-1] > 1e-1


def test_gradflow_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activations: 'softmax'"):
        gradflow(activations=["softmax"], plot_path=None)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        gradflow(depth=0, plot_path=None)


def test_resume_accepts_defaults_spelled_out(fake_mnist, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    run(small_config(epochs=1), checkpoint=ckpt)  # lr and weight_decay left at their defaults
    r = run(small_config(epochs=2, lr=1e-3, weight_decay=0.0), resume=ckpt)
    assert r.epochs_done == 2


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (dict(), dict(track_gradients=True), "track_gradients: checkpoint False"),
        (dict(), dict(config=dict(epochs=1)), "may grow, not shrink"),
    ],
)
def test_resume_refuses_what_would_corrupt_the_history(fake_mnist, tmp_path, first, then, message):
    ckpt = tmp_path / "run.ckpt"
    run(small_config(epochs=2), checkpoint=ckpt)
    then = dict(then)
    cfg = small_config(**then.pop("config", {}))
    with pytest.raises(CheckpointMismatchError, match=message):
        run(cfg, resume=ckpt, **then)


def test_ctrl_c_without_checkpoint_path_still_writes_one(fake_mnist, tmp_path, monkeypatch):
    from gpubp.train import INTERRUPT_CHECKPOINT

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        _InterruptAfter(m, 3)
        r = run(small_config())
    assert r.interrupted and r.test_accuracy is None  # no test pass after Ctrl-C
    assert r.checkpoint == INTERRUPT_CHECKPOINT and (tmp_path / INTERRUPT_CHECKPOINT).exists()
    resumed = run(small_config(), resume=tmp_path / INTERRUPT_CHECKPOINT)
    assert_same_parameters(run(small_config()).model, resumed.model)


def test_missing_output_folder_fails_before_training(fake_mnist, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(small_config(), json_path=tmp_path / "no" / "such" / "run.json")


def test_a_plot_path_that_is_not_png_is_refused_before_training(fake_mnist, tmp_path):
    with pytest.raises(ValueError, match=r"name the file \.png"):
        run(small_config(), plot_path=tmp_path / "x.jpg", checkpoint=tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()


def test_auto_on_numpy_says_numba_is_missing(monkeypatch):
    """A plain ``pip install .`` has no Numba: the run says why it is on the slower backend."""
    pytest.importorskip("sklearn")
    from gpubp import backends

    monkeypatch.setitem(backends._STATUS, "numba", lambda: "Numba is not installed (pip install)")
    monkeypatch.setattr(backends, "_instances", {})
    lines: list[str] = []
    r = train(TrainConfig(dataset="digits", layers=(8,), epochs=1, seed=1), log=lines.append)
    assert r.model.backend.name == "numpy"
    assert any("auto took the numpy backend" in s and "Numba" in s for s in lines), lines


def test_compile_notice_only_when_the_numba_cache_is_cold(monkeypatch, tmp_path):
    pytest.importorskip("numba")
    from gpubp import loop
    from gpubp.backends.numba import cache as numba_cache

    monkeypatch.setattr(numba_cache, "cache_dir", lambda: tmp_path)
    assert not loop._kernels_cached("numba")  # empty folder: the first run compiles
    (tmp_path / "gpubp" / "x").mkdir(parents=True)
    (tmp_path / "gpubp" / "x" / "kernels.output_delta-1.py311.nbi").write_bytes(b"")
    assert loop._kernels_cached("numba")
