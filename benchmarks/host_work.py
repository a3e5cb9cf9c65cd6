"""Host work per train step of the cupy backend, counted on the emulated GPU (not timed).

Usage: python benchmarks/host_work.py [--steps N] [--optimizer sgd|adam] [--schedule]
                                     [--distributed]

The emulator is no clock, so this counts what a step costs the host instead, per step, over
``N`` steps after a warm-up, through the same calls as ``gpubp train`` (the device-resident
data set gathered by :class:`gpubp.gather.BatchGather`, ``MLP.step``, the losses added to a
:class:`gpubp.loop.LossSum`, with ``--schedule`` a cosine learning rate set every step by
:meth:`gpubp.optim.Optimizer.follow`), or with
``--distributed`` through :meth:`gpubp.distributed.DataParallel.step` on one MPI rank
(``COMM_SELF``; the all-reduce goes through the emulated NCCL, needs mpi4py):

- ``cupy_calls``: calls from outside into the cupy module (array methods and functions, stream
  and memory calls), of them ``setitem``: copies into device arrays (``a[...] = b``, a batch
  staged), and ``python_calls``: every Python function call of the step;
- the emulated device's counters: ``alloc`` (device allocations), ``h2d`` (host-to-device
  uploads), ``get`` (device-to-host reads), ``graph_launch``, ``eager_launch`` (kernels
  launched one by one), ``memcpy`` (copies outside a graph).

Runs on the emulated GPU only (it sets ``GPUBP_CUPY_MODULE=cudaemu.cupy``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COUNTERS = ("alloc", "h2d", "get", "graph_launch", "eager_launch", "memcpy", "sync")


def measure(
    steps: int, optimizer: str, schedule: bool, distributed: bool = False
) -> dict[str, float]:
    """Counts per step (see the module docstring), averaged over ``steps`` steps."""
    import numpy as np

    from cudaemu import _common
    from gpubp import MLP
    from gpubp.gather import BatchGather
    from gpubp.loop import LossSum
    from gpubp.optim import SGD, Adam
    from gpubp.schedules import Schedule

    rng = np.random.default_rng(0)
    model = MLP([20, 32, 5], backend="cupy", seed=0)
    be = model.backend
    n, batch = 1000, 64
    X = be.asarray(rng.normal(size=(n, 20)), "float32")
    Y = be.asarray(rng.integers(0, 5, n))
    opt = Adam(lr=1e-3) if optimizer == "adam" else SGD(lr=0.05, momentum=0.9)
    cosine = Schedule("cosine", opt.lr, 3 + steps)
    # as gpubp train and MLP.fit make it
    gather = BatchGather(X, Y, batch, xp=be.xp, buffers=be.batch_buffers)
    losses = LossSum(be)
    order = rng.permutation(n)
    dp = None
    if distributed:
        from mpi4py import MPI

        from gpubp.distributed import DataParallel, MPICommunicator

        dp = DataParallel(MPICommunicator(MPI.COMM_SELF), model)

    def step(k: int) -> None:
        if schedule:
            opt.follow(cosine, k)  # a new learning rate every step, as gpubp train sets it
        idx = order[(k * batch) % (n - batch) :][:batch]
        if dp is not None:  # as gpubp train --distributed steps
            losses.add(dp.step(X, Y, idx, opt), batch)
        else:
            losses.add(model.step(*gather(idx), opt), batch)

    for k in range(3):  # warm-up: compile, allocate, capture
        step(k)
    emu = str(Path(_common.__file__).parent)
    calls: collections.Counter[str] = collections.Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        calls["python_calls"] += 1
        code = frame.f_code
        caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
        if code.co_filename.startswith(emu) and not caller.startswith(emu):
            calls["cupy_calls"] += 1
            if code.co_name == "__setitem__":  # a device copy into an array (a staging copy)
                calls["setitem"] += 1

    before = collections.Counter(_common.stats)
    sys.setprofile(profile)
    try:
        for k in range(3, 3 + steps):
            step(k)
    finally:
        sys.setprofile(None)
    after = collections.Counter(_common.stats)
    out = {key: calls[key] / steps for key in ("cupy_calls", "setitem", "python_calls")}
    for key in COUNTERS:
        out[key] = (after[key] - before[key]) / steps
    losses.read()
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ["GPUBP_CUPY_MODULE"] = "cudaemu.cupy"  # counted by the emulator, before any import
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--schedule", action="store_true", help="a new lr every step")
    parser.add_argument(
        "--distributed", action="store_true", help="DataParallel.step on one MPI rank"
    )
    args = parser.parse_args(argv)
    counts = measure(args.steps, args.optimizer, args.schedule, args.distributed)
    head = {"optimizer": args.optimizer, "schedule": args.schedule}
    print(json.dumps({**head, "distributed": args.distributed, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
