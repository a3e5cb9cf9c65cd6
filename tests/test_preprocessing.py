"""Models carry their preprocessing: the maths on every backend against the float64 reference,
the model file (saved, loaded, refused when damaged, old files warned about), ``gpubp train``'s
saved model on raw test images, checkpoints and ``gpubp evaluate``."""

from __future__ import annotations

import gzip
import json
import re
import warnings

import numpy as np
import pytest

import gpubp
from gpubp import cli, datasets, npzfile, reference
from gpubp.checkpoint import load_checkpoint
from gpubp.errors import (
    CheckpointMismatchError,
    DatasetError,
    ModelFileError,
    NoPreprocessingWarning,
)
from gpubp.evaluate import dataset_preprocessing, raw_test_split
from gpubp.preprocessing import Preprocessing
from gpubp.train import TrainConfig, train

from .idx_files import idx_bytes, write_fake_idx_dataset

TOL = {"float32": 2e-4, "float64": 1e-10}


def close(got, want, dtype) -> None:
    want = np.asarray(want, dtype=np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(np.asarray(got, dtype=np.float64) - want).max()) / scale
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:g}"


def raw_inputs(rng, batch, n):
    """Raw features far from standardised: offsets in the hundreds, spreads from 1 to 100 (an
    offset 10^7 times the spread would drown it in float32, whose arithmetic the model uses)."""
    return rng.normal(0, 1, (batch, n)) * 10.0 ** rng.uniform(0, 2, n) + rng.uniform(-200, 200, n)


# --- the Preprocessing value -----------------------------------------------------------------


def test_standardize_per_feature_is_scikit_learns_standard_scaler(rng):
    from sklearn.preprocessing import StandardScaler

    X = raw_inputs(rng, 40, 7)
    X[:, 3] = 2.5  # a constant feature is centred, not scaled (scale 1, as scikit-learn)
    p = Preprocessing.standardize(X)
    sk = StandardScaler().fit(X)
    np.testing.assert_allclose(p.shift, sk.mean_, rtol=1e-12)
    np.testing.assert_allclose(p.scale, 1.0 / sk.scale_, rtol=1e-12)
    np.testing.assert_allclose(p.apply(X), sk.transform(X), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(p.inverse(p.apply(X)), X, rtol=1e-12)


def test_standardize_globally_uses_one_mean_and_deviation(rng):
    X = raw_inputs(rng, 9, 5)
    p = Preprocessing.standardize(X, per_feature=False)
    np.testing.assert_allclose(p.shift, np.full(5, X.mean()), rtol=1e-12)
    np.testing.assert_allclose(p.scale, np.full(5, 1 / X.std()), rtol=1e-12)


@pytest.mark.parametrize(
    ("shift", "scale", "error", "message"),
    [
        ([0.0, 1.0], [1.0], ValueError, "shift has 2 values and scale 1"),
        ([0.0, np.nan], [1.0, 1.0], ValueError, "shift contains NaN"),
        ([0.0], [np.inf], ValueError, "scale contains NaN or infinity"),
        ([[0.0]], [1.0], ValueError, "shift has shape"),
        (["a"], [1.0], TypeError, "shift must be a 1-D array of numbers"),
    ],
)
def test_a_bad_preprocessing_is_refused(shift, scale, error, message):
    with pytest.raises(error, match=message):
        Preprocessing(shift, scale)


def test_the_arrays_are_read_only_copies():
    shift = np.zeros(3)
    p = Preprocessing(shift, np.ones(3))
    shift[0] = 7.0
    assert p.shift[0] == 0.0
    with pytest.raises(ValueError):
        p.scale[0] = 2.0


# --- the model applies it, everywhere, on every backend ----------------------------------------


@pytest.fixture
def problem(rng, dtype):
    """A model with preprocessing, raw inputs of awkward shapes and the reference's view."""
    n_in, batch = 37, 33
    X = raw_inputs(rng, batch, n_in)
    p = Preprocessing.standardize(raw_inputs(rng, 50, n_in))
    y = rng.integers(0, 5, batch)
    return X, y, p, n_in


def test_forward_and_evaluate_apply_it_first(backend_name, dtype, problem):
    X, y, p, n_in = problem
    model = gpubp.MLP([n_in, 19, 5], backend=backend_name, dtype=dtype, preprocessing=p)
    W, b = model.get_parameters()
    want = reference.forward(W, b, p.apply(X), "relu", "softmax")
    for rows in (slice(0, 1), slice(None)):  # a batch of one, and all
        close(model.forward(X[rows]), want[rows], dtype)
    close(model.forward(X, batch_size=8), want, dtype)  # chunks: each preprocessed
    ev = model.evaluate(X, y)
    z = reference.forward(W, b, p.apply(X), "relu", "identity")
    _, loss = reference.output_delta(z, y, "softmax", "cross_entropy")
    close(ev["loss"], loss, dtype)
    assert ev["accuracy"] == np.mean(np.argmax(want, axis=1) == y)
    np.testing.assert_array_equal(model.predict(X), np.argmax(model.forward(X), axis=1))


def test_gradients_and_train_step_take_raw_inputs(backend_name, dtype, problem):
    X, y, p, n_in = problem
    model = gpubp.MLP([n_in, 23, 5], "tanh", backend=backend_name, dtype=dtype, preprocessing=p)
    W, b = model.get_parameters()
    loss, dW, db = model.gradients(X, y)
    want_loss, want_dW, want_db = reference.gradients(
        W, b, p.apply(X), y, "tanh", "softmax", "cross_entropy"
    )
    close(loss, want_loss, dtype)
    for got, want in zip(dW + db, want_dW + want_db):
        close(got, want, dtype)
    model.train_step(X, y, gpubp.optim.SGD(lr=0.1))
    W1, b1 = model.get_parameters()
    for got, w, g in zip(W1 + b1, W + b, want_dW + want_db):
        close(got, w - 0.1 * g, dtype)


def test_fit_on_raw_data_trains_the_network_on_preprocessed_data(backend_name, problem, dtype):
    X, y, p, n_in = problem
    with_p = gpubp.MLP([n_in, 11, 5], backend=backend_name, dtype=dtype, preprocessing=p)
    bare = gpubp.MLP([n_in, 11, 5], backend=backend_name, dtype=dtype)
    Xp = p.apply(X.astype(dtype))  # the same arithmetic as the model's, in its dtype
    Xv = X[:5]
    h1 = with_p.fit(X, y, epochs=2, batch_size=8, validation_data=(Xv, y[:5]), progress=False)
    h2 = bare.fit(Xp, y, epochs=2, batch_size=8, validation_data=(Xp[:5], y[:5]), progress=False)
    (W1, b1), (W2, b2) = with_p.get_parameters(), bare.get_parameters()
    for a, c in zip(W1 + b1, W2 + b2):
        close(a, c, dtype)
    np.testing.assert_allclose(h1["val_loss"], h2["val_loss"], rtol=TOL[dtype])


def test_the_input_is_never_modified(problem, dtype):
    X, y, p, n_in = problem
    X = X.astype(dtype)
    before = X.copy()
    model = gpubp.MLP([n_in, 8, 5], backend="numpy", dtype=dtype, preprocessing=p)
    model.forward(X)
    model.evaluate(X, y)
    model.train_step(X, y, gpubp.optim.SGD(lr=0.01))
    model.fit(X, y, epochs=1, progress=False)
    np.testing.assert_array_equal(X, before)


def test_a_wrong_preprocessing_leaves_the_model_as_it_was(rng):
    p = Preprocessing.standardize(raw_inputs(rng, 10, 4))
    model = gpubp.MLP([4, 3, 2], backend="numpy", preprocessing=p)
    with pytest.raises(ValueError, match=r"has 5 values per vector; expected 4"):
        model.preprocessing = Preprocessing(np.zeros(5), np.ones(5))
    with pytest.raises(TypeError, match=r"Preprocessing.standardize\(X_train\)"):
        model.preprocessing = (np.zeros(4), np.ones(4))  # type: ignore[assignment]
    assert model.preprocessing is p
    with pytest.raises(ValueError, match="expected 3"):
        gpubp.MLP([3, 2], preprocessing=p)
    model.preprocessing = None
    x = rng.normal(size=(3, 4))
    W, b = model.get_parameters()
    close(model.forward(x), reference.forward(W, b, x, "relu", "softmax"), "float32")


# --- the model file ----------------------------------------------------------------------------


def rewrite(path, drop=(), meta_update=None, arrays_update=None, meta_drop=()):
    """Re-write a model file with members dropped or replaced and metadata changed."""
    arrays = npzfile.read_npz(path)
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta.update(meta_update or {})
    for key in meta_drop:
        meta.pop(key, None)
    for name in drop:
        arrays.pop(name)
    arrays.update(arrays_update or {})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    npzfile.write_npz_atomic(path, arrays)


@pytest.fixture
def saved(tmp_path, rng):
    p = Preprocessing.standardize(raw_inputs(rng, 20, 6), description="test units")
    model = gpubp.MLP([6, 9, 3], backend="numpy", preprocessing=p)
    model.dataset, model.labels = "toy", ("a", "b", "c")
    path = tmp_path / "m.npz"
    model.save(path)
    return path, model


def test_a_saved_model_keeps_its_preprocessing_dataset_and_labels(saved, rng):
    path, model = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file of this version loads without a warning
        loaded = gpubp.MLP.load(path, backend="numpy")
    np.testing.assert_array_equal(loaded.preprocessing.shift, model.preprocessing.shift)
    np.testing.assert_array_equal(loaded.preprocessing.scale, model.preprocessing.scale)
    assert loaded.preprocessing.kind == "standardize"
    assert loaded.preprocessing.description == "test units"
    assert (loaded.dataset, loaded.labels) == ("toy", ("a", "b", "c"))
    x = raw_inputs(rng, 5, 6)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    arrays = npzfile.read_npz(path)  # the agreed layout: float64 members, keys in the metadata
    assert arrays["input_shift"].dtype == np.float64 and arrays["input_scale"].shape == (6,)
    meta = json.loads(arrays["meta"].tobytes().decode())
    assert meta["preprocessing"]["kind"] == "standardize" and meta["labels"] == ["a", "b", "c"]


def test_a_model_without_preprocessing_says_so_and_loads_quietly(tmp_path):
    model = gpubp.MLP([4, 2], backend="numpy")
    model.save(tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = gpubp.MLP.load(tmp_path / "m.npz", backend="numpy")
    assert loaded.preprocessing is None and loaded.dataset is None and loaded.labels is None


def test_a_file_from_before_loads_with_a_warning(saved, rng):
    path, model = saved
    rewrite(
        path,
        drop=npzfile.INPUT_MEMBERS,
        meta_drop=("preprocessing", "dataset", "labels"),
    )
    with pytest.warns(NoPreprocessingWarning, match="carries no input preprocessing"):
        loaded = gpubp.MLP.load(path, backend="numpy")
    assert issubclass(NoPreprocessingWarning, UserWarning)
    assert loaded.preprocessing is None
    x = raw_inputs(rng, 3, 6)
    W, b = model.get_parameters()
    close(loaded.forward(x), reference.forward(W, b, x, "relu", "softmax"), "float32")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": ["input_scale"]}, "holds input_shift but not input_scale"),
        ({"drop": ["input_shift"]}, "holds input_scale but not input_shift"),
        ({"drop": npzfile.INPUT_MEMBERS}, "declares an input preprocessing but"),
        ({"arrays_update": {"input_shift": np.zeros(5)}}, r"input_shift has shape \(5,\)"),
        ({"arrays_update": {"input_scale": np.ones((6, 1))}}, r"input_scale has shape \(6, 1\)"),
        ({"arrays_update": {"input_scale": np.arange(6)}}, "input_scale holds int64 values"),
        (
            {"arrays_update": {"input_scale": np.array([1, 1, np.inf, 1, 1, 1.0])}},
            "input_scale holds NaN or infinite values",
        ),
        (
            {"arrays_update": {"input_shift": np.full(6, np.nan)}},
            "input_shift holds NaN or infinite values",
        ),
        ({"meta_update": {"preprocessing": None}}, "metadata says the model has no preprocessing"),
        ({"meta_update": {"preprocessing": 3}}, "'preprocessing' entry is int"),
        ({"meta_update": {"labels": ["a"]}}, "names 1 labels for a model with 3 outputs"),
        ({"meta_update": {"labels": "abc"}}, "'labels' must be a list of names"),
        ({"meta_update": {"dataset": 1}}, "'dataset' must be a name"),
    ],
)
def test_a_damaged_preprocessing_block_is_a_model_file_error(saved, change, message):
    path, _ = saved
    rewrite(path, **change)
    with pytest.raises(ModelFileError, match=message) as info:
        gpubp.MLP.load(path, backend="numpy")
    assert str(path) in str(info.value)


def test_labels_of_the_wrong_length_are_refused_before_writing(tmp_path):
    model = gpubp.MLP([4, 3], backend="numpy")
    model.labels = ("only", "two")
    with pytest.raises(ValueError, match="labels names 2 classes for a model with 3 outputs"):
        model.save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


# --- gpubp train: the saved model on raw test data ---------------------------------------------

SMALL = ["--layers", "24", "--batch-size", "32", "--quiet", "--backend", "numpy"]


def test_digits_saved_model_predicts_raw_test_images_at_the_printed_accuracy(tmp_path, capsys):
    path = tmp_path / "m.npz"
    argv = ["train", "--dataset", "digits", "--epochs", "3", *SMALL, "--save", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"test accuracy (\d\.\d{4})", out).group(1))

    # the raw test images: scikit-learn's 0..16 values, the rows gpubp's split holds out
    raw = raw_test_split("digits")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rows = {r.tobytes() for r in bunch.data}
    assert raw.x.dtype == np.float64 and all(r.tobytes() in rows for r in raw.x)
    model = gpubp.MLP.load(path, backend="numpy")
    accuracy = float(np.mean(model.predict(raw.x) == raw.y))
    assert f"{accuracy:.4f}" == f"{printed:.4f}"
    assert (model.dataset, model.labels) == ("digits", tuple(str(d) for d in range(10)))
    # its preprocessing is gpubp's own data pipeline, written on raw values
    ds = datasets.load_dataset("digits")
    np.testing.assert_allclose(model.preprocessing.apply(raw.x), ds.x_test, atol=1e-5)
    # without it the same network does worse: the failure the preprocessing fixes
    model.preprocessing = None
    assert np.mean(model.predict(raw.x) == raw.y) < accuracy


def test_idx_run_scores_raw_uint8_pixels_as_the_saved_model_does(tmp_path, rng):
    parts = write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=150, n_test=41)
    config = TrainConfig(
        dataset="mnist", data_dir=str(tmp_path / "data"), layers=(13,), epochs=2,
        batch_size=16, backend="numpy",
    )  # fmt: skip
    result = train(config, save_path=tmp_path / "m.npz", progress=False, log=lambda _: None)
    model = gpubp.MLP.load(tmp_path / "m.npz", backend="numpy")
    pixels = parts["t10k-images-idx3-ubyte"].reshape(41, -1)  # uint8, as in the file
    labels = parts["t10k-labels-idx1-ubyte"]
    assert model.evaluate(pixels, labels)["accuracy"] == result.test_accuracy
    assert np.mean(model.predict(pixels) == labels) == result.test_accuracy
    assert model.preprocessing.description.startswith("gpubp train's standardisation of mnist")
    ds = datasets.load_dataset("mnist", tmp_path / "data")
    assert model.preprocessing.equals(dataset_preprocessing(ds))
    np.testing.assert_allclose(model.preprocessing.apply(pixels), ds.x_test, atol=1e-5)


def test_checkpoints_carry_the_preprocessing_to_the_resumed_run(tmp_path, rng):
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=60, n_test=10)
    config = TrainConfig(
        dataset="mnist", data_dir=str(tmp_path / "data"), layers=(7,), epochs=1,
        batch_size=16, backend="numpy",
    )  # fmt: skip
    ckpt = tmp_path / "run.ckpt"
    quiet = {"progress": False, "log": lambda _: None}
    first = train(config, checkpoint=ckpt, **quiet)
    saved = load_checkpoint(ckpt).preprocessing
    assert saved is not None and saved.equals(first.model.preprocessing)
    more = TrainConfig(**{**config.as_dict(), "epochs": 2})
    resumed = train(more, resume=ckpt, save_path=tmp_path / "m.npz", **quiet)
    assert gpubp.MLP.load(tmp_path / "m.npz").preprocessing.equals(saved)
    assert resumed.epochs_done == 2
    # a checkpoint of data with other statistics is not resumed on this data
    rewrite(ckpt, arrays_update={"input_shift": saved.shift + 1.0})
    with pytest.raises(CheckpointMismatchError, match="standardised with other statistics"):
        train(TrainConfig(**{**config.as_dict(), "epochs": 3}), resume=ckpt, **quiet)


def test_a_damaged_checkpoint_block_fails_the_load(tmp_path, rng):
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=40, n_test=10)
    config = TrainConfig(
        dataset="mnist", data_dir=str(tmp_path / "data"), layers=(5,), epochs=1, backend="numpy"
    )
    ckpt = tmp_path / "run.ckpt"
    train(config, checkpoint=ckpt, progress=False, log=lambda _: None)
    rewrite(ckpt, drop=["input_scale"])
    with pytest.raises(ModelFileError, match="holds input_shift but not input_scale"):
        load_checkpoint(ckpt)


# --- gpubp evaluate ------------------------------------------------------------------------------


@pytest.fixture
def mnist_model(tmp_path, rng):
    folder = tmp_path / "data"
    write_fake_idx_dataset(folder / "mnist", rng, n_train=80, n_test=23)
    path = tmp_path / "m.npz"
    config = TrainConfig(
        dataset="mnist", data_dir=str(folder), layers=(9,), epochs=1, backend="numpy"
    )
    result = train(config, save_path=path, progress=False, log=lambda _: None)
    return path, folder, result


def test_evaluate_prints_the_runs_accuracy_and_writes_json(mnist_model, tmp_path, capsys):
    path, folder, result = mnist_model
    js = tmp_path / "ev.json"
    argv = ["evaluate", str(path), "--data-dir", str(folder), "--backend", "numpy"]
    assert cli.main([*argv, "--json", str(js)]) == 0
    out, err = capsys.readouterr()
    assert f"test accuracy {result.test_accuracy:.4f}" in out
    assert "on 23 mnist test samples" in out and "trained on mnist" in out and err == ""
    record = json.loads(js.read_text())
    assert record["accuracy"] == result.test_accuracy and record["dataset"] == "mnist"
    assert record["preprocessing"]["kind"] == "standardize"


def test_evaluate_refuses_a_dataset_of_another_width(mnist_model, capsys):
    path, _, _ = mnist_model
    assert cli.main(["evaluate", str(path), "--dataset", "digits", "--backend", "numpy"]) == 1
    err = capsys.readouterr().err
    assert "takes 784 inputs but digits's test images have 64 features" in err
    assert "it was trained on mnist" in err


def test_evaluate_warns_once_about_an_old_file(mnist_model, capsys):
    path, folder, _ = mnist_model
    rewrite(path, drop=npzfile.INPUT_MEMBERS, meta_drop=("preprocessing", "dataset", "labels"))
    argv = ["evaluate", str(path), "--data-dir", str(folder), "--backend", "numpy"]
    assert cli.main(argv) == 1  # no dataset recorded: it must be named
    assert "does not say which dataset it was trained on" in capsys.readouterr().err
    assert cli.main([*argv, "--dataset", "mnist"]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning:") == 1 and "carries no input preprocessing" in err
    assert "trained on an unrecorded dataset" in out


def test_evaluate_reports_a_missing_model_file(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "none.npz"), "--dataset", "digits"]) == 1
    assert "none.npz: no such file" in capsys.readouterr().err


def test_evaluate_help_says_what_raw_means(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "pixel values 0..255" in out and "0..16 for digits" in out and "--dataset" in out


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 10, 2], np.uint8), "labels range from 0 to 10"),
        (np.array([0, 1, 2], np.uint8), r"do not match"),
    ],
)
def test_the_raw_test_split_gets_the_loaders_checks(tmp_path, rng, labels, message):
    """gpubp evaluate reads the test files itself: a label out of range or a count that does not
    match the images is a DatasetError naming the folder, as in training, not a wrong score."""
    folder = tmp_path / "mnist"
    write_fake_idx_dataset(folder, rng, n_test=4)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DatasetError, match=message) as info:
        raw_test_split("mnist", str(folder))
    assert str(folder) in str(info.value)
