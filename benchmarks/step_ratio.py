"""One optimizer step of the numba backend against its GEMM floor, in one process, interleaved.

A float32 ReLU classifier's step three ways, and the same step's GEMMs alone (forward
``a @ W.T``, ``delta.T @ a``, ``delta @ W``) through the GEMM provider
(``gpubp.backends.numba.layers.matmul``, MKL where installed):

- ``fit``: the step as ``MLP.fit`` and ``gpubp train`` take it, 20 batches gathered from a
  shuffled training set and trained in one native call (``MLP.steps``), per step;
- ``step``: ``MLP.step`` on a batch already gathered and checked (one call from Python a step);
- ``train_step``: ``MLP.train_step``, the one-off call, its input checks included.

Nine interleaved rounds of 300 steps each; the best round of each, and the ratios. Nothing but
this process runs gpubp's threads, so no other runtime's spinning threads distort it::

    python benchmarks/step_ratio.py 784,512,256,10 128 adam
    python benchmarks/step_ratio.py 784,128,10 64 sgd
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gpubp
from gpubp import optim
from gpubp.backends.numba import gemm, layers

RULES = {
    "sgd": lambda: optim.SGD(lr=0.01),
    "momentum": lambda: optim.SGD(lr=0.01, momentum=0.9),
    "adam": lambda: optim.Adam(lr=1e-3),
}


def arguments(description: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line of this benchmark and of ``step_parts.py``: sizes, batch, optimizer."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("sizes", help="layer sizes, e.g. 784,512,256,10")
    p.add_argument("batch", type=int)
    p.add_argument("optimizer", choices=sorted(RULES))
    return p, p.parse_args()


def main() -> None:
    _, args = arguments(__doc__.split("\n\n")[0])
    sizes, B = [int(s) for s in args.sizes.split(",")], args.batch
    L = len(sizes) - 1
    rng = np.random.default_rng(0)
    model = gpubp.MLP(sizes, activation="relu", backend="numba", dtype="float32", seed=0)
    opt = RULES[args.optimizer]()
    X = rng.standard_normal((20 * B, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], 20 * B)
    W = [rng.standard_normal((sizes[i + 1], sizes[i])).astype(np.float32) for i in range(L)]
    a = [rng.standard_normal((B, s)).astype(np.float32) for s in sizes]
    d = [rng.standard_normal((B, s)).astype(np.float32) for s in sizes]
    dW = [np.empty_like(w) for w in W]
    calls = [0]

    def step() -> None:
        j = calls[0] % 20
        calls[0] += 1
        model.train_step(X[j * B : (j + 1) * B], y[j * B : (j + 1) * B], opt)

    Xc, yc = model.prepare_x(X), model.check_y(y, len(X))
    order = rng.permutation(len(X))

    def fit20() -> None:
        took = model.steps(Xc, yc, order, 0, 20, B, opt, [opt.lr] * 20)
        if took is None or len(took) != 20:  # else the time per step would mean nothing
            raise SystemExit(f"MLP.steps took {took and len(took)} of 20 steps here")

    def step1() -> None:
        j = calls[0] % 20
        calls[0] += 1
        model.step(Xc[j * B : (j + 1) * B], yc[j * B : (j + 1) * B], opt)

    def floor() -> None:
        for i in range(L):
            layers.matmul(a[i], W[i], a[i + 1], False, True)
        for i in range(L - 1, -1, -1):
            layers.matmul(d[i + 1], a[i], dW[i], True, False)
            if i > 0:
                layers.matmul(d[i + 1], W[i], d[i], False, False)

    # (name, call, steps per call)
    runs = (("fit", fit20, 20), ("step", step1, 1), ("train_step", step, 1), ("floor", floor, 1))
    for _, fn, per in runs:
        for _ in range(60 // per):
            fn()
    best = {name: np.inf for name, _, _ in runs}
    for _ in range(9):
        for name, fn, per in runs:
            t = time.perf_counter()
            for _ in range(300 // per):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / (300 // per * per))
    provider = gemm.PROVIDER.name if gemm.PROVIDER else "matmul"
    ratios = ", ".join(
        f"{name} {best[name] * 1e3:.3f} ms ({best[name] / best['floor']:.2f}x)"
        for name, _, _ in runs[:-1]
    )
    print(
        f"{provider} {sizes} batch {B} {args.optimizer}: floor {best['floor'] * 1e3:.3f} ms; "
        f"{ratios}"
    )


if __name__ == "__main__":
    main()
