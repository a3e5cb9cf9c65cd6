"""The command line's options: the option sets of ``gpubp train`` and ``gpubp gradflow``, and
the types and help every command shares. Each ``type=`` refuses a bad value with what it
expected (argparse adds the option's name), by the same rules as the Python API's
(:mod:`gpubp._checks`: NaN and infinity are refused too)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._checks import fraction, non_negative_int, non_negative_number, positive_int, positive_number
from .activations import HIDDEN_ACTIVATIONS
from .backends import BACKEND_NAMES

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "DATA_DIR_HELP",
    "QUIET_HELP",
    "add_data_dir_options",
    "add_gradflow_options",
    "add_threads_option",
    "add_train_options",
    "fraction_value",
    "given_options",
    "int_list",
    "name_list",
    "non_negative_float",
    "non_negative_int_value",
    "png_path",
    "positive_float",
    "positive_int_value",
    "seed_value",
    "show_defaults",
]


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


positive_int_value = _checked(int, positive_int, "a positive integer")
seed_value = _checked(int, non_negative_int, "an integer >= 0")
non_negative_int_value = seed_value
positive_float = _checked(float, positive_number, "a positive number")
non_negative_float = _checked(float, non_negative_number, "a number >= 0")
fraction_value = _checked(float, fraction, "a number in [0, 1)")


def png_path(text: str) -> str:
    """A file name ending in .png (the figures are PNG); empty means no picture."""
    if text and not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(
            f"expected a file name ending in .png (the figure is written as PNG), got {text!r}"
        )
    return text


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, such as ``512,256``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(positive_int(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths such as 512,256, got {text!r}"
        )
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {', '.join(choices)}, got {text!r}"
            )
        return names

    return parse


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).replace("%", "%%")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of every option that has a default and does not say
    it already; options without one (None, or off for a flag) show none."""
    for action in parser._actions:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue
        text = action.help or ""
        if "default" not in text:
            action.help = f"{text} (default: {_shown(default)})".lstrip()


_UNSET = object()


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` gives explicitly (argparse fills a namespace's
    missing attributes only, so the ones still unset were not given)."""
    namespace = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not _UNSET}


def add_threads_option(parser: Any, also: str = "") -> None:
    """``--threads N``, passed to the backend as ``threads=N`` (see ``gpubp.get_backend``)."""
    parser.add_argument(
        "--threads",
        type=positive_int_value,
        metavar="N",
        help="threads for the backend: numba takes them (BLAS's and its row split), numpy and "
        f"cupy refuse a count{also} (default: the backend's own choice)",
    )


DATA_DIR_HELP = (
    "folder with the IDX files: when given, the only place looked (default: $GPUBP_DATA, "
    "the cache, system folders)"
)


def add_data_dir_options(g: Any) -> None:
    """``--data-dir`` and ``--download``: where the IDX files are, and fetching them."""
    g.add_argument("--data-dir", help=DATA_DIR_HELP)
    g.add_argument(
        "--download",
        action="store_true",
        help="fetch a missing MNIST/Fashion-MNIST (SHA-256 checked) into --data-dir, else the "
        "cache",
    )


def add_file_data_options(g: Any) -> None:
    """``gpubp train``'s options for your own data file."""
    g.add_argument(
        "--data",
        metavar="PATH",
        help="train on your own file instead: CSV or TSV (header or not), .npz (X, y), .npy "
        "(X*.npy with y*.npy) or .parquet",
    )
    g.add_argument(
        "--target",
        metavar="COLUMN",
        help="with --data: the target column (default: y, target, label or class, else the "
        "last column; without a header columns are 1, 2, ...; for .npy the labels file)",
    )
    g.add_argument("--test-data", metavar="PATH", help="with --data: the test rows, another file")
    g.add_argument(
        "--test-fraction",
        type=fraction_value,
        metavar="F",
        help="with --data: the seeded share of its rows held out for testing (default: 0.2)",
    )
    g.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="with --data (default: from the target: floats are regression, integers, strings "
        "and booleans classification)",
    )


QUIET_HELP = "no live progress bar (the epoch lines and the summary stay)"


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options of ``gpubp train``, in groups, with TrainConfig's defaults."""
    from .config import TrainConfig
    from .datasets import DATASET_NAMES

    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        choices=("auto", *DATASET_NAMES),
        help="auto: the largest dataset found locally (it says which)",
    )
    add_data_dir_options(g)
    add_file_data_options(g)
    g.add_argument(
        "--val-fraction",
        type=fraction_value,
        default=d.val_fraction,
        help="share of the training set held out for validation",
    )
    _add_model_options(p.add_argument_group("model and optimizer"), d)
    g = p.add_argument_group("where it runs")
    g.add_argument("--backend", default=d.backend, choices=("auto", *BACKEND_NAMES))
    g.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"))
    add_threads_option(g)
    _add_file_options(p.add_argument_group("files"))
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _add_model_options(g: Any, d: TrainConfig) -> None:
    """``gpubp train``'s network and optimizer options; ``d``: the default TrainConfig."""
    from .config import OPTIMIZERS, SCHEDULES

    g.add_argument(
        "--layers",
        type=int_list,
        default=d.layers,
        help="hidden widths, comma-separated",
    )
    g.add_argument("--activation", default=d.activation, choices=HIDDEN_ACTIVATIONS)
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    g.add_argument(
        "--lr",
        type=positive_float,
        help="peak learning rate (default: 0.1 sgd, 0.05 momentum, 0.001 adam/adamw)",
    )
    g.add_argument(
        "--weight-decay",
        type=non_negative_float,
        help="decoupled (adamw) or L2 weight decay (default: 0.01 for adamw, else 0)",
    )
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    g.add_argument(
        "--batch-size",
        type=positive_int_value,
        help="(default: 128, or 32 for datasets under 10,000 training samples)",
    )
    g.add_argument("--epochs", type=positive_int_value, default=d.epochs)
    g.add_argument("--seed", type=seed_value, default=d.seed)


def _add_file_options(g: Any) -> None:
    """``gpubp train``'s files: checkpoint, resume, records, model; and the MPI switch."""
    from .checkpoint import OVERRIDABLE

    g.add_argument("--checkpoint", metavar="PATH", help="write a checkpoint here every epoch")
    g.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from this checkpoint (options not given: the checkpoint's)",
    )
    g.add_argument(
        "--override",
        type=name_list(OVERRIDABLE),
        metavar="NAMES",
        help="with --resume: settings that may differ from the checkpoint's (lr: continue a "
        "diverged run with a smaller --lr)",
    )
    g.add_argument("--json", metavar="PATH", help="write the run's record (config, history)")
    g.add_argument(
        "--plot", metavar="PATH", type=png_path, help="write loss/accuracy curves (a .png)"
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


def add_gradflow_options(p: argparse.ArgumentParser) -> None:
    """The options of ``gpubp gradflow``."""
    from .datasets import DATASET_NAMES

    p.add_argument(
        "--activations",
        type=name_list(HIDDEN_ACTIVATIONS),
        default=["sigmoid", "tanh", "relu"],
        help="comma-separated hidden activations to compare",
    )
    p.add_argument("--depth", type=positive_int_value, default=8, help="hidden layers")
    p.add_argument("--width", type=positive_int_value, default=64, help="units per hidden layer")
    p.add_argument("--dataset", default="auto", choices=("auto", *DATASET_NAMES))
    add_data_dir_options(p)
    p.add_argument("--steps", type=positive_int_value, default=200, help="SGD steps per network")
    p.add_argument("--batch-size", type=positive_int_value, default=64)
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES))
    add_threads_option(p)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=png_path,
        default="gradflow.png",
        help="the .png to write; '' for none",
    )
    p.add_argument("--json", metavar="PATH", help="also write the norms as JSON")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no live progress bar (the per-layer norms and the summary stay)",
    )
