"""The CuPy backend: the ops on CuPy arrays, through cuBLAS and gpubp's own CUDA kernels.

Importing this module needs neither CuPy nor a GPU; the cupy module is obtained (by
:func:`gpubp.backends.cuda.cupy_module.import_cupy`, or given) when a :class:`CupyBackend` is
made, and each kernel family (``kernels/*.cu``) is compiled by NVRTC through ``cupy.RawModule``
the first time one of its kernels is used, once per device (CuPy also keeps the cubins in its
on-disk cache). GEMMs go through gpubp's own cuBLAS handle (:mod:`.cublas`), one per device and
thread, so that the train step can be captured as a CUDA graph (:mod:`.graph`, kept per batch
shape by :mod:`.steps`); the device state both share is :mod:`.context`.

With ``fold_sgd=True``, plain SGD folds the weight update into the gradient GEMM. It is off by
default: the guard then checks the loss, activations and deltas but cannot see a gradient that
overflows inside the GEMM itself (finite factors whose product exceeds the float range), which
would reach ``W`` as inf.

Non-finite values: kernels set a sticky device flag when an activation, delta, loss or gradient is
NaN or infinite; the update kernels then skip themselves (and the folded GEMM sees zeroed deltas),
so no host synchronisation is needed per step. :class:`NonFiniteLossError` is raised at the next
synchronisation point (the loss's ``float()``, :meth:`CupyBackend.synchronize`, ``to_numpy``),
with the parameters and optimizer state of the last good step (:mod:`.status`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..base import Backend
from . import catalogue as ck
from . import launch
from .context import DeviceContext
from .cublas import Cublas
from .cupy_module import import_cupy
from .graph import StepBuffers
from .inputs import GatheredInputs
from .memory import out_of_memory_error
from .sparse import CudaSparseOps
from .status import DeviceLoss, DeviceLossSum, LossLedger, StepErrors
from .steps import StepCache
from .update import CudaUpdateOps, UpdateTables

#: The environment variable that turns CUDA graphs off (``0``) or makes them required.
GRAPHS_ENV = "GPUBP_CUDA_GRAPHS"
_GRAPHS_WORDS = {"0": "off", "false": "off", "off": "off", "1": "on", "true": "on", "on": "on",
                 "require": "require"}  # fmt: skip


def graphs_mode(graphs: bool | str | None) -> str:
    """``"off"``, ``"on"`` or ``"require"`` for the ``graphs`` argument (``None``: from
    ``GPUBP_CUDA_GRAPHS``, default on). :class:`ValueError` names a value it cannot read."""
    if graphs is None:
        value = os.environ.get(GRAPHS_ENV, "1").strip().lower()
        if value not in _GRAPHS_WORDS:
            raise ValueError(
                f"{GRAPHS_ENV}={value!r} is not understood; expected 0 (eager steps), 1 (graphs "
                "where they can be captured, the default) or require (a failed capture is an error)"
            )
        return _GRAPHS_WORDS[value]
    if isinstance(graphs, str):
        if graphs != "require":
            raise ValueError(f"graphs={graphs!r}: expected True, False or 'require'")
        return "require"
    return "on" if graphs else "off"


class CupyBackend(CudaSparseOps, CudaUpdateOps, Backend):
    """cuBLAS GEMMs, fused CUDA kernels and a CUDA-graph train step on an NVIDIA GPU.

    Parameters
    ----------
    tf32 : bool
        Allow TF32 tensor-core math in float32 GEMMs (about 10 mantissa bits; off by default, so
        float32 results meet the same tolerance as on the CPU).
    graphs : bool or "require"
        Capture the train step as a CUDA graph (default; the environment variable
        ``GPUBP_CUDA_GRAPHS=0`` turns it off). Without, the same kernels run eagerly. A step
        that cannot be captured runs eagerly with a warning, or, with ``"require"``
        (``GPUBP_CUDA_GRAPHS=require``), raises :class:`~gpubp.errors.GraphCaptureError`
        naming the call that broke the capture. :meth:`capture_report` says what happened.
    fold_sgd : bool
        Fold plain SGD's weight update into the gradient GEMM (``dW`` never materialised; saves
        one write and two reads of the weights' size per step). Off by default because an
        overflow inside that GEMM is not caught before it reaches the weights (see the module
        docstring).
    cupy : module, optional
        The cupy module to use: by default ``cupy``, or the module ``GPUBP_CUPY_MODULE`` names
        (:func:`gpubp.backends.cuda.cupy_module.import_cupy`); a stand-in that behaves like
        ``cupy`` may be given instead.
    """

    name: ClassVar[str] = "cupy"

    def __init__(
        self,
        tf32: bool = False,
        graphs: bool | str | None = None,
        fold_sgd: bool = False,
        cupy: Any = None,
    ) -> None:
        super().__init__()
        cupy = import_cupy() if cupy is None else cupy
        self.xp = cupy
        self._cp = cupy
        self._ctx = DeviceContext(cupy, tf32)
        mode = graphs_mode(graphs)
        self.graphs = mode != "off"
        self.fold_sgd = bool(fold_sgd)
        self._ledgers: dict[tuple[int, str], LossLedger] = {}
        self._loss_sum: DeviceLossSum | None = None  # the open one, where the steps add
        self._inputs = GatheredInputs(cupy)  # the gathers' buffers a step reads in place
        self._errors = StepErrors(self._ctx)
        self._tables = UpdateTables(self._ctx)  # the updates outside the graph (.update)
        self._steps = StepCache(
            self._ctx, self.kernel, self._allocate, graphs=mode, fold_sgd=self.fold_sgd
        )

    @property
    def tf32(self) -> bool:
        """Whether float32 GEMMs may use TF32 tensor-core math."""
        return self._ctx.tf32

    @tf32.setter
    def tf32(self, value: bool) -> None:
        self._ctx.tf32 = bool(value)

    # --- device state -------------------------------------------------------------------------

    def kernel(self, name: str) -> Any:
        """The compiled kernel ``name`` (a catalogue instantiation) on the current device.

        The ``kernels`` getter that the wrappers of :mod:`gpubp.backends.cuda.launch` take.
        """
        return self._ctx.kernel(name)

    def cublas(self) -> Cublas:
        """gpubp's cuBLAS handle for the current device, on the current stream."""
        return self._ctx.cublas()

    def constants(self, dtype: Any) -> Any:
        """A device hyper-parameter block holding only the GEMM constants ``ONE`` and ``ZERO``."""
        return self._ctx.constants(dtype)

    def scratch_status(self) -> Any:
        """The status word of the ops outside a train step.

        Its STATUS_BAD flag is not an error (a stand-alone op returns NaN as NumPy does; only a
        train step must refuse to update); its STATUS_LAUNCH flag, an internal error, is read at
        the next synchronisation like the train steps' word.
        """
        return self._ctx.device().scratch_status

    def check_status(self) -> None:
        """Look at the train steps' status word (a synchronisation) and raise what it holds.

        Raises :class:`NonFiniteLossError` if a queued step met a NaN or infinity; its update
        and those of the steps queued after it were skipped, and their optimizer step counts are
        taken back, so parameters and state are those of the last good step.
        """
        self._errors.check()

    def synchronize(self) -> None:
        """Wait for the queued work; raise what the train steps' status word holds."""
        self._cp.cuda.get_current_stream().synchronize()
        self.check_status()

    def read_losses(self, values: Sequence[Any]) -> list[float]:
        """The losses of queued train steps, read in one device-to-host transfer."""
        if not values or not all(isinstance(v, DeviceLoss) for v in values):
            return super().read_losses(values)
        self.check_status()  # a deferred NonFiniteLossError surfaces here, as at float()
        host = self._cp.stack([v.value for v in values]).get()
        return [float(v) for v in host]

    def to_numpy(self, a: Any) -> np.ndarray:
        if isinstance(a, self._cp.ndarray):
            out = np.asarray(a.get())
            self.check_status()
            return out
        return np.asarray(a)

    def capture_report(self, since: dict[str, Any] | None = None) -> dict[str, Any]:
        """Whether this backend's train steps ran as CUDA graphs, and why not if they did not.

        ``{"mode", "captured", "graph_steps", "eager_steps", "failures"}`` plus ``"why_not"``
        when ``captured`` is false (see :class:`gpubp.backends.cuda.graph.CaptureLog`); over
        the backend's life, or the steps after ``since`` (an earlier report).
        """
        log = self._steps.log
        return log.report() if since is None else log.since(since)

    def batch_buffers(
        self, x_shape: tuple[int, ...], x_dtype: Any, y_shape: tuple[int, ...], y_dtype: Any
    ) -> tuple[Any, Any]:
        """A batch gather's device buffers, which a train step on a batch gathered there reads
        in place (its input buffers: no staging copy per step)."""
        return self._inputs.register(*super().batch_buffers(x_shape, x_dtype, y_shape, y_dtype))

    # --- checks ---------------------------------------------------------------------------------

    def _fits(self, *arrays: Any) -> bool:
        """Whether the kernel path can take these arrays (CuPy, C-contiguous, one float dtype)."""
        cp = self._cp
        dt = None
        for a in arrays:
            if a is None:
                continue
            if not isinstance(a, cp.ndarray) or not a.flags.c_contiguous:
                return False
            if dt is None:
                dt = a.dtype
            if a.dtype != dt or dt.name not in ck.CUDA_TYPES:
                return False
        return True

    def _labels_or_dense(self, y: Any, n: int, dtype: Any) -> tuple[Any, Any]:
        """``(dense targets or None, int64 labels or None)`` as the output kernels take them."""
        cp = self._cp
        y = cp.asarray(y)
        if y.ndim == 1 and y.dtype.kind in "iu" and n > 1:
            return None, cp.ascontiguousarray(y, dtype=np.int64)
        Y = cp.ascontiguousarray(y.reshape(y.shape[0], n), dtype=dtype)
        return Y, None

    # --- the ops --------------------------------------------------------------------------------

    def forward_layer(
        self, a_prev: Any, W: Any, b: Any, activation: str, *, out: Any = None, scratch: Any = None
    ) -> Any:
        """``a = f(a_prev @ W.T + b)``: ``(B, n_in) @ (n_out, n_in).T + (n_out,) -> (B, n_out)``.

        cuBLAS writes the GEMM into ``out``; one kernel adds the bias and applies ``f`` in place.
        """
        if not self._fits(a_prev, W, b, out) or a_prev.ndim != 2:
            return super().forward_layer(a_prev, W, b, activation, out=out, scratch=scratch)
        if out is None:
            out = self._cp.empty((a_prev.shape[0], W.shape[0]), dtype=W.dtype)
        self._ctx.gemm(False, True, a_prev, W, out, "ONE", "ZERO", self.constants(W.dtype))
        launch.bias_activation(self.kernel, out, b, activation, self.scratch_status())
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
        """``(delta^L, C)`` from ``z`` ``(B, n)`` in one row kernel plus a fixed-order sum."""
        if not self._fits(z, out) or z.ndim != 2:
            return super().output_delta(z, y, output, loss, out=out, scratch=scratch, rowbuf=rowbuf)
        cp = self._cp
        rows, n = z.shape
        Y, labels = self._labels_or_dense(y, n, z.dtype)
        if out is None:
            out = cp.empty_like(z)
        if out is not z:
            out[...] = z
        value = cp.empty(1, dtype=z.dtype)
        row_loss = cp.empty(rows, dtype=z.dtype)
        launch.output_layer(
            self.kernel, out, None, Y, labels, output, loss, row_loss, value,
            self.scratch_status(), partial=cp.empty(ck.LOSS_PARTS, dtype=np.float64),
        )  # fmt: skip
        return out, value.reshape(())

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
        """``delta = (delta_next @ W_next) * f'(a)``: ``(B, n_next) @ (n_next, n) -> (B, n)``."""
        if not self._fits(delta_next, W_next, a, out):
            return super().hidden_delta(delta_next, W_next, a, activation, out=out, scratch=scratch)
        if out is None:
            out = self._cp.empty_like(a)
        self._ctx.gemm(
            False, False, delta_next, W_next, out, "ONE", "ZERO", self.constants(a.dtype)
        )
        launch.hidden_delta(self.kernel, out, a, activation, self.scratch_status())
        return out

    def parameter_gradients(
        self, delta: Any, a_prev: Any, *, dW: Any = None, db: Any = None
    ) -> tuple[Any, Any]:
        """``dW = delta.T @ a_prev`` ``(n_out, B) @ (B, n_in)``; ``db = sum over B of delta``."""
        if not self._fits(delta, a_prev, dW, db):
            return super().parameter_gradients(delta, a_prev, dW=dW, db=db)
        cp = self._cp
        rows, n = delta.shape
        if dW is None:
            dW = cp.empty((n, a_prev.shape[1]), dtype=delta.dtype)
        if db is None:
            db = cp.empty(n, dtype=delta.dtype)
        consts = self.constants(delta.dtype)
        self._ctx.gemm(True, False, delta, a_prev, dW, "ONE", "ZERO", consts)
        plan = ck.bias_grad_plan(rows, n)
        partial = cp.empty(plan[0] * n, dtype=np.float64)
        launch.bias_grad(self.kernel, delta, db, partial, plan, self.scratch_status())
        return dW, db

    # --- evaluation -------------------------------------------------------------------------------

    def argmax_correct(self, a: Any, y: Any = None) -> tuple[Any, Any]:
        """``(pred, correct)``: the argmax of each row of ``a`` ``(B, n)`` (NumPy's rule: first
        maximum, NaN counts as the maximum) and, with targets ``y`` (``(B,)`` labels or
        ``(B, n)`` rows, compared by their argmax), the number of rows predicted right, as a
        device integer (``None`` without ``y``).
        """
        cp = self._cp
        a = cp.ascontiguousarray(a)
        rows = a.shape[0]
        pred = cp.empty(rows, dtype=np.int64)
        correct = cp.zeros(1, dtype=np.uint64)
        Y, labels = None, None
        if y is not None:
            y = cp.asarray(y)
            if y.ndim == 1:
                labels = cp.ascontiguousarray(y, dtype=np.int64)
            else:
                Y = cp.ascontiguousarray(y, dtype=a.dtype)
        launch.argmax_accuracy(self.kernel, a, Y, labels, pred, correct, self.scratch_status())
        return pred, (None if y is None else correct[0])

    def threshold_correct(self, a: Any, y: Any) -> Any:
        """Number of elements with ``(a > 0.5) == (y > 0.5)`` (sigmoid + BCE), on the device."""
        cp = self._cp
        a = cp.ascontiguousarray(a)
        y = cp.ascontiguousarray(cp.asarray(y), dtype=a.dtype).reshape(a.shape)
        correct = cp.zeros(1, dtype=np.uint64)
        launch.threshold_accuracy(self.kernel, a, y, correct)
        return correct[0]

    # --- compositions -----------------------------------------------------------------------------

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
        """``(C, dWs, dbs)`` by the train step's kernels, without the update (run eagerly)."""
        if not self._fits(*weights, *biases):
            return super().gradients(weights, biases, x, y, activation, output, loss)
        step = self._gradient_step(weights, biases, x, y, (activation, output, loss))
        value = self._cp.empty((), dtype=weights[0].dtype)
        value[...] = step.buf.loss[0]
        return value, step.buf.ws.dW, step.buf.ws.db

    def _gradient_step(
        self, weights: list[Any], biases: list[Any], x: Any, y: Any, spec: tuple[str, str, str]
    ) -> Any:
        """The gradients-only step for these arrays, run eagerly: its buffers hold ``C``
        (``buf.loss[0]``), ``dW`` and ``db`` (``buf.ws``)."""
        x, y = self._cp.asarray(x), self._cp.asarray(y)
        inputs = self._inputs.of(x, y, weights[0].dtype, weights[-1].shape[0])  # a gather's
        step = self._steps.get(weights, biases, x, y, *spec, None, None, inputs)
        step.stage(x, y)  # nothing to copy where the step reads the gather's buffers
        step.record(self.scratch_status())
        return step

    def shard_gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        spec: tuple[str, str, str],
        share: float,
        grads: list[Any],
        loss_out: Any,
    ) -> None:
        """:meth:`~gpubp.backends.update.UpdateOps.shard_gradients` from the step's buffers:
        one multiply per tensor into ``grads`` and one for the loss (no allocation, no copy of
        the loss first); the same numbers."""
        if not self._fits(*weights, *biases, *grads):
            return super().shard_gradients(weights, biases, x, y, spec, share, grads, loss_out)
        step = self._gradient_step(weights, biases, x, y, spec)
        cp = self._cp
        for dst, g in zip(grads, [*step.buf.ws.dW, *step.buf.ws.db]):
            cp.multiply(g, share, out=dst)
        cp.multiply(step.buf.loss, share, out=loss_out[:1], dtype=np.float64)
        return None

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
        """Forward, loss, backward and update as one CUDA graph (or eagerly); no host sync.

        Returns ``(C, weights, biases, state)``; ``C`` is a :class:`DeviceLoss`. A NaN or
        infinity anywhere in the step skips its update on the device and raises
        :class:`NonFiniteLossError` at the next synchronisation point (``float(C)`` included).
        """
        slots = [state[s] for s in optimizer.slots]
        if not self._fits(*weights, *biases, *(t for s in slots for t in s)):
            return super().train_step(
                weights, biases, x, y, activation, output, loss, optimizer, state
            )
        step_no = int(state["step"]) + 1
        x, y = self._cp.asarray(x), self._cp.asarray(y)
        inputs = self._inputs.of(x, y, weights[0].dtype, weights[-1].shape[0])
        step = self._steps.get(
            weights, biases, x, y, activation, output, loss, optimizer, slots, inputs
        )
        step.stage(x, y)
        step.set_hyperparameters(optimizer, step_no)
        ledger = self._ledger(weights[0].dtype)
        step.ledger = ledger.words  # the step appends its loss to the ledger (in its graph)
        into = self._loss_sum or self.open_loss_sum(0.0)
        value = ledger.next_slot(into)
        step.run()
        state["step"] = step_no
        self._errors.queued(state)  # after the step is queued: a check may synchronise
        loss_value = DeviceLoss(self, value, into, int(x.shape[0]))
        return loss_value, weights, biases, state

    def _ledger(self, dtype: Any) -> LossLedger:
        """The loss ledger of the current device and ``dtype`` (:class:`.status.LossLedger`)."""
        key = (self._ctx.device().id, np.dtype(dtype).str)
        ledger = self._ledgers.get(key)
        if ledger is None:
            ring = self._ctx.device().ring
            ledger = self._ledgers[key] = LossLedger(self._cp, dtype, ring.upload)
        return ledger

    def open_loss_sum(self, total: float) -> DeviceLossSum:
        """A running total of the next train steps' ``rows * loss``, kept on the device from
        ``total`` in float64 (as the host sums): one read for any number of steps."""
        self._loss_sum = DeviceLossSum(self, self._cp.asarray(np.array([total], np.float64)))
        return self._loss_sum

    def _allocate(self, sizes: tuple[int, ...], batch: int, dtype: Any) -> StepBuffers:
        """The step's buffers; out of memory is an error giving the bytes and a batch that fits."""
        cp = self._cp
        try:
            return StepBuffers(cp, self.workspace(sizes, batch, dtype), sizes, dtype)
        except cp.cuda.memory.OutOfMemoryError:
            self._workspaces.clear()
            self._steps.clear()
            pool = cp.get_default_memory_pool()
            pool.free_all_blocks()
            free = int(cp.cuda.runtime.memGetInfo()[0]) + int(pool.free_bytes())
            raise out_of_memory_error(sizes, batch, dtype, free) from None
