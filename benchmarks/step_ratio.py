"""One optimizer step of the numba backend against its GEMM floor, in one process, interleaved.

``MLP.train_step`` (input checks included) on a float32 ReLU classifier, and the same step's
GEMMs alone (forward ``a @ W.T``, ``delta.T @ a``, ``delta @ W``) through the GEMM provider
(``gpubp.backends.numba.layers.matmul``, MKL where installed), nine interleaved rounds of 300
calls each; the best round of each, and the ratio. Nothing but this process runs gpubp's
threads, so no other runtime's spinning threads distort it::

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sizes", help="layer sizes, e.g. 784,512,256,10")
    p.add_argument("batch", type=int)
    p.add_argument("optimizer", choices=sorted(RULES))
    args = p.parse_args()
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

    def floor() -> None:
        for i in range(L):
            layers.matmul(a[i], W[i], a[i + 1], False, True)
        for i in range(L - 1, -1, -1):
            layers.matmul(d[i + 1], a[i], dW[i], True, False)
            if i > 0:
                layers.matmul(d[i + 1], W[i], d[i], False, False)

    for _ in range(30):
        step()
        floor()
    best = {"step": np.inf, "floor": np.inf}
    for _ in range(9):
        for name, fn in (("step", step), ("floor", floor)):
            t = time.perf_counter()
            for _ in range(300):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / 300)
    provider = gemm.PROVIDER.name if gemm.PROVIDER else "matmul"
    print(
        f"{provider} {sizes} batch {B} {args.optimizer}: step {best['step'] * 1e3:.3f} ms, "
        f"floor {best['floor'] * 1e3:.3f} ms, ratio {best['step'] / best['floor']:.2f}"
    )


if __name__ == "__main__":
    main()
