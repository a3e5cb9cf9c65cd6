"""Train an MLP on a synthetic 5-class spiral and report accuracy and speed.

Run: python examples/quickstart.py [--backend auto] [--epochs 30]

The data is made here (no download): five interleaved spiral arms in 2-D, a problem no linear
model can solve, with a held-out test set.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gpubp


def spirals(n_per_class: int, classes: int = 5, noise: float = 0.35, seed: int = 0):
    """``(x, y)``: ``x`` of shape ``(classes * n_per_class, 2)``, integer labels ``y``."""
    rng = np.random.default_rng(seed)
    r = np.tile(np.linspace(0.05, 1.0, n_per_class), classes)
    k = np.repeat(np.arange(classes), n_per_class)
    theta = 6.0 * r + 2 * np.pi * k / classes + rng.normal(0, noise, r.shape)
    x = np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1)
    return x.astype(np.float32), k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    x, y = spirals(3000, seed=0)
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:12000], y[:12000], x[12000:], y[12000:]

    model = gpubp.MLP([2, 128, 128, 5], activation="relu", backend=args.backend, seed=0)
    print(f"{model} on {len(x_train)} training points, {len(x_test)} test points")
    t0 = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=64,
        optimizer=gpubp.optim.Adam(lr=3e-3),
        validation_data=(x_test, y_test),
    )
    seconds = time.perf_counter() - t0
    result = model.evaluate(x_test, y_test)
    print(f"test accuracy {result['accuracy']:.4f}  test loss {result['loss']:.4f}")
    print(
        f"trained {args.epochs} epochs in {seconds:.2f} s: "
        f"{args.epochs * len(x_train) / seconds:,.0f} samples/s on backend {model.backend.name!r}"
    )


if __name__ == "__main__":
    main()
