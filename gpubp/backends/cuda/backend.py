"""The CuPy backend: cuBLAS GEMMs, gpubp's own CUDA kernels, and the train step as a CUDA graph.

Importing this module needs neither CuPy nor a GPU; the cupy module is obtained (by
:func:`import_cupy`) when a :class:`CupyBackend` is made, and each kernel family
(``kernels/*.cu``) is compiled by NVRTC through ``cupy.RawModule`` the first time one of its
kernels is used, once per device (CuPy also keeps the cubins in its on-disk cache). GEMMs go
through gpubp's own cuBLAS handle (:mod:`.cublas`), one per device and thread, so that the train
step can be captured as a CUDA graph (:mod:`.graph`).

With ``fold_sgd=True``, plain SGD folds the weight update into the gradient GEMM. It is off by
default: the guard then checks the loss, activations and deltas but cannot see a gradient that
overflows inside the GEMM itself (finite factors whose product exceeds the float range), which
would reach ``W`` as inf.

Non-finite values: kernels set a sticky device flag when an activation, delta, loss or gradient is
NaN or infinite; the update kernels then skip themselves (and the folded GEMM sees zeroed deltas),
so no host synchronisation is needed per step. :class:`NonFiniteLossError` is raised at the next
synchronisation point (the loss's ``float()``, :meth:`CupyBackend.synchronize`, ``to_numpy``),
with the parameters and optimizer state of the last good step.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ...errors import NonFiniteLossError
from ..base import Backend
from . import catalogue as ck
from . import launch
from .cublas import Cublas
from .graph import _HostRing, _StepBuffers, _TrainStep, folds
from .memory import out_of_memory_error

#: Train steps kept captured (least recently used dropped first).
MAX_GRAPHS = 4
#: Train steps queued without looking at the status word before the host looks anyway.
MAX_PENDING = 1024
_CUDA_MEMCPY_DEVICE_TO_DEVICE = 3

#: The environment variable that swaps CuPy for gpubp's CPU emulation of it.
EMULATOR_ENV = "GPUBP_CUDA_EMULATOR"
EMULATOR_MODULE = "gpubp.backends.cuda.emu.cupy"


def emulated() -> bool:
    """Whether ``GPUBP_CUDA_EMULATOR=1``: the backend then runs on the CPU emulation of CuPy."""
    return os.environ.get(EMULATOR_ENV) == "1"


def import_cupy() -> Any:
    """The cupy module the backend uses: ``cupy``, or with ``GPUBP_CUDA_EMULATOR=1`` the emulated
    CuPy (``gpubp.backends.cuda.emu.cupy``, a module that behaves like ``cupy`` on the CPU).

    The one place the CUDA backend imports CuPy.
    """
    if emulated():
        return importlib.import_module(EMULATOR_MODULE)
    import cupy

    return cupy


# One cuBLAS handle per (cupy module, device, thread), shared by every backend instance, as CuPy
# keeps its own: handles are never destroyed (at exit the CUDA context may already be gone).
_HANDLES: dict[tuple[int, int, int], Cublas] = {}
_HANDLES_LOCK = threading.Lock()


def _cublas_for(cp: Any, device: int) -> Cublas:
    key = (id(cp), device, threading.get_ident())
    blas = _HANDLES.get(key)
    if blas is None:
        with _HANDLES_LOCK:
            blas = _HANDLES.get(key)
            if blas is None:
                blas = _HANDLES[key] = Cublas(cp)
    return blas


class DeviceLoss:
    """The loss of a queued train step: a device scalar, read (and checked) at ``float()``.

    Reading it is a synchronisation point: if a queued step met a NaN or infinity,
    :class:`~gpubp.errors.NonFiniteLossError` is raised here.
    """

    __slots__ = ("_backend", "_value")

    def __init__(self, backend: CupyBackend, value: Any) -> None:
        self._backend = backend
        self._value = value

    def __float__(self) -> float:
        self._backend.check_status()
        return float(self._value.get())

    def item(self) -> float:
        return float(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(float(self), dtype=dtype)

    def __repr__(self) -> str:
        return f"DeviceLoss({float(self)!r})"

    def __format__(self, spec: str) -> str:
        return format(float(self), spec)

    def __add__(self, other: Any) -> float:
        return float(self) + other

    __radd__ = __add__

    def __mul__(self, other: Any) -> float:
        return float(self) * other

    __rmul__ = __mul__

    def __sub__(self, other: Any) -> float:
        return float(self) - other

    def __truediv__(self, other: Any) -> float:
        return float(self) / other


class CupyBackend(Backend):
    """cuBLAS GEMMs, fused CUDA kernels and a CUDA-graph train step on an NVIDIA GPU.

    Parameters
    ----------
    tf32 : bool
        Allow TF32 tensor-core math in float32 GEMMs (about 10 mantissa bits; off by default, so
        float32 results meet the same tolerance as on the CPU).
    graphs : bool
        Capture the train step as a CUDA graph (default; the environment variable
        ``GPUBP_CUDA_GRAPHS=0`` turns it off). Without, the same kernels run eagerly.
    fold_sgd : bool
        Fold plain SGD's weight update into the gradient GEMM (``dW`` never materialised; saves
        one write and two reads of the weights' size per step). Off by default because an
        overflow inside that GEMM is not caught before it reaches the weights (see the module
        docstring).
    """

    name: ClassVar[str] = "cupy"

    def __init__(
        self, tf32: bool = False, graphs: bool | None = None, fold_sgd: bool = False
    ) -> None:
        super().__init__()
        cupy = import_cupy()
        self.xp = cupy
        self._cp = cupy
        self.tf32 = bool(tf32)
        if graphs is None:
            graphs = os.environ.get("GPUBP_CUDA_GRAPHS", "1") != "0"
        self.graphs = bool(graphs)
        self.fold_sgd = bool(fold_sgd)
        self._per_device: dict[int, dict[str, Any]] = {}
        self._steps: OrderedDict[tuple[Any, ...], _TrainStep] = OrderedDict()
        self._pending: list[dict[str, Any]] = []
        self._said_eager = False

    # --- device state -------------------------------------------------------------------------

    def _device(self) -> dict[str, Any]:
        """Per-device kernels, status words and constants, made on first use of the device."""
        cp = self._cp
        dev = cp.cuda.Device().id
        d = self._per_device.get(dev)
        if d is None:
            d = {
                "id": dev,
                "kernels": launch.Kernels(cp),
                "status": cp.zeros(ck.STATUS_SLOTS, dtype=np.int32),  # the train steps' guard
                "scratch_status": cp.zeros(ck.STATUS_SLOTS, dtype=np.int32),  # everything else
                # read only, never written: the stand-alone update, which must not skip itself
                # for a flag some earlier stand-alone op raised
                "clear_status": cp.zeros(ck.STATUS_SLOTS, dtype=np.int32),
                "ring": _HostRing(cp),
                "consts": {},
            }
            self._per_device[dev] = d
        return d

    def kernel(self, name: str) -> Any:
        """The compiled kernel ``name`` (a catalogue instantiation) on the current device.

        The ``kernels`` getter that the wrappers of :mod:`gpubp.backends.cuda.launch` take.
        """
        return self._device()["kernels"](name)

    def cublas(self) -> Cublas:
        """gpubp's cuBLAS handle for the current device, on the current stream."""
        blas = _cublas_for(self._cp, self._device()["id"])
        blas.set_stream(self._cp.cuda.get_current_stream().ptr)
        return blas

    def constants(self, dtype: Any) -> Any:
        """A device hyper-parameter block holding only the GEMM constants ``ONE`` and ``ZERO``."""
        consts = self._device()["consts"]
        key = np.dtype(dtype).str
        if key not in consts:
            hp = np.zeros(ck.HP_SLOTS, dtype=dtype)
            hp[ck.HP["ONE"]] = 1
            consts[key] = self._cp.asarray(hp)
        return consts[key]

    def scratch_status(self) -> Any:
        """The status word of the ops outside a train step.

        Its STATUS_BAD flag is not an error (a stand-alone op returns NaN as NumPy does; only a
        train step must refuse to update); its STATUS_LAUNCH flag, an internal error, is read at
        the next synchronisation like the train steps' word.
        """
        return self._device()["scratch_status"]

    def check_status(self) -> None:
        """Look at the train steps' status word (a synchronisation) and raise what it holds.

        Raises :class:`NonFiniteLossError` if a queued step met a NaN or infinity; its update
        and those of the steps queued after it were skipped, and their optimizer step counts are
        taken back, so parameters and state are those of the last good step.
        """
        if not self._per_device:
            return
        for d in self._per_device.values():
            status = d["status"]
            host = status.get()
            scratch = d["scratch_status"]
            if scratch.get()[ck.STATUS_LAUNCH]:
                scratch.fill(0)
                host[ck.STATUS_LAUNCH] = 1
            if host[ck.STATUS_LAUNCH]:
                status.fill(0)
                raise RuntimeError(
                    "a gpubp kernel was launched with a block size that is not a multiple of 32 "
                    "(an internal error; please report it)"
                )
            if not host[ck.STATUS_BAD]:
                continue
            skipped = int(host[ck.STATUS_SKIPPED])
            status.fill(0)
            for state in self._pending[len(self._pending) - skipped :] if skipped else []:
                state["step"] = int(state["step"]) - 1
            self._pending.clear()
            later = f" and the {skipped - 1} queued after it" if skipped > 1 else ""
            raise NonFiniteLossError(
                "a train step produced a NaN or infinite loss, activation, delta or gradient; "
                f"that step{later} was skipped and the parameters kept, so they and the optimizer "
                "state are those of the last good step. Lower the learning rate, or scale the "
                "inputs"
            )
        self._pending.clear()

    def synchronize(self) -> None:
        """Wait for the queued work; raise what the train steps' status word holds."""
        self._cp.cuda.get_current_stream().synchronize()
        self.check_status()

    def read_losses(self, values: Sequence[Any]) -> list[float]:
        """The losses of queued train steps, read in one device-to-host transfer."""
        if not values or not all(isinstance(v, DeviceLoss) for v in values):
            return super().read_losses(values)
        self.check_status()  # a deferred NonFiniteLossError surfaces here, as at float()
        host = self._cp.stack([v._value for v in values]).get()
        return [float(v) for v in host]

    def to_numpy(self, a: Any) -> np.ndarray:
        if isinstance(a, self._cp.ndarray):
            out = np.asarray(a.get())
            self.check_status()
            return out
        return np.asarray(a)

    # --- GEMM ---------------------------------------------------------------------------------

    def _gemm(
        self,
        trans_a: bool,
        trans_b: bool,
        A: Any,
        B: Any,
        C: Any,
        alpha: str,
        beta: str,
        hp: Any,
    ) -> Any:
        """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` on the current stream.

        ``alpha`` and ``beta`` are hyper-parameter slot names read from the device block ``hp``
        (device pointer mode), so a captured graph reads their current values. All arrays are
        C-contiguous 2-D arrays of one dtype (:func:`gpubp.backends.cuda.launch.gemm`).
        """
        return launch.gemm(self.cublas(), trans_a, trans_b, A, B, C, alpha, beta, hp, self.tf32)

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
        self._gemm(False, True, a_prev, W, out, "ONE", "ZERO", self.constants(W.dtype))
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
            self.kernel, out, None, Y, labels, output, loss, row_loss, value, self.scratch_status()
        )
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
        self._gemm(False, False, delta_next, W_next, out, "ONE", "ZERO", self.constants(a.dtype))
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
        self._gemm(True, False, delta, a_prev, dW, "ONE", "ZERO", consts)
        plan = ck.bias_grad_plan(rows, n)
        partial = cp.empty(plan[0] * n, dtype=np.float64)
        launch.bias_grad(self.kernel, delta, db, partial, plan, self.scratch_status())
        return dW, db

    def update_parameters(
        self,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Every parameter updated by one kernel launch from a table of pointers and sizes."""
        slots = [state[s] for s in optimizer.slots]
        if not self._fits(*params, *grads, *(x for s in slots for x in s)):
            return super().update_parameters(params, grads, optimizer, state, scratch=scratch)
        cp = self._cp
        step = int(state["step"]) + 1
        dtype = params[0].dtype
        table, chunks = ck.build_table(self._entries(params, grads, slots))
        hp = cp.asarray(ck.hyperparameters(optimizer, step, dtype))
        launch.update_table(
            self.kernel, optimizer, dtype, cp.asarray(table), len(params), chunks, hp,
            self._device()["clear_status"],
        )  # fmt: skip
        state["step"] = step
        return params, state

    @staticmethod
    def _entries(
        params: list[Any], grads: list[Any], slots: list[list[Any]]
    ) -> list[tuple[int, int, int, int, int]]:
        rows = []
        for i, (p, g) in enumerate(zip(params, grads)):
            s1 = slots[0][i].data.ptr if len(slots) > 0 else 0
            s2 = slots[1][i].data.ptr if len(slots) > 1 else 0
            rows.append((p.data.ptr, g.data.ptr, s1, s2, int(p.size)))
        return rows

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
        x, y = self._cp.asarray(x), self._cp.asarray(y)
        step = self._step_for(weights, biases, x, y, activation, output, loss, None, None)
        step.stage(x, y)
        step.record(self.scratch_status())
        value = self._cp.empty((), dtype=weights[0].dtype)
        value[...] = step.buf.loss[0]
        return value, step.buf.ws.dW, step.buf.ws.db

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
        step = self._step_for(weights, biases, x, y, activation, output, loss, optimizer, slots)
        step.stage(x, y)
        step.set_hyperparameters(ck.hyperparameters(optimizer, step_no, weights[0].dtype))
        step.run()
        state["step"] = step_no
        self._pending.append(state)
        value = self._cp.empty((), dtype=weights[0].dtype)
        self._cp.cuda.runtime.memcpyAsync(
            value.data.ptr,
            step.buf.loss.data.ptr,
            value.dtype.itemsize,
            _CUDA_MEMCPY_DEVICE_TO_DEVICE,
            self._cp.cuda.get_current_stream().ptr,
        )
        if len(self._pending) >= MAX_PENDING:
            self.check_status()
        return DeviceLoss(self, value), weights, biases, state

    def _step_for(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        slots: list[list[Any]] | None,
    ) -> _TrainStep:
        sizes = (weights[0].shape[1], *(W.shape[0] for W in weights))
        dtype = weights[0].dtype
        labels = y.ndim == 1 and y.dtype.kind in "iu" and sizes[-1] > 1
        structure: tuple[Any, ...] = ()
        if optimizer is not None:
            structure = (optimizer.op, *optimizer.variant, self.fold_sgd and folds(optimizer))
        key = (
            sizes,
            int(x.shape[0]),
            dtype.str,
            activation,
            output,
            loss,
            labels,
            structure,
            tuple(p.data.ptr for p in [*weights, *biases]),
            tuple(t.data.ptr for s in (slots or []) for t in s),
        )
        step = self._steps.get(key)
        if step is None:
            buf = self._allocate(sizes, int(x.shape[0]), dtype)
            step = _TrainStep(
                self, buf, weights, biases, activation, output, loss, labels, optimizer, slots
            )
            self._steps[key] = step
            while len(self._steps) > MAX_GRAPHS:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        return step

    def _allocate(self, sizes: tuple[int, ...], batch: int, dtype: Any) -> _StepBuffers:
        """The step's buffers; out of memory is an error giving the bytes and a batch that fits."""
        cp = self._cp
        try:
            return _StepBuffers(cp, self.workspace(sizes, batch, dtype), sizes, dtype)
        except cp.cuda.memory.OutOfMemoryError:
            self._workspaces.clear()
            self._steps.clear()
            pool = cp.get_default_memory_pool()
            pool.free_all_blocks()
            free = int(cp.cuda.runtime.memGetInfo()[0]) + int(pool.free_bytes())
            raise out_of_memory_error(sizes, batch, dtype, free) from None

    def _say_eager(self, why: str) -> None:
        if not self._said_eager:
            self._said_eager = True
            warnings.warn(
                f"gpubp cupy backend: the train step cannot be captured as a CUDA graph ({why}); "
                "running its kernels eagerly instead (same results, more launch overhead)",
                RuntimeWarning,
                stacklevel=4,
            )
