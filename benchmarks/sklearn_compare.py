"""scikit-learn's MLPClassifier against gpubp.sklearn.MLPClassifier, same settings, float32.

    python benchmarks/sklearn_compare.py            # Fashion-MNIST (or digits) and breast cancer
    python benchmarks/sklearn_compare.py --quick    # small subsets, a few seconds (CI)

Both estimators get the same data (float32, so both train in float32), the same
hyper-parameters and the same ``random_state``, and run the same number of epochs (``tol=0``
with ``n_iter_no_change`` equal to ``max_iter``, so neither stops early). One table: fit time
and test accuracy side by side, and the speed-up. Fashion-MNIST is read by ``gpubp.datasets`` where
its files are present; otherwise scikit-learn's 8x8 digits stand in, and the table says so. The
tabular set is scikit-learn's bundled breast cancer data, standardised.

Each estimator is fitted once on a few rows before timing, so Numba's compilation (cached on
disk after the first run) and first-call imports are left out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.preprocessing import StandardScaler

from gpubp import datasets as data
from gpubp.sklearn import MLPClassifier as GpubpMLP

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def image_set(quick: bool) -> tuple[str, Split]:
    """Fashion-MNIST where present (else digits), standardised as ``gpubp train`` does."""
    name = "fashion-mnist" if data.find_dataset("fashion-mnist") else "digits"
    ds = data.load_dataset(name, progress=False)
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if quick:
        xtr, ytr, xte, yte = xtr[:3000], ytr[:3000], xte[:1000], yte[:1000]
    label = name if name == "fashion-mnist" else "digits (Fashion-MNIST not found here)"
    return label, (xtr.astype(np.float32), ytr, xte.astype(np.float32), yte)


def tabular_set() -> tuple[str, Split]:
    """scikit-learn's bundled breast cancer data (569 x 30), standardised, 25% test."""
    X, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(xtr)
    return "breast cancer", (
        scaler.transform(xtr).astype(np.float32),
        ytr,
        scaler.transform(xte).astype(np.float32),
        yte,
    )


def run(est: Any, split: Split) -> tuple[float, float, float]:
    """``(fit seconds, fit CPU seconds, test accuracy)`` after a warm-up fit on a few rows.

    The CPU time (all threads of the process) tells more than the wall time on a machine
    shared with other jobs."""
    xtr, ytr, xte, yte = split
    warm = est.__class__(**{**est.get_params(), "max_iter": 1})
    warm.fit(xtr[:64], ytr[:64])
    c0, t0 = time.process_time(), time.perf_counter()
    est.fit(xtr, ytr)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, float(est.score(xte, yte))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, few epochs (CI)")
    parser.add_argument("--backend", default="auto", help="gpubp backend (default: auto)")
    parser.add_argument("--hidden", default="256,128", help="hidden widths (default: 256,128)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for the image set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hidden = tuple(int(n) for n in args.hidden.split(","))
    image_epochs = args.epochs or (3 if args.quick else 15)
    cases = [(*image_set(args.quick), image_epochs), (*tabular_set(), 5 if args.quick else 50)]
    print(
        f"MLPClassifier{hidden}, relu, adam lr 1e-3, batch 200, alpha 1e-4, float32, "
        f"seed {args.seed}; gpubp backend {args.backend!r}"
    )
    header = (
        f"{'dataset':40s} {'epochs':>6s} {'estimator':9s} {'fit s':>8s} {'cpu s':>8s} "
        f"{'test acc':>9s}"
    )
    print(header)
    print("-" * len(header))
    for name, split, epochs in cases:
        params = dict(
            hidden_layer_sizes=hidden,
            max_iter=epochs,
            tol=0.0,
            n_iter_no_change=epochs,
            random_state=args.seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk_s, sk_cpu, sk_acc = run(SkMLP(**params), split)
            gp_s, gp_cpu, gp_acc = run(GpubpMLP(backend=args.backend, **params), split)
        print(f"{name:40s} {epochs:6d} {'sklearn':9s} {sk_s:8.2f} {sk_cpu:8.2f} {sk_acc:9.4f}")
        print(
            f"{'':40s} {'':6s} {'gpubp':9s} {gp_s:8.2f} {gp_cpu:8.2f} {gp_acc:9.4f}   "
            f"{sk_s / gp_s:.2f}x faster ({sk_cpu / gp_cpu:.2f}x less CPU time)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
