"""The CuPy backend: cuBLAS GEMMs, gpubp's own CUDA kernels, and the train step as a CUDA graph.

Importing this module needs neither CuPy nor a GPU; CuPy is imported when a
:class:`CupyBackend` is made, and each kernel family (``kernels/*.cu``) is compiled by NVRTC
through ``cupy.RawModule`` the first time one of its kernels is used, once per device (CuPy
also keeps the cubins in its on-disk cache).

One train step, for ``L`` layers (every buffer preallocated per batch shape):

1. forward: ``z = a @ W.T`` (cuBLAS into the next activation buffer), then bias + activation in
   place (``bias_activation``); the last layer's GEMM output goes to the output kernel;
2. output: bias, output activation, per-row loss and ``delta^L`` in one kernel, in place; one
   block sums the row losses in a fixed order (``finalize_loss``);
3. backward: ``g = delta^{l+1} @ W^{l+1}`` (cuBLAS), then ``g *= f'(a^l)`` in place;
4. update: ``dW`` and ``db`` are computed, checked for NaN/inf, and every parameter is updated in
   one launch from a table of pointers. With ``fold_sgd=True``, plain SGD (no momentum, no
   weight decay) instead folds the weight update into the gradient GEMM,
   ``W = -lr * delta.T @ a + 1 * W`` (``dW`` never exists), and fuses the bias update into the
   bias-gradient column sum. It is off by default: the guard then checks the loss, activations
   and deltas but cannot see a gradient that overflows inside the GEMM itself (finite factors
   whose product exceeds the float range), which would reach ``W`` as inf.

The step is captured once per batch shape (and parameter buffers) as a CUDA graph and replayed;
each batch is copied into the captured input buffers, and the learning rate and the other
hyper-parameters live in device memory, so a schedule needs no recapture. If capture fails the
steps run eagerly (said once, as a warning).

Non-finite values: kernels set a sticky device flag when an activation, delta, loss or gradient is
NaN or infinite; the update kernels then skip themselves (and the folded GEMM sees zeroed deltas),
so no host synchronisation is needed per step. :class:`NonFiniteLossError` is raised at the next
synchronisation point (the loss's ``float()``, :meth:`CupyBackend.synchronize`, ``to_numpy``),
with the parameters and optimizer state of the last good step.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import DeviceOutOfMemoryError, NonFiniteLossError
from . import cuda_kernels as ck
from .base import Backend, Workspace

# cuBLAS / CUDA constants (cublas_api.h, library_types.h); fixed by the CUDA ABI.
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
CUDA_R_32F, CUDA_R_64F = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 70, 77
CUBLAS_GEMM_DEFAULT = -1
_CUDA_MEMCPY_DEVICE_TO_DEVICE = 3

#: Train steps kept captured (least recently used dropped first).
MAX_GRAPHS = 4
#: Train steps queued without looking at the status word before the host looks anyway.
MAX_PENDING = 1024


def rowmajor_gemm(
    trans_a: bool, trans_b: bool, M: int, N: int, K: int, lda: int, ldb: int, ldc: int
) -> tuple[int, int, int, int, int, str, int, str, int, int]:
    """cuBLAS (column-major) arguments for the row-major ``C (M, N) = op(A) @ op(B)``.

    A row-major matrix is its transpose in column-major order, so ``C.T = op(B).T @ op(A).T``
    is computed with the operands swapped. ``lda``/``ldb``/``ldc`` are the row-major row lengths
    of the stored ``A``, ``B``, ``C``. Returns ``(transa, transb, m, n, k, first, ld_first,
    second, ld_second, ldc)`` where ``first``/``second`` name which of ``"A"``, ``"B"`` goes in
    cuBLAS's A and B slots.
    """
    return (
        CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
        CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
        N,
        M,
        K,
        "B",
        ldb,
        "A",
        lda,
        ldc,
    )


def workspace_bytes(sizes: Sequence[int], batch: int, dtype: Any) -> tuple[int, int]:
    """``(fixed, per_sample)`` device bytes of one train step's buffers (an upper estimate).

    ``per_sample`` grows with the batch: activations, deltas, targets, scratch, the row losses,
    labels and the bias-gradient partial sums; ``fixed`` does not: ``dW``, ``db``, the
    optimizer scratch. The parameters and optimizer state are not included (they exist already).
    """
    item = np.dtype(dtype).itemsize
    L = len(sizes) - 1
    widest = max(sizes)
    per_sample = item * (sum(sizes[:-1]) + 2 * sizes[-1] + sum(sizes[1:-1]) + widest + 2)
    per_sample += 8 * 3  # row indices, flat indices, int64 labels
    per_sample += 8 * math.ceil(max(sizes[1:]) / 32) + 8  # bias partial sums (>= 32 rows each)
    fixed = item * sum(sizes[i + 1] * (sizes[i] + 1) for i in range(L))
    fixed += 2 * item * max(sizes[i + 1] * sizes[i] for i in range(L))
    fixed += 64 * 1024  # tables, status word, hyper-parameters, alignment
    return fixed, per_sample


def fitting_batch(free_bytes: int, sizes: Sequence[int], dtype: Any) -> int:
    """The largest batch whose step buffers fit in ``free_bytes`` (90 % of it), or 0."""
    fixed, per_sample = workspace_bytes(sizes, 1, dtype)
    return max(0, int((0.9 * free_bytes - fixed) // per_sample))


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


class _Kernels:
    """The compiled kernel families of one device, compiled lazily, one RawModule per family."""

    def __init__(self, cupy: Any) -> None:
        self._cp = cupy
        self._modules: dict[str, Any] = {}
        self._functions: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            family = ck.family_of(name)  # raises for a name the compile test does not cover
            mod = self._modules.get(family)
            if mod is None:
                mod = self._cp.RawModule(
                    code=ck.source(family),
                    options=ck.COMPILE_OPTIONS,
                    name_expressions=ck.name_expressions(family),
                )
                self._modules[family] = mod
            fn = self._functions[name] = mod.get_function(name)
        return fn


class _StepBuffers:
    """Everything one captured train step reads and writes, beyond the base Workspace."""

    def __init__(self, cp: Any, ws: Workspace, sizes: tuple[int, ...], dtype: Any) -> None:
        B = ws.batch
        self.ws = ws
        self.labels = cp.zeros(B, dtype=np.int64)
        self.row_loss = cp.zeros(B, dtype=dtype)
        self.loss = cp.zeros(1, dtype=dtype)
        self.hp = cp.zeros(ck.HP_SLOTS, dtype=dtype)
        self.hp_host: np.ndarray | None = None
        plans = [ck.bias_grad_plan(B, n) for n in sizes[1:]]
        self.partial = cp.zeros(max(s * n for (s, _), n in zip(plans, sizes[1:])), np.float64)
        self.plans = plans


class _HostRing:
    """Pinned host slots for the per-step hyper-parameter upload (asynchronous, never a sync).

    A slot is reused only after the copy that read it has finished (its event), so the host
    never overwrites values a queued copy has yet to read.
    """

    def __init__(self, cp: Any, slots: int = 64, nbytes: int = ck.HP_SLOTS * 8) -> None:
        self._cp = cp
        self._mem = cp.cuda.alloc_pinned_memory(slots * nbytes)
        self._nbytes = nbytes
        self._events: list[Any] = [None] * slots
        self._next = 0

    def upload(self, host: np.ndarray, dst: Any) -> None:
        k = self._next
        self._next = (k + 1) % len(self._events)
        if self._events[k] is not None:
            self._events[k].synchronize()
        view = np.frombuffer(self._mem, dtype=np.uint8, count=self._nbytes, offset=k * self._nbytes)
        view[: host.nbytes] = host.view(np.uint8)
        stream = self._cp.cuda.get_current_stream()
        dst.data.copy_from_host_async(self._mem.ptr + k * self._nbytes, host.nbytes, stream)
        ev = self._cp.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        self._events[k] = ev


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
        import cupy

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
                "kernels": _Kernels(cp),
                "status": cp.zeros(ck.STATUS_SLOTS, dtype=np.int32),  # the train steps' guard
                "scratch_status": cp.zeros(ck.STATUS_SLOTS, dtype=np.int32),  # everything else
                "ring": _HostRing(cp),
                "consts": {},
            }
            self._per_device[dev] = d
        return d

    def _kernel(self, name: str) -> Any:
        return self._device()["kernels"](name)

    def _consts(self, dtype: Any) -> Any:
        """A device hyper-parameter block holding only the GEMM constants 1 and 0."""
        consts = self._device()["consts"]
        key = np.dtype(dtype).str
        if key not in consts:
            hp = np.zeros(ck.HP_SLOTS, dtype=dtype)
            hp[ck.HP["ONE"]] = 1
            consts[key] = self._cp.asarray(hp)
        return consts[key]

    def _scratch_status(self) -> Any:
        s = self._device()["scratch_status"]
        s.fill(0)
        return s

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
        alpha: Any,
        beta: Any,
        hp: Any,
    ) -> Any:
        """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` by cuBLAS GemmEx.

        ``alpha`` and ``beta`` are hyper-parameter slot names read from the device block ``hp``
        (device pointer mode), so a captured graph reads their current values. All arrays are
        C-contiguous 2-D arrays of one dtype.
        """
        from cupy.cuda import device
        from cupy_backends.cuda.libs import cublas

        M, K = (A.shape[1], A.shape[0]) if trans_a else A.shape
        N = B.shape[0] if trans_b else B.shape[1]
        if M == 0 or N == 0:
            return C
        dt = C.dtype
        if dt == np.float64:
            data, compute = CUDA_R_64F, CUBLAS_COMPUTE_64F
        else:
            data = CUDA_R_32F
            compute = CUBLAS_COMPUTE_32F_FAST_TF32 if self.tf32 else CUBLAS_COMPUTE_32F
        ta, tb, m, n, k, first, ldf, _, lds, ldc = rowmajor_gemm(
            trans_a, trans_b, M, N, K, A.shape[1], B.shape[1], C.shape[1]
        )
        x, y = (B, A) if first == "B" else (A, B)
        item = dt.itemsize
        a_ptr = hp.data.ptr + ck.HP[alpha] * item
        b_ptr = hp.data.ptr + ck.HP[beta] * item
        handle = device.get_cublas_handle()
        mode = cublas.getPointerMode(handle)
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_DEVICE)
        try:
            cublas.gemmEx(
                handle, ta, tb, m, n, k, a_ptr, x.data.ptr, data, ldf, y.data.ptr, data, lds,
                b_ptr, C.data.ptr, data, ldc, compute, CUBLAS_GEMM_DEFAULT,
            )  # fmt: skip
        finally:
            cublas.setPointerMode(handle, mode)
        return C

    # --- launches -----------------------------------------------------------------------------

    def _launch(self, name: str, blocks: int, args: tuple[Any, ...]) -> None:
        self._kernel(name)((blocks,), (ck.THREADS,), args)

    def _epilogue(self, z: Any, b: Any, activation: str, status: Any) -> None:
        rows, n = z.shape
        if activation == "softmax":
            self._launch(
                ck.bias_softmax(z.dtype),
                ck.row_blocks(rows),
                (z, b, np.int64(rows), np.int32(n), status),
            )
        else:
            self._launch(
                ck.bias_activation(z.dtype, activation),
                ck.blocks_for(rows * n // (16 // z.dtype.itemsize) + 1),
                (z, b, np.int64(rows), np.int32(n), status),
            )

    def _hidden(self, g: Any, a: Any, activation: str, status: Any) -> None:
        self._launch(
            ck.hidden_delta(g.dtype, activation),
            ck.blocks_for(g.size // (16 // g.dtype.itemsize) + 1),
            (g, a, np.int64(g.size), status),
        )

    def _output(
        self,
        z: Any,
        b: Any,
        y: Any,
        labels: Any,
        output: str,
        loss: str,
        row_loss: Any,
        loss_out: Any,
        status: Any,
    ) -> None:
        rows, n = z.shape
        T = z.dtype.type
        null = np.uint64(0)
        name = ck.output_kernel(z.dtype, output, loss, labels is not None)
        self._launch(
            name,
            ck.row_blocks(rows),
            (
                z,
                null if b is None else b,
                null if y is None else y,
                null if labels is None else labels,
                np.int64(rows),
                np.int32(n),
                T(1.0 / rows),
                row_loss,
                status,
            ),
        )
        scale = 1.0 / (2 * rows) if loss == "mse" else 1.0 / rows
        self._launch(
            ck.finalize_loss(z.dtype),
            1,
            (row_loss, np.int64(rows), np.float64(scale), loss_out, status),
        )

    def _bias_grad(
        self,
        delta: Any,
        db: Any,
        partial: Any,
        plan: tuple[int, int],
        b: Any,
        hp: Any,
        status: Any,
    ) -> None:
        """``db = sum over rows of delta``; with ``b`` given, also ``b -= lr * db`` (plain SGD)."""
        rows, n = delta.shape
        splits, per = plan
        self._launch(
            ck.bias_grad_partial(delta.dtype),
            ck.blocks_for(splits * n),
            (delta, np.int64(rows), np.int32(n), np.int64(per), np.int64(splits), partial),
        )
        self._launch(
            ck.bias_grad_finish(delta.dtype, b is not None),
            min(n, 65536),
            (partial, np.int64(splits), np.int32(n), db, db if b is None else b, hp, status),
        )

    def _update_table(
        self, optimizer: Any, dtype: Any, table: Any, n: int, chunks: int, hp: Any, status: Any
    ) -> None:
        if optimizer.kind == "sgd":
            name = ck.sgd_update_table(dtype, optimizer.momentum != 0, optimizer.nesterov)
        else:
            name = ck.adam_update_table(dtype, optimizer.decoupled)
        self._launch(
            name,
            ck.blocks_for(chunks * ck.THREADS),
            (table, np.int32(n), np.int64(chunks), np.int64(ck.CHUNK), hp, status),
        )

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
        self._gemm(False, True, a_prev, W, out, "ONE", "ZERO", self._consts(W.dtype))
        self._epilogue(out, b, activation, self._scratch_status())
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
        self._output(out, None, Y, labels, output, loss, row_loss, value, self._scratch_status())
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
        self._gemm(False, False, delta_next, W_next, out, "ONE", "ZERO", self._consts(a.dtype))
        self._hidden(out, a, activation, self._scratch_status())
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
        consts = self._consts(delta.dtype)
        self._gemm(True, False, delta, a_prev, dW, "ONE", "ZERO", consts)
        plan = ck.bias_grad_plan(rows, n)
        partial = cp.empty(plan[0] * n, dtype=np.float64)
        self._bias_grad(delta, db, partial, plan, None, consts, self._scratch_status())
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
        self._update_table(
            optimizer, dtype, cp.asarray(table), len(params), chunks, hp, self._scratch_status()
        )
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
        rows, n = a.shape
        pred = cp.empty(rows, dtype=np.int64)
        correct = cp.zeros(1, dtype=np.uint64)
        null = np.uint64(0)
        Y, labels, target = None, None, ck.TARGET_NONE
        if y is not None:
            y = cp.asarray(y)
            if y.ndim == 1:
                labels, target = cp.ascontiguousarray(y, dtype=np.int64), ck.TARGET_LABELS
            else:
                Y, target = cp.ascontiguousarray(y, dtype=a.dtype), ck.TARGET_DENSE
        self._launch(
            ck.argmax_accuracy(a.dtype, target),
            ck.row_blocks(rows),
            (
                a,
                null if Y is None else Y,
                null if labels is None else labels,
                np.int64(rows),
                np.int32(n),
                pred,
                correct,
                self._scratch_status(),
            ),
        )
        return pred, (None if y is None else correct[0])

    def threshold_correct(self, a: Any, y: Any) -> Any:
        """Number of elements with ``(a > 0.5) == (y > 0.5)`` (sigmoid + BCE), on the device."""
        cp = self._cp
        a = cp.ascontiguousarray(a)
        y = cp.ascontiguousarray(cp.asarray(y), dtype=a.dtype).reshape(a.shape)
        correct = cp.zeros(1, dtype=np.uint64)
        self._launch(
            ck.threshold_accuracy(a.dtype),
            ck.blocks_for(a.size),
            (a, y, np.int64(a.size), correct),
        )
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
        step.record(self._scratch_status())
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
            structure = (
                optimizer.kind,
                getattr(optimizer, "momentum", 0) != 0,
                getattr(optimizer, "nesterov", False),
                getattr(optimizer, "decoupled", False),
                self.fold_sgd and _folds(optimizer),
            )
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
            fixed, per_sample = workspace_bytes(sizes, batch, dtype)
            need = fixed + per_sample * batch
            fits = fitting_batch(free, sizes, dtype)
            advice = (
                f"batch_size={fits} would fit"
                if fits > 0
                else "no batch size fits; the "
                "parameters alone fill the GPU, so make the network smaller"
            )
            raise DeviceOutOfMemoryError(
                f"out of GPU memory: a train step of layer sizes {list(sizes)} at batch size "
                f"{batch} ({np.dtype(dtype).name}) needs about {need:,} bytes of buffers, and "
                f"{free:,} bytes are free; {advice}"
            ) from None

    def _say_eager(self, why: str) -> None:
        if not self._said_eager:
            self._said_eager = True
            warnings.warn(
                f"gpubp cupy backend: the train step cannot be captured as a CUDA graph ({why}); "
                "running its kernels eagerly instead (same results, more launch overhead)",
                RuntimeWarning,
                stacklevel=4,
            )


def _folds(optimizer: Any) -> bool:
    """Whether the weight update folds into the gradient GEMM: plain SGD, no decay, no momentum."""
    return (
        optimizer is not None
        and optimizer.kind == "sgd"
        and optimizer.momentum == 0
        and optimizer.weight_decay == 0
    )


class _TrainStep:
    """One batch shape's train step: its buffers, pointer tables and (once captured) its graph."""

    def __init__(
        self,
        be: CupyBackend,
        buf: _StepBuffers,
        weights: list[Any],
        biases: list[Any],
        activation: str,
        output: str,
        loss: str,
        labels: bool,
        optimizer: Any,
        slots: list[list[Any]] | None,
    ) -> None:
        cp = be._cp
        self.be, self.buf = be, buf
        self.W, self.b = list(weights), list(biases)
        self.activation, self.output, self.loss, self.labels = activation, output, loss, labels
        self.optimizer = optimizer
        self.fold = be.fold_sgd and _folds(optimizer)
        self.dtype = weights[0].dtype
        self.graph: Any = None
        self.runs = 0
        ws = buf.ws
        L = len(weights)
        # delta of weights[i]: the output delta for the last layer, ws.d[i + 1] below it
        self.deltas = [ws.d[i + 1] for i in range(L - 1)] + [ws.z_out]
        self.status = be._device()["status"]
        self.update_table: Any = None
        self.delta_table: Any = None
        if optimizer is not None and not self.fold:
            entries = be._entries([*weights, *biases], [*ws.dW, *ws.db], slots or [])
            table, self.update_chunks = ck.build_table(entries)
            self.update_table = cp.asarray(table)
            self.n_update = len(entries)
        if self.fold:
            entries = [(d.data.ptr, 0, 0, 0, int(d.size)) for d in self.deltas]
            table, _ = ck.build_table(entries)
            self.delta_table = cp.asarray(table)

    def stage(self, x: Any, y: Any) -> None:
        """Copy the batch into the captured input buffers (converting dtype on the device)."""
        ws = self.buf.ws
        ws.a[0][...] = x
        if self.labels:
            self.buf.labels[...] = y
        else:
            ws.y[...] = y.reshape(ws.y.shape)

    def set_hyperparameters(self, hp: np.ndarray) -> None:
        """Upload the hyper-parameter block when it changed (asynchronously, from pinned memory)."""
        if self.buf.hp_host is None or not np.array_equal(self.buf.hp_host, hp):
            self.be._device()["ring"].upload(hp, self.buf.hp)
            self.buf.hp_host = hp.copy()

    def run(self) -> None:
        """Enqueue one step: the graph if there is one, else eagerly (capturing on the 2nd run)."""
        be, cp = self.be, self.be._cp
        if self.graph is None and be.graphs and self.runs >= 1:
            self.graph = self._capture()
        if self.graph is not None and self.graph is not False:
            self.graph.launch(stream=cp.cuda.get_current_stream())
        else:
            self.record(self.status)
        self.runs += 1

    def _capture(self) -> Any:
        """The step as a CUDA graph; ``False`` (and a warning, once) if it cannot be captured.

        The first run is eager: cuBLAS and the kernels are then initialised and compiled, which
        must not happen during capture.
        """
        cp = self.be._cp
        stream = cp.cuda.Stream(non_blocking=True)
        stream.wait_event(cp.cuda.get_current_stream().record())
        graph = None
        try:
            with stream:
                stream.begin_capture()
                try:
                    self.record(self.status)
                finally:
                    graph = stream.end_capture()
            graph.upload(stream)
            stream.synchronize()
            return graph
        except Exception as exc:  # any capture failure: eager launches give the same results
            self.be._say_eager(f"{type(exc).__name__}: {exc}")
            return False

    def record(self, status: Any) -> None:
        """Enqueue the whole step on the current stream (eagerly, or into a capture)."""
        be, buf, ws = self.be, self.buf, self.buf.ws
        L = len(self.W)
        hp = buf.hp if self.optimizer is not None else be._consts(self.dtype)
        # forward
        for i in range(L):
            out = ws.a[i + 1] if i < L - 1 else ws.z_out
            be._gemm(False, True, ws.a[i], self.W[i], out, "ONE", "ZERO", hp)
            if i < L - 1:
                be._epilogue(out, self.b[i], self.activation, status)
        # output layer: bias, activation, loss per row, delta in place; the fixed-order total
        be._output(
            ws.z_out,
            self.b[L - 1],
            None if self.labels else ws.y,
            buf.labels if self.labels else None,
            self.output,
            self.loss,
            buf.row_loss,
            buf.loss,
            status,
        )
        # backward: every delta before any update (the deltas read the old weights)
        for i in range(L - 1, 0, -1):
            g = ws.d[i]
            be._gemm(False, False, self.deltas[i], self.W[i], g, "ONE", "ZERO", hp)
            be._hidden(g, ws.a[i], self.activation, status)
        if self.optimizer is None:  # gradients only
            for i in range(L):
                be._gemm(True, False, self.deltas[i], ws.a[i], ws.dW[i], "ONE", "ZERO", hp)
                be._bias_grad(self.deltas[i], ws.db[i], buf.partial, buf.plans[i], None, hp, status)
            return
        if self.fold:
            # a skipped step must add exactly 0: zero the deltas when the flag is set
            be._launch(
                ck.zero_if_bad_table(self.dtype),
                ck.blocks_for(max(d.size for d in self.deltas)),
                (self.delta_table, np.int32(L), status),
            )
            for i in range(L):  # W = -lr * delta.T @ a + 1 * W;  b -= lr * sum(delta)
                be._gemm(True, False, self.deltas[i], ws.a[i], self.W[i], "NEG_LR", "ONE", hp)
                be._bias_grad(
                    self.deltas[i], ws.db[i], buf.partial, buf.plans[i], self.b[i], hp, status
                )
        else:
            for i in range(L):
                be._gemm(True, False, self.deltas[i], ws.a[i], ws.dW[i], "ONE", "ZERO", hp)
                be._bias_grad(self.deltas[i], ws.db[i], buf.partial, buf.plans[i], None, hp, status)
            n = self.n_update
            biggest = max(int(p.size) for p in [*self.W, *self.b])
            be._launch(
                ck.check_finite_table(self.dtype),
                ck.blocks_for(biggest),
                (self.update_table, np.int32(n), status),
            )
            be._update_table(
                self.optimizer, self.dtype, self.update_table, n, self.update_chunks, hp, status
            )
        be._launch(ck.finish_step(), 1, (status,))
