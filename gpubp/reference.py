"""The float64 reference: backpropagation written formula by formula.

This module is the judge of every backend, so it is kept small and obvious: float64 NumPy, no
buffers, no fusion, no cleverness, every function pure (it returns new arrays and never writes
into its arguments). It is itself checked against central finite differences in the tests.

Conventions: a batch is a row-major array of shape ``(B, n)``; layer ``l`` has weights ``W``
of shape ``(n_out, n_in)`` and bias ``b`` of shape ``(n_out,)``; losses are averaged over the
batch. The op names and argument order are the backend protocol's
(:class:`gpubp.backends.base.Backend`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

LEAKY_SLOPE = 0.01
Array = np.ndarray


def _f64(x: Any) -> Array:
    return np.asarray(x, dtype=np.float64)


def activate(z: Array, activation: str) -> Array:
    """``a = f(z)`` elementwise (softmax: row-wise); ``z`` has shape ``(B, n)``."""
    z = _f64(z)
    if activation == "identity":
        return z.copy()
    if activation == "sigmoid":
        with np.errstate(over="ignore"):  # exp(-z) = inf gives the exact limit 0
            return 1.0 / (1.0 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    if activation == "relu":
        return np.where(z > 0, z, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, LEAKY_SLOPE * z)
    if activation == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "exp":
        return np.exp(z)
    raise ValueError(f"unknown activation {activation!r}")


def derivative_from_output(a: Array, activation: str) -> Array:
    """``f'(z)`` written in terms of ``a = f(z)``, for the elementwise activations."""
    a = _f64(a)
    if activation == "identity":
        return np.ones_like(a)
    if activation == "sigmoid":
        return a * (1.0 - a)
    if activation == "tanh":
        return 1.0 - a * a
    if activation == "relu":
        return (a > 0).astype(np.float64)
    if activation == "leaky_relu":
        return np.where(a > 0, 1.0, LEAKY_SLOPE)
    raise ValueError(f"activation {activation!r} has no elementwise derivative")


def as_targets(y: Any, n_out: int) -> Array:
    """Targets as a float64 ``(B, n_out)`` array; integer labels ``(B,)`` become one-hot rows."""
    y = np.asarray(y)
    if y.ndim == 1 and n_out > 1:
        onehot = np.zeros((y.shape[0], n_out))
        onehot[np.arange(y.shape[0]), y.astype(np.int64)] = 1.0
        return onehot
    return _f64(y).reshape(y.shape[0], n_out)


# --- the ops ------------------------------------------------------------------------------


def forward_layer(a_prev: Array, W: Array, b: Array, activation: str) -> Array:
    """One layer forward.

    ``z = a_prev @ W.T + b``: ``(B, n_in) @ (n_out, n_in).T + (n_out,) -> (B, n_out)``;
    returns ``a = f(z)``, shape ``(B, n_out)``.
    """
    return activate(_f64(a_prev) @ _f64(W).T + _f64(b), activation)


def output_delta(z: Array, y: Array, output: str, loss: str) -> tuple[Array, float]:
    """Output-layer error and loss value from the output pre-activation ``z`` (shape ``(B, n)``).

    With ``a = f(z)`` and ``Y`` the ``(B, n)`` targets (integer labels become one-hot rows):

    - ``mse``: ``C = 1/(2B) sum (a - Y)^2``, ``delta = J_f(z)^T (a - Y) / B``, which is
      ``(a - Y) * f'(z) / B`` for elementwise ``f``; for softmax, with ``g = (a - Y) / B``,
      ``delta = a * (g - sum_j g_j a_j)``.
    - ``cross_entropy`` (softmax): ``C = -1/B sum Y log a``, ``delta = (a - Y) / B``.
    - ``binary_cross_entropy`` (sigmoid): ``C = -1/B sum [Y log a + (1 - Y) log(1 - a)]``,
      ``delta = (a - Y) / B``.
    - ``poisson`` (exp): half the Poisson deviance, ``C = 1/B sum [Y log(Y / a) - Y + a]``
      (``0 log 0 = 0``; ``Y >= 0``), ``delta = (a - Y) / B``.

    The log-losses are evaluated from ``z`` (log-sum-exp, softplus) so they stay finite.
    Returns ``(delta, C)`` with ``delta`` of shape ``(B, n)``.
    """
    z = _f64(z)
    B, n = z.shape
    Y = as_targets(y, n)
    a = activate(z, output)
    if loss == "mse":
        value = float(np.sum((a - Y) ** 2) / (2 * B))
        g = (a - Y) / B
        if output == "softmax":
            delta = a * (g - np.sum(g * a, axis=1, keepdims=True))
        else:
            delta = g * derivative_from_output(a, output)
        return delta, value
    if loss == "cross_entropy" and output == "softmax":
        if n < 2:
            raise ValueError("cross_entropy needs at least 2 outputs; use binary_cross_entropy")
        m = z.max(axis=1, keepdims=True)
        log_a = z - m - np.log(np.sum(np.exp(z - m), axis=1, keepdims=True))
        return (a - Y) / B, float(-np.sum(Y * log_a) / B)
    if loss == "binary_cross_entropy" and output == "sigmoid":
        # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z
        softplus = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
        return (a - Y) / B, float(np.sum(softplus - Y * z) / B)
    if loss == "poisson" and output == "exp":
        # Y log(Y / a) = Y log Y - Y z, with 0 log 0 = 0
        y_log_y = np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1.0)), 0.0)
        return (a - Y) / B, float(np.sum(y_log_y - Y * z - Y + a) / B)
    raise ValueError(f"loss {loss!r} is not defined for output {output!r}")


def hidden_delta(delta_next: Array, W_next: Array, a: Array, activation: str) -> Array:
    """Backpropagate one layer: ``delta = (delta_next @ W_next) * f'(z)``.

    ``(B, n_next) @ (n_next, n) -> (B, n)``, times ``f'`` computed from ``a = f(z)``, ``(B, n)``.
    """
    return (_f64(delta_next) @ _f64(W_next)) * derivative_from_output(a, activation)


def parameter_gradients(delta: Array, a_prev: Array) -> tuple[Array, Array]:
    """``dW = delta.T @ a_prev``: ``(n_out, B) @ (B, n_in)``; ``db = sum over B of delta``."""
    delta = _f64(delta)
    return delta.T @ _f64(a_prev), delta.sum(axis=0)


def sgd_update(
    param: Array,
    grad: Array,
    buf: Array | None,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> tuple[Array, Array | None]:
    """One step of SGD as ``torch.optim.SGD`` defines it (dampening 0).

    ``g = grad + wd * p``; with momentum ``buf = momentum * buf + g`` (``buf`` starts at 0,
    which equals PyTorch's ``buf = g`` on the first step), then ``g = g + momentum * buf``
    (Nesterov) or ``g = buf``; finally ``p = p - lr * g``. Returns ``(param, buf)``.
    """
    p, g = _f64(param), _f64(grad)
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        buf = momentum * _f64(buf) + g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


def adam_update(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[Array, Array, Array]:
    """One step of Adam (``decoupled=False``) or AdamW (``decoupled=True``), as in PyTorch.

    Adam adds ``wd * p`` to the gradient; AdamW instead scales ``p *= 1 - lr * wd``. Then
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` with ``t = step`` (1 on the
    first step). Returns ``(param, m, v)``.
    """
    p, g = _f64(param), _f64(grad)
    if weight_decay and decoupled:
        p = p * (1.0 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * p
    m = beta1 * _f64(m) + (1.0 - beta1) * g
    v = beta2 * _f64(v) + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1**step)
    v_hat = v / (1.0 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


# --- compositions ---------------------------------------------------------------------------


def forward(
    weights: list[Array], biases: list[Array], x: Array, activation: str, output: str
) -> Array:
    """Network output ``a^L`` for input ``x`` ``(B, n_0)``: hidden layers use ``activation``."""
    a = _f64(x)
    for W, b in zip(weights[:-1], biases[:-1]):
        a = forward_layer(a, W, b, activation)
    return forward_layer(a, weights[-1], biases[-1], output)


def backprop(
    weights: list[Array],
    biases: list[Array],
    x: Array,
    y: Array,
    activation: str,
    output: str,
    loss: str,
) -> tuple[float, list[Array], list[Array]]:
    """Loss, the layer inputs ``[a^0, ..., a^{L-1}]`` and the errors ``[delta^1, ..., delta^L]``.

    Forward keeping every ``a^l`` (``a^0 = x``), ``delta^L`` from :func:`output_delta` on the
    output pre-activation, then ``delta^l = hidden_delta(delta^{l+1}, W^{l+1}, a^l)`` down to
    ``l = 1``. ``delta^l`` has shape ``(B, n_l)``.
    """
    acts = [_f64(x)]
    for W, b in zip(weights[:-1], biases[:-1]):
        acts.append(forward_layer(acts[-1], W, b, activation))
    z_out = forward_layer(acts[-1], weights[-1], biases[-1], "identity")
    delta, value = output_delta(z_out, y, output, loss)
    deltas = [delta]
    for layer in range(len(weights) - 1, 0, -1):
        delta = hidden_delta(delta, weights[layer], acts[layer], activation)
        deltas.insert(0, delta)
    return value, acts, deltas


def gradients(
    weights: list[Array],
    biases: list[Array],
    x: Array,
    y: Array,
    activation: str,
    output: str,
    loss: str,
) -> tuple[float, list[Array], list[Array]]:
    """Loss and its gradients with respect to every ``W^l`` and ``b^l``, by backpropagation:
    ``dW^l, db^l = parameter_gradients(delta^l, a^{l-1})`` with the errors of :func:`backprop`.
    """
    value, acts, deltas = backprop(weights, biases, x, y, activation, output, loss)
    grads = [parameter_gradients(d, a) for d, a in zip(deltas, acts)]
    return value, [g[0] for g in grads], [g[1] for g in grads]


def update_parameters(
    params: list[Array], grads: list[Array], optimizer: Any, state: dict[str, Any]
) -> tuple[list[Array], dict[str, Any]]:
    """Apply ``optimizer`` (an :mod:`gpubp.optim` object) to each parameter in turn.

    ``params`` and ``grads`` are in the order ``W^1..W^L, b^1..b^L``; ``state`` holds
    ``"step"`` (steps taken so far) and one list per slot (``momentum_buffer``, ``exp_avg``,
    ``exp_avg_sq``). The optimizer calls this module's :func:`sgd_update` or
    :func:`adam_update` on each parameter. Returns new parameters and a new state.
    """
    return optimizer.update(sys.modules[__name__], params, grads, state)


def train_step(
    weights: list[Array],
    biases: list[Array],
    x: Array,
    y: Array,
    activation: str,
    output: str,
    loss: str,
    optimizer: Any,
    state: dict[str, Any],
) -> tuple[float, list[Array], list[Array], dict[str, Any]]:
    """:func:`gradients` then :func:`update_parameters`; ``(loss, weights, biases, state)``."""
    value, dWs, dbs = gradients(weights, biases, x, y, activation, output, loss)
    L = len(weights)
    params, state = update_parameters(list(weights) + list(biases), dWs + dbs, optimizer, state)
    return value, params[:L], params[L:], state
