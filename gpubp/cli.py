"""The ``gpubp`` command line: ``train``, ``evaluate``, ``predict``, ``gradflow``, ``bench``,
``check`` and ``info``."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, machine
from .arguments import (
    add_gradflow_options,
    add_train_options,
    given_options,
    seed_value,
    show_defaults,
)
from .backends import (
    BACKEND_NAMES,
    EMULATED,
    EMULATOR_HINT,
    auto_order,
    available_backends,
    backend_status,
    get_backend,
    use_backend,
)
from .backends.cuda.cupy_module import injected
from .bench import add_arguments as add_bench_arguments
from .bench import main as bench_main
from .check import DEFAULT_SHAPES, TOLERANCE, CheckResult, format_failures, format_table, run_checks
from .cli_errors import RUN_ERRORS, Parser, command_line_message, input_named
from .cli_models import add_evaluate_parser, add_predict_parser
from .errors import (
    BackendUnavailableError,
    GraphCaptureError,
    NonFiniteLossError,
)


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
    context: Any = contextlib.nullcontext()
    if args.require_graphs and "cupy" in names:
        from .backends.cuda import CupyBackend

        context = use_backend(CupyBackend(graphs="require"))
    results: list[CheckResult] = []
    with context:
        for name in names:
            for dt in dtypes:
                print(f"  {name} {dt} ...", end="", flush=True)
                try:
                    batch = run_checks([name], [dt], seed=args.seed)
                except GraphCaptureError as exc:
                    print(f"\ngpubp check: backend {name!r}: {exc}", file=sys.stderr)
                    return 1
                bad = sum(not r.ok for r in batch)
                print(f" {len(batch)} configurations, {bad} failed")
                results.extend(batch)
        graphs = get_backend("cupy").capture_report() if "cupy" in names else None
    if graphs is not None:
        from .outputs import graphs_line

        print(f"cupy: {graphs_line(graphs)}")
    print("\n" + format_table(results))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"\n{len(failed)} configuration(s) FAILED:\n{format_failures(failed)}")
        return 1
    print(
        f"\nall {len(results)} configurations within tolerance "
        f"({', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items() if k in dtypes)})"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    print(f"gpubp {__version__}  (Python {platform.python_version()}, {platform.platform()})")
    print("\nbackends (best first; 'auto' picks the first available):")
    status = backend_status()
    for name in auto_order():
        why = status[name]
        said = "available" if why is None else "unavailable: " + why
        if name == "cupy" and injected() and why is None:
            said = f"available: {EMULATED}; auto never picks it, --backend cupy does"
        print(f"  {name:6} {said}")
    if status["cupy"] is not None and not injected():
        print(f"  ({EMULATOR_HINT})")
    print("\nlibraries:")
    for dist in machine.LIBRARIES:
        print(f"  {dist:14} {machine.version(dist)}")
    print("\ndevices:")
    cores, usable = os.cpu_count(), machine.usable_cores()
    print(f"  CPU: {machine.cpu_name()}, {cores} logical cores, {usable} usable by this process")
    blas = machine.blas()
    threads = "threads unknown (needs threadpoolctl)" if blas["threads"] is None else "threads"
    count = "" if blas["threads"] is None else f"{blas['threads']} "
    print(f"  NumPy's BLAS: {blas['name']} {blas['version']}, {count}{threads}")
    print(f"  GEMM provider (numba): {machine.gemm_provider()}")
    found, why = machine.gpus()
    for i, (name, gib) in enumerate(found):
        print(f"  GPU {i}: {name}, {gib:.1f} GiB")
    if why is not None:
        print(f"  GPU: {why}")
    if status.get("cupy") is None:
        print(f"  cuBLAS (cupy backend): {_cublas_in_use()}")
    return 0


def _cublas_in_use() -> str:
    """The libcublas the cupy backend calls: the one CuPy loaded (or a stand-in's own)."""
    from .backends.cuda import cublas
    from .backends.cuda.cupy_module import cupy_module_name

    if injected():
        return f"the stand-in's own ({cupy_module_name()})"
    path, why = cublas.cupy_cublas()
    return path if path is not None else f"not loaded: {why}"


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


def _threads_context(
    backend: str, threads: int | None, command: str, distributed: bool = False
) -> Any:
    """Inside it, ``backend`` (a name or ``auto``) is the instance with ``threads=threads``; a
    no-op without ``--threads``. :class:`ValueError` names ``--threads``; a count above the
    cores this process may use is taken, with a note that says what it costs (not under MPI,
    where each rank's count is capped at its share of the node, :mod:`.distributed`)."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        context = use_backend(get_backend(backend, threads=threads))
    except ValueError as exc:
        raise ValueError(f"--threads: {exc}") from None
    cores = machine.usable_cores()
    if threads > cores and not distributed:
        print(
            f"gpubp {command}: note: --threads {threads} is more than the {cores} core(s) this "
            f"process may use; the extra threads only wait for each other at every step "
            f"(--threads {cores} or fewer, or leave it out to let gpubp choose)",
            file=sys.stderr,
        )
    return context


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
            threads = _threads_context(config.backend, args.threads, "train", args.distributed)
        except ValueError as exc:  # e.g. --lr beyond the range of --dtype
            print(f"gpubp train: {command_line_message(exc)}", file=sys.stderr)
            return 2
        if args.distributed:
            from .distributed import init

            comm = init()
        with threads:
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
        if isinstance(exc, BrokenPipeError) and comm is None:
            raise  # the reader of stdout left: main ends quietly
        if isinstance(exc, NonFiniteLossError):
            message = f"{exc}; try a smaller --lr"
            if args.resume is not None and "lr" not in (args.override or ()):
                message += " with --override lr (a resume keeps the checkpoint's lr otherwise)"
        elif isinstance(exc, (*RUN_ERRORS, OSError)):  # OSError: an output path not writable
            message = input_named(command_line_message(exc), args)
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
        threads = _threads_context(args.backend, args.threads, "gradflow")
    except ValueError as exc:
        print(f"gpubp gradflow: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailableError as exc:
        print(f"gpubp gradflow: {command_line_message(exc)}", file=sys.stderr)
        return 1
    try:
        with threads:
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
                download=args.download,
                plot_path=args.plot or None,
                json_path=args.json,
                progress=not args.quiet,
            )
    except (*RUN_ERRORS, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        print(f"gpubp gradflow: {command_line_message(exc)}", file=sys.stderr)
        return 1
    except NonFiniteLossError as exc:
        print(f"gpubp gradflow: {exc}; try a smaller --lr", file=sys.stderr)
        return 1
    return 0


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train an MLP on a dataset (digits, MNIST, Fashion-MNIST) or your own file",
        description="Train a classifier on a real dataset, or with --data a classifier or a "
        "regression on your own file, with progress shown, then print the test accuracy (a "
        "regression's RMSE), the wall time, samples per second and the backend. The same seed "
        "gives the same numbers on the same backend. Exit status 130 when stopped by Ctrl-C "
        "(a checkpoint is written first). With --resume, every option not given is the "
        "checkpoint's.",
    )
    add_train_options(p)
    show_defaults(p)
    p.set_defaults(func=_cmd_train, subparser=p)


def _add_gradflow_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gradflow",
        help="draw per-layer gradient norms of deep networks, one line per activation",
        description="Train one deep, narrow network per activation for a few SGD steps and "
        "plot the per-layer norms of delta and dW (log scale), at initialisation and after "
        "training: deep sigmoid networks starve their first layers of gradient, ReLU networks "
        "do not.",
    )
    add_gradflow_options(p)
    show_defaults(p)
    p.set_defaults(func=_cmd_gradflow)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpubp",
        description="Backpropagation for fully connected networks on NumPy, Numba and CUDA.",
    )
    parser.add_argument("--version", action="version", version=f"gpubp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
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
    check.add_argument("--seed", type=seed_value, default=0, help="seed of the random problems")
    check.add_argument(
        "--require-graphs",
        action="store_true",
        help="cupy: a train step that cannot be captured as a CUDA graph is an error naming the "
        "call that broke the capture (as GPUBP_CUDA_GRAPHS=require)",
    )
    show_defaults(check)
    check.set_defaults(func=_cmd_check)
    info = sub.add_parser(
        "info",
        help="list backends, devices and library versions",
        description="Print gpubp's version, every backend in the order --backend auto considers "
        "them (and why one cannot run here), the versions of the libraries gpubp uses, the CPU "
        "and the cores this process may use, NumPy's BLAS and its threads, the numba backend's "
        "GEMM provider, and the GPUs.",
    )
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser(
        "bench",
        help="time every backend against PyTorch and the GEMM floor",
        description="Time one train step of every available backend side by side with PyTorch "
        "(where installed) and the GEMM-only floor on the standard shapes, each checked against "
        "the float64 reference first. Exit status 1 if a backend fails its check.",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=bench_main)
    for command in sub.choices.values():  # whose options an unknown one is compared with
        command.set_defaults(command_parser=command)
    return parser


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (True where it cannot tell)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser, which knows the options it could have meant
        getattr(args, "command_parser", parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "subparser", None) is not None:
        args.given = given_options(args.subparser, argv[argv.index(args.command) + 1 :])
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
    except BrokenPipeError as exc:
        if not _stdout_closed():  # a pipe of something else: an error like any other
            print(f"gpubp {args.command}: {exc}", file=sys.stderr)
            return 1
        # e.g. gpubp info | head -3: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not complain
        return 1
    except KeyboardInterrupt:  # outside a training loop, or a second Ctrl-C inside one
        fresh_line = "\n" if getattr(sys.stderr, "isatty", lambda: False)() else ""
        print(
            f"{fresh_line}gpubp {args.command}: interrupted (Ctrl-C); no file gpubp writes by "
            "name is left half-written (each is replaced whole)",
            file=sys.stderr,
        )
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
