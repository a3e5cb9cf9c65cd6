"""One contender of the whole-job benchmark, in a process of its own (see :mod:`.job`).

Run as ``python -m gpubp.bench.job_worker CONTENDER SPEC_JSON``; prints one JSON line:
``train_seconds`` (the epochs' training steps), ``test_accuracy`` and what else it knows. Every
contender trains on the same arrays: :func:`gpubp.data.load_dataset` and the seeded
:func:`gpubp.data.train_val_split` of ``gpubp train``, as float32. Loading the data and
warming up (imports, kernels, first allocations) happen before the clock starts.

- ``gpubp``: :func:`gpubp.train.train` with the job's :class:`~gpubp.train.TrainConfig`, what
  ``gpubp train`` runs; its ``train_seconds`` counts the steps, not the per-epoch evaluations
  (reported apart as ``epoch_seconds``, steps plus evaluations).
- ``torch``: the usual PyTorch CPU loop: ``nn.Sequential`` of ``Linear``/``ReLU``,
  ``cross_entropy``, ``torch.optim.Adam``, the learning rate set every step to the same cosine
  schedule, ``randperm`` batches gathered by indexing, ``loss.item()`` summed per step.
- ``sklearn``: ``MLPClassifier(solver="adam")`` with the same layers, batch size, initial
  learning rate (scikit-learn's Adam has no schedule), no L2 term, ``max_iter=epochs`` and
  ``tol=0`` so it runs every epoch; ``fit`` is timed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

from .. import datasets as data
from ..config import DEFAULT_BATCH, DEFAULT_LR, SMALL_DATA, SMALL_DATA_BATCH, TrainConfig


def job_config(spec: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of ``gpubp train --dataset D --epochs E`` (defaults otherwise)."""
    return TrainConfig(
        dataset=spec["dataset"], epochs=int(spec["epochs"]), data_dir=spec.get("data_dir")
    )


def job_data(config: TrainConfig) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` as ``gpubp train`` trains and tests on them."""
    ds = data.load_dataset(config.dataset, config.data_dir, False, config.seed, progress=False)
    x_tr, y_tr, _, _ = data.train_val_split(
        ds.x_train, ds.y_train, config.val_fraction, config.seed
    )
    return x_tr, y_tr, ds.x_test, ds.y_test


def job_batch(config: TrainConfig, n_train: int) -> int:
    """The batch size ``gpubp train`` picks for ``n_train`` training samples."""
    if config.batch_size is not None:
        return int(config.batch_size)
    return SMALL_DATA_BATCH if n_train < SMALL_DATA else DEFAULT_BATCH


def run_gpubp(config: TrainConfig) -> dict[str, Any]:
    from .. import MLP
    from ..optim import make_optimizer
    from ..train import train

    x_tr, y_tr, _, _ = job_data(config)
    n_out = int(y_tr.max()) + 1
    # warm up: the backend's kernels compiled or loaded from their cache, outside the clock
    warm = MLP([x_tr.shape[1], *config.layers, n_out], backend=config.backend, seed=1)
    batch = job_batch(config, len(x_tr))
    warm.train_step(x_tr[:batch], y_tr[:batch], make_optimizer(config.optimizer, lr=1e-3))
    del x_tr, y_tr, warm
    result = train(config, progress=False, log=lambda line: None)
    return {
        "train_seconds": result.train_seconds,
        "epoch_seconds": float(sum(result.history["seconds"])),
        "test_accuracy": result.test_accuracy,
        "label": f"gpubp ({result.model.backend.name})",
        "steps": None,
    }


def run_torch(config: TrainConfig) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    x_tr, y_tr, x_te, y_te = job_data(config)
    torch.manual_seed(config.seed)
    X, Y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    n, batch = len(x_tr), job_batch(config, len(x_tr))
    sizes = [x_tr.shape[1], *config.layers, int(y_tr.max()) + 1]

    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    peak = DEFAULT_LR["adam"]
    warm = make()  # warm up: first allocations and kernel choices, outside the clock
    warm_opt = torch.optim.Adam(warm.parameters(), lr=peak)
    for _ in range(2):
        warm_opt.zero_grad(set_to_none=True)
        F.cross_entropy(warm(X[:batch]), Y[:batch]).backward()
        warm_opt.step()
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=peak)
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(n / batch)
    total = config.epochs * steps_per_epoch
    t0 = time.perf_counter()
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            for group in opt.param_groups:
                group["lr"] = peak * 0.5 * (1.0 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            step += 1
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(dim=1).numpy()
    return {
        "train_seconds": seconds,
        "test_accuracy": float(np.mean(pred == y_te)),
        "label": f"PyTorch {torch.__version__.split('+')[0]} ({torch.get_num_threads()} threads)",
        "steps": step,
    }


def run_sklearn(config: TrainConfig) -> dict[str, Any]:
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_tr, y_tr, x_te, y_te = job_data(config)
    clf = MLPClassifier(
        hidden_layer_sizes=tuple(config.layers),
        activation="relu",
        solver="adam",
        alpha=0.0,
        batch_size=job_batch(config, len(x_tr)),
        learning_rate_init=DEFAULT_LR["adam"],
        max_iter=config.epochs,
        shuffle=True,
        random_state=config.seed,
        tol=0.0,
        n_iter_no_change=config.epochs + 1,
        early_stopping=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the point
        t0 = time.perf_counter()
        clf.fit(x_tr, y_tr)
        seconds = time.perf_counter() - t0
    return {
        "train_seconds": seconds,
        "test_accuracy": float(clf.score(x_te, y_te)),
        "label": f"scikit-learn {sklearn.__version__} MLPClassifier",
        "steps": None,
    }


RUNNERS = {"gpubp": run_gpubp, "torch": run_torch, "sklearn": run_sklearn}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in RUNNERS:
        print(f"usage: python -m gpubp.bench.job_worker {{{','.join(RUNNERS)}}} SPEC_JSON")
        return 2
    config = job_config(json.loads(argv[1]))
    out = RUNNERS[argv[0]](config)
    out["pid"] = os.getpid()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
