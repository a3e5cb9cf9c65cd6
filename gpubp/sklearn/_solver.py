"""scikit-learn's stochastic solver, step for step, on a gpubp backend.

The gradients come from the backend's fused forward/backward (:meth:`Backend.gradients`), or,
with sample weights, from its per-layer ops with the output error rows weighted. scikit-learn's
L2 penalty and its SGD and Adam rules run as the backend's fused ``sgd_update_many`` /
``adam_update_many`` ops (PyTorch's forms, every tensor in one call), with the
hyper-parameters mapped so that each step is scikit-learn's (see :class:`SGDRule` and
:class:`AdamRule`).

With ``B`` the batch, ``w`` the sample weights (all ones without them), ``S = sum_i w_i``, ``a``
the output and ``Y`` the ``(B, n_out)`` targets (identity output with squared error, softmax
with log loss, logistic with binary log loss, exp with half the Poisson deviance: the canonical
pairs, whose output error is ``a - Y``):

    delta^L  = diag(w) (a - Y) / S
    dW^l     = delta^l.T @ a^{l-1} + alpha W^l / S        (weights only; biases get no penalty)
    loss     = sum_i w_i l_i / S + alpha / (2 S) sum_l ||W^l||^2

where ``l_i`` is row ``i``'s loss: ``1/(2 n_out) ||a_i - Y_i||^2`` (squared error, averaged
over the outputs as scikit-learn reports it; its gradient is the sum's), ``-sum_j Y_ij log a_ij``
(log loss), ``-sum_j [Y_ij log a_ij + (1 - Y_ij) log(1 - a_ij)]`` (binary log loss) or
``sum_j [Y_ij log(Y_ij / a_ij) - Y_ij + a_ij]`` (Poisson, ``0 log 0 = 0``), the log
losses evaluated from the logits (so they stay finite where scikit-learn clips ``a`` to
``[eps, 1 - eps]``).

Weights here are in gpubp's layout ``(n_out, n_in)``; the estimators expose scikit-learn's
``(n_in, n_out)``.

Sparse ``X`` (scipy CSR) stays sparse: each batch's rows are taken from it as a CSR matrix
on the host, and the first layer's forward ``x @ W^1.T`` and weight gradient
``dW^1 = (x.T @ delta^1).T`` are the backend's sparse-dense products
(:mod:`gpubp.backends.sparse`: scipy's on the CPU, gpubp's CSR kernel on the GPU); the other
layers are the backend's ops (the per-layer path of the weighted case above).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.utils import gen_batches

from .. import activations as act
from ..backends import Backend
from ..backends.sparse import CsrBatch

#: scikit-learn's output activation -> (gpubp output, gpubp loss).
OUTPUTS: dict[str, tuple[str, str]] = {
    "identity": ("identity", "mse"),
    "softmax": ("softmax", "cross_entropy"),
    "logistic": ("sigmoid", "binary_cross_entropy"),
    "exp": ("exp", "poisson"),
}

#: scikit-learn's hidden activation names -> gpubp's.
HIDDEN: dict[str, str] = {
    "identity": "identity",
    "logistic": "sigmoid",
    "tanh": "tanh",
    "relu": "relu",
}


class SGDRule:
    """scikit-learn's ``SGDOptimizer``: ``v = momentum v - lr g``; the step adds ``v``, or
    ``momentum v - lr g`` again with Nesterov's momentum. ``lr`` follows ``schedule``:
    ``invscaling`` sets ``lr_init / (t + 1) ** power_t`` at the end of each epoch (``t`` the
    samples seen), ``adaptive`` divides it by 5 when progress stalls.

    Run as the backend's fused ``sgd_update`` (PyTorch's form, ``buf = momentum buf + g``,
    ``p -= lr buf`` or ``p -= lr (g + momentum buf)``): the same steps with ``v = -lr buf``,
    so ``buf`` is rescaled by ``lr_old / lr_new`` whenever the rate changes.
    """

    def __init__(
        self,
        xp: Any,
        params: list[Any],
        lr: float,
        schedule: str,
        momentum: float,
        nesterov: bool,
        power_t: float,
    ) -> None:
        self.learning_rate_init = float(lr)
        self.learning_rate = float(lr)
        self.schedule = schedule
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.power_t = float(power_t)
        self.buffers = [xp.zeros_like(p) for p in params]
        self._buffer_lr = self.learning_rate  # the rate the buffers hold -v / lr for

    def update(
        self, be: Backend, params: list[Any], grads: list[Any], decay: list[float], scratch: Any
    ) -> None:
        """One step on every parameter; ``decay[i]`` is added times ``params[i]`` to its
        gradient (scikit-learn's L2 term)."""
        lr = self.learning_rate
        if self.momentum and lr != self._buffer_lr:
            for buf in self.buffers:
                buf *= self._buffer_lr / lr
        self._buffer_lr = lr
        be.sgd_update_many(
            params, grads, self.buffers, lr, self.momentum, self.nesterov, decay, scratch=scratch
        )

    def iteration_ends(self, time_step: int) -> None:
        if self.schedule == "invscaling":
            self.learning_rate = self.learning_rate_init / (time_step + 1) ** self.power_t

    def trigger_stopping(self, msg: str, verbose: bool) -> bool:
        """Whether to stop when progress stalls (``adaptive``: only once ``lr <= 1e-6``)."""
        if self.schedule != "adaptive":
            if verbose:
                print(msg + " Stopping.")
            return True
        if self.learning_rate <= 1e-6:
            if verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self.learning_rate /= 5.0
        if verbose:
            print(msg + f" Setting learning rate to {self.learning_rate:f}")
        return False


class AdamRule:
    """scikit-learn's ``AdamOptimizer``: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    the step adds ``-lr_t m / (sqrt(v) + eps)`` with ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)``
    (epsilon outside the bias correction, unlike PyTorch's Adam).

    Run as the backend's fused ``adam_update`` (PyTorch's form,
    ``p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps')``), which is the same step with
    ``eps' = eps / sqrt(1 - b2^t)``.
    """

    def __init__(
        self, xp: Any, params: list[Any], lr: float, beta_1: float, beta_2: float, epsilon: float
    ) -> None:
        self.learning_rate_init = float(lr)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.t = 0
        self.ms = [xp.zeros_like(p) for p in params]
        self.vs = [xp.zeros_like(p) for p in params]

    def update(
        self, be: Backend, params: list[Any], grads: list[Any], decay: list[float], scratch: Any
    ) -> None:
        """One step on every parameter; ``decay[i]`` is added times ``params[i]`` to its
        gradient (scikit-learn's L2 term)."""
        self.t += 1
        b1, b2, t = self.beta_1, self.beta_2, self.t
        root = math.sqrt(1 - b2**t)
        eps = self.epsilon / root
        lr = self.learning_rate_init
        be.adam_update_many(
            params, grads, self.ms, self.vs, t, lr, b1, b2, eps, decay, False, scratch=scratch
        )

    def iteration_ends(self, time_step: int) -> None:
        pass

    def trigger_stopping(self, msg: str, verbose: bool) -> bool:
        if verbose:
            print(msg + " Stopping.")
        return True


class Network:
    """The parameters of one fit on ``backend`` and one scikit-learn step over them.

    Parameters
    ----------
    backend : Backend
        Where the parameters live and the gradients are computed.
    coefs, intercepts : list of ndarray
        scikit-learn's layout: ``coefs[l]`` ``(n_l, n_{l+1})``, ``intercepts[l]`` ``(n_{l+1},)``.
    activation : str
        scikit-learn's hidden activation name.
    out_activation : str
        ``identity``, ``softmax`` or ``logistic``.
    alpha : float
        The L2 penalty.
    dtype : numpy dtype
        Of the parameters and the arithmetic.
    train : bool
        Whether :meth:`step` will be called (allocates its scratch buffers).
    sparse : bool
        Whether the input will be sparse: ``W^1`` is then stored in scikit-learn's layout
        ``(n_0, n_1)`` (``self.W[0]`` is a transposed view of it), the layout the sparse-dense
        products read and write without a copy; the optimizer updates that array.
    """

    def __init__(
        self,
        backend: Backend,
        coefs: list[np.ndarray],
        intercepts: list[np.ndarray],
        activation: str,
        out_activation: str,
        alpha: float,
        dtype: np.dtype[Any],
        *,
        train: bool = True,
        sparse: bool = False,
    ) -> None:
        self.backend = backend
        self.xp = backend.xp
        self.dtype = dtype
        self.activation = HIDDEN[activation]
        self.output, self.loss = OUTPUTS[out_activation]
        self.alpha = float(alpha)
        # copies (np.array copies), never views of the estimator's coefs_ / intercepts_: the
        # step updates these in place, and a fit that fails must leave those as they were
        self.W = [backend.asarray(np.array(c.T, dtype=dtype, order="C")) for c in coefs]
        self.sparse = sparse
        if sparse:
            self.W[0] = backend.asarray(np.array(coefs[0], dtype=dtype, order="C")).T
        self.b = [backend.asarray(np.array(c, dtype=dtype, order="C")) for c in intercepts]
        # the optimizer ops' temporaries: a flat buffer of twice the parameter's size each
        self.scratch = (
            [self.xp.empty(2 * p.size, dtype=dtype) for p in (*self.W, *self.b)] if train else []
        )

    @property
    def params(self) -> list[Any]:
        """``W^1..W^L, b^1..b^L`` (the order of the optimizer's state; ``W^1`` as stored: its
        transpose for sparse input)."""
        return [self._stored(0, self.W[0]), *self.W[1:], *self.b]

    def _stored(self, i: int, a: Any) -> Any:
        """``W^i`` or its gradient ``a`` in the layout of ``W^i``'s storage (contiguous)."""
        return a.T if i == 0 and self.sparse else a

    def coefs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(coefs_, intercepts_)`` as NumPy copies in scikit-learn's layout.

        Always fresh memory: ``to_numpy`` returns the live array itself on the CPU backends,
        and the transpose of a ``(1, n)`` or ``(n, 1)`` matrix is already contiguous, so
        ``ascontiguousarray`` would hand out a view that the next step changes.
        """
        be = self.backend
        return (
            [np.array(be.to_numpy(W).T, order="C", copy=True) for W in self.W],
            [np.array(be.to_numpy(b), copy=True) for b in self.b],
        )

    def loss_and_gradients(
        self, x: Any, y: Any, labels: Any, sw: Any, *, clipped: bool = False
    ) -> tuple[Any, list[Any], list[Any], float]:
        """``(loss, dWs, dbs, l2)`` of the batch ``x`` ``(B, n_0)`` (a backend array, or a
        :class:`CsrBatch` of sparse rows; see the module doc).

        ``y`` is ``(B, n_out)`` targets; ``labels`` the ``(B,)`` class indices standing for
        them (softmax output) or None; ``sw`` ``(B,)`` sample weights or None. ``loss`` (a
        backend scalar) includes the L2 term; the gradients do not: ``l2 = alpha / S`` times
        ``W^l`` is still to be added to ``dW^l`` (0.0 without a penalty). The gradient arrays
        may belong to the backend's workspace (the next call overwrites them).

        ``clipped``: the log losses as scikit-learn evaluates them, on probabilities clipped
        to ``[eps, 1 - eps]`` (``eps`` the dtype's machine epsilon), which differ from the
        exact ones where outputs saturate (its L-BFGS line search compares these values).
        """
        exact = not (clipped and self.loss in ("cross_entropy", "binary_cross_entropy"))
        if sw is None and exact and not isinstance(x, CsrBatch):  # the backend's fused pass
            target = labels if labels is not None else y
            value, dWs, dbs = self.backend.gradients(
                self.W, self.b, x, target, self.activation, self.output, self.loss
            )
            denom: Any = x.shape[0]
            if self.loss == "mse":
                value = value / y.shape[1]
        else:
            value, dWs, dbs, denom = self._weighted_gradients(x, y, sw, clipped)
        l2 = 0.0
        if self.alpha:
            denom = float(denom)
            l2 = self.alpha / denom
            sq = self.backend.sum_of_squares(self.params[: len(self.W)])
            value = value + 0.5 * self.alpha * sq / denom
        return value, dWs, dbs, l2

    def step(self, x: Any, y: Any, labels: Any, sw: Any, optimizer: Any) -> Any:
        """One scikit-learn step on the batch ``x`` ``(B, n_0)``: gradients, L2, update
        (arguments as for :meth:`loss_and_gradients`). Returns the batch's loss (a backend
        scalar) before the update."""
        value, dWs, dbs, l2 = self.loss_and_gradients(x, y, labels, sw)
        L = len(self.W)
        decay = [l2] * L + [0.0] * L  # weights only
        grads = [self._stored(0, dWs[0]), *dWs[1:], *dbs]
        optimizer.update(self.backend, self.params, grads, decay, self.scratch)
        return value

    def _weighted_gradients(
        self, x: Any, y: Any, sw: Any, clipped: bool = False
    ) -> tuple[Any, list[Any], list[Any], Any]:
        """Backpropagation with the output error of row ``i`` scaled by ``w_i / S`` (``1 / B``
        if ``sw`` is None): the backend's forward, Hadamard and gradient ops, layer by layer."""
        be, xp = self.backend, self.xp
        L = len(self.W)
        acts = [x]
        for i in range(L - 1):
            acts.append(self._layer(i, acts[i], self.activation))
        z = self._layer(L - 1, acts[L - 1], "identity")
        rows = self._row_losses(z, y, clipped)
        total = x.shape[0] if sw is None else xp.sum(sw)
        value = (xp.sum(rows) if sw is None else xp.vdot(rows, sw)) / total
        delta = act.apply_inplace(xp, z, self.output)
        delta -= y
        delta *= 1.0 / total if sw is None else (sw / total)[:, None]
        dWs: list[Any] = [None] * L
        dbs: list[Any] = [None] * L
        for i in range(L - 1, -1, -1):
            if isinstance(acts[i], CsrBatch):  # dW = (x.T @ delta).T, a sparse-dense product
                dWs[i] = be.sparse_weight_gradient(acts[i], delta).T  # a view of (n_0, n_1)
                dbs[i] = delta.sum(axis=0)
            else:
                dWs[i], dbs[i] = be.parameter_gradients(delta, acts[i])
            if i > 0:
                delta = be.hidden_delta(delta, self.W[i], acts[i], self.activation)
        return value, dWs, dbs, total

    def _layer(self, i: int, a_prev: Any, activation: str) -> Any:
        """``f(a_prev @ W^i.T + b^i)`` ``(B, n_i)``: the backend's op, or for sparse rows
        ``a_prev`` (a :class:`CsrBatch`, the first layer's input) its sparse-dense product then
        the bias and activation in place."""
        if not isinstance(a_prev, CsrBatch):
            return self.backend.forward_layer(a_prev, self.W[i], self.b[i], activation)
        # W[0].T is contiguous when self.sparse
        return self.backend.sparse_forward_layer(a_prev, self.W[i].T, self.b[i], activation)

    def _row_losses(self, z: Any, y: Any, clipped: bool = False) -> Any:
        """Each row's loss ``(B,)`` from the output pre-activation ``z`` (see the module doc);
        ``clipped``: the log losses with ``log a`` and ``log(1 - a)`` clipped to
        ``[log eps, log(1 - eps)]``, as scikit-learn clips ``a``."""
        xp = self.xp
        if self.loss == "mse":
            r = z - y
            return xp.sum(r * r, axis=1) / (2 * y.shape[1])
        if self.loss == "poisson":  # Y log Y - Y z - Y + exp(z), 0 log 0 = 0
            y_log_y = y * xp.log(xp.where(y > 0, y, 1))
            with np.errstate(over="ignore"):
                return xp.sum(y_log_y - y * z - y + xp.exp(z), axis=1)
        eps = float(np.finfo(self.dtype).eps)
        lo, hi = math.log(eps), math.log1p(-eps)
        if self.loss == "cross_entropy":
            m = xp.max(z, axis=1, keepdims=True)
            lse = xp.log(xp.sum(xp.exp(z - m), axis=1)) + m[:, 0]
            if clipped:  # -sum_j Y_ij clip(log a_ij), log a_ij = z_ij - lse_i
                return -xp.sum(y * xp.clip(z - lse[:, None], lo, hi), axis=1)
            return lse * xp.sum(y, axis=1) - xp.sum(y * z, axis=1)
        softplus = xp.maximum(z, 0) + xp.log1p(xp.exp(-xp.abs(z)))
        if clipped:  # log a = z - softplus(z), log(1 - a) = -softplus(z)
            log_a, log_1ma = xp.clip(z - softplus, lo, hi), xp.clip(-softplus, lo, hi)
            return -xp.sum(y * log_a + (1 - y) * log_1ma, axis=1)
        return xp.sum(softplus - y * z, axis=1)

    def forward(self, x: Any, chunk: int = 4096) -> np.ndarray:
        """The network's output ``(B, n_out)`` for ``x`` (NumPy, the model's dtype), as NumPy."""
        be = self.backend
        out = np.empty((x.shape[0], self.W[-1].shape[0]), dtype=self.dtype)
        if sp.issparse(x):
            x = as_input(self, x)
        for start in range(0, x.shape[0], chunk):
            if sp.issparse(x):  # layer by layer, the first a sparse-dense product
                a = be.sparse_batch(x[start : start + chunk], self.dtype)
                for i in range(len(self.W)):
                    last = i == len(self.W) - 1
                    a = self._layer(i, a, self.output if last else self.activation)
            else:
                xb = be.asarray(np.ascontiguousarray(x[start : start + chunk]), self.dtype)
                a = be.forward(self.W, self.b, xb, self.activation, self.output)
            out[start : start + a.shape[0]] = be.to_numpy(a)
        return out


def as_input(net: Network, X: Any) -> Any:
    """``X`` ``(n, n_0)`` for ``net``: dense on its backend, or sparse as a CSR array of its
    dtype on the host (whose batches :meth:`Backend.sparse_batch` prepares)."""
    if sp.issparse(X):
        return sp.csr_array(X, dtype=net.dtype)
    return net.backend.asarray(np.ascontiguousarray(X), net.dtype)


class Batches:
    """One fit's training set on the backend, cut into scikit-learn's batches.

    ``X`` ``(n, n_0)``, the encoded targets ``y`` ``(n, n_out)`` (and, for a softmax output,
    their class indices) and the sample weights ``sw`` ``(n,)`` or None are copied to the
    device once; each epoch then takes the batches of ``batch_size`` rows in an order given by
    the caller (scikit-learn's ``gen_batches`` over its shuffled indices), or in place.
    """

    def __init__(
        self, net: Network, X: np.ndarray, y: np.ndarray, sw: np.ndarray | None, batch_size: int
    ) -> None:
        be, dtype = net.backend, net.dtype
        self.net, self.n, self.batch_size = net, X.shape[0], batch_size
        self.x = as_input(net, X)
        self.sparse = sp.issparse(self.x)
        self.y = be.asarray(y, dtype)
        self.labels = be.asarray(np.argmax(y, axis=1)) if net.output == "softmax" else None
        self.sw = None if sw is None else be.asarray(sw, dtype)
        # the shuffled batches are gathered into one buffer: a fresh array per batch would be
        # a fresh mapping (page faults) per step
        # (NumPy buffers take's output unless mode is not 'raise'; the indices are in range)
        self.gathered: Any = (
            None if self.sparse else be.xp.empty((batch_size, X.shape[1]), dtype=dtype)
        )
        self.take_mode = {"mode": "clip"} if be.xp is np else {}

    def epoch(self, optimizer: Any, order: np.ndarray | None) -> Any:
        """One pass of :meth:`Network.step` over the batches of ``order`` (host indices, a
        permutation of the rows) or, if None, of the rows as they are (views, no copy).

        Returns the sum over batches of the loss times the batch's size, as scikit-learn
        accumulates it: in the losses' own type (a float32 model sums in float32; a backend
        scalar stays on the device), unread.
        """
        net, xp = self.net, self.net.backend.xp
        accumulated: Any = 0.0
        for batch in gen_batches(self.n, self.batch_size):
            if self.sparse:  # the batch's rows, a CSR array, as the backend's products take it
                host = batch if order is None else order[batch]
                xb = net.backend.sparse_batch(self.x[host], net.dtype)
                idx = host if xp is np or order is None else net.backend.asarray(host)
            elif order is not None:
                idx = net.backend.asarray(order[batch])
                out = self.gathered[: len(idx)]
                xb = xp.take(self.x, idx, axis=0, out=out, **self.take_mode)
            else:
                idx, xb = batch, self.x[batch]
            value = net.step(
                xb,
                self.y[idx],
                None if self.labels is None else self.labels[idx],
                None if self.sw is None else self.sw[idx],
                optimizer,
            )
            accumulated = accumulated + value * (batch.stop - batch.start)
        return accumulated
