"""Your own data on the command line: ``gpubp train --data``, ``evaluate --data``, ``predict``;
the file readers (CSV/TSV with pyarrow and without, .npz, .npy pairs, Parquet), the task and
labels, the regression target's units, checkpoints on changed data."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

import gpubp
from gpubp import cli, tables
from gpubp import reference as ref
from gpubp.errors import DatasetError
from gpubp.filedata import FileData, encode_labels, infer_task, unscale_output
from gpubp.preprocessing import Preprocessing

FAST = ["--layers", "7", "--batch-size", "16", "--backend", "numpy", "--quiet"]


def _classes(rng, n):
    """Features on awkward scales, a string label that depends on them."""
    x = rng.normal(size=(n, 3)) * [1.0, 30.0, 0.01] + [0.0, 100.0, -5.0]
    label = np.where(x[:, 0] + (x[:, 1] - 100) / 30 > 0, "cat", "dog")
    label[np.abs(x[:, 2] + 5) < 0.003] = "eel"
    return x, label


def _write_csv(path, x, y, header=("a", "b", "c", "species"), delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        for row, label in zip(x, y):
            w.writerow([*(f"{v:.6g}" for v in row), label])


@pytest.fixture
def csv_files(tmp_path, rng):
    x, y = _classes(rng, 160)
    _write_csv(tmp_path / "train.csv", x[:120], y[:120])
    _write_csv(tmp_path / "test.csv", x[120:], y[120:])
    _write_csv(tmp_path / "new.csv", x[120:130], y[120:130], header=("a", "b", "c", "other"))
    return tmp_path


def test_csv_with_a_string_target_trains_resumes_evaluates_and_predicts(csv_files, capsys):
    d = csv_files
    files = [
        "--save",
        str(d / "m.npz"),
        "--checkpoint",
        str(d / "c.ckpt"),
        "--json",
        str(d / "r.json"),
    ]
    pytest.importorskip("matplotlib")
    files += ["--plot", str(d / "p.png")]
    argv = ["train", "--data", str(d / "train.csv"), "--target", "species", "--epochs", "2"]
    assert cli.main([*argv, *FAST, *files]) == 0
    out = capsys.readouterr().out
    assert "target 'species': classification, 3 classes" in out
    assert (d / "p.png").stat().st_size > 0 and json.loads((d / "r.json").read_text())
    ckpt = gpubp.train.load_checkpoint(d / "c.ckpt")
    assert ckpt.train_config["data_files"][0]["size"] == (d / "train.csv").stat().st_size
    assert cli.main(["train", "--resume", str(d / "c.ckpt"), "--epochs", "3"]) == 0
    assert "epoch 3/3" in capsys.readouterr().out

    model = gpubp.MLP.load(d / "m.npz")
    assert model.labels == ("cat", "dog", "eel") and model.features == ("a", "b", "c")
    assert model.target == "species" and model.preprocessing is not None
    assert cli.main(["evaluate", str(d / "m.npz")]) == 1  # no built-in dataset to score on
    assert f"gpubp evaluate {d / 'm.npz'} --data PATH" in capsys.readouterr().err
    assert (
        cli.main(
            ["evaluate", str(d / "m.npz"), "--data", str(d / "test.csv"), "--target", "species"]
        )
        == 0
    )
    said = capsys.readouterr().out
    test = tables.read_table(d / "test.csv", "species")
    codes, _ = encode_labels(test.y, model.labels)
    want = model.evaluate(test.x, codes)["accuracy"]
    assert f"accuracy {want:.4f}" in said and "on 40 rows" in said

    out_csv = d / "p.csv"
    argv = ["predict", str(d / "m.npz"), "--data", str(d / "new.csv"), "--output", str(out_csv)]
    assert cli.main([*argv, "--proba"]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 10 and list(rows[0]) == ["prediction", "p(cat)", "p(dog)", "p(eel)"]
    proba = model.forward(tables.read_table(d / "new.csv", "other").x)
    for row, p in zip(rows, proba):
        assert row["prediction"] == model.labels[int(np.argmax(p))]
        np.testing.assert_allclose([float(row[f"p({c})"]) for c in model.labels], p, rtol=1e-6)


def test_parquet_with_a_float_target_is_a_regression_in_the_targets_units(tmp_path, rng, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    x = rng.normal(size=(150, 2)) * [3.0, 0.2]
    y = 5000.0 + 800.0 * x[:, 0] - 4000.0 * x[:, 1]
    cols = {"size": x[:, 0], "age": x[:, 1], "price": y}
    pq.write_table(pa.table({k: v[:120] for k, v in cols.items()}), tmp_path / "train.parquet")
    pq.write_table(pa.table({k: v[120:] for k, v in cols.items()}), tmp_path / "test.parquet")
    m, c = str(tmp_path / "m.npz"), str(tmp_path / "c.ckpt")
    argv = ["train", "--data", str(tmp_path / "train.parquet"), "--target", "price"]
    assert (
        cli.main([*argv, "--epochs", "40", "--lr", "0.01", *FAST, "--save", m, "--checkpoint", c])
        == 0
    )
    out = capsys.readouterr().out
    assert "target 'price': regression" in out and "test RMSE" in out
    assert cli.main(["train", "--resume", c, "--epochs", "41"]) == 0
    model = gpubp.MLP.load(m)
    assert (model.output, model.loss, model.labels) == ("identity", "mse", None)
    test = tables.read_table(tmp_path / "test.parquet", "price")
    pred = model.predict(test.x)[:, 0]
    rmse = float(np.sqrt(np.mean((pred - test.y) ** 2)))
    assert rmse < 0.2 * float(np.std(y))  # in dollars, not in standard deviations
    capsys.readouterr()
    assert cli.main(["evaluate", m, "--data", str(tmp_path / "test.parquet")]) == 0
    said = float(re.search(r"RMSE ([\d.e+]+)", capsys.readouterr().out).group(1))
    assert said == pytest.approx(rmse, rel=1e-3)
    out_pq = tmp_path / "p.parquet"
    assert (
        cli.main(["predict", m, "--data", str(tmp_path / "test.parquet"), "--output", str(out_pq)])
        == 0
    )
    np.testing.assert_allclose(
        pq.read_table(out_pq).column("prediction").to_numpy(), pred, rtol=1e-6
    )


def test_the_target_scaling_folds_into_the_last_layer_exactly(rng):
    """``W^L <- sigma W^L``, ``b^L <- sigma b^L + mu`` gives ``mu + sigma a^L`` (float64)."""
    sizes = [5, 3, 1]
    weights = [rng.normal(size=(sizes[i + 1], sizes[i])) for i in range(2)]
    biases = [rng.normal(size=sizes[i + 1]) for i in range(2)]
    x = rng.normal(size=(9, 5))
    info = FileData("regression", ("a",) * 5, "y", Preprocessing.standardize(x), 1234.5, 67.8)
    before = ref.forward(weights, biases, x, "tanh", "identity")
    unscale_output(weights, biases, info)
    after = ref.forward(weights, biases, x, "tanh", "identity")
    np.testing.assert_allclose(after, 1234.5 + 67.8 * before, rtol=1e-12)


def test_a_resume_on_changed_data_is_refused(csv_files, capsys):
    d = csv_files
    argv = ["train", "--data", str(d / "train.csv"), "--epochs", "1", *FAST]
    assert cli.main([*argv, "--checkpoint", str(d / "c.ckpt")]) == 0
    with (d / "train.csv").open("a") as f:
        f.write("1,100,-5,cat\n")
    assert cli.main(["train", "--resume", str(d / "c.ckpt"), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "train.csv has changed" in err and "SHA-256" in err


@pytest.mark.parametrize("arrow", [True, False], ids=["pyarrow", "csv-module"])
def test_csv_and_tsv_with_and_without_a_header(tmp_path, rng, monkeypatch, arrow):
    if arrow:
        pytest.importorskip("pyarrow")
    else:
        monkeypatch.setattr(tables, "_pyarrow", lambda: None)
    x, y = _classes(rng, 12)
    _write_csv(tmp_path / "h.csv", x, y)
    _write_csv(tmp_path / "n.tsv", x, (y == "cat").astype(int), header=None, delimiter="\t")
    h = tables.read_table(tmp_path / "h.csv")  # the last column is the target
    assert h.features == ("a", "b", "c") and h.target == "species" and list(h.y) == list(y)
    np.testing.assert_allclose(h.x, x, rtol=1e-5)
    assert h.x.dtype == np.float32
    n = tables.read_table(tmp_path / "n.tsv", dtype="float64")
    assert n.features == ("1", "2", "3") and n.target == "4" and n.y.dtype.kind == "i"
    np.testing.assert_allclose(n.x, x, rtol=1e-5)
    assert infer_task(n.y) == "classification" and infer_task(n.y, "regression") == "regression"


@pytest.mark.parametrize("arrow", [True, False], ids=["pyarrow", "csv-module"])
@pytest.mark.parametrize(
    ("cell", "said"), [("abc", "'abc', not a number"), ("", "missing"), ("NA", "missing")]
)
def test_a_bad_feature_cell_names_its_column_and_row(tmp_path, monkeypatch, arrow, cell, said):
    if arrow:
        pytest.importorskip("pyarrow")
    else:
        monkeypatch.setattr(tables, "_pyarrow", lambda: None)
    (tmp_path / "d.csv").write_text(f"a,b,y\n1,2,0\n3,4,1\n5,{cell},0\n")
    with pytest.raises(DatasetError) as info:
        tables.read_table(tmp_path / "d.csv")
    assert "column 'b', row 3" in str(info.value) and said in str(info.value)


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "_pyarrow", lambda: None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="pip install pyarrow"):
        tables.read_table(tmp_path / "d.parquet")


def test_npz_and_npy_pairs(tmp_path, rng):
    x, y = rng.normal(size=(8, 4)), rng.integers(0, 3, 8)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    np.save(tmp_path / "X_train.npy", x)
    np.save(tmp_path / "y_train.npy", y)
    for t in (tables.read_table(tmp_path / "d.npz"), tables.read_table(tmp_path / "X_train.npy")):
        np.testing.assert_allclose(t.x, x, rtol=1e-6)
        np.testing.assert_array_equal(t.y, y)
    np.save(tmp_path / "labels.npy", y[::-1])
    got = tables.read_table(tmp_path / "X_train.npy", target=str(tmp_path / "labels.npy"))
    np.testing.assert_array_equal(got.y, y[::-1])


def test_train_config_takes_a_data_file(csv_files):
    from gpubp.train import TrainConfig, train

    config = TrainConfig(data=str(csv_files / "train.csv"), target="species", layers=(5,),
                         epochs=1, backend="numpy", test_fraction=0.25)  # fmt: skip
    result = train(config, progress=False, log=lambda line: None)
    assert result.model.labels == ("cat", "dog", "eel") and result.test_accuracy is not None
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(data="x.csv", test_data="t.csv", test_fraction=0.2)
    with pytest.raises(ValueError, match="only applies with data"):
        TrainConfig(target="y")


def test_distributed_training_on_a_file(csv_files):
    """``--distributed`` with ``--data``: two MPI ranks, one model with the file's label names."""
    from .test_distributed import _mpi_ready, _mpirun

    if _mpi_ready() is not None:
        pytest.skip(str(_mpi_ready()))
    argv = ["-m", "gpubp", "train", "--data", "train.csv", "--epochs", "1", *FAST]
    two = _mpirun(2, [*argv, "--distributed", "--save", "m.npz"], csv_files)
    assert two.returncode == 0, two.stderr
    assert "data parallel over 2 MPI rank(s)" in two.stdout
    assert gpubp.MLP.load(csv_files / "m.npz").labels == ("cat", "dog", "eel")


@pytest.mark.parametrize("name", ["bad.csv", "bad.npz", "bad.npy", "empty.csv"])
def test_an_unreadable_file_is_a_dataset_error_naming_it(tmp_path, monkeypatch, name):
    monkeypatch.setattr(tables, "_pyarrow", lambda: None)
    (tmp_path / name).write_bytes(b"" if name.startswith("empty") else b"\xff\xfe\x00garbage\x9c")
    with pytest.raises(DatasetError, match=name):
        tables.read_table(tmp_path / name)


def test_predict_refuses_to_write_over_its_data_and_names_the_options(csv_files, capsys):
    d = csv_files
    m = str(d / "m.npz")
    assert (
        cli.main(["train", "--data", str(d / "train.csv"), "--epochs", "1", *FAST, "--save", m])
        == 0
    )
    before = (d / "new.csv").read_bytes()
    assert (
        cli.main(["predict", m, "--data", str(d / "new.csv"), "--output", str(d / "new.csv")]) == 1
    )
    err = capsys.readouterr().err
    assert "--output" in err and "--data file" in err and (d / "new.csv").read_bytes() == before
