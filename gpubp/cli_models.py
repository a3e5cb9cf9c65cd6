"""``gpubp evaluate`` and ``gpubp predict``: a saved model on a dataset's test split or on a
data file (:mod:`gpubp.evaluate`, :mod:`gpubp.predict`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._checks import printable
from .arguments import add_data_dir_options, show_defaults
from .backends import BACKEND_NAMES
from .cli_errors import RUN_ERRORS, command_line_message, input_named

__all__ = ["add_evaluate_parser", "add_predict_parser"]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import warnings

    from .datasets import input_files
    from .evaluate import evaluate_model
    from .files import check_outputs, write_json
    from .model import MLP

    try:  # the output is never the model or a data file, and can be written: known now
        inputs = {"model": args.model, **input_files(args.data_dir)}
        if args.data is not None:
            inputs["data"] = args.data
        check_outputs({"json_path": args.json}, inputs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = MLP.load(args.model, backend=args.backend)
            if args.data is not None:
                return _evaluate_file(args, model)
            record = evaluate_model(
                model, args.dataset, args.data_dir, where=args.model, download=args.download
            )
        _print_warnings(caught)
        record["model"] = args.model
        if args.json is not None:
            write_json(args.json, record)
    except (*RUN_ERRORS, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        message = input_named(command_line_message(exc), args)
        print(f"gpubp evaluate: {printable(message, newlines=True)}", file=sys.stderr)
        return 1
    accuracy = "n/a" if record["accuracy"] is None else f"{record['accuracy']:.4f}"
    trained = record["trained_on"] or "an unrecorded dataset"
    line = (  # one line, whatever the file's strings hold: control characters escaped
        f"test accuracy {accuracy} (loss {record['loss']:.4f}) on {record['test_samples']} "
        f"{record['dataset']} test samples | {args.model}: {record['layer_sizes']}, trained on "
        f"{trained} | backend {record['backend']} {record['dtype']}"
    )
    print(printable(line))
    return 0


def _print_warnings(caught: list[Any]) -> None:
    """The warnings of ``gpubp evaluate`` on stderr; of the two a model without preprocessing
    can raise (the old file on load, the raw images at scoring), the first alone."""
    from .errors import NoPreprocessingWarning

    said_no_preprocessing = False
    for w in caught:
        if issubclass(w.category, NoPreprocessingWarning):
            if said_no_preprocessing:
                continue
            said_no_preprocessing = True
        print(f"gpubp evaluate: warning: {printable(str(w.message))}", file=sys.stderr)


def add_evaluate_parser(sub: Any) -> None:
    from .datasets import DATASET_NAMES

    p = sub.add_parser(
        "evaluate",
        help="score a saved model on a dataset's test split",
        description="Load a model saved by gpubp train --save (or MLP.save) and print its "
        "accuracy and loss on the raw test images of a dataset (pixel values 0..255 for "
        "MNIST and Fashion-MNIST, 0..16 for digits), or with --data on the rows of your own "
        "file (accuracy, or the RMSE of a regression), through the preprocessing saved in the "
        "model. Warns when the model carries none (a file from an older gpubp) or was trained "
        "on another dataset.",
    )
    p.add_argument("model", metavar="MODEL", help="the model file (.npz)")
    p.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="the dataset to score on (default: the one the model was trained on)",
    )
    add_data_dir_options(p)
    p.add_argument(
        "--data",
        metavar="PATH",
        help="score on your own file instead (CSV, TSV, .npz, .npy, .parquet), its columns "
        "taken by the names the model was trained with",
    )
    p.add_argument(
        "--target",
        metavar="COLUMN",
        help="with --data: the target column (default: the one the model was trained on)",
    )
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES))
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    show_defaults(p)
    p.set_defaults(func=_cmd_evaluate)


def _evaluate_file(args: argparse.Namespace, model: Any) -> int:
    """``gpubp evaluate MODEL --data PATH``: the score on the file's rows (errors to the caller)."""
    from .files import write_json
    from .predict import evaluate_file

    if args.dataset is not None:
        print("gpubp evaluate: pass --dataset or --data, not both", file=sys.stderr)
        return 2
    record = evaluate_file(model, args.data, args.target)
    record["model"] = args.model
    if args.json is not None:
        write_json(args.json, record)
    if record["rmse"] is not None:
        score = f"RMSE {record['rmse']:.4g} (loss {record['loss']:.4g})"
    else:
        score = f"accuracy {record['accuracy']:.4f} (loss {record['loss']:.4f})"
    print(
        f"{score} on {record['rows']} rows of {args.data}, target {record['target']!r} | "
        f"{args.model}: {list(model.layer_sizes)} | backend {model.backend.name} "
        f"{model.dtype.name}"
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .model import MLP
    from .predict import predict_file

    try:
        model = MLP.load(args.model, backend=args.backend)
        rows = predict_file(model, args.data, args.output, args.proba)
    except (*RUN_ERRORS, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        message = input_named(command_line_message(exc), args)
        print(f"gpubp predict: {message}", file=sys.stderr)
        return 1
    if args.output is not None:
        print(f"{rows} predictions written to {args.output}", file=sys.stderr)
    return 0


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="write a saved model's predictions for the rows of a data file",
        description="Load a model saved by gpubp train --save and write one row per row of "
        "the file: the predicted label's name (or a regression's value), and with --proba "
        "each class's probability. The file's feature columns are taken by the names the "
        "model was trained with (a target column, if present, is left out) and go through "
        "the model's saved preprocessing. CSV, or Parquet by the output's suffix; standard "
        "output by default.",
    )
    p.add_argument("model", metavar="MODEL", help="the model file (.npz)")
    p.add_argument(
        "--data",
        metavar="PATH",
        required=True,
        help="the rows to predict: CSV, TSV, .npz, .npy or .parquet",
    )
    p.add_argument(
        "--output",
        metavar="PATH",
        help="where to write: .csv or .parquet (default: CSV on standard output)",
    )
    p.add_argument(
        "--proba", action="store_true", help="add one probability column per class, p(<label>)"
    )
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES))
    show_defaults(p)
    p.set_defaults(func=_cmd_predict)
