"""A saved model on a data file: ``gpubp evaluate MODEL --data PATH`` and ``gpubp predict``.

The file is read as :func:`gpubp.tables.read_table` reads training data, its feature columns
picked by the names the model recorded (:attr:`gpubp.MLP.features`) where it has them, and sent
through the model's own preprocessing. A classifier's predictions are its label names
(:attr:`gpubp.MLP.labels`), with ``--proba`` one probability column per class; a regression's
are values in the target's units.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError, OutputPathError
from .filedata import encode_labels
from .files import check_outputs, write_atomic
from .losses import is_classifier
from .model import MLP
from .tables import Table, read_table

__all__ = ["evaluate_file", "predict_file", "prediction_table", "write_table"]


def _read(model: MLP, path: str | os.PathLike[str], target: str | None, need: bool) -> Table:
    table = read_table(path, target or model.target, model.dtype.name, model.features, need)
    if table.x.shape[1] != model.n_inputs:
        raise DatasetError(
            f"{path}: {table.x.shape[1]} feature columns ({', '.join(table.features)}); the "
            f"model takes {model.n_inputs} inputs"
        )
    return table


def evaluate_file(
    model: MLP, path: str | os.PathLike[str], target: str | None = None
) -> dict[str, Any]:
    """Score ``model`` on ``path``'s rows: ``{"rows", "target", "loss", "accuracy", "rmse"}``
    (accuracy for a classifier, the root mean squared error for a one-output regression)."""
    table = _read(model, path, target, True)
    assert table.y is not None
    classifier = is_classifier(model.loss, model.n_outputs)
    y: np.ndarray = table.y
    if classifier and model.labels is not None:
        y, _ = encode_labels(table.y, tuple(model.labels), f"{path}: the target {table.target!r}")
    elif not classifier and y.dtype.kind not in "biuf":
        raise DatasetError(
            f"{path}: the target {table.target!r} holds text; the model predicts values"
        )
    ev = model.evaluate(table.x, y)
    loss = float(ev["loss"] or 0.0)
    rmse = None if classifier else float(np.sqrt(2.0 * loss))  # gpubp's MSE is half the mean
    return {
        "data": os.fspath(path),
        "rows": len(table.x),
        "target": table.target,
        "loss": loss,
        "accuracy": ev["accuracy"],
        "rmse": rmse,
    }


def prediction_table(model: MLP, x: np.ndarray, proba: bool = False) -> dict[str, list[Any]]:
    """Columns of predictions for the raw rows ``x``: ``prediction`` (a label name, or a value)
    and with ``proba`` ``p(<label>)`` per class of a classifier."""
    out = model.forward(x)
    if not is_classifier(model.loss, model.n_outputs):
        if out.shape[1] == 1:
            return {"prediction": out[:, 0].tolist()}
        return {f"prediction_{j + 1}": out[:, j].tolist() for j in range(out.shape[1])}
    names = list(model.labels or [str(j) for j in range(model.n_outputs)])
    if model.loss == "binary_cross_entropy" and model.n_outputs == 1:
        picked = (out[:, 0] > 0.5).astype(np.int64)
        names = names if len(names) == 2 else ["0", "1"]
        columns: dict[str, list[Any]] = {"prediction": [names[i] for i in picked]}
        if proba:
            columns[f"p({names[1]})"] = out[:, 0].tolist()
        return columns
    picked = np.argmax(out, axis=1)
    columns = {"prediction": [names[i] for i in picked]}
    if proba:
        for j, name in enumerate(names):
            columns[f"p({name})"] = out[:, j].tolist()
    return columns


def predict_file(
    model: MLP,
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    proba: bool = False,
) -> int:
    """Write one row of predictions per row of ``path`` to ``output`` (CSV, or Parquet by the
    suffix ``.parquet``; stdout when None); returns the number of rows."""
    if output is not None:
        try:
            check_outputs({"output": output}, {"data": path})
        except OutputPathError as exc:  # the command line's words: --output, --data
            options = {"output": "--output", "data": "--data"}
            exc.option = exc.option or options.get(exc.argument)
            exc.other_option = exc.other_option or options.get(exc.other or "")
            raise
        if Path(output).suffix.lower() in (".parquet", ".pq"):
            _require_pyarrow(output)
    table = _read(model, path, None, False)
    columns = prediction_table(model, table.x, proba)
    write_table(columns, output)
    return len(table.x)


def _require_pyarrow(output: str | os.PathLike[str]) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DatasetError(
            f"{output}: writing Parquet needs pyarrow, which is not installed; pip install "
            "pyarrow, or write a .csv"
        ) from None


def write_table(columns: dict[str, list[Any]], output: str | os.PathLike[str] | None) -> None:
    """``columns`` as CSV with a header (to stdout when ``output`` is None), or as Parquet when
    ``output`` ends in ``.parquet``; written atomically."""
    if output is not None and Path(output).suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink)
        write_atomic(output, sink.getvalue().to_pybytes())
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(columns))
    writer.writerows(zip(*columns.values()))
    if output is None:
        sys.stdout.write(text.getvalue())
    else:
        write_atomic(output, text.getvalue().encode())
