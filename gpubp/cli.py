"""The ``gpubp`` command line: ``gpubp check``, ``gpubp info`` and ``gpubp bench``."""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import platform
import sys
from collections.abc import Sequence

from . import __version__
from .backends import BACKEND_NAMES, available_backends, backend_status
from .check import DEFAULT_SHAPES, TOLERANCE, CheckResult, run_checks


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
    import os

    print(f"  CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores")
    try:
        import numpy as np

        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        print(f"  BLAS: {blas.get('name', 'unknown')} {blas.get('version', '')}".rstrip())
    except Exception:  # numpy < 1.25 has no dict mode; the BLAS line is a courtesy
        pass
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        for i in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            print(f"  GPU {i}: {props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.1f} GiB")
    except ImportError:
        print("  GPU: CuPy not installed, so no GPU is used")
    except Exception as exc:
        print(f"  GPU: none usable ({type(exc).__name__}: {exc})")
    return 0


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
    check.add_argument("--seed", type=int, default=0, help="seed of the random problems")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
