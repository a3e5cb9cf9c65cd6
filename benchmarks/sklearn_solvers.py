"""scikit-learn's MLP against gpubp.sklearn's on L-BFGS and on sparse input, same settings.

    python benchmarks/sklearn_solvers.py            # both problems
    python benchmarks/sklearn_solvers.py --quick    # small sizes, a few seconds

- lbfgs: ``MLPClassifier(solver='lbfgs')`` on Fashion-MNIST's first rows (scikit-learn's digits
  where it is absent), float64, a fixed number of iterations (``tol=0``);
- sparse: ``MLPClassifier(solver='adam')`` on a random text-like CSR matrix (20,000 x 50,000 at
  0.1% density, 10 classes from a random linear rule), float32, a fixed number of epochs.

Each estimator is fitted once on a few rows before timing (Numba's compilation, imports).
Prints fit time and training accuracy side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier as SkMLP

from gpubp import datasets as data
from gpubp.sklearn import MLPClassifier as GpubpMLP


def lbfgs_problem(quick: bool) -> tuple[str, Any, np.ndarray]:
    n = 2000 if quick else 10000
    if data.find_dataset("fashion-mnist"):
        ds = data.load_dataset("fashion-mnist", progress=False)
        return f"fashion-mnist[:{n}]", ds.x_train[:n].astype(np.float64), ds.y_train[:n]
    X, y = load_digits(return_X_y=True)
    return "digits", X / 16.0, y


def sparse_problem(quick: bool) -> tuple[str, Any, np.ndarray]:
    rows, cols = (2000, 5000) if quick else (20000, 50000)
    X = sp.random(rows, cols, density=0.001, format="csr", dtype=np.float32, random_state=0)
    w = np.random.default_rng(0).normal(size=(cols, 10)).astype(np.float32)
    y = np.asarray(np.argmax(X @ w, axis=1)).ravel()
    return f"sparse {rows} x {cols}, 0.1%", X, y


def timed(est: Any, X: Any, y: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X[:50], y[:50])  # warm-up: compilation, imports
        start = time.perf_counter()
        est.fit(X, y)
    return time.perf_counter() - start, float(est.score(X, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--backend", default="auto", help="gpubp backend (default: auto)")
    parser.add_argument("--only", choices=("lbfgs", "sparse"), help="run one problem only")
    args = parser.parse_args()
    cases = []
    if args.only != "sparse":
        cases.append(
            (lbfgs_problem(args.quick), dict(solver="lbfgs", max_iter=30 if args.quick else 100))
        )
    if args.only != "lbfgs":
        cases.append(
            (sparse_problem(args.quick), dict(solver="adam", max_iter=3 if args.quick else 5))
        )
    print(f"{'problem':36} {'solver':6} {'estimator':9} {'fit s':>8} {'train acc':>9}")
    for (name, X, y), params in cases:
        common = dict(hidden_layer_sizes=(128,), random_state=0, tol=0.0, **params)
        if params["solver"] != "lbfgs":
            common["n_iter_no_change"] = common["max_iter"]
        sk_s, sk_acc = timed(SkMLP(**common), X, y)
        gp_s, gp_acc = timed(GpubpMLP(backend=args.backend, **common), X, y)
        print(f"{name:36} {params['solver']:6} {'sklearn':9} {sk_s:8.2f} {sk_acc:9.4f}")
        print(f"{'':36} {'':6} {'gpubp':9} {gp_s:8.2f} {gp_acc:9.4f}   {sk_s / gp_s:.2f}x")


if __name__ == "__main__":
    main()
