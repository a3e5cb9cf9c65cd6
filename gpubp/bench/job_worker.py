"""One contender of the whole-job benchmark, in a process of its own (see :mod:`.job`).

Run as ``python -m gpubp.bench.job_worker CONTENDER SPEC_JSON``; prints one JSON line:
``train_seconds`` (the epochs' training steps), ``test_accuracy``, ``threads`` (what it ran
with; the spec's ``threads`` sets it) and what else it knows. Every
contender trains on the same arrays: :func:`gpubp.datasets.load_dataset` and the seeded
:func:`gpubp.datasets.train_val_split` of ``gpubp train``, as float32. Loading the data and
warming up (imports, kernels, first allocations) happen before the clock starts.

- ``gpubp``: :func:`gpubp.train.train` with the job's :class:`~gpubp.train.TrainConfig`, what
  ``gpubp train`` runs; its ``train_seconds`` counts the steps, not the per-epoch evaluations
  (reported apart as ``epoch_seconds``, steps plus evaluations).
- ``torch``: the usual PyTorch CPU loop: ``nn.Sequential`` of ``Linear``/``ReLU``,
  ``cross_entropy``, ``torch.optim.Adam``, the learning rate set every step to the same cosine
  schedule, ``randperm`` batches gathered by indexing, ``loss.item()`` summed per step.
  ``torch-fused``: the same with ``Adam(fused=True)``; ``torch-compile``: the same step
  (zero_grad, forward, loss, backward, Adam with a tensor learning rate) through
  ``torch.compile``, compiled for both batch sizes of the job before the clock starts.
- ``jax``: the step (gather, forward, backward and a hand-written Adam) in one ``jax.jit``,
  the learning rate an argument, the loss read once per epoch; PyTorch's initialisation.
- ``sklearn``: ``MLPClassifier(solver="adam")`` with the same layers, batch size, initial
  learning rate (scikit-learn's Adam has no schedule), no L2 term, ``max_iter=epochs`` and
  ``tol=0`` so it runs every epoch; ``fit`` is timed.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import datasets as data
from ..backends import get_backend, use_backend
from ..config import DEFAULT_BATCH, DEFAULT_LR, SMALL_DATA, SMALL_DATA_BATCH, TrainConfig
from ..machine import blas, threads_limited


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


def run_gpubp(config: TrainConfig, threads: int | None) -> dict[str, Any]:
    from .. import MLP
    from ..train import train

    x_tr, y_tr, _, _ = job_data(config)
    n_out = int(y_tr.max()) + 1
    be = get_backend(config.backend, threads=threads)
    # warm up, outside the clock: every kernel the job calls compiled or loaded from its cache,
    # through the job's own paths (runs of full batches in one native call, a last short batch
    # on its own, the evaluations, and a step on one thread, where the thread tuner may take
    # one); one train_step warmed only the short batch's, so with a cold cache the first run
    # of steps compiled inside the clock (2 epochs: 6.45 s, not 1.19)
    sizes, batch = [x_tr.shape[1], *config.layers, n_out], job_batch(config, len(x_tr))
    few = 2 * batch + 1
    warm = MLP(sizes, config.activation, backend=be, dtype=config.dtype, seed=1)
    warm.fit(
        x_tr[:few],
        y_tr[:few],
        epochs=1,
        batch_size=batch,
        optimizer=config.make_optimizer(),
        validation_data=(x_tr[:few], y_tr[:few]),  # the evaluations' kernels too
        progress=False,
    )
    if threads != 1:  # the thread tuner may take a step on one thread (a probe, a busy core)
        one = get_backend(config.backend, threads=1)
        warm = MLP(sizes, config.activation, backend=one, dtype=config.dtype, seed=1)
        warm.train_step(x_tr[:batch], y_tr[:batch], config.make_optimizer())
    del x_tr, y_tr, warm
    with use_backend(be):  # the run's MLP gets this instance, threads and all
        result = train(config, progress=False, log=lambda line: None)
    used = getattr(be, "threads", None) or blas()["threads"]
    return {
        "train_seconds": result.train_seconds,
        "epoch_seconds": float(sum(result.history["seconds"])),
        "test_accuracy": result.test_accuracy,
        "label": f"gpubp ({result.model.backend.name}, {used or '?'} threads)",
        "threads": used,
        "steps": None,
    }


def run_torch(config: TrainConfig, threads: int | None, mode: str = "eager") -> dict[str, Any]:
    """The PyTorch CPU loop; ``mode``: ``eager`` (default Adam), ``fused``
    (``Adam(fused=True)``) or ``compile`` (``torch.compile`` of the whole step)."""
    import torch
    from torch.nn import functional as F

    if threads is not None:
        torch.set_num_threads(threads)
    x_tr, y_tr, x_te, y_te = job_data(config)
    torch.manual_seed(config.seed)
    X, Y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    n, batch = len(x_tr), job_batch(config, len(x_tr))
    model = _torch_model(torch, [x_tr.shape[1], *config.layers, int(y_tr.max()) + 1])
    peak = DEFAULT_LR["adam"]
    # a tensor lr: torch.compile would otherwise recompile the step for every new value
    lr: Any = torch.tensor(peak) if mode == "compile" else peak
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=mode == "fused")

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    run = torch.compile(step, dynamic=False) if mode == "compile" else step
    _torch_warm_up(torch, model, opt, run, X, Y, {batch, n % batch} - {0})
    gen = torch.Generator().manual_seed(config.seed)
    total = config.epochs * math.ceil(n / batch)
    t0 = time.perf_counter()
    k = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            value = peak * 0.5 * (1.0 + math.cos(math.pi * k / total))
            for group in opt.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value
            running += run(X[idx], Y[idx]).item() * len(idx)
            k += 1
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(dim=1).numpy()
    how = {"eager": "eager", "fused": "eager, Adam(fused=True)", "compile": "torch.compile"}
    version = torch.__version__.split("+")[0]
    return {
        "train_seconds": seconds,
        "test_accuracy": float(np.mean(pred == y_te)),
        "label": f"PyTorch {version} {how[mode]} ({torch.get_num_threads()} threads)",
        "threads": torch.get_num_threads(),
        "steps": k,
    }


def _torch_model(torch: Any, sizes: list[int]) -> Any:
    """``nn.Sequential`` of ``Linear`` and ``ReLU`` for the layer sizes ``sizes``."""
    layers: list[Any] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _torch_warm_up(
    torch: Any, model: Any, opt: Any, run: Any, X: Any, Y: Any, batches: set[int]
) -> None:
    """Two steps at each batch size the loop meets (first allocations, kernel choices, the
    compilations), then the parameters and Adam's state put back in place, outside the clock
    (in place: a compiled step keeps the tensors it was compiled for)."""
    initial = [p.detach().clone() for p in model.parameters()]
    for b in sorted(batches):
        for _ in range(2):
            run(X[:b], Y[:b])
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
    for state in opt.state.values():  # step count and moments back to 0
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


def run_sklearn(config: TrainConfig, threads: int | None) -> dict[str, Any]:
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
    with warnings.catch_warnings(), threads_limited(threads):
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the point
        t0 = time.perf_counter()
        clf.fit(x_tr, y_tr)
        seconds = time.perf_counter() - t0
        used = blas()["threads"]
    return {
        "train_seconds": seconds,
        "test_accuracy": float(clf.score(x_te, y_te)),
        "label": f"scikit-learn {sklearn.__version__} MLPClassifier",
        "threads": used,
        "steps": None,
    }


def run_jax(config: TrainConfig, threads: int | None) -> dict[str, Any]:
    """JAX: the whole step (gather, forward, backward, a hand-written Adam) in one ``jit``."""
    if threads is not None and hasattr(os, "sched_setaffinity"):
        # XLA sizes its CPU thread pool by the cores this process may run on
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import jax
    import jax.numpy as jnp

    x_tr, y_tr, x_te, y_te = job_data(config)
    n, batch = len(x_tr), job_batch(config, len(x_tr))
    sizes = [x_tr.shape[1], *config.layers, int(y_tr.max()) + 1]
    rng = np.random.default_rng(config.seed)
    params = []
    for n_in, n_out in itertools.pairwise(sizes):  # PyTorch's default: U(-1/sqrt(n_in), ...)
        bound = 1.0 / math.sqrt(n_in)
        w = rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)
        params.append((jnp.asarray(w), jnp.asarray(rng.uniform(-bound, bound, n_out), jnp.float32)))

    def logits(params: Any, x: Any) -> Any:
        for i, (w, b) in enumerate(params):
            x = x @ w.T + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    def loss_fn(params: Any, x: Any, y: Any) -> Any:
        z = logits(params, x)
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0])

    b1, b2, eps = 0.9, 0.999, 1e-8

    def step(params: Any, m: Any, v: Any, t: Any, lr: Any, X: Any, Y: Any, idx: Any) -> Any:
        loss, g = jax.value_and_grad(loss_fn)(params, X[idx], Y[idx])
        t = t + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - b1**t, 1 - b2**t
        params = jax.tree.map(
            lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v
        )
        return params, m, v, t, loss

    run = jax.jit(step, donate_argnums=(0, 1, 2))
    X, Y = jnp.asarray(x_tr), jnp.asarray(y_tr.astype(np.int32))
    zeros = jax.tree.map(jnp.zeros_like, params)
    for b in sorted({batch, n % batch} - {0}):  # compile each batch shape outside the clock
        copies = [jax.tree.map(jnp.copy, t) for t in (params, zeros, zeros)]
        jax.block_until_ready(
            run(*copies, jnp.float32(0), 1e-3, X, Y, np.arange(b, dtype=np.int32))
        )
    m, v, t = jax.tree.map(jnp.copy, zeros), zeros, jnp.float32(0)
    peak = DEFAULT_LR["adam"]
    order_rng = np.random.default_rng([config.seed, 1])
    total = config.epochs * math.ceil(n / batch)
    t0 = time.perf_counter()
    k = 0
    for _ in range(config.epochs):
        order = order_rng.permutation(n).astype(np.int32)
        losses = []
        for start in range(0, n, batch):
            lr = peak * 0.5 * (1.0 + math.cos(math.pi * k / total))
            params, m, v, t, loss = run(params, m, v, t, lr, X, Y, order[start : start + batch])
            losses.append(loss)
            k += 1
        float(sum(losses))  # the epoch's loss, read once (as gpubp does)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    pred = np.asarray(jax.jit(logits)(params, jnp.asarray(x_te))).argmax(axis=1)
    used = len(os.sched_getaffinity(0))
    return {
        "train_seconds": seconds,
        "test_accuracy": float(np.mean(pred == y_te)),
        "label": f"JAX {jax.__version__} jit, hand-written Adam ({used} cores)",
        "threads": used,
        "steps": k,
    }


RUNNERS: dict[str, Callable[[TrainConfig, int | None], dict[str, Any]]] = {
    "gpubp": run_gpubp,
    "torch": run_torch,
    "torch-fused": functools.partial(run_torch, mode="fused"),
    "torch-compile": functools.partial(run_torch, mode="compile"),
    "jax": run_jax,
    "sklearn": run_sklearn,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in RUNNERS:
        print(f"usage: python -m gpubp.bench.job_worker {{{','.join(RUNNERS)}}} SPEC_JSON")
        return 2
    spec = json.loads(argv[1])
    out = RUNNERS[argv[0]](job_config(spec), spec.get("threads"))
    out["pid"] = os.getpid()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
