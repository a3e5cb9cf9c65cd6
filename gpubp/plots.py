"""PNG figures for training runs; matplotlib is an optional extra (``gpubp[plot]``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import PlotUnavailableError


def check_png(path: str | os.PathLike[str]) -> None:
    """Refuse a file name that does not end in ``.png``: the figures are written as PNG only,
    and PNG bytes under another name would mislead whatever opens the file."""
    if not os.fspath(path).lower().endswith(".png"):
        raise ValueError(
            f"plot path {os.fspath(path)!r}: figures are written as PNG; name the file .png"
        )


def require_matplotlib(skip: str = "leave out --plot") -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error saying what to do
    (``skip`` says how to do without the plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never opens a window, works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailableError(
            f"plots need matplotlib, which is not installed: pip install 'gpubp[plot]' (or "
            f"pip install matplotlib), or {skip}"
        ) from None
    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write the figure atomically (:func:`gpubp.files.write_atomic`: no half-written PNG, no
    planted link followed)."""
    from .files import write_atomic

    write_atomic(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))


def training_curves(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    title: str = "",
    test_accuracy: float | None = None,
) -> None:
    """Loss (left) and accuracy (right) per epoch, training and validation, as a PNG.

    ``history`` holds lists per epoch: ``epoch``, ``loss`` and optionally ``accuracy``,
    ``val_loss``, ``val_accuracy`` (the keys :func:`gpubp.train.train` records).
    """
    plt = require_matplotlib()
    epochs = list(history["epoch"])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["loss"], "o-", label="training (mean over the epoch)")
    if history.get("val_loss"):
        ax_loss.plot(epochs, history["val_loss"], "s-", label="validation")
    ax_loss.set_xlabel("epoch")
    classifier = bool(history.get("accuracy")) or test_accuracy is not None
    ax_loss.set_ylabel("cross-entropy loss" if classifier else "MSE loss (standardised target)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(True, alpha=0.3)
    if history.get("accuracy"):
        ax_acc.plot(epochs, history["accuracy"], "o-", label="training (held-in sample)")
    if history.get("val_accuracy"):
        ax_acc.plot(epochs, history["val_accuracy"], "s-", label="validation")
    if test_accuracy is not None:
        ax_acc.axhline(test_accuracy, color="k", ls="--", lw=1, label=f"test {test_accuracy:.4f}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    if classifier:
        ax_acc.legend()
    else:  # a regression has no accuracy
        ax_acc.text(0.5, 0.5, "regression: no accuracy", ha="center", transform=ax_acc.transAxes)
    ax_acc.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def gradient_flow(
    runs: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """Per-layer gradient norms, one line per activation, log scale, as a PNG.

    ``runs[activation]`` holds ``delta`` and ``dW`` (norm per layer, first layer first) and,
    optionally, ``delta_init`` and ``dW_init`` measured at initialisation (drawn dashed).
    """
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, norms) in enumerate(runs.items()):
        colour = colours[k % len(colours)]
        for ax, key, label in (
            (axes[0], "delta", r"$\|\delta^l\|$"),
            (axes[1], "dW", r"$\|\partial C/\partial W^l\|$"),
        ):
            layers = range(1, len(norms[key]) + 1)
            ax.plot(layers, norms[key], "o-", color=colour, label=f"{name} (after training)")
            if norms.get(f"{key}_init"):
                ax.plot(
                    layers, norms[f"{key}_init"], "x--", color=colour, alpha=0.6,
                    label=f"{name} (at initialisation)",
                )  # fmt: skip
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("layer l (1 = next to the input)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("error signal per layer")
    axes[1].set_title("weight gradient per layer")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
