"""The Numba backend: GEMMs from the fastest BLAS found with fused ``@njit`` kernels between
them (float32, float64).

Per layer the train step is three GEMMs (forward, backward, weight gradient) and, between them,
one pass over each GEMM output while it is still in cache:

- forward: ``z = a_prev @ W.T`` (GEMM), then ``a = f(z + b)`` in place (:func:`.kernels.bias_act`);
- output: loss value and ``delta^L`` in one pass per row, with ``db^L`` summed in that pass;
- backward: ``g = delta_next @ W_next`` (GEMM), then ``delta = g * f'(a)`` in place with
  ``db = sum over B of delta`` in the same pass;
- ``dW = delta.T @ a_prev`` (GEMM); then the checked update (:mod:`.update`): one write pass
  where a proof shows every new value finite, else the exact check pass first (nothing
  written; a non-finite new value rejects the step), all in the parameters' dtype.

The GEMMs call the provider of :mod:`.gemm` (MKL where installed, else NumPy's OpenBLAS) from
inside the kernels, so one layer is one call from Python, and the train step's whole backward
pass is one call (:func:`.layers.backprop`, in :mod:`.step`). Everything is written into a
per-batch-shape workspace, so a steady-state step allocates no arrays.

Threads (:mod:`.pool`). With MKL, its GEMMs and the parallel update kernels run on one GNU
OpenMP pool; the elementwise passes between the GEMMs are serial (at the batch sizes of a
training step they are a few microseconds each). A large batch (at least
:attr:`NumbaBackend.split_min_rows` rows per thread) is instead split by rows over Python
threads, each part running the whole pass on its rows with the BLAS at one thread
(:mod:`.split`). ``threads=n`` sets how many threads this backend's calls use (the BLAS's,
restored after each call, as with threadpoolctl; the parallel kernels'; the split's); the
default is the cores this process may run on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ... import activations as act
from ..._checks import positive_int
from ..base import Backend
from ..cores import usable_cores
from ..workspace import Workspace
from . import gemm as numba_blas
from . import kernels as K
from . import layers, pool
from . import optim_kernels as O
from .split import RowSplit
from .step import NumbaStep
from .steps import NumbaSteps
from .update import NumbaUpdate
from .workspace import NumbaWorkspace

_HIDDEN = {name: act.ACTIVATION_IDS[name] for name in act.HIDDEN_ACTIVATIONS}
_EMPTY_I64 = np.empty(0, dtype=np.int64)
_GRADIENT_OPS = ("forward_layer", "output_delta", "hidden_delta", "parameter_gradients")
#: Settings of the BLAS's threads that a default backend leaves alone.
_THREAD_VARIABLES = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


_local = threading.local()


class _ThreadScope:
    """The scope of :meth:`NumbaBackend._threads` (a class, not a generator: a step enters it
    once or twice, and a generator-based context costs a few microseconds each time)."""

    __slots__ = ("before", "threads")

    def __init__(self, threads: int | None) -> None:
        self.threads: int | None = threads
        self.before: int | None = None

    def __enter__(self) -> None:
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        n = self.threads
        if depth:
            return
        _local.current = pool.get_threads() if n is None else n
        if n is None:
            return
        if getattr(_local, "kernel_threads", None) != n:  # Numba's count is per thread
            pool.set_threads(n)
            _local.kernel_threads = n
        before = numba_blas.blas_threads()
        if before is not None and before != n:
            numba_blas.set_blas_threads(n)
            self.before = before

    def __exit__(self, *exc: object) -> None:
        _local.depth -= 1
        if self.before is not None:
            numba_blas.set_blas_threads(self.before)


class NumbaBackend(NumbaSteps, NumbaStep, RowSplit, NumbaUpdate, Backend):
    """NumPy arrays, GEMMs in the fastest BLAS found (:mod:`.gemm`), everything else in fused
    Numba kernels.

    Parameters
    ----------
    threads : int or None
        Threads for this backend's calls: the BLAS's (restored after each call), and how many
        share a large batch split by rows or an optimizer pass (1: never split). ``None``
        (default): the cores this process may run on (:func:`~gpubp.backends.cores.usable_cores`:
        its affinity and cgroup quota), unless ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` or
        ``OMP_NUM_THREADS`` is set, when the BLAS keeps that setting.
    """

    name: ClassVar[str] = "numba"
    xp = np
    workspace_class: ClassVar[type[Workspace]] = NumbaWorkspace

    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        if threads is not None and not positive_int(threads):
            raise ValueError(
                f"threads must be a positive int (BLAS threads) or None to leave BLAS as it is, "
                f"got {threads!r}"
            )
        #: Whether each step's thread count is tuned from the step times (:mod:`.tuner`):
        #: when no count was asked for, here or in the environment.
        self.adaptive_threads = False
        if threads is None and not any(os.environ.get(v) for v in _THREAD_VARIABLES):
            threads = usable_cores()
            self.adaptive_threads = True
        self.threads = None if threads is None else int(threads)
        #: Whether GEMMs run inside the kernels (a provider found) or through numpy.matmul.
        self.blas_in_kernels = numba_blas.AVAILABLE
        self.update_counts = {"proved": 0, "checked": 0}

    def _threads(self, n: int | None = None) -> _ThreadScope:
        """Inside, the GEMM provider and the parallel kernels use ``n`` threads (default
        :attr:`threads`; the provider's setting is put back after, the kernels' is this
        thread's own). Nested scopes of one thread do nothing: the outermost one set them."""
        return _ThreadScope(self.threads if n is None else n)

    def kernel_threads(self) -> int:
        """Threads the parallel kernels get: inside :meth:`_threads`, its count; else
        :attr:`threads`, or the pool's setting."""
        if getattr(_local, "depth", 0):
            return int(_local.current)
        return self.threads if self.threads is not None else pool.get_threads()

    # --- helpers ----------------------------------------------------------------------------

    def _own_ops(self, ops: tuple[str, ...]) -> bool:
        """Whether ``ops`` are this class's own: the fused compositions call kernels directly,
        so a subclass that overrides an op gets the generic composition, which calls its op."""
        cls = type(self)
        return cls is NumbaBackend or all(
            getattr(cls, op) is getattr(NumbaBackend, op) for op in ops
        )

    @staticmethod
    def _fits(dtype: Any, *arrays: Any) -> bool:
        """Whether every array is a C-contiguous NumPy array of ``dtype`` (a float dtype)."""
        if np.dtype(dtype) not in (np.float32, np.float64):
            return False
        return all(
            isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous for a in arrays
        )

    def _out(self, out: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        if out is None:
            return np.empty(shape, dtype=dtype)
        return out

    def _gemm(self, A: Any, B: Any, out: Any) -> Any:
        return np.matmul(A, B, out=out)

    # --- the ops ----------------------------------------------------------------------------

    def forward_layer(
        self, a_prev: Any, W: Any, b: Any, activation: str, *, out: Any = None, scratch: Any = None
    ) -> Any:
        """``a = f(a_prev @ W.T + b)``: ``(B, n_in) @ (n_out, n_in).T + (n_out,) -> (B, n_out)``.

        One GEMM into ``out``, then bias and activation in one pass over it.
        """
        dt = W.dtype
        out = self._out(out, (a_prev.shape[0], W.shape[0]), dt)
        if not self._fits(dt, a_prev, W, b, out) or activation not in act.ACTIVATION_IDS:
            return super().forward_layer(a_prev, W, b, activation, out=out, scratch=scratch)
        aid = act.ACTIVATION_IDS[activation]
        no_max = np.empty(0, dtype=dt)
        if self.blas_in_kernels:
            with self._threads():
                layers.forward_layer(a_prev, W, b, aid, out, no_max)
                return out
        np.matmul(a_prev, W.T, out=out)
        K.bias_act(out, b, aid, no_max)
        return out

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
        """``(delta^L, C)`` from ``z`` ``(B, n)`` and targets ``y`` in one pass per row.

        ``y`` is ``(B, n)`` targets or ``(B,)`` integer labels (one-hot rows, never built).
        Formulas as in :func:`gpubp.reference.output_delta`; ``out`` may be ``z`` (in place).
        """
        n = z.shape[1]
        out = self._out(out, z.shape, z.dtype)
        if not self._fits(z.dtype, z, out) or loss not in K.LOSS_IDS:
            return super().output_delta(z, y, output, loss, out=out, scratch=scratch, rowbuf=rowbuf)
        labels, Y = self._split_targets(y, n, z.dtype)
        value, _ = K.output_delta(
            z,
            Y,
            labels,
            act.ACTIVATION_IDS[output],
            K.LOSS_IDS[loss],
            out,
            np.empty(0, dtype=z.dtype),
            z.shape[0],
        )
        return out, value

    def _split_targets(
        self, y: Any, n: int, dtype: Any, ws: NumbaWorkspace | None = None
    ) -> tuple[Any, Any]:
        """``(labels, Y)``: int64 labels and an empty Y, or empty labels and ``(B, n)`` Y."""
        no_y = np.empty((0, 0), dtype=dtype) if ws is None else ws.no_y
        if y.ndim == 1 and y.dtype.kind in "iu" and n > 1:
            if y.dtype == np.int64 and y.flags.c_contiguous:
                return y, no_y
            if ws is None:
                return y.astype(np.int64), no_y
            ws.labels[...] = y
            return ws.labels, no_y
        y = y.reshape(y.shape[0], n)
        if y.dtype != dtype or not y.flags.c_contiguous:
            y = self._targets(y, n, dtype, out=None if ws is None else ws.y)
            y = np.ascontiguousarray(y)
        return _EMPTY_I64, y

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

        One GEMM into ``out``, then the Hadamard product with ``f'`` (from ``a``) in place.
        """
        dt = W_next.dtype
        out = self._out(out, a.shape, dt)
        if activation not in _HIDDEN or not self._fits(dt, delta_next, W_next, a, out):
            return super().hidden_delta(delta_next, W_next, a, activation, out=out, scratch=scratch)
        aid = _HIDDEN[activation]
        no_db = np.empty(0, dtype=dt)
        if self.blas_in_kernels:
            with self._threads():
                layers.hidden_delta(delta_next, W_next, a, aid, out, no_db, no_db)
                return out
        np.matmul(delta_next, W_next, out=out)
        K.dact_mul(out, a, aid, no_db, no_db)
        return out

    def parameter_gradients(
        self, delta: Any, a_prev: Any, *, dW: Any = None, db: Any = None
    ) -> tuple[Any, Any]:
        """``dW = delta.T @ a_prev`` ``(n_out, B) @ (B, n_in)``; ``db = sum over B of delta``."""
        dt = delta.dtype
        dW = self._out(dW, (delta.shape[1], a_prev.shape[1]), dt)
        db = self._out(db, (delta.shape[1],), dt)
        if not self._fits(dt, delta, a_prev, dW, db):
            return super().parameter_gradients(delta, a_prev, dW=dW, db=db)
        if self.blas_in_kernels:
            with self._threads():
                layers.weight_gradient(delta, a_prev, dW, 1.0, 0.0)
        else:
            np.matmul(delta.T, a_prev, out=dW)
        K.colsum(delta, db)
        return dW, db

    def sum_of_squares(self, arrays: Sequence[Any]) -> Any:
        """``sum_a sum_i a_i^2`` in float64, one kernel call per array: NumPy's ``vdot`` calls
        its BLAS, whose threads then spin beside the next step's."""
        if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
            return super().sum_of_squares(arrays)
        return float(sum(O.sumsq(a.reshape(-1), 0, a.size) for a in arrays))

    # --- compositions -----------------------------------------------------------------------

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

        One kernel call for the whole network where the one-call step applies (see
        :meth:`.step.NumbaStep._net_gradients`), else one per GEMM-and-pass; ``db`` is summed
        inside the passes that make each delta. The returned gradient arrays belong to the
        workspace: the next call overwrites them.
        """
        dt = weights[0].dtype
        if (
            not self._own_ops(_GRADIENT_OPS)
            or not self._fits(dt, *weights, *biases)
            or activation not in _HIDDEN
            or loss not in K.LOSS_IDS
        ):
            return super().gradients(weights, biases, x, y, activation, output, loss)
        one_call = self._net_gradients(weights, biases, x, y, activation, output, loss)
        if one_call is not None:
            return one_call
        with self._threads():
            parts = self._parts(x.shape[0])
            if parts > 1:
                staged = self._staged(weights, x, y)
                ids = (_HIDDEN[activation], act.ACTIVATION_IDS[output], K.LOSS_IDS[loss])
                value = self._split_gradients(weights, biases, staged, ids, parts)
                ws = staged[0]
                return value, ws.dW, ws.db
            return self._gradients(weights, biases, x, y, activation, output, loss)

    def _gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> tuple[Any, list[Any], list[Any]]:
        ws, _, value, _ = self._backprop(weights, biases, x, y, activation, output, loss, False)
        return value, ws.dW, ws.db

    def _staged(self, weights: list[Any], x: Any, y: Any) -> tuple[NumbaWorkspace, Any, Any, Any]:
        """``(ws, a0, labels, Y)``: this batch shape's workspace, ``x`` staged into it and the
        targets as :meth:`_split_targets` gives them."""
        ws = self.workspace_for(weights, x)
        assert isinstance(ws, NumbaWorkspace)
        a0 = self._stage(x, ws.a[0])
        labels, Y = self._split_targets(y, weights[-1].shape[0], weights[0].dtype, ws)
        return ws, a0, labels, Y

    def _backprop(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
        fold: bool,
        bound: bool = False,
    ) -> tuple[NumbaWorkspace, Any, float, list[float]]:
        """Forward, output delta and every delta (with ``db``) into the workspace.

        Without ``fold`` the weight gradients ``dW`` are computed too, each as soon as its
        delta exists; with ``fold`` they are not (the SGD step folds them into the weights
        later). With ``fold`` or ``bound`` the returned list holds, per layer ``i``, the bound
        ``B max|delta^{i+1}| max|a^i|`` on ``|dW^i|``, from maxima the passes take as they
        write (inf where an activation is not finite; a delta is finite wherever its ``db``
        column is), else zeros.
        """
        L = len(weights)
        ws, a0, labels, Y = self._staged(weights, x, y)
        aid = _HIDDEN[activation]
        acts = ws.a
        cm = ws.cm if fold or bound else ws.no_db
        in_kernels = self.blas_in_kernels
        amax = [K.absmax(a0, ws.cm) if fold or bound else 0.0]
        prev = a0
        for i in range(L - 1):
            if in_kernels:
                m = layers.forward_layer(prev, weights[i], biases[i], aid, acts[i + 1], cm)
            else:
                np.matmul(prev, weights[i].T, out=acts[i + 1])
                m = K.bias_act(acts[i + 1], biases[i], aid, cm)
            amax.append(m)
            prev = acts[i + 1]
        z = ws.z_out
        if in_kernels:
            layers.forward_layer(prev, weights[L - 1], biases[L - 1], 0, z, ws.no_db)
        else:
            np.matmul(prev, weights[L - 1].T, out=z)
            K.bias_act(z, biases[L - 1], 0, ws.no_db)
        oid = act.ACTIVATION_IDS[output]
        value, dmax = K.output_delta(z, Y, labels, oid, K.LOSS_IDS[loss], z, ws.db[L - 1], ws.batch)
        bounds = [0.0] * L
        B = float(ws.batch)
        delta = z
        for i in range(L - 1, -1, -1):
            a_prev = a0 if i == 0 else acts[i]
            bounds[i] = B * dmax * amax[i]
            if not fold:
                if in_kernels:
                    layers.weight_gradient(delta, a_prev, ws.dW[i], 1.0, 0.0)
                else:
                    np.matmul(delta.T, a_prev, out=ws.dW[i])
            if i > 0:
                # db[i - 1] is summed in the same pass that makes delta^i
                d = ws.d[i]
                if in_kernels:
                    dmax = layers.hidden_delta(delta, weights[i], a_prev, aid, d, ws.db[i - 1], cm)
                else:
                    np.matmul(delta, weights[i], out=d)
                    dmax = K.dact_mul(d, a_prev, aid, ws.db[i - 1], cm)
                delta = d
        return ws, a0, value, bounds

    def check_finite(self, value: Any, dWs: list[Any], dbs: list[Any]) -> None:
        """Raise :class:`NonFiniteLossError` if the loss or a gradient holds NaN or infinity."""
        finite = np.isfinite(float(value))
        if finite:
            for grads in (dWs, dbs):
                for g in grads:
                    if isinstance(g, np.ndarray) and g.dtype.kind == "f" and g.flags.c_contiguous:
                        if K.has_nonfinite(g):
                            finite = False
                            break
                    elif not np.isfinite(g).all():
                        finite = False
                        break
        if not finite:
            super().check_finite(value, dWs, dbs)  # raises, with the message naming the tensor
