"""PyTorch modules out and in: ``torch.nn.Sequential(Linear, act, ..., Linear[, output act])``.

:func:`to_sequential` builds such a module from a model's parameters and activations;
:func:`read_sequential` reads one back into what an :class:`~gpubp.MLP` is built from (its
layer sizes, activations, loss, dtype and parameters). :meth:`gpubp.MLP.to_torch` and
:meth:`gpubp.MLP.from_torch` are these two with the model. PyTorch is optional: it is imported
on first use only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .activations import LEAKY_SLOPE
from .budget import check_network
from .preprocessing import Preprocessing

__all__ = ["TorchNetwork", "import_torch", "read_sequential", "to_sequential"]


def import_torch() -> Any:
    """``torch``, or an ImportError saying how to install it."""
    try:
        import torch  # optional: imported on first use, so gpubp never needs it installed
    except ImportError:
        raise ImportError(
            "this needs PyTorch, which is not installed; pip install torch (see "
            "https://pytorch.org for the build that matches your GPU)"
        ) from None
    return torch


def _activation_module(nn: Any, name: str) -> Any:
    return {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "softmax": lambda: nn.Softmax(dim=1),
    }[name]()


def to_sequential(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    activation: str,
    output: str,
    preprocessing: Preprocessing | None = None,
    device: Any = None,
) -> Any:
    """``torch.nn.Sequential``: ``Linear(n_0, n_1), act, ..., Linear(n_{L-1}, n_L)`` and the
    output activation (none for ``identity``), in the weights' dtype.

    ``Linear`` keeps ``weight`` ``(n_l, n_{l-1})`` and ``bias`` ``(n_l,)``, gpubp's own layout, so
    the weights are copied as they are. An input preprocessing ``x' = (x - shift) * scale`` is
    folded into the first layer, ``W' = W diag(scale)`` and ``b' = b - W (scale * shift)``
    (computed in float64), so the module takes the same raw inputs. The loss is not part of
    the module.
    """
    torch = import_torch()
    nn = torch.nn
    try:  # a bad device is named now, as gpubp's error, before anything is built
        target = None if device is None else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device={device!r:.80} is not a torch device ({exc})") from None
    tdtype = torch.float32 if weights[0].dtype == np.float32 else torch.float64
    weights, biases = list(weights), list(biases)
    if preprocessing is not None:
        W0 = weights[0].astype(np.float64)
        weights[0] = W0 * preprocessing.scale[None, :]
        biases[0] = biases[0].astype(np.float64) - W0 @ (preprocessing.scale * preprocessing.shift)
    layers: list[Any] = []
    for i, (W, b) in enumerate(zip(weights, biases)):
        linear = nn.Linear(W.shape[1], W.shape[0], dtype=tdtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
            linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        layers.append(linear)
        if i < len(weights) - 1:
            layers.append(_activation_module(nn, activation))
        elif output != "identity":
            layers.append(_activation_module(nn, output))
    seq = nn.Sequential(*layers)
    try:
        return seq if target is None else seq.to(target)
    except (RuntimeError, AssertionError) as exc:  # e.g. cuda in a CPU-only PyTorch
        raise ValueError(f"device={device!r:.80} cannot be used here ({exc})") from None


_READS = (
    "from_torch reads Linear, ReLU, Tanh, Sigmoid, LeakyReLU(0.01), Identity and Softmax(dim=1) "
    "(on the output only)"
)


def _activation_name(nn: Any, module: Any, where: str) -> str | None:
    """gpubp's name for an activation module, ``None`` for a Linear; refuses anything else."""
    if isinstance(module, nn.Linear):
        return None
    for cls, name in (
        (nn.Identity, "identity"),
        (nn.ReLU, "relu"),
        (nn.Tanh, "tanh"),
        (nn.Sigmoid, "sigmoid"),
    ):
        if type(module) is cls:
            return name
    if type(module) is nn.LeakyReLU:
        if module.negative_slope != LEAKY_SLOPE:
            raise ValueError(
                f"{where} is LeakyReLU(negative_slope={module.negative_slope}); gpubp's "
                f"leaky_relu has the slope {LEAKY_SLOPE}"
            )
        return "leaky_relu"
    if type(module) is nn.Softmax:
        if module.dim not in (1, -1):
            raise ValueError(
                f"{where} is Softmax(dim={module.dim}); gpubp's softmax runs over the features "
                "of each sample, dim=1"
            )
        return "softmax"
    raise ValueError(
        f"{where} is {type(module).__name__}, which gpubp has no equivalent of; {_READS}"
    )


@dataclass
class TorchNetwork:
    """What :func:`read_sequential` reads from a ``torch.nn.Sequential``: the arguments of
    :class:`~gpubp.MLP`, and its ``Linear`` modules, whose weights :meth:`parameters` gives."""

    layer_sizes: list[int]
    activation: str
    output: str
    loss: str
    dtype: str
    linears: list[Any]

    def parameters(self, dtype: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(weights, biases)`` as NumPy arrays of ``dtype`` (a missing bias: zeros)."""
        # in the model's dtype while still a tensor: NumPy has no bfloat16 (.numpy() refuses)
        as_dtype = getattr(import_torch(), np.dtype(dtype).name)

        def host(t: Any) -> np.ndarray:
            return np.asarray(t.detach().cpu().to(as_dtype).numpy())

        weights = [host(lin.weight) for lin in self.linears]
        biases = [
            np.zeros(lin.out_features) if lin.bias is None else host(lin.bias)
            for lin in self.linears
        ]
        return weights, biases


def _layers(nn: Any, seq: Any) -> tuple[list[Any], list[str | None]]:
    """The ``Linear`` modules of ``seq`` and the activation after each (None: none given)."""
    linears: list[Any] = []
    acts: list[str | None] = []
    for i, module in enumerate(seq):
        where = f"seq[{i}]"
        name = _activation_name(nn, module, where)
        if name is None:
            if linears and acts[-1] is None:
                acts[-1] = "identity"
            linears.append(module)
            acts.append(None)
            continue
        if not linears:
            raise ValueError(f"{where} is {type(module).__name__} before any Linear; {_READS}")
        if acts[-1] is not None:
            raise ValueError(
                f"{where} is a second activation after one Linear ({type(module).__name__}); "
                "gpubp applies one activation per layer"
            )
        acts[-1] = name
    if not linears:
        raise ValueError("seq holds no Linear layer; " + _READS)
    return linears, acts


def _check_layers(linears: list[Any], hidden: list[str]) -> None:
    """Refuse a softmax between layers, mixed hidden activations, widths that do not chain."""
    if "softmax" in hidden:
        k = hidden.index("softmax")
        raise ValueError(
            f"the Softmax after Linear number {k + 1} is between layers; gpubp applies "
            "softmax on the output only"
        )
    if len(set(hidden)) > 1:
        raise ValueError(
            f"the hidden layers use different activations ({', '.join(hidden)}); a gpubp MLP "
            "has one hidden activation"
        )
    for k in range(1, len(linears)):
        if linears[k].in_features != linears[k - 1].out_features:
            raise ValueError(
                f"Linear number {k + 1} takes {linears[k].in_features} inputs but the one before "
                f"gives {linears[k - 1].out_features}"
            )


#: the output activation a loss brings to a ``Sequential`` that ends in ``Linear``
_LOSS_OUTPUT = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}


def read_sequential(seq: Any, loss: str | None = None, dtype: str | None = None) -> TorchNetwork:
    """The layers and weights of ``seq``, a ``torch.nn.Sequential`` of ``Linear`` layers with an
    activation module after each (none: identity).

    The hidden layers must share one activation (gpubp has one hidden activation); the module
    after the last ``Linear`` is the output activation. ``loss`` is not part of a
    ``Sequential``: by default ``cross_entropy`` for a softmax output, ``binary_cross_entropy``
    for a sigmoid output, ``mse`` otherwise. A ``seq`` that ends in ``Linear`` (the usual
    PyTorch classifier, trained with ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``, which hold
    the softmax or sigmoid) takes its output from ``loss``: ``cross_entropy`` gives a softmax
    output, ``binary_cross_entropy`` a sigmoid one, anything else (or none) identity. ``dtype``
    defaults to the weights' (float32 or float64). Anything else in ``seq`` (dropout,
    normalisation, a LogSoftmax) is refused with a ValueError naming it.
    """
    torch = import_torch()
    nn = torch.nn
    if not isinstance(seq, nn.Sequential):
        raise TypeError(
            f"seq must be a torch.nn.Sequential of Linear and activation modules, got "
            f"{type(seq).__name__}"
        )
    linears, acts = _layers(nn, seq)
    hidden = [a or "identity" for a in acts[:-1]]
    # a PyTorch classifier ends in Linear, the softmax (sigmoid) inside CrossEntropyLoss
    # (BCEWithLogitsLoss): the loss asked for brings its output activation
    output = acts[-1] or _LOSS_OUTPUT.get(loss or "", "identity")
    _check_layers(linears, hidden)
    sizes = [linears[0].in_features, *(lin.out_features for lin in linears)]
    check_network(sizes, 8)  # before a weight is read or copied
    if any(p.is_meta for lin in linears for p in lin.parameters()):
        raise ValueError("seq holds parameters on the meta device, which hold no values")
    dtypes = {str(lin.weight.dtype).removeprefix("torch.") for lin in linears}
    if dtype is None:
        if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
            raise ValueError(
                f"the Linear weights are {', '.join(sorted(dtypes))}; pass dtype='float32' or "
                "'float64'"
            )
        dtype = dtypes.pop()
    if loss is None:
        loss = {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy"}.get(output, "mse")
    return TorchNetwork(
        layer_sizes=sizes,
        activation=hidden[0] if hidden else "relu",
        output=output,
        loss=loss,
        dtype=dtype,
        linears=linears,
    )
