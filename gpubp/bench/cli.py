"""``gpubp bench``'s options and command."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from ..arguments import add_threads_option, name_list, non_negative_int_value
from ..backends import BACKEND_NAMES, backend_status
from ..check import TOLERANCE
from ..datasets import DATASET_NAMES, find_dataset
from .job import (
    CONTENDERS,
    JOB_DATASETS,
    JobSpec,
    available_contenders,
    format_report,
    run_job,
    to_json,
)
from .problem import QUICK_SWEEP_BATCHES, STANDARD_SHAPES, SWEEP_BATCHES, BenchShape, parse_shape
from .report import format_table, plot_sweep
from .run import BenchConfig, run_bench
from .timing import DEFAULT_MIN_TIME, DEFAULT_REPEATS, DEFAULT_SETTLE, QUICK_MIN_TIME, QUICK_REPEATS

# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gpubp bench``."""
    parser.add_argument(
        "--shapes",
        default="all",
        help=f"comma-separated: {', '.join(STANDARD_SHAPES)}, or SIZES@BATCH such as "
        "784-128-10@64; 'all' (default) runs every standard shape this machine can",
    )
    parser.add_argument(
        "--backends",
        default="all",
        help=f"comma-separated from {', '.join(BACKEND_NAMES)}; 'all' (default): every one "
        "that can run here",
    )
    parser.add_argument("--dtypes", default="float32", help="default float32; float32,float64")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_REPEATS} samples of >= {QUICK_MIN_TIME:g} s (default {DEFAULT_REPEATS} of "
        f">= {DEFAULT_MIN_TIME:g} s) per candidate: rougher timings; each candidate's check "
        "against the float64 reference, run first, is the same",
    )
    parser.add_argument("--repeats", type=int, help="samples per candidate (overrides --quick)")
    parser.add_argument(
        "--min-time", type=float, help="seconds each sample runs at least (overrides --quick)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        help=f"seconds to pause before each sample so the previous candidate's spinning BLAS "
        f"threads go to sleep (default {DEFAULT_SETTLE:g})",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="also sweep the batch size and plot time per sample against it (log-log, one "
        "line per backend; needs matplotlib)",
    )
    parser.add_argument(
        "--plot-shape",
        help="the network of the --plot sweep (a --shapes name or SIZES@BATCH; default: the "
        "first of --shapes, mnist-mlp with 'all')",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem")
    add_threads_option(
        parser, "; PyTorch and BLAS (the floor, numpy, scikit-learn) and JAX get as many"
    )
    parser.add_argument(
        "--load",
        type=non_negative_int_value,
        default=0,
        metavar="N",
        help="run N busy processes (CPU spin loops) beside every candidate, as on a shared "
        "machine (default 0)",
    )
    _add_job_arguments(parser)
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress line on standard error"
    )


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gpubp bench --job``, in a group of their own."""
    job = parser.add_argument_group(
        "whole-job benchmark",
        "--job trains the default `gpubp train` job with gpubp and, where installed, the same "
        "job as PyTorch CPU loops (default Adam, Adam(fused=True), torch.compile), a JAX jit "
        "step and scikit-learn's MLPClassifier, interleaved, each in a fresh process, and "
        "prints training time, its ratios to gpubp and to the job's GEMM floor, test accuracy "
        "and threads (instead of the step benchmark); --threads and --load apply to each",
    )
    job.add_argument(
        "--job",
        nargs="?",
        const="all",
        metavar="DATASETS",
        help=f"comma-separated from {', '.join(JOB_DATASETS)}; 'all' (the default with a bare "
        "--job): each found here (with --quick: digits only, and no torch.compile)",
    )
    job.add_argument(
        "--epochs", type=int, help="epochs of each job (default: gpubp train's 15; 1 with --quick)"
    )
    job.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    job.add_argument("--data-dir", help="where the IDX files are looked for first")
    job.add_argument("--no-sklearn", action="store_true", help="leave scikit-learn out")
    job.add_argument(
        "--contenders",
        type=name_list(tuple(CONTENDERS)),
        metavar="NAMES",
        help="comma-separated from "
        + ", ".join(f"{k} ({v})" for k, v in CONTENDERS.items())
        + "; default: every one that can run here (with --quick: but torch-compile)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed options; :class:`ValueError` names a bad option."""
    status = backend_status()
    backends = None
    if args.backends != "all":
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        for name in backends:
            if name not in status:
                raise ValueError(
                    f"--backends: unknown backend {name!r}; expected names from "
                    f"{', '.join(BACKEND_NAMES)} or 'all'"
                )
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for dt in dtypes:
        if dt not in TOLERANCE:
            raise ValueError(f"--dtypes: {dt!r} is not supported; expected float32,float64")
    if not dtypes:
        raise ValueError("--dtypes: give at least one of float32,float64")
    if args.shapes == "all":
        shapes = list(STANDARD_SHAPES.values())
    else:
        shapes = [parse_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if repeats < 3:
        raise ValueError(f"--repeats: {repeats} is too few for a median and a spread; use >= 3")
    min_time = (
        args.min_time
        if args.min_time is not None
        else (QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME)
    )
    if not min_time >= 0:
        raise ValueError(f"--min-time: {min_time} must be a number of seconds >= 0")
    if not args.settle >= 0:
        raise ValueError(f"--settle: {args.settle} must be a number of seconds >= 0")
    sweep = None
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "--plot needs matplotlib, which is not installed; pip install 'gpubp[plot]' "
                "(or leave --plot out)"
            )
        sweep = parse_shape(args.plot_shape) if args.plot_shape else _default_sweep(shapes)
    return BenchConfig(
        shapes=shapes,
        backends=backends,
        dtypes=dtypes,
        repeats=repeats,
        min_time=min_time,
        settle=args.settle,
        torch=not args.no_torch,
        memory=not args.no_memory,
        sweep_shape=sweep,
        sweep_batches=QUICK_SWEEP_BATCHES if args.quick else SWEEP_BATCHES,
        seed=args.seed,
        threads=args.threads,
        load=args.load,
    )


def _default_sweep(shapes: list[BenchShape]) -> BenchShape:
    """The network ``--plot`` sweeps unless ``--plot-shape`` names one: the one asked for."""
    return (
        shapes[0]
        if shapes and shapes != list(STANDARD_SHAPES.values())
        else STANDARD_SHAPES["mnist-mlp"]
    )


def job_specs(args: argparse.Namespace) -> tuple[list[JobSpec], list[str]]:
    """The jobs ``--job`` asks for, and those of ``all`` that cannot run here (with why);
    :class:`ValueError` names a bad option."""
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 15)
    if epochs < 1:
        raise ValueError(f"--epochs: {epochs} must be at least 1")
    if args.rounds < 1:
        raise ValueError(f"--rounds: {args.rounds} must be at least 1")
    absent: list[str] = []
    if args.job == "all":
        names = ["digits"] if args.quick else list(JOB_DATASETS)
        if "fashion-mnist" in names and find_dataset("fashion-mnist", args.data_dir) is None:
            names.remove("fashion-mnist")
            absent.append(
                "the fashion-mnist job: its files were not found (gpubp train --dataset "
                "fashion-mnist --download fetches them; or pass --data-dir)"
            )
        if importlib.util.find_spec("sklearn") is None:
            names.remove("digits")
            absent.append("the digits job: it needs scikit-learn (pip install scikit-learn)")
    else:
        names = [n.strip() for n in args.job.split(",") if n.strip()]
        for name in names:
            if name not in DATASET_NAMES:
                raise ValueError(
                    f"--job: unknown dataset {name!r}; expected names from "
                    f"{', '.join(DATASET_NAMES)} or 'all'"
                )
    if not names:
        raise ValueError("--job: no job can run here: " + "; ".join(absent))
    return [JobSpec(n, epochs, args.data_dir, args.threads) for n in names], absent


def _outputs_refused(args: argparse.Namespace) -> bool:
    """Check ``--json`` and ``--plot`` before anything runs (their folders exist and take a
    file, neither is a folder, nor the other); print why not and return True if refused."""
    from ..errors import OutputPathError, OutputWriteError
    from ..files import check_outputs

    paths = {"json_path": args.json or None, "plot_path": getattr(args, "plot", None) or None}
    try:
        check_outputs(paths)
    except (OutputPathError, OutputWriteError) as exc:
        text = exc.command_line_message() if isinstance(exc, OutputPathError) else str(exc)
        print(f"gpubp bench: {text}", file=sys.stderr)
        return True
    return False


def _write_json(path: str, record: dict[str, object]) -> None:
    from ..files import write_atomic  # atomic, and no planted link followed

    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    print(f"\nwrote {path}")


def job_main(args: argparse.Namespace) -> int:
    """``gpubp bench --job``: train every job with every contender, print the tables."""
    try:
        specs, absent = job_specs(args)
    except ValueError as exc:
        print(f"gpubp bench: {exc}", file=sys.stderr)
        return 2
    if _outputs_refused(args):
        return 1
    wanted = args.contenders
    if wanted is None and args.quick:  # a rough look in seconds, not a minute of compiling
        wanted = [c for c in CONTENDERS if c != "torch-compile"]
        absent.append("torch-compile: left out by --quick (name it in --contenders to run it)")
    contenders, missing = available_contenders(
        wanted, torch=not args.no_torch, sklearn=not args.no_sklearn
    )
    absent += missing
    stream = None if args.no_progress else sys.stderr
    results = [run_job(spec, contenders, args.rounds, stream, args.load) for spec in specs]
    print(
        format_report(
            results, absent, _job_command(args, specs), args.rounds, args.load, args.threads
        )
    )
    if args.json:
        cmd = _job_command(args, specs)
        _write_json(args.json, to_json(results, absent, cmd, args.load, args.threads))
    return 1 if any(row.error for r in results for row in r.rows) else 0


def _job_command(args: argparse.Namespace, specs: list[JobSpec]) -> str:
    """A ``gpubp bench --job`` command that reruns this one (without ``--json``)."""
    command = " ".join(["gpubp bench --job", ",".join(s.dataset for s in specs)])
    command += f" --epochs {specs[0].epochs} --rounds {args.rounds}"
    command += "".join(f" --no-{c}" for c in ("torch", "sklearn") if getattr(args, f"no_{c}"))
    if args.contenders:
        command += f" --contenders {','.join(args.contenders)}"
    command += f" --load {args.load}" if args.load else ""
    command += f" --threads {args.threads}" if args.threads is not None else ""
    return command


def main(args: argparse.Namespace) -> int:
    """``gpubp bench``: run, print the table, write ``--json`` and ``--plot``; 1 on failures."""
    if getattr(args, "job", None) is not None:
        return job_main(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gpubp bench: {exc}", file=sys.stderr)
        return 2
    if _outputs_refused(args):
        return 1
    report = run_bench(config, None if args.no_progress else sys.stderr)
    print(format_table(report))
    if args.json:
        _write_json(args.json, report.to_json())
    if args.plot:
        plot_sweep(report, args.plot)
        print(f"wrote {args.plot} ({config.sweep_shape.name if config.sweep_shape else ''})")
    return 1 if report.failures else 0
