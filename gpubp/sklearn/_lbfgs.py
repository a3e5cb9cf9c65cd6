"""scikit-learn's ``solver='lbfgs'`` on a gpubp backend: scipy's L-BFGS-B over the full batch.

scikit-learn minimises ``f(theta)`` with ``scipy.optimize.minimize(method='L-BFGS-B',
jac=True)``, ``theta`` the flat vector of every coefficient and intercept in its layout and
order (``coefs_[0].ravel(), ..., coefs_[L-1].ravel(), intercepts_[0], ..., intercepts_[L-1]``)
and ``f`` the loss of :mod:`gpubp.sklearn._solver` over the whole training set with its L2 term:

    f(theta)  = sum_i w_i l_i / S + alpha / (2 S) sum_l ||W^l||^2
    df/dW^l   = delta^l.T @ a^{l-1} + alpha W^l / S,     df/db^l = sum_rows delta^l

(``delta^L = diag(w) (a - Y) / S``, ``S = sum_i w_i`` or ``n``). Here each evaluation copies
``theta`` into the backend's parameters, runs the backend's fused forward/backward over the
whole batch (or, with sample weights or the clipped log losses, its per-layer ops) and packs
the gradient on the device: only ``theta`` goes in and the flat gradient and the loss come out
per evaluation (on a GPU two transfers of ``n_params`` values of the model's dtype, plus the
scalar loss, each a synchronisation; the data and activations stay on the device). Sparse
``X`` is prepared once as the backend's :class:`~gpubp.backends.sparse.CsrBatch` (on a GPU,
uploaded once with its transpose; :mod:`gpubp.sklearn._solver`).

``max_iter`` bounds scipy's iterations (``maxiter``), ``max_fun`` its function evaluations
(``maxfun``) and ``tol`` its projected-gradient test (``gtol``); ``n_iter_`` is scipy's
iteration count (at most ``max_iter``), ``loss_`` its final ``f``, and scikit-learn's
``ConvergenceWarning`` is raised (by scikit-learn's own check) when scipy stops otherwise than
converged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy
import scipy.optimize
import scipy.sparse as sp
from sklearn.utils.optimize import _check_optimize_result

from ._solver import Network, as_input


class FullBatch:
    """``f(theta)`` and its gradient (see the module doc) of ``net`` on ``(X, y, sw)``.

    ``X`` ``(n, n_0)`` and the encoded targets ``y`` ``(n, n_out)`` (and the sample weights
    ``sw`` ``(n,)`` or None) are copied to the backend once.
    """

    def __init__(self, net: Network, X: np.ndarray, y: np.ndarray, sw: np.ndarray | None) -> None:
        be, dtype = net.backend, net.dtype
        self.net = net
        x = as_input(net, X)
        # sparse rows prepared once for the backend's products (uploaded once on a GPU)
        self.x = net.backend.sparse_batch(x, dtype) if sp.issparse(x) else x
        self.y = be.asarray(y, dtype)
        self.labels = be.asarray(np.argmax(y, axis=1)) if net.output == "softmax" else None
        self.sw = None if sw is None else be.asarray(sw, dtype)
        # (start, stop) of each W^l (as coefs_[l] = W^l.T, raveled) and each b^l in theta
        sizes = [W.size for W in net.W] + [b.size for b in net.b]
        ends = np.cumsum(sizes).tolist()
        self.slices = list(zip([0, *ends[:-1]], ends, strict=True))
        self.n_params = int(ends[-1])
        self.evaluations = 0

    def pack(self) -> np.ndarray:
        """``theta`` of the network's current parameters, scikit-learn's order, in the
        network's dtype (scipy evaluates in the dtype of the start)."""
        be, xp = self.net.backend, self.net.xp
        flat = xp.concatenate([W.T.ravel() for W in self.net.W] + list(self.net.b))
        return np.array(be.to_numpy(flat), copy=True)

    def unpack(self, theta: np.ndarray) -> None:
        """Copy ``theta`` into the network's parameters (one transfer to the backend)."""
        net = self.net
        t = net.backend.asarray(np.ascontiguousarray(theta), net.dtype)
        L = len(net.W)
        for W, (start, stop) in zip(net.W, self.slices[:L], strict=True):
            W[...] = t[start:stop].reshape(W.shape[1], W.shape[0]).T
        for b, (start, stop) in zip(net.b, self.slices[L:], strict=True):
            b[...] = t[start:stop]

    def split(self, theta: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(coefs_, intercepts_)`` of ``theta`` in scikit-learn's layout (copies, its dtype)."""
        L = len(self.net.W)
        coefs = [
            theta[start:stop].reshape(W.shape[1], W.shape[0]).copy()
            for W, (start, stop) in zip(self.net.W, self.slices[:L], strict=True)
        ]
        return coefs, [theta[start:stop].copy() for start, stop in self.slices[L:]]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """``(f(theta), grad f(theta))``, float and float64 ``(n_params,)``."""
        self.evaluations += 1
        net, xp = self.net, self.net.xp
        self.unpack(theta)
        value, dWs, dbs, l2 = net.loss_and_gradients(
            self.x, self.y, self.labels, self.sw, clipped=True
        )
        if l2:
            dWs = [dW + l2 * W for dW, W in zip(dWs, net.W, strict=True)]
        flat = xp.concatenate([dW.T.ravel() for dW in dWs] + list(dbs))
        grad = np.asarray(net.backend.to_numpy(flat), dtype=np.float64)
        return float(value), grad


def minimize(
    objective: FullBatch, max_iter: int, max_fun: int, tol: float, verbose: bool | int
) -> tuple[int, float, np.ndarray]:
    """Run scikit-learn's L-BFGS-B from the network's parameters, leave the network at scipy's
    answer; ``(n_iter_, loss_, theta)`` (scikit-learn's ``ConvergenceWarning`` when not
    converged), ``theta`` scipy's answer as it gives it (float64)."""
    iprint = 1 if verbose is True or verbose >= 1 else -1
    version = tuple(int(p) for p in scipy.__version__.split(".")[:2] if p.isdigit())
    options: dict[str, Any] = {"maxfun": max_fun, "maxiter": max_iter, "gtol": tol}
    if version < (1, 15):  # scipy 1.15 deprecated iprint (as scikit-learn passes it)
        options["iprint"] = iprint
    result = scipy.optimize.minimize(
        objective, objective.pack(), method="L-BFGS-B", jac=True, options=options
    )
    n_iter = int(_check_optimize_result("lbfgs", result, max_iter))
    objective.unpack(result.x)
    return n_iter, float(result.fun), np.asarray(result.x)
