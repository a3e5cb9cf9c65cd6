"""``gpubp gradflow``: how the gradient's size changes from layer to layer, per activation.

:func:`gradient_norms` measures ``||delta^l||`` and ``||dC/dW^l||`` with the float64 reference;
:func:`gradflow` trains one deep, narrow network per activation for a few SGD steps (through the
one epoch loop, :class:`gpubp.loop.EpochLoop`) and measures them before and after.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import datasets as data
from . import plots, reference
from ._checks import check_positive_int
from .activations import HIDDEN_ACTIVATIONS
from .backends import get_backend
from .budget import check_network
from .files import check_output_folders, check_outputs, write_json
from .loop import EpochEnd, EpochLoop
from .model import MLP
from .optim import make_optimizer

__all__ = ["PROBE_SAMPLES", "gradflow", "gradient_norms"]

#: Samples of the fixed batch on which gradient norms are measured.
PROBE_SAMPLES = 512

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def gradient_norms(model: MLP, x: Any, y: Any) -> dict[str, list[float]]:
    """Per-layer ``||delta^l||`` and ``||dC/dW^l||`` (Frobenius) on the batch ``(x, y)``.

    Computed by the float64 reference from the model's current parameters, so the numbers are
    the same whichever backend trains the model. ``delta^l`` ``(B, n_l)`` is the error of layer
    ``l`` for the batch-mean loss; ``dC/dW^l = delta^l.T @ a^{l-1}``. Lists run from layer 1
    (next to the input) to layer ``L``.
    """
    weights, biases = model.get_parameters()
    _, acts, deltas = reference.backprop(
        weights, biases, x, y, model.activation, model.output, model.loss
    )
    return {
        "delta": [float(np.linalg.norm(d)) for d in deltas],
        "dW": [
            float(np.linalg.norm(reference.parameter_gradients(d, a)[0]))
            for d, a in zip(deltas, acts)
        ],
    }


def gradflow(
    activations: Sequence[str] = ("sigmoid", "tanh", "relu"),
    depth: int = 8,
    width: int = 64,
    dataset: str = "auto",
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 0.05,
    backend: str = "auto",
    seed: int = 0,
    data_dir: str | None = None,
    plot_path: str | os.PathLike[str] | None = "gradflow.png",
    json_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Log = _print,
    threads: int | None = None,
    download: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """Train one network per activation briefly and measure gradient norms layer by layer.

    Each network has ``depth`` hidden layers of ``width`` units, is trained for ``steps``
    mini-batch SGD steps, and is measured on a fixed batch at initialisation and after training
    (:func:`gradient_norms`). With sigmoid, ``f' <= 1/4`` shrinks ``||delta^l||`` roughly
    geometrically towards the input, so the first layers barely learn; ReLU keeps it level.

    ``threads``: the backend's thread count (see :func:`gpubp.get_backend`); ``download``:
    fetch a missing MNIST or Fashion-MNIST (see :func:`gpubp.datasets.load_dataset`).

    Returns ``{activation: {"delta", "dW", "delta_init", "dW_init"}}``, lists from layer 1.
    """
    _check_arguments(activations, depth, width, steps, plot_path, json_path)
    outputs = {"plot_path": plot_path, "json_path": json_path}
    check_outputs(outputs, data.input_files(data_dir))  # writable, and no dataset file
    check_positive_int("batch_size", batch_size)
    fix = "choose a smaller depth or width (--depth, --width)"  # 784 inputs at most, 10 classes
    check_network([784, *([width] * depth), 10], 4, min(batch_size, 60_000), 0, fix)
    be = get_backend(backend, threads=threads)
    ds = data.load_dataset(dataset, data_dir, download, seed, progress)
    log(f"dataset: {ds.describe()}")
    rng = np.random.default_rng(seed)
    probe = rng.choice(len(ds.x_train), size=min(PROBE_SAMPLES, len(ds.x_train)), replace=False)
    xp_, yp_ = ds.x_train[probe], ds.y_train[probe]
    X, Y = be.asarray(ds.x_train), be.asarray(ds.y_train)  # on the device once, for every run
    runs: dict[str, dict[str, list[float]]] = {}
    for name in activations:
        model = MLP(
            [ds.n_features, *([width] * depth), ds.n_classes],
            activation=name,
            backend=be,
            seed=seed,
        )
        runs[name] = _train_and_measure(
            model, X, Y, steps, batch_size, lr, np.random.default_rng([seed, 2]),
            (xp_, yp_), progress, log,
        )  # fmt: skip
    log(_gradflow_table(runs))
    title = (
        f"gradient flow on {ds.name}: {depth} hidden layers of {width}, "
        f"after {steps} SGD steps (lr {lr:g}, batch {batch_size})"
    )
    if plot_path is not None:
        plots.gradient_flow(runs, plot_path, title=title)
        log(f"gradient-flow picture written to {plot_path}")
    if json_path is not None:
        write_json(
            json_path,
            {
                "dataset": ds.name,
                "depth": depth,
                "width": width,
                "steps": steps,
                "lr": lr,
                "batch_size": batch_size,
                "runs": runs,
            },
        )
        log(f"gradient norms written to {json_path}")
    return runs


def _check_arguments(
    activations: Sequence[str],
    depth: int,
    width: int,
    steps: int,
    plot_path: str | os.PathLike[str] | None,
    json_path: str | os.PathLike[str] | None,
) -> None:
    """:func:`gradflow`'s arguments and output folders checked before any training."""
    for name in activations:
        if name not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"activations: {name!r} is not supported; expected names from "
                f"{', '.join(HIDDEN_ACTIVATIONS)}"
            )
    if not activations:
        raise ValueError("activations: give at least one, e.g. sigmoid,tanh,relu")
    for arg, value in (("depth", depth), ("width", width), ("steps", steps)):
        check_positive_int(arg, value)
    check_output_folders(plot_path=plot_path, json_path=json_path)  # fail now, not after
    if plot_path is not None:
        plots.check_png(plot_path)
        plots.require_matplotlib(skip="pass --plot '' (plot_path=None) to skip the picture")


def _train_and_measure(
    model: MLP,
    X: Any,
    Y: Any,
    steps: int,
    batch_size: int,
    lr: float,
    order: np.random.Generator,
    probe: tuple[np.ndarray, np.ndarray],
    progress: bool,
    log: Log,
) -> dict[str, list[float]]:
    """Gradient norms on ``probe`` before and after ``steps`` SGD steps on batches drawn (with
    replacement) by ``order``: one epoch of the loop, one line of output."""
    init = gradient_norms(model, *probe)
    opt = make_optimizer("sgd", lr=lr)
    n = len(X)
    norms: dict[str, list[float]] = {}

    def end_epoch(end: EpochEnd) -> str:
        after = gradient_norms(model, *probe)
        norms.update(delta=after["delta"], dW=after["dW"])
        norms.update(delta_init=init["delta"], dW_init=init["dW"])
        last = after["dW"][-1]
        ratio = after["dW"][0] / last if last > 0 else float("nan")  # a dead ReLU net: 0
        return f"loss {end.loss:.4f}  ||dW^1|| / ||dW^L|| = {ratio:.2e} after {steps} steps"

    loop = EpochLoop(
        model.backend, steps * batch_size, batch_size, 1, progress=progress, echo=log,
        label=lambda _: f"{model.activation:10}",
    )  # fmt: skip
    loop.run(
        lambda idx: model.step(X[idx], Y[idx], opt),
        lambda: np.concatenate([order.integers(0, n, batch_size) for _ in range(steps)]),
        end_epoch,
    )
    return norms


def _gradflow_table(runs: dict[str, dict[str, list[float]]]) -> str:
    names = list(runs)
    n_layers = len(next(iter(runs.values()))["dW"])
    lines = ["||dC/dW^l|| after training, by layer (1 = next to the input):"]
    lines.append(f"{'layer':>6} " + " ".join(f"{n:>11}" for n in names))
    for layer in range(n_layers):
        cells = " ".join(f"{runs[n]['dW'][layer]:11.3e}" for n in names)
        lines.append(f"{layer + 1:>6} {cells}")
    return "\n".join(lines)
