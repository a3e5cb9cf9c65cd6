"""A few small train steps through every kernel family, for compute-sanitizer (memcheck, racecheck).

Usage: compute-sanitizer --tool memcheck python benchmarks/sanitize_step.py [--small]

Awkward shapes (widths not multiples of 4, batch 1 and 7) so the scalar and vector paths and the
row kernels all run; both the CUDA-graph and the eager step; every optimizer and output; the
evaluation kernels. Exits non-zero if a result is not finite. ``--small``: one configuration
(float32, ReLU + softmax cross-entropy, SGD, batch 7, graph and eager), for a run with minutes to
spare (``benchmarks/device_run.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(small: bool = False) -> int:
    from gpubp.backends.cuda import CupyBackend
    from gpubp.backends.cuda.cupy_module import import_cupy
    from gpubp.check import random_problem
    from gpubp.optim import SGD, Adam

    cp = import_cupy()

    configs = [
        ("relu", "softmax", "cross_entropy"),
        ("tanh", "sigmoid", "binary_cross_entropy"),
        ("sigmoid", "softmax", "mse"),
        ("leaky_relu", "identity", "mse"),
    ]
    opts = [
        lambda: SGD(lr=0.1),
        lambda: SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda: Adam(lr=0.01, weight_decay=0.01, decoupled=True),
    ]
    dtypes, cases = ("float32", "float64"), (((5, 33, 3), 7), ((8, 12, 2), 1))
    if small:
        configs, opts, dtypes, cases = configs[:1], opts[:1], dtypes[:1], cases[:1]
    for graphs in (True, False):
        be = CupyBackend(graphs=graphs)
        for dtype in dtypes:
            for (activation, output, loss), make in zip(configs, opts * 2):
                for sizes, batch in cases:
                    W, b, x, y = random_problem(
                        sizes, batch, loss, output, np.random.default_rng(0)
                    )
                    Wd = [cp.asarray(w, dtype) for w in W]
                    bd = [cp.asarray(v, dtype) for v in b]
                    yd = cp.asarray(y) if y.dtype.kind in "iu" else cp.asarray(y, dtype)
                    xd = cp.asarray(x, dtype)
                    opt = make()
                    shapes = [w.shape for w in Wd] + [v.shape for v in bd]
                    state = opt.bind(None, be, shapes, dtype)
                    for _ in range(3):
                        value, *_ = be.train_step(
                            Wd, bd, xd, yd, activation, output, loss, opt, state
                        )
                    value2, _dWs, _ = be.gradients(Wd, bd, xd, yd, activation, output, loss)
                    out = be.forward(Wd, bd, xd, activation, output)
                    be.argmax_correct(out, yd if yd.ndim == 1 else None)
                    if not (np.isfinite(float(value)) and np.isfinite(float(value2))):
                        print(f"non-finite loss for {activation}/{output}/{loss}", file=sys.stderr)
                        return 1
        be.synchronize()
    print("sanitize_step: all steps ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(small="--small" in sys.argv[1:]))
