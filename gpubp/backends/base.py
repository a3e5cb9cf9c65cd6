"""The backend protocol and a complete implementation written against an array module ``xp``.

Every backend offers the ops of :mod:`gpubp.reference`, with the same names and the same
positional arguments in the same order; a backend may add keyword-only arguments (buffers to
write into). A test checks this for every backend.

Unlike the reference, backend ops may write their results into buffers they are given
(``out=``, ``dW=``, ...) and the update ops change the parameters and optimizer state in place;
every op still returns its results, so callers use the return values and never care which.

:class:`Backend` is complete: a new backend sets ``xp`` (NumPy, CuPy, ...) and overrides only
the ops it makes faster, falling back to ``super()`` for anything it does not handle.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .. import activations as act
from ..errors import NonFiniteLossError
from .sparse import SparseOps
from .update import UpdateOps
from .workspace import Workspace

#: The op names every backend offers, in the order the reference defines them.
OPS: tuple[str, ...] = (
    "forward_layer",
    "output_delta",
    "hidden_delta",
    "parameter_gradients",
    "sgd_update",
    "adam_update",
    "forward",
    "gradients",
    "update_parameters",
    "train_step",
)

SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "float64")


class Backend(SparseOps, UpdateOps):
    """Backpropagation ops on the array module ``xp``; subclasses set ``name`` and ``xp``.

    Attributes
    ----------
    name : str
        The one word a user passes as ``backend=``.
    xp : module
        The array module (``numpy``, ``cupy``) every op is written against.
    """

    name: ClassVar[str] = "base"
    xp: Any = np
    max_workspaces: ClassVar[int] = 4
    #: The buffers one batch shape needs; a backend may add its own in a subclass.
    workspace_class: ClassVar[type[Workspace]] = Workspace

    def __init__(self) -> None:
        self._workspaces: OrderedDict[tuple[Any, ...], Workspace] = OrderedDict()
        self._stagings = OrderedDict()

    def __repr__(self) -> str:
        return f"<gpubp backend {self.name!r}>"

    # --- arrays -----------------------------------------------------------------------------

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` as an array of this backend (a copy only where needed)."""
        return self.xp.asarray(x, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.xp.zeros(shape, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        """A NumPy array with the values of ``a`` (no copy for NumPy input)."""
        return np.asarray(a)

    def owns(self, a: Any) -> bool:
        """Whether ``a`` is already an array of this backend."""
        return isinstance(a, self.xp.ndarray)

    def synchronize(self) -> None:
        """Wait until queued work is done (a no-op on the CPU)."""

    def capture_report(self, since: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Whether the train steps ran as CUDA graphs (``None``: this backend has none; see
        :meth:`gpubp.backends.cuda.CupyBackend.capture_report`)."""
        return None

    def argmax_correct(self, a: Any, y: Any = None) -> tuple[Any, Any]:
        """``(pred, correct)``: the argmax of each row of ``a`` ``(B, n)`` (NumPy's rule: the
        first maximum, a NaN counts as the maximum) and, with targets ``y`` (``(B,)`` labels or
        ``(B, n)`` rows, compared by their argmax), the number of rows predicted right as a
        backend scalar (``None`` without ``y``)."""
        xp = self.xp
        pred = xp.argmax(a, axis=1)
        if y is None:
            return pred, None
        truth = y if y.ndim == 1 else xp.argmax(y, axis=1)
        return pred, xp.sum(pred == truth)

    def threshold_correct(self, a: Any, y: Any) -> Any:
        """Number of elements with ``(a > 0.5) == (y > 0.5)`` (sigmoid + BCE), a backend scalar."""
        return self.xp.sum((a > 0.5) == (y.reshape(a.shape) > 0.5))

    def read_losses(self, values: Sequence[Any]) -> list[float]:
        """The losses returned by :meth:`train_step`, as floats.

        A synchronisation point on a GPU (one transfer, whatever the number of values), where a
        deferred :class:`~gpubp.errors.NonFiniteLossError` is raised.
        """
        return [float(v) for v in values]

    def workspace_for(self, weights: list[Any], x: Any) -> Workspace:
        """The workspace for this network and ``x``'s batch size."""
        sizes = (weights[0].shape[1], *(W.shape[0] for W in weights))
        return self.workspace(sizes, x.shape[0], weights[0].dtype)

    def workspace(self, sizes: tuple[int, ...], batch: int, dtype: Any) -> Workspace:
        """The buffers for one batch shape, made once and reused (least recently used kept)."""
        key = (tuple(sizes), int(batch), np.dtype(dtype).str)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self.workspace_class(self.xp, tuple(sizes), batch, dtype)
            self._workspaces[key] = ws
            while len(self._workspaces) > self.max_workspaces:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(key)
        return ws

    def open_loss_sum(self, total: float) -> Any:
        """A running total of the next train steps' ``rows * loss`` kept where the steps run,
        starting at ``total``, or ``None`` (the default: the host sums
        the losses it reads). A backend's total has ``holds(value, rows)``, whether the step
        that returned ``value`` added to it, and ``read()``; :class:`gpubp.loop.LossSum` uses it."""
        return None

    def batch_buffers(
        self, x_shape: tuple[int, ...], x_dtype: Any, y_shape: tuple[int, ...], y_dtype: Any
    ) -> tuple[Any, Any]:
        """Two arrays of ``xp`` that a batch gather (:class:`gpubp.gather.BatchGather`) fills
        step after step: ``x_shape`` rows of inputs and ``y_shape`` rows of targets. A backend
        whose train step has input buffers of its own may hand out those (the CuPy backend's
        graph step reads them in place, with no staging copy)."""
        return self.xp.empty(x_shape, dtype=x_dtype), self.xp.empty(y_shape, dtype=y_dtype)

    def sum_of_squares(self, arrays: Sequence[Any]) -> Any:
        """``sum_a sum_i a_i^2`` over ``arrays`` (an L2 penalty's ``||W||^2``), a backend
        scalar, unread (on a GPU it stays on the device)."""
        return sum(self.xp.vdot(a, a) for a in arrays)

    def train_steps(
        self,
        weights: list[Any],
        biases: list[Any],
        X: Any,
        y: Any,
        order: Any,
        start: int,
        count: int,
        batch: int,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        state: dict[str, Any],
        lrs: list[float],
    ) -> list[float] | None:
        """Up to ``count`` training steps on the batches ``order[start + s batch : start + (s +
        1) batch]`` of the whole set ``(X, y)`` (as checked for a fit), step ``s`` at learning
        rate ``lrs[s]``, taken together where this backend can (its losses, as floats); the
        steps not taken are left to :meth:`train_step`, one by one. None: this backend takes
        none of these steps together, now or later (this class never does)."""
        return None

    # --- the ops ----------------------------------------------------------------------------

    def forward_layer(
        self, a_prev: Any, W: Any, b: Any, activation: str, *, out: Any = None, scratch: Any = None
    ) -> Any:
        """``a = f(a_prev @ W.T + b)``: ``(B, n_in) @ (n_out, n_in).T + (n_out,) -> (B, n_out)``.

        Bias and activation are applied in place on the GEMM output ``out``.
        """
        xp = self.xp
        z = xp.matmul(a_prev, W.T, out=out)
        z += b
        return act.apply_inplace(xp, z, activation, scratch)

    def output_delta(
        self,
        z: Any,
        y: Any,
        output: str,
        loss: str,
        *,
        out: Any = None,
        scratch: Any = None,
        rowbuf: Any = None,
    ) -> tuple[Any, Any]:
        """``(delta^L, C)`` from the output pre-activation ``z`` ``(B, n)`` and targets ``y``.

        ``y`` is ``(B, n)`` targets or, for classification, ``(B,)`` integer labels. Formulas as
        in :func:`gpubp.reference.output_delta`. ``out`` may be ``z`` itself (in place).
        ``scratch`` is ``(B, n)`` and ``rowbuf`` ``(B, 1)``, both optional.
        """
        xp = self.xp
        B, n = z.shape
        Y = self._targets(y, n, z.dtype)
        if out is None:
            out = xp.empty_like(z)
        s = xp.empty_like(z) if scratch is None else scratch
        rb = xp.empty((B, 1), dtype=z.dtype) if rowbuf is None else rowbuf
        if loss == "cross_entropy":
            # C = 1/B sum_rows [logsumexp(z) - Y.z] (rows of Y sum to 1); delta = (softmax - Y)/B
            xp.max(z, axis=1, keepdims=True, out=rb)
            xp.subtract(z, rb, out=out)  # shifted logits; overwrites z when out is z
            yz = xp.vdot(Y, out)
            xp.exp(out, out=out)
            xp.sum(out, axis=1, keepdims=True, out=rb)
            out /= rb
            xp.log(rb, out=rb)
            value = (xp.sum(rb) - yz) / B
            out -= Y
            out *= 1.0 / B
            return out, value
        if loss == "binary_cross_entropy":
            # C = 1/B sum [softplus(z) - Y z]; softplus(z) = max(z, 0) + log1p(exp(-|z|))
            xp.abs(z, out=s)
            xp.negative(s, out=s)
            xp.exp(s, out=s)
            xp.log1p(s, out=s)
            value = xp.sum(s) - xp.vdot(Y, z)
            xp.maximum(z, 0, out=s)
            value = (value + xp.sum(s)) / B
            if out is not z:
                out[...] = z
            act.apply_inplace(xp, out, "sigmoid")
            out -= Y
            out *= 1.0 / B
            return out, value
        if loss == "poisson":
            # C = 1/B sum [Y log Y - Y z - Y + exp(z)] (0 log 0 = 0), delta = (exp(z) - Y) / B
            s[...] = xp.where(Y > 0, Y, 1)
            xp.log(s, out=s)
            s *= Y  # Y log Y, 0 where Y = 0
            value = xp.sum(s) - xp.vdot(Y, z) - xp.sum(Y)
            if out is not z:
                out[...] = z
            with np.errstate(over="ignore"):
                xp.exp(out, out=out)
            value = (value + xp.sum(out)) / B
            out -= Y
            out *= 1.0 / B
            return out, value
        # mse: C = 1/(2B) ||a - Y||^2, delta = J_f^T (a - Y) / B
        if out is not z:
            out[...] = z
        act.apply_inplace(xp, out, output, s)
        xp.subtract(out, Y, out=s)  # r = a - Y
        value = xp.vdot(s, s) / (2 * B)
        s *= 1.0 / B  # g = r / B
        self._mul_output_jacobian(out, s, output, rb)
        return out, value

    def _mul_output_jacobian(self, a: Any, g: Any, output: str, rowbuf: Any) -> None:
        """Overwrite ``a`` (``f(z)``) with ``J_f(z)^T g``; ``g`` is used as scratch."""
        xp = self.xp
        if output == "identity":
            a[...] = g
        elif output == "softmax":
            # a * (g - sum_j g_j a_j)  =  g a - a (sum_j g_j a_j)
            g *= a
            xp.sum(g, axis=1, keepdims=True, out=rowbuf)
            a *= rowbuf
            xp.subtract(g, a, out=a)
        elif output == "relu":
            xp.greater(a, 0, out=a)
            a *= g
        elif output == "tanh":
            a *= a
            xp.subtract(1.0, a, out=a)
            a *= g
        elif output == "sigmoid":
            g *= a
            xp.subtract(1.0, a, out=a)
            a *= g
        else:  # pragma: no cover - validated at construction
            raise ValueError(f"output {output!r} is not supported")

    def _targets(
        self, y: Any, n: int, dtype: Any, out: Any = None, ws: Workspace | None = None
    ) -> Any:
        """``(B, n)`` targets of ``dtype``; ``(B,)`` integer labels become one-hot rows."""
        xp = self.xp
        if y.ndim == 1 and y.dtype.kind in "iu" and n > 1:
            B = y.shape[0]
            Y = xp.empty((B, n), dtype=dtype) if out is None else out
            Y.fill(0)
            if ws is not None:
                idx = ws.flat_idx
                xp.multiply(ws.rows, n, out=idx)
                idx += y
            else:
                idx = xp.arange(B, dtype=np.int64) * n + y
            xp.put(Y.reshape(-1), idx, 1)
            return Y
        y = y.reshape(y.shape[0], n)
        if out is None:
            return y if y.dtype == dtype else y.astype(dtype)
        out[...] = y
        return out

    def hidden_delta(
        self,
        delta_next: Any,
        W_next: Any,
        a: Any,
        activation: str,
        *,
        out: Any = None,
        scratch: Any = None,
    ) -> Any:
        """``delta = (delta_next @ W_next) * f'(a)``: ``(B, n_next) @ (n_next, n) -> (B, n)``.

        The Hadamard product is applied in place on the GEMM output ``out``.
        """
        g = self.xp.matmul(delta_next, W_next, out=out)
        return act.derivative_mul_inplace(self.xp, g, a, activation, scratch)

    def parameter_gradients(
        self, delta: Any, a_prev: Any, *, dW: Any = None, db: Any = None
    ) -> tuple[Any, Any]:
        """``dW = delta.T @ a_prev`` ``(n_out, B) @ (B, n_in)``; ``db = sum over B of delta``."""
        xp = self.xp
        return xp.matmul(delta.T, a_prev, out=dW), xp.sum(delta, axis=0, out=db)

    # --- compositions -----------------------------------------------------------------------

    def forward(
        self, weights: list[Any], biases: list[Any], x: Any, activation: str, output: str
    ) -> Any:
        """Network output ``a^L`` ``(B, n_L)`` for ``x`` ``(B, n_0)`` (allocates; for inference)."""
        a = x
        L = len(weights)
        for i in range(L):
            a = self.forward_layer(a, weights[i], biases[i], activation if i < L - 1 else output)
        return a

    def gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> tuple[Any, list[Any], list[Any]]:
        """``(C, dWs, dbs)`` by backpropagation into this batch shape's workspace buffers.

        The returned gradient arrays belong to the workspace: the next call overwrites them.
        """
        L = len(weights)
        ws = self.workspace_for(weights, x)
        B = ws.batch
        sizes = (weights[0].shape[1], *(W.shape[0] for W in weights))
        a0 = self._stage(x, ws.a[0])
        Y = self._targets(y, sizes[-1], weights[0].dtype, out=ws.y, ws=ws)
        acts = [a0]
        for i in range(L - 1):
            acts.append(
                self.forward_layer(
                    acts[i],
                    weights[i],
                    biases[i],
                    activation,
                    out=ws.a[i + 1],
                    scratch=ws.scratch_like((B, sizes[i + 1])),
                )
            )
        z = self.forward_layer(acts[L - 1], weights[L - 1], biases[L - 1], "identity", out=ws.z_out)
        delta, value = self.output_delta(
            z, Y, output, loss, out=z, scratch=ws.scratch_like(z.shape), rowbuf=ws.rowbuf
        )
        for i in range(L - 1, -1, -1):
            self.parameter_gradients(delta, acts[i], dW=ws.dW[i], db=ws.db[i])
            if i > 0:
                delta = self.hidden_delta(
                    delta,
                    weights[i],
                    acts[i],
                    activation,
                    out=ws.d[i],
                    scratch=ws.scratch_like((B, sizes[i])),
                )
        return value, ws.dW, ws.db

    def _stage(self, x: Any, buf: Any) -> Any:
        """``x`` itself if it is a C-contiguous array of the right dtype, else a copy in ``buf``."""
        if self.owns(x) and x.dtype == buf.dtype and x.flags.c_contiguous:
            return x
        buf[...] = x
        return buf

    def apply_update(
        self,
        value: Any,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """The step after the gradients: the loss ``value`` must be finite, then
        :meth:`checked_update`; ``(params, state)``, updated in place.

        ``params`` and ``grads`` are in the order ``W^1..W^L, b^1..b^L``. If the loss, a
        gradient, a new parameter or a new optimizer state value is not finite,
        :class:`~gpubp.errors.NonFiniteLossError` is raised and nothing is changed.
        """
        self.check_loss(value)
        return self.checked_update(value, params, grads, optimizer, state, scratch=scratch)

    def train_step(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        state: dict[str, Any],
    ) -> tuple[Any, list[Any], list[Any], dict[str, Any]]:
        """:meth:`gradients` then :meth:`apply_update`; ``(C, weights, biases, state)``, updated
        in place.

        All gradients are computed before anything is updated; if the loss, any gradient or
        any new parameter or state value is not finite,
        :class:`~gpubp.errors.NonFiniteLossError` is raised and the parameters and optimizer
        state are left exactly as they were. (A GPU backend may raise it at its next
        synchronisation point instead: :meth:`synchronize`, ``float(C)``, ``to_numpy``.) A
        backend that fuses the step overrides this method as a whole.
        """
        value, dWs, dbs = self.gradients(weights, biases, x, y, activation, output, loss)
        scratch = self.workspace_for(weights, x).pscratch
        self.apply_update(
            value, [*weights, *biases], [*dWs, *dbs], optimizer, state, scratch=scratch
        )
        return value, weights, biases, state

    def check_loss(self, value: Any) -> None:
        """Raise :class:`NonFiniteLossError` if the loss ``value`` is NaN or infinite."""
        if not math.isfinite(float(value)):
            raise NonFiniteLossError(
                f"the loss is {float(value)} (not finite); the step was skipped and the "
                "parameters kept. Lower the learning rate, or check the inputs for huge values"
            )

    def check_finite(self, value: Any, dWs: list[Any], dbs: list[Any]) -> None:
        """Raise :class:`NonFiniteLossError` if the loss or a gradient holds NaN or infinity."""
        xp = self.xp
        self.check_loss(value)
        for kind, grads in (("dW", dWs), ("db", dbs)):
            for i, g in enumerate(grads):
                # one reduction per tensor; a NaN or inf anywhere makes the sum non-finite, and a
                # finite-but-overflowing sum is confirmed elementwise before raising
                if not math.isfinite(float(xp.sum(g))) and not bool(xp.isfinite(g).all()):
                    raise NonFiniteLossError(
                        f"the gradient {kind}[{i}] holds NaN or infinity although the loss is "
                        f"{float(value):.6g}; the step was skipped and the parameters kept. Lower "
                        "the learning rate or scale the inputs"
                    )
