"""Activation names, their numeric ids and the rules the backends share.

The ids are the same numbers the CUDA kernels use (``kernels/activations.cuh``); a test keeps
the two lists in step.

Each activation is applied in place to the pre-activation ``z`` (shape ``(B, n)``), and its
derivative is taken from the stored *output* ``a = f(z)`` wherever that is exact, so ``z`` need
not be kept for the backward pass:

============  =========================  ==============================
name          f(z)                       f'(z) written with a = f(z)
============  =========================  ==============================
identity      z                          1
sigmoid       1 / (1 + exp(-z))          a (1 - a)
tanh          tanh(z)                    1 - a^2
relu          max(z, 0)                  1 if a > 0 else 0
leaky_relu    z if z > 0 else 0.01 z     1 if a > 0 else 0.01
softmax       exp(z_i) / sum_j exp(z_j)  (not elementwise; output layer only)
exp           exp(z)                     a (output layer only: the Poisson loss's output)
============  =========================  ==============================

``exp`` is the output of the Poisson loss (:mod:`gpubp.losses`), run by the backends' ops (the
scikit-learn estimators use it); it is not an output of :class:`gpubp.MLP`
(``OUTPUT_ACTIVATIONS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LEAKY_SLOPE = 0.01

#: Activation name -> id shared with ``kernels/activations.cuh``.
ACTIVATION_IDS: dict[str, int] = {
    "identity": 0,
    "sigmoid": 1,
    "tanh": 2,
    "relu": 3,
    "leaky_relu": 4,
    "softmax": 5,
    "exp": 6,
}

HIDDEN_ACTIVATIONS: tuple[str, ...] = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("identity", "sigmoid", "tanh", "relu", "softmax")
RELU_FAMILY: tuple[str, ...] = ("relu", "leaky_relu")


def check_activation(name: object, *, argument: str, allowed: tuple[str, ...]) -> str:
    """Return ``name`` if it is one of ``allowed``, else raise a ValueError naming ``argument``."""
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(
            f"{argument}={name!r} is not supported; expected one of {', '.join(allowed)}"
        )
    return name


def apply_inplace(xp: Any, z: Any, activation: str, scratch: Any = None) -> Any:
    """Overwrite ``z`` (shape ``(B, n)``) with ``f(z)`` and return it.

    ``scratch`` is an optional buffer of ``z``'s shape and dtype (only its first column is
    used by softmax); without it the few activations that need one allocate a temporary.
    """
    if activation == "identity":
        pass
    elif activation == "relu":
        xp.maximum(z, 0, out=z)
    elif activation == "leaky_relu":
        # max(z, 0.01 z) is leaky ReLU because the slope is below 1.
        s = _scratch(xp, z, scratch)
        xp.multiply(z, LEAKY_SLOPE, out=s)
        xp.maximum(z, s, out=z)
    elif activation == "tanh":
        xp.tanh(z, out=z)
    elif activation == "sigmoid":
        # 1 / (1 + exp(-z)) keeps relative accuracy for z << 0 (the tanh form does not);
        # exp(-z) overflowing to inf gives exactly the limit 0, so the warning is silenced.
        with np.errstate(over="ignore"):
            xp.negative(z, out=z)
            xp.exp(z, out=z)
            z += 1.0
            xp.reciprocal(z, out=z)
    elif activation == "softmax":
        softmax_inplace(xp, z, None if scratch is None else scratch[:, :1])
    elif activation == "exp":
        with np.errstate(over="ignore"):  # overflow gives inf, as exp does
            xp.exp(z, out=z)
    else:  # pragma: no cover - names are validated at the API boundary
        raise ValueError(f"unknown activation {activation!r}")
    return z


def softmax_inplace(xp: Any, z: Any, rowbuf: Any = None) -> Any:
    """Row-wise softmax of ``z`` (shape ``(B, n)``) in place, shifted by the row max for safety.

    ``rowbuf`` is an optional ``(B, 1)`` buffer for the row maxima and sums.
    """
    if rowbuf is None:
        rowbuf = xp.empty((z.shape[0], 1), dtype=z.dtype)
    xp.max(z, axis=1, keepdims=True, out=rowbuf)
    z -= rowbuf
    xp.exp(z, out=z)
    xp.sum(z, axis=1, keepdims=True, out=rowbuf)
    z /= rowbuf
    return z


def derivative_mul_inplace(xp: Any, g: Any, a: Any, activation: str, scratch: Any = None) -> Any:
    """Multiply ``g`` in place by ``f'(z)``, computed from the output ``a = f(z)``.

    This is the fused Hadamard step of the backward pass: ``g`` holds ``delta_next @ W_next``
    (shape ``(B, n)``) and becomes ``delta``. ``scratch`` is an optional buffer of ``g``'s
    shape and dtype.
    """
    if activation == "identity":
        return g
    if activation not in ("relu", "leaky_relu", "tanh", "sigmoid"):
        raise ValueError(
            f"activation {activation!r} has no elementwise derivative; softmax is only "
            "available on the output layer"
        )
    s = _scratch(xp, g, scratch)
    if activation == "relu":
        xp.greater(a, 0, out=s)  # [a > 0] as 1.0 / 0.0
    elif activation == "leaky_relu":
        xp.greater(a, 0, out=s)
        s *= 1.0 - LEAKY_SLOPE
        s += LEAKY_SLOPE  # 1 where a > 0, the slope elsewhere
    elif activation == "tanh":
        xp.multiply(a, a, out=s)
        xp.subtract(1.0, s, out=s)  # 1 - a^2
    else:  # sigmoid
        xp.subtract(1.0, a, out=s)
        s *= a  # a (1 - a)
    g *= s
    return g


def _scratch(xp: Any, like: Any, scratch: Any) -> Any:
    return xp.empty_like(like) if scratch is None else scratch


def initial_std(activation: str, n_in: int, n_out: int) -> tuple[str, float]:
    """Initialisation rule for a layer followed by ``activation``.

    He (normal, std sqrt(2 / n_in)) for the ReLU family, Glorot (uniform on +-sqrt(6 / (n_in +
    n_out))) otherwise. Returns ``("normal", std)`` or ``("uniform", limit)``.
    """
    if activation in RELU_FAMILY:
        return "normal", float(np.sqrt(2.0 / n_in))
    return "uniform", float(np.sqrt(6.0 / (n_in + n_out)))


def initial_parameters(
    sizes: Sequence[int], activation: str, output: str, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A network's first parameters, float64: ``W^l`` ``(n_l, n_{l-1})`` drawn as
    :func:`initial_std` says for the layer's activation (``output`` for the last), ``b^l``
    zeros."""
    weights, biases = [], []
    L = len(sizes) - 1
    for i in range(L):
        n_in, n_out = sizes[i], sizes[i + 1]
        rule, scale = initial_std(activation if i < L - 1 else output, n_in, n_out)
        if rule == "normal":
            w = rng.normal(0.0, scale, size=(n_out, n_in))
        else:
            w = rng.uniform(-scale, scale, size=(n_out, n_in))
        weights.append(w)
        biases.append(np.zeros(n_out))
    return weights, biases
