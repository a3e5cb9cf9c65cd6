"""Your own data from a file: CSV or TSV (with or without a header), ``.npz`` (``X``, ``y``),
``.npy`` pairs and Parquet, read into numeric features ``X`` ``(N, d)`` of one dtype and a target
column ``y`` ``(N,)`` as it is written (integers, floats, booleans or strings).

CSV and TSV are read with pyarrow where it is installed (multi-threaded), else with the
standard library's :mod:`csv`; Parquet needs pyarrow. A header is taken to be there when a cell
of the first row is not a number. Without one the columns are named ``1``, ``2``, ... (so
``--target 5`` names the fifth). The target is the column ``target`` names, else a column called
``y``, ``target``, ``label`` or ``class``, else the last one.

Every feature must be a number: a text cell or a missing value (an empty cell, ``NA``, ``NaN``)
is a :class:`~gpubp.errors.DatasetError` naming the file, column and row, and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError

__all__ = ["TARGET_NAMES", "Table", "fingerprint", "read_table", "table_kind"]

#: Column names taken as the target when none is named (else the last column).
TARGET_NAMES: tuple[str, ...] = ("y", "target", "label", "class")
_MISSING = {"", "na", "nan", "null", "none", "n/a", "?"}
_KINDS = {".csv": "csv", ".tsv": "tsv", ".txt": "csv", ".npz": "npz", ".npy": "npy"}
_KINDS.update({".parquet": "parquet", ".pq": "parquet"})


@dataclass
class Table:
    """A data file read: features ``x`` ``(N, d)`` in the dtype asked for, their ``features``
    names, the target column ``y`` ``(N,)`` as written (None when the file has none) and its
    name, and the file it came from."""

    x: np.ndarray
    features: tuple[str, ...]
    y: np.ndarray | None
    target: str | None
    source: str


def table_kind(path: str | os.PathLike[str]) -> str:
    """``csv``, ``tsv``, ``npz``, ``npy`` or ``parquet`` by the file's suffix; else
    :class:`~gpubp.errors.DatasetError` listing the suffixes read."""
    kind = _KINDS.get(Path(path).suffix.lower())
    if kind is None:
        raise DatasetError(
            f"{path}: cannot tell the format from the suffix {Path(path).suffix!r}; expected "
            ".csv, .tsv, .npz, .npy or .parquet"
        )
    return kind


def fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"name", "size", "sha256"}`` of a file: what a checkpoint records of its data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": os.fspath(path), "size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _pyarrow() -> Any:
    try:
        import pyarrow

        return pyarrow
    except ImportError:
        return None


def read_table(
    path: str | os.PathLike[str],
    target: str | None = None,
    dtype: str = "float32",
    features: tuple[str, ...] | None = None,
    need_target: bool = True,
) -> Table:
    """Read ``path`` (see the module's formats): features as ``dtype``, the target as written.

    ``target``: the target column's name (or, for ``.npy``, the labels file); ``features``: the
    feature columns to take, by name and in this order (a model's), when the file has them;
    ``need_target=False``: a file without the target column is fine (prediction).
    """
    if not os.path.isfile(path):
        raise DatasetError(
            f"{path}: no such file; pass the path of a CSV, TSV, .npz, .npy or .parquet file"
        )
    kind = table_kind(path)
    try:
        if kind == "npz":
            return _from_arrays(path, *_npz(path), dtype, features, need_target)
        if kind == "npy":
            x, y = _npy_pair(path, target, need_target)
            return _from_arrays(path, x, y, dtype, features, need_target)
        columns = _columns(path, kind)
    except (UnicodeDecodeError, csv.Error, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: cannot be read as {kind} ({exc})") from None
    except ValueError as exc:  # NumPy's refusals: not an .npy, an object array
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot be read as {kind} ({exc})") from None
    if not columns:
        raise DatasetError(f"{path}: holds no columns; expected a header or rows of numbers")
    return _from_columns(path, columns, target, dtype, features, need_target)


# --- arrays ------------------------------------------------------------------------------------


def _npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as z:
        names = {n.lower(): n for n in z.files}
        if "x" not in names:
            raise DatasetError(f"{path}: holds {sorted(z.files)}; expected arrays X and y")
        return z[names["x"]], (z[names["y"]] if "y" in names else None)


def _npy_pair(
    path: str | os.PathLike[str], target: str | None, need_target: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    p = Path(path)
    if target is not None and target.lower().endswith(".npy"):
        labels: Path | None = Path(target)
    else:
        stem = p.name
        i = next((k for k, c in enumerate(stem) if c in "Xx"), None)
        labels = p.with_name(stem[:i] + "y" + stem[i + 1 :]) if i is not None else None
    x = np.load(p, allow_pickle=False)
    if labels is None or not labels.is_file():
        if need_target:
            raise DatasetError(
                f"{path}: no labels file found (looked for {labels}); pass it with --target "
                "LABELS.npy, or name the pair X*.npy and y*.npy"
            )
        return x, None
    return x, np.load(labels, allow_pickle=False)


def _from_arrays(
    path: Any,
    x: np.ndarray,
    y: np.ndarray | None,
    dtype: str,
    features: tuple[str, ...] | None,
    need_target: bool,
) -> Table:
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise DatasetError(
            f"{path}: X has shape {x.shape} and dtype {x.dtype}; expected numbers (N, d)"
        )
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DatasetError(f"{path}: y has shape {y.shape}; expected ({len(x)},), one per row of X")
    if y is None and need_target:
        raise DatasetError(f"{path}: holds no y; expected arrays X and y")
    names = tuple(f"x{j + 1}" for j in range(x.shape[1]))
    if features is not None and len(features) != len(names):
        raise DatasetError(f"{path}: X has {x.shape[1]} columns; the model takes {len(features)}")
    out = x.astype(dtype, copy=False)
    bad = ~np.isfinite(out)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DatasetError(
            f"{path}: X[{row}, {col}] is {x[row, col]!r}; every feature must be a finite number "
            f"in {dtype}: drop or fill that row"
        )
    return Table(out, features or names, y, None if y is None else "y", os.fspath(path))


# --- columns -----------------------------------------------------------------------------------


def _columns(path: str | os.PathLike[str], kind: str) -> dict[str, list[Any] | np.ndarray]:
    """The file's columns by name, in order: lists of text cells (the csv module) or arrays."""
    pa = _pyarrow()
    if kind == "parquet":
        if pa is None:
            raise DatasetError(
                f"{path}: reading Parquet needs pyarrow, which is not installed; "
                "pip install pyarrow"
            )
        import pyarrow.parquet as pq

        return _arrow_columns(pq.read_table(path))
    delimiter = "\t" if kind == "tsv" else ","
    header = _has_header(path, delimiter)
    if pa is not None:
        from pyarrow import csv as pacsv

        read = pacsv.ReadOptions(autogenerate_column_names=not header)
        parse = pacsv.ParseOptions(delimiter=delimiter)
        convert = pacsv.ConvertOptions(null_values=sorted(_MISSING | {m.upper() for m in _MISSING}))
        try:
            table = pacsv.read_csv(path, read, parse, convert)
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{path}: {exc}") from None
        cols = _arrow_columns(table)
        return cols if header else {str(i + 1): v for i, v in enumerate(cols.values())}
    return _csv_columns(path, delimiter, header)


def _has_header(path: str | os.PathLike[str], delimiter: str) -> bool:
    with open(path, newline="", encoding="utf-8") as f:
        first = next(csv.reader(f, delimiter=delimiter), [])
    return any(_number(cell) is None and cell.strip().lower() not in _MISSING for cell in first)


def _csv_columns(path: Any, delimiter: str, header: bool) -> dict[str, list[Any] | np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    names = [c.strip() for c in rows[0]] if header and rows else []
    body = rows[1:] if header else rows
    width = len(names) if header else (len(body[0]) if body else 0)
    for i, r in enumerate(body):
        if len(r) != width:
            line = i + 1 + header
            raise DatasetError(
                f"{path}: line {line} has {len(r)} cells; expected {width}, as line 1"
            )
    if not header:
        names = [str(j + 1) for j in range(width)]
    return {name: [r[j] for r in body] for j, name in enumerate(names)}


def _arrow_columns(table: Any) -> dict[str, list[Any] | np.ndarray]:
    out: dict[str, list[Any] | np.ndarray] = {}
    for name, col in zip(table.column_names, table.columns):
        import pyarrow as pa

        t = col.type
        if col.null_count:
            out[name] = col.to_pylist()  # None marks each missing value
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out[name] = col.to_numpy()
        else:
            out[name] = [str(v) for v in col.to_pylist()]
    return out


def _number(cell: Any) -> float | None:
    if isinstance(cell, (int, float, np.number)) and not isinstance(cell, bool):
        return float(cell)
    try:
        value = float(str(cell))
    except ValueError:
        return None
    return value if not math.isnan(value) else None


def _pick_target(path: Any, names: list[str], target: str | None, need: bool) -> str | None:
    if target is not None:
        if target not in names:
            raise DatasetError(
                f"{path}: no column {target!r} for --target; the columns are {', '.join(names)}"
            )
        return target
    found = [n for n in names if n.lower() in TARGET_NAMES]
    if found:
        return found[0]
    return names[-1] if need else None


def _from_columns(
    path: Any,
    columns: dict[str, list[Any] | np.ndarray],
    target: str | None,
    dtype: str,
    features: tuple[str, ...] | None,
    need_target: bool,
) -> Table:
    names = list(columns)
    numbered = names == [str(j + 1) for j in range(len(names))]  # a file without a header
    if features is not None and not numbered and not set(features) <= set(names):
        missing = [f for f in features if f not in names]
        raise DatasetError(
            f"{path}: has no column {', '.join(map(repr, missing))} of those the model was "
            f"trained on ({', '.join(features)}); its columns are {', '.join(names)}"
        )
    if features is not None and numbered and target not in names:
        target = None  # by position: the model's features, then the target (if any) last
        if len(names) == len(features) + 1:
            target = names[-1]
    if features is not None and set(features) <= set(names):  # a model's columns, by name
        chosen = list(features)
        tname = target if target in names else None
        if tname is None and need_target:
            raise DatasetError(
                f"{path}: no target column {target!r}; the columns are {', '.join(names)}. "
                "Pass --target COLUMN"
            )
    else:
        tname = _pick_target(path, names, target, need_target)
        chosen = [n for n in names if n != tname]
        if features is not None and len(chosen) != len(features):
            raise DatasetError(
                f"{path}: has the feature columns {', '.join(chosen)}; the model takes "
                f"{len(features)}: {', '.join(features)}"
            )
    if not chosen:
        raise DatasetError(f"{path}: no feature columns besides the target {tname!r}")
    n = len(columns[chosen[0]])
    x = np.empty((n, len(chosen)), dtype=dtype)  # the features, held once, in the model's dtype
    for j, name in enumerate(chosen):
        x[:, j] = _feature(path, name, columns[name], dtype)
    y = None if tname is None else _target(path, tname, columns[tname])
    return Table(x, tuple(features or chosen), y, tname, os.fspath(path))


def _feature(path: Any, name: str, cells: list[Any] | np.ndarray, dtype: str) -> np.ndarray:
    if isinstance(cells, np.ndarray) and cells.dtype.kind in "biuf":
        values = cells.astype(dtype)
    else:
        values = np.empty(len(cells), dtype=dtype)
        for i, cell in enumerate(cells):
            v = None if cell is None else _number(cell)
            if v is None:
                what = (
                    "missing"
                    if cell is None or str(cell).strip().lower() in _MISSING
                    else (f"{cell!r}, not a number")
                )
                raise DatasetError(
                    f"{path}: column {name!r}, row {i + 1}: {what}. Every feature must be a "
                    "number: drop or fill missing values, encode a text column as numbers "
                    "(one column per category), or drop it"
                )
            values[i] = v
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(
            f"{path}: column {name!r}, row {i + 1}: {cells[i]!r} is not a finite number in "
            f"{dtype}; drop or fill that row, or rescale the column"
        )
    return values


def _target(path: Any, name: str, cells: list[Any] | np.ndarray) -> np.ndarray:
    """The target column as written: bool, int64, float64 or str."""
    if isinstance(cells, np.ndarray):
        return cells
    text = [None if c is None else str(c).strip() for c in cells]
    missing = [i for i, c in enumerate(text) if c is None or c.lower() in _MISSING]
    if missing:
        raise DatasetError(
            f"{path}: the target column {name!r}, row {missing[0] + 1}, is missing; every row "
            "needs a target: drop that row"
        )
    lowered = {c.lower() for c in text if c is not None}
    if lowered <= {"true", "false"}:
        return np.array([c is not None and c.lower() == "true" for c in text])
    try:
        return np.array([int(c) for c in text if c is not None], dtype=np.int64)
    except ValueError:
        pass
    numbers = [_number(c) for c in text]
    if all(v is not None for v in numbers):
        return np.array(numbers, dtype=np.float64)
    return np.array(text, dtype=str)
