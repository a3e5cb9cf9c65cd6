"""The ``gpubp`` command line: ``train``, ``evaluate``, ``gradflow``, ``bench``, ``check`` and
``info``."""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._checks import fraction, non_negative_int, non_negative_number, positive_int, positive_number
from .activations import HIDDEN_ACTIVATIONS
from .backends import BACKEND_NAMES, available_backends, backend_status
from .check import DEFAULT_SHAPES, TOLERANCE, CheckResult, run_checks
from .distributed import DistributedError
from .errors import (
    BackendUnavailableError,
    DatasetError,
    DatasetNotFoundError,
    ModelFileError,
    NonFiniteLossError,
    OutputPathError,
)
from .plots import PlotUnavailableError


def _cmd_check(args: argparse.Namespace) -> int:
    names = available_backends() if args.backends == "all" else args.backends.split(",")
    status = backend_status()
    for name in names:
        if name not in status:
            print(
                f"gpubp check: --backends: unknown backend {name!r}; expected names from "
                f"{', '.join(BACKEND_NAMES)} or 'all'",
                file=sys.stderr,
            )
            return 2
        if status[name] is not None:
            print(f"gpubp check: backend {name!r} cannot run here: {status[name]}", file=sys.stderr)
            return 2
    dtypes = args.dtypes.split(",")
    for dt in dtypes:
        if dt not in TOLERANCE:
            print(
                f"gpubp check: --dtypes: {dt!r} is not supported; expected float32,float64",
                file=sys.stderr,
            )
            return 2
    print(
        f"checking {', '.join(names)} against the float64 reference "
        f"({len(DEFAULT_SHAPES)} shapes x every activation/output/loss x {', '.join(dtypes)})"
    )
    results: list[CheckResult] = []
    for name in names:
        for dt in dtypes:
            print(f"  {name} {dt} ...", end="", flush=True)
            batch = run_checks([name], [dt], seed=args.seed)
            bad = sum(not r.ok for r in batch)
            print(f" {len(batch)} configurations, {bad} failed")
            results.extend(batch)
    _print_table(results)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"\n{len(failed)} configuration(s) FAILED:")
        for r in failed:
            errs = ", ".join(f"{k}={v:.2e}" for k, v in r.errors.items() if v > TOLERANCE[r.dtype])
            print(
                f"  {r.backend} {r.dtype} sizes={list(r.sizes)} batch={r.batch} "
                f"{r.activation}/{r.output}/{r.loss}: {errs}"
            )
        return 1
    print(
        f"\nall {len(results)} configurations within tolerance "
        f"({', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items() if k in dtypes)})"
    )
    return 0


def _print_table(results: list[CheckResult]) -> None:
    """Worst relative error per (backend, dtype, output/loss) over activations and shapes."""
    groups: dict[tuple[str, str, str], dict[str, float]] = collections.defaultdict(dict)
    ok: dict[tuple[str, str, str], bool] = collections.defaultdict(lambda: True)
    for r in results:
        key = (r.backend, r.dtype, f"{r.output}+{r.loss}")
        g = groups[key]
        for col, val in (
            ("forward", r.errors["forward"]),
            ("loss", r.errors["loss"]),
            ("dW", r.errors["dW"]),
            ("db", r.errors["db"]),
            ("update", max(v for k, v in r.errors.items() if k.startswith("step:"))),
        ):
            g[col] = max(g.get(col, 0.0), val)
        ok[key] = ok[key] and r.ok
    cols = ["forward", "loss", "dW", "db", "update"]
    header = f"{'backend':8} {'dtype':8} {'output+loss':30} " + " ".join(f"{c:>9}" for c in cols)
    print("\nworst relative error against the reference (over hidden activations and shapes)")
    print(header)
    print("-" * len(header))
    for key in sorted(groups):
        g = groups[key]
        cells = " ".join(f"{g[c]:9.1e}" for c in cols)
        print(f"{key[0]:8} {key[1]:8} {key[2]:30} {cells}  {'ok' if ok[key] else 'FAIL'}")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cmd_info(args: argparse.Namespace) -> int:
    print(f"gpubp {__version__}  (Python {platform.python_version()}, {platform.platform()})")
    print("\nbackends (best first; 'auto' picks the first available):")
    for name, why in backend_status().items():
        print(f"  {name:6} {'available' if why is None else 'unavailable: ' + why}")
    print("\nlibraries:")
    for dist in ("numpy", "numba", "cupy-cuda12x", "cupy-cuda13x", "scikit-learn", "matplotlib"):
        print(f"  {dist:14} {_version(dist)}")
    print("\ndevices:")
    print(f"  CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores")
    try:
        import numpy as np

        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        print(f"  BLAS: {blas.get('name', 'unknown')} {blas.get('version', '')}".rstrip())
    except Exception:  # numpy < 1.25 has no dict mode; the BLAS line is a courtesy
        pass
    try:
        from .backends.cuda.backend import import_cupy

        cupy = import_cupy()
        n = cupy.cuda.runtime.getDeviceCount()
        for i in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            print(f"  GPU {i}: {props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.1f} GiB")
    except ImportError:
        print("  GPU: CuPy not installed, so no GPU is used")
    except Exception as exc:
        print(f"  GPU: none usable ({type(exc).__name__}: {exc})")
    return 0


def _checked(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, refused with "expected ..." unless ``ok``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


# the same rules as the Python API's (gpubp._checks): NaN and infinity are refused too
_positive_int = _checked(int, positive_int, "a positive integer")
_seed = _checked(int, non_negative_int, "an integer >= 0")
_positive_float = _checked(float, positive_number, "a positive number")
_non_negative_float = _checked(float, non_negative_number, "a number >= 0")
_fraction = _checked(float, fraction, "a number in [0, 1)")


def _png_path(text: str) -> str:
    """A file name ending in .png (the figures are PNG); empty means no picture."""
    if text and not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(
            f"expected a file name ending in .png (the figure is written as PNG), got {text!r}"
        )
    return text


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(positive_int(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths such as 512,256, got {text!r}"
        )
    return values


def _name_list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {', '.join(choices)}, got {text!r}"
            )
        return names

    return parse


#: What makes a run fail without being a bug: the message says what to do; exit status 1.
_RUN_ERRORS = (
    BackendUnavailableError,
    DatasetError,
    DatasetNotFoundError,
    DistributedError,
    ModelFileError,
    OutputPathError,
    PlotUnavailableError,
)


def _message(exc: BaseException) -> str:
    """The error's text in the command line's words: an output path's error names its option
    (``--save``, not ``save_path=``), which the error carries."""
    if isinstance(exc, OutputPathError):
        return exc.command_line_message()
    # the backend registry's hint names the Python argument; a command line has --backend
    return str(exc).replace("pass backend='auto'", "pass --backend auto")


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the options given, and with --resume the checkpoint's for the rest
    (its backend only where that can run here)."""
    import dataclasses

    from .checkpoint import load_checkpoint, resume_settings
    from .config import TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig)] + ["track_gradients"]
    settings = {name: getattr(args, name) for name in names}
    if args.resume is not None:
        status = backend_status()
        for key, value in resume_settings(load_checkpoint(args.resume)).items():
            if key in args.given or (key == "backend" and status.get(value, "") is not None):
                continue
            settings[key] = value
    return settings


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import train

    if args.override and args.resume is None:
        print("gpubp train: --override only applies with --resume PATH", file=sys.stderr)
        return 2
    comm = None
    try:
        settings = _train_settings(args)
        track_gradients = settings.pop("track_gradients")
        try:
            config = TrainConfig(**settings)
        except ValueError as exc:  # e.g. --lr beyond the range of --dtype
            print(f"gpubp train: {_message(exc)}", file=sys.stderr)
            return 2
        if args.distributed:
            from .distributed import init

            comm = init()
        result = train(
            config,
            comm=comm,
            checkpoint=args.checkpoint,
            resume=args.resume,
            json_path=args.json,
            plot_path=args.plot,
            save_path=args.save,
            track_gradients=track_gradients,
            progress=not args.quiet,
            override=args.override or (),
        )
    except BaseException as exc:
        if isinstance(exc, NonFiniteLossError):
            message = f"{exc}; try a smaller --lr"
            if args.resume is not None and "lr" not in (args.override or ()):
                message += " with --override lr (a resume keeps the checkpoint's lr otherwise)"
        elif isinstance(exc, (*_RUN_ERRORS, OSError)):  # OSError: an output path not writable
            message = _message(exc)
        elif comm is None or isinstance(exc, SystemExit):
            raise
        else:  # an unexpected error on one rank: say which, with the traceback, then end all
            import traceback

            message = "".join(traceback.format_exception(exc)).rstrip()
        if comm is None:
            print(f"gpubp train: {message}", file=sys.stderr)
            return 1
        # under MPI every rank must end, or the others wait forever in the next Allreduce
        print(f"gpubp train (rank {comm.rank} of {comm.size}): {message}", file=sys.stderr)
        comm.abort(1)
        return 1  # not reached: Abort ends this process too
    return 130 if result.interrupted else 0


def _cmd_gradflow(args: argparse.Namespace) -> int:
    from .gradflow import gradflow

    try:
        gradflow(
            activations=args.activations,
            depth=args.depth,
            width=args.width,
            dataset=args.dataset,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            backend=args.backend,
            seed=args.seed,
            data_dir=args.data_dir,
            plot_path=args.plot or None,
            json_path=args.json,
            progress=not args.quiet,
        )
    except (*_RUN_ERRORS, OSError) as exc:
        print(f"gpubp gradflow: {_message(exc)}", file=sys.stderr)
        return 1
    except NonFiniteLossError as exc:
        print(f"gpubp gradflow: {exc}; try a smaller --lr", file=sys.stderr)
        return 1
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import warnings

    from .evaluate import evaluate_model
    from .files import write_json
    from .model import MLP

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = MLP.load(args.model, backend=args.backend)
            record = evaluate_model(model, args.dataset, args.data_dir, where=args.model)
        _print_warnings(caught)
        record["model"] = args.model
        if args.json is not None:
            write_json(args.json, record)
    except (*_RUN_ERRORS, OSError) as exc:
        print(f"gpubp evaluate: {_message(exc)}", file=sys.stderr)
        return 1
    accuracy = "n/a" if record["accuracy"] is None else f"{record['accuracy']:.4f}"
    trained = record["trained_on"] or "an unrecorded dataset"
    print(
        f"test accuracy {accuracy} (loss {record['loss']:.4f}) on {record['test_samples']} "
        f"{record['dataset']} test samples | {args.model}: {record['layer_sizes']}, trained on "
        f"{trained} | backend {record['backend']} {record['dtype']}"
    )
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
        print(f"gpubp evaluate: warning: {w.message}", file=sys.stderr)


def _add_evaluate_parser(sub: Any) -> None:
    from .data import DATASET_NAMES

    p = sub.add_parser(
        "evaluate",
        help="score a saved model on a dataset's test split",
        description="Load a model saved by gpubp train --save (or MLP.save) and print its "
        "accuracy and loss on the raw test images of a dataset (pixel values 0..255 for "
        "MNIST and Fashion-MNIST, 0..16 for digits), through the preprocessing saved in the "
        "model. Warns when the model carries none (a file from an older gpubp) or was trained "
        "on another dataset.",
    )
    p.add_argument("model", metavar="MODEL", help="the model file (.npz)")
    p.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="the dataset to score on (default: the one the model was trained on)",
    )
    p.add_argument("--data-dir", help="folder with the IDX files (also $GPUBP_DATA)")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES))
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    _show_defaults(p)
    p.set_defaults(func=_cmd_evaluate)


_QUIET = "no live progress bar (the epoch lines and the summary stay)"


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).replace("%", "%%")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of every option that has a default and does not say
    it already; options without one (None, or off for a flag) show none."""
    for action in parser._actions:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue
        text = action.help or ""
        if "default" not in text:
            action.help = f"{text} (default: {_shown(default)})".lstrip()


def _add_train_parser(sub: Any) -> None:
    from .checkpoint import OVERRIDABLE
    from .config import OPTIMIZERS, SCHEDULES, TrainConfig
    from .data import DATASET_NAMES

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train an MLP on real data (digits, MNIST, Fashion-MNIST) and report accuracy",
        description="Train a classifier on a real dataset with progress shown, then print the "
        "test accuracy, the wall time, samples per second and the backend. The same seed "
        "gives the same numbers on the same backend. Exit status 130 when stopped by Ctrl-C "
        "(a checkpoint is written first). With --resume, every option not given is the "
        "checkpoint's.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        choices=("auto", *DATASET_NAMES),
        help="auto: the largest dataset found locally (it says which)",
    )
    g.add_argument("--data-dir", help="folder with the IDX files (also $GPUBP_DATA)")
    g.add_argument(
        "--download",
        action="store_true",
        help="fetch a missing MNIST/Fashion-MNIST into the cache (SHA-256 checked)",
    )
    g.add_argument(
        "--val-fraction",
        type=_fraction,
        default=d.val_fraction,
        help="share of the training set held out for validation",
    )
    g = p.add_argument_group("model and optimizer")
    g.add_argument(
        "--layers",
        type=_int_list,
        default=d.layers,
        help="hidden widths, comma-separated",
    )
    g.add_argument("--activation", default=d.activation, choices=HIDDEN_ACTIVATIONS)
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    g.add_argument(
        "--lr",
        type=_positive_float,
        help="peak learning rate (default: 0.1 sgd, 0.05 momentum, 0.001 adam/adamw)",
    )
    g.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        help="decoupled (adamw) or L2 weight decay (default: 0.01 for adamw, else 0)",
    )
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        help="(default: 128, or 32 for datasets under 10,000 training samples)",
    )
    g.add_argument("--epochs", type=_positive_int, default=d.epochs)
    g.add_argument("--seed", type=_seed, default=d.seed)
    g = p.add_argument_group("where it runs")
    g.add_argument("--backend", default=d.backend, choices=("auto", *BACKEND_NAMES))
    g.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"))
    g = p.add_argument_group("files")
    g.add_argument("--checkpoint", metavar="PATH", help="write a checkpoint here every epoch")
    g.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from this checkpoint (options not given: the checkpoint's)",
    )
    g.add_argument(
        "--override",
        type=_name_list(OVERRIDABLE),
        metavar="NAMES",
        help="with --resume: settings that may differ from the checkpoint's (lr: continue a "
        "diverged run with a smaller --lr)",
    )
    g.add_argument("--json", metavar="PATH", help="write the run's record (config, history)")
    g.add_argument(
        "--plot", metavar="PATH", type=_png_path, help="write loss/accuracy curves (a .png)"
    )
    g.add_argument("--save", metavar="PATH", help="write the trained model (.npz)")
    g.add_argument(
        "--track-gradients",
        action="store_true",
        help="record per-layer norms of delta and dW after every epoch",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over MPI ranks: mpirun -n N gpubp train --distributed ...",
    )
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    _show_defaults(p)
    p.set_defaults(func=_cmd_train, subparser=p)


def _add_gradflow_parser(sub: Any) -> None:
    from .data import DATASET_NAMES

    p = sub.add_parser(
        "gradflow",
        help="draw per-layer gradient norms of deep networks, one line per activation",
        description="Train one deep, narrow network per activation for a few SGD steps and "
        "plot the per-layer norms of delta and dW (log scale), at initialisation and after "
        "training: deep sigmoid networks starve their first layers of gradient, ReLU networks "
        "do not.",
    )
    p.add_argument(
        "--activations",
        type=_name_list(HIDDEN_ACTIVATIONS),
        default=["sigmoid", "tanh", "relu"],
        help="comma-separated hidden activations to compare",
    )
    p.add_argument("--depth", type=_positive_int, default=8, help="hidden layers")
    p.add_argument("--width", type=_positive_int, default=64, help="units per hidden layer")
    p.add_argument("--dataset", default="auto", choices=("auto", *DATASET_NAMES))
    p.add_argument("--data-dir", help="folder with the IDX files (also $GPUBP_DATA)")
    p.add_argument("--steps", type=_positive_int, default=200, help="SGD steps per network")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=0.05)
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES))
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=_png_path,
        default="gradflow.png",
        help="the .png to write; '' for none",
    )
    p.add_argument("--json", metavar="PATH", help="also write the norms as JSON")
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    _show_defaults(p)
    p.set_defaults(func=_cmd_gradflow)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(parser)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpubp",
        description="Backpropagation for fully connected networks on NumPy, Numba and CUDA.",
    )
    parser.add_argument("--version", action="version", version=f"gpubp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_gradflow_parser(sub)
    check = sub.add_parser(
        "check",
        help="check every backend here against the float64 reference",
        description="Run every available backend against the float64 reference over a grid of "
        "shapes, activations, losses, dtypes and optimizers; print the worst relative errors. "
        "Exit status 1 if any configuration is out of tolerance.",
    )
    check.add_argument(
        "--backends", default="all", help="comma-separated names, or 'all' (default)"
    )
    check.add_argument("--dtypes", default="float32,float64", help="default: float32,float64")
    check.add_argument("--seed", type=_seed, default=0, help="seed of the random problems")
    _show_defaults(check)
    check.set_defaults(func=_cmd_check)
    info = sub.add_parser("info", help="list backends, devices and library versions")
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser(
        "bench",
        help="time every backend against PyTorch and the GEMM floor",
        description="Time one train step of every available backend side by side with PyTorch "
        "(where installed) and the GEMM-only floor on the standard shapes, each checked against "
        "the float64 reference first. Exit status 1 if a backend fails its check.",
    )
    _add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


_UNSET = object()


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` gives explicitly (argparse fills a namespace's
    missing attributes only, so the ones still unset were not given)."""
    namespace = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not _UNSET}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "subparser", None) is not None:
        args.given = _given(args.subparser, argv[argv.index(args.command) + 1 :])
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
    except BrokenPipeError:  # e.g. gpubp info | head -3: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not complain
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
