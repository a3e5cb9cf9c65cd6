"""The train step as the device runs it: its buffers, and the step recorded once as a CUDA graph.

One train step, for ``L`` layers (every buffer preallocated per batch shape):

1. forward: ``z = a @ W.T`` (cuBLAS into the next activation buffer), then bias + activation in
   place (``bias_activation``); the last layer's GEMM output goes to the output kernel;
2. output: bias, output activation, per-row loss and ``delta^L`` in one kernel, in place; the
   row losses summed in a fixed order by many blocks, then one (``loss_partial``,
   ``finalize_loss``);
3. backward: ``g = delta^{l+1} @ W^{l+1}`` (cuBLAS), then ``g *= f'(a^l)`` in place;
4. update: ``dW`` (a GEMM per layer) and ``db`` (every layer's column sums in two launches,
   :class:`.bias.BiasLayers`) are computed, checked for NaN/inf, and every parameter is updated
   in one launch from a table of pointers. With ``fold_sgd=True``, plain SGD (no momentum, no
   weight decay) instead folds the weight update into the gradient GEMM,
   ``W = -lr * delta.T @ a + 1 * W`` (``dW`` never exists), and updates the biases from ``db``
   by the table kernel.

The step is captured once per batch shape (and parameter buffers) as a CUDA graph and replayed;
each batch is copied into the captured input buffers (or, gathered into a gather's buffers the
backend handed out, read there in place), and the learning rate and the other
hyper-parameters live in device memory, so a schedule needs no recapture (a schedule that is a
formula is computed there, from a global step counter, by the step's first kernel). The captured
step calls only kernel launches and gpubp's own cuBLAS handle's ``cublasGemmEx``
(:mod:`.cublas`), whose stream is set before the capture begins; CuPy's cuBLAS wrappers would
refuse to run while capturing. If capture fails nonetheless, the steps run eagerly (said once,
as a warning), or, where graphs are required (``GPUBP_CUDA_GRAPHS=require``),
:class:`~gpubp.errors.GraphCaptureError` names the call that broke the capture;
:class:`CaptureLog` counts graph and eager steps.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import GraphCaptureError
from ..workspace import Workspace
from . import catalogue as ck
from . import launch, scalars
from .bias import BiasLayers, bias_grad_layers
from .context import DeviceContext, Entry, table_entries


class StepBuffers:
    """Everything one captured train step reads and writes, beyond the base Workspace."""

    def __init__(self, cp: Any, ws: Workspace, sizes: tuple[int, ...], dtype: Any) -> None:
        B = ws.batch
        self.ws = ws
        self.labels = cp.zeros(B, dtype=np.int64)
        self.row_loss = cp.zeros(B, dtype=dtype)
        self.loss = cp.zeros(1, dtype=dtype)
        plans = [ck.bias_grad_plan(B, n) for n in sizes[1:]]
        # every layer's partial bias column sums (bias.BiasLayers), and the loss sum's parts
        # (used one after another)
        items = sum(s * n for (s, _), n in zip(plans, sizes[1:]))
        self.partial = cp.zeros(max(ck.LOSS_PARTS, items), np.float64)


@dataclass(frozen=True)
class StepSpec:
    """What a step computes, beyond its arrays: the functions, the target form, the fold."""

    activation: str
    output: str
    loss: str
    #: targets given as int64 class labels (else dense rows)
    labels: bool
    #: plain SGD's weight update folded into the gradient GEMM (see :func:`folds`)
    fold: bool


@dataclass
class CaptureLog:
    """Whether a backend's train steps ran as CUDA graphs, counted over its life.

    ``mode`` is ``"off"`` (graphs not asked for), ``"on"`` (captured where possible, eager with a
    warning otherwise) or ``"require"`` (a failed capture is an error). ``graph_steps`` counts
    the steps replayed from a graph, ``eager_steps`` those launched one kernel at a time (the
    first step of every batch shape is one: it compiles and allocates what the capture must not),
    ``failures`` the reasons captures failed, in order, each once.
    """

    mode: str
    graph_steps: int = 0
    eager_steps: int = 0
    failures: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """The counts, ``captured`` (some step replayed a graph and no capture failed) and, when
        not captured, ``why_not`` in words."""
        captured = self.graph_steps > 0 and not self.failures
        out: dict[str, Any] = {
            "mode": self.mode,
            "captured": captured,
            "graph_steps": self.graph_steps,
            "eager_steps": self.eager_steps,
            "failures": list(self.failures),
        }
        if not captured:
            if self.mode == "off":
                out["why_not"] = "CUDA graphs are off (graphs=False or GPUBP_CUDA_GRAPHS=0)"
            elif self.failures:
                out["why_not"] = f"the capture failed: {self.failures[0]}"
            elif not self.eager_steps:
                out["why_not"] = (
                    "no whole train step ran (gradient-only calls and data-parallel steps run "
                    "their kernels eagerly)"
                )
            else:
                out["why_not"] = (
                    "no batch shape ran twice (the first step of each shape runs eagerly; "
                    "the second is captured)"
                )
        return out

    def since(self, before: dict[str, Any]) -> dict[str, Any]:
        """The report of what happened after ``before`` (an earlier :meth:`report`)."""
        now = CaptureLog(self.mode, self.graph_steps - before["graph_steps"],
                         self.eager_steps - before["eager_steps"],
                         self.failures[len(before["failures"]):])  # fmt: skip
        return now.report()


#: The folder of the gpubp package, to find gpubp's own frame in a traceback.
_PACKAGE = Path(__file__).resolve().parents[2]


def _frame(f: traceback.FrameSummary) -> str:
    path = Path(f.filename).resolve()
    name = path.relative_to(_PACKAGE.parent) if path.is_relative_to(_PACKAGE.parent) else path
    return f"{name}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _in_library(filename: str, library: Path | None) -> bool:
    """Whether a frame is CuPy's own (a ``cupy*`` folder, or the stand-in's ``library``)."""
    path = Path(filename)
    if any(part.startswith("cupy") for part in path.parts[:-1]):
        return True
    return library is not None and path.resolve().is_relative_to(library)


def offending_call(exc: BaseException, library: Path | None = None) -> str:
    """Where ``exc`` came from: the innermost frame outside CuPy (or the stand-in whose folder
    is ``library``) -- the call that broke a capture --, and the gpubp frame that led to it
    where that is another; ``"unknown"`` without a traceback."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not _in_library(f.filename, library)
    ]
    if not frames:
        return "unknown"
    where = _frame(frames[-1])
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    if ours and ours[-1] is not frames[-1]:
        where += f" (called from {_frame(ours[-1])})"
    return where


def folds(optimizer: Any) -> bool:
    """Whether the weight update folds into the gradient GEMM: plain SGD, no decay, no momentum."""
    return (
        optimizer is not None
        and optimizer.kind == "sgd"
        and optimizer.momentum == 0
        and optimizer.weight_decay == 0
    )


def _buffer_entry(a: Any) -> Entry:
    """A table row naming the buffer ``a`` in the parameter column (what the guard zeroes)."""
    return (a.data.ptr, 0, 0, 0, int(a.size))


class _Table:
    """A pointer table on the device with what its launches take, derived once per step:
    the rows ``n``, the chunk count of the update kernels, the largest tensor (grid size)."""

    def __init__(self, cp: Any, entries: list[Entry]) -> None:
        table, self.chunks = ck.build_table(entries)
        self.dev = cp.asarray(table)
        self.n = len(entries)
        self.biggest = max(e[4] for e in entries)


class TrainStep:
    """One batch shape's train step: its buffers, pointer tables and (once captured) its graph.

    Parameters
    ----------
    ctx : DeviceContext
        The device context (cupy, cuBLAS, status words, constants, host ring).
    kernels : callable
        The kernel getter the step launches through (the backend's ``kernel``, which a subclass
        may override).
    buf : StepBuffers
        The step's buffers.
    weights, biases : list of device arrays
        The parameters the step reads and updates in place.
    spec : StepSpec
        What the step computes.
    optimizer : Optimizer or None
        The update rule; ``None`` for gradients only.
    slots : list of lists of device arrays or None
        The optimizer's state slots, per parameter.
    graphs : bool
        Capture the step as a CUDA graph on its second run.
    on_eager : callable
        Called with the reason when the capture fails (the step then runs eagerly).
    log : CaptureLog, optional
        Where the step counts its graph and eager runs and a failed capture's reason.
    inputs : pair of device arrays, optional
        ``(x, y)``: a batch gather's buffers (the backend's ``batch_buffers``) the step reads in
        place of its own input buffers, so a batch gathered there needs no staging copy:
        ``x`` ``(B, n_0)`` of the parameters' dtype, ``y`` ``(B,)`` int64 labels or ``(B, n_L)``
        dense targets as the step takes them.
    """

    def __init__(
        self,
        ctx: DeviceContext,
        kernels: launch.KernelGetter,
        buf: StepBuffers,
        weights: list[Any],
        biases: list[Any],
        spec: StepSpec,
        optimizer: Any,
        slots: list[list[Any]] | None,
        *,
        graphs: bool,
        on_eager: Callable[[str], None],
        log: CaptureLog | None = None,
        inputs: tuple[Any, Any] | None = None,
    ) -> None:
        cp = ctx.cp
        self.log = log if log is not None else CaptureLog("on" if graphs else "off")
        self.ctx, self.kernels, self.buf = ctx, kernels, buf
        self.W, self.b = list(weights), list(biases)
        self.activation, self.output, self.loss = spec.activation, spec.output, spec.loss
        self.labels, self.fold = spec.labels, spec.fold
        self.optimizer = optimizer
        self.graphs, self.on_eager = graphs, on_eager
        self.dtype = weights[0].dtype
        self.graph: Any = None
        self.runs = 0
        #: the loss ledger's words (int64 (3,)) the step appends its loss to; set before its
        #: first run, baked into its graph
        self.ledger: Any = None
        ws = buf.ws
        L = len(weights)
        self.adopted = inputs is not None
        # the activations a[0..L-1]: the input batch (a gather's buffer, or the step's own) first
        self.a = [ws.a[0] if inputs is None else inputs[0], *ws.a[1:]]
        self.labels_in, self.y_in = buf.labels, ws.y
        if inputs is not None:
            if self.labels:
                self.labels_in = inputs[1]
            else:
                self.y_in = inputs[1].reshape(ws.y.shape)
        # delta of weights[i]: the output delta for the last layer, ws.d[i + 1] below it
        self.deltas = [ws.d[i + 1] for i in range(L - 1)] + [ws.z_out]
        #: every layer's bias gradient, db[i] = sum over rows of deltas[i], in two launches
        self.bias = BiasLayers(cp, self.deltas, ws.db)
        self.status = ctx.device().status
        self.update: _Table | None = None
        #: Adam's step scalars computed in the graph from the device step counter
        self.device_scalars = optimizer is not None and optimizer.op == "adam_update"
        #: the learning rate computed in the graph (schedule_lr) where the optimizer follows a
        #: schedule (optim.Optimizer.follow) when the step is made
        self.device_lr = getattr(optimizer, "schedule", None) is not None
        #: the hyper-parameter block the step reads, and what the graph computes it from
        self.scalars = scalars.StepScalars(
            cp, self.dtype, adam=self.device_scalars, schedule=self.device_lr
        )
        if optimizer is not None and not self.fold:
            entries = table_entries([*weights, *biases], [*ws.dW, *ws.db], slots or [])
            self.update = _Table(cp, entries)
        if self.fold:
            # both operands of every folded GEMM: zeroed when a flag is up, so that it adds
            # exactly 0 to W (zeroing the deltas alone would leave 0 * inf = NaN)
            self.zeroed = _Table(cp, [_buffer_entry(d) for d in [*self.deltas, *self.a[:L]]])
            # the input batch, which the first folded GEMM reads (checked as a "gradient")
            self.inputs = _Table(cp, [(0, self.a[0].data.ptr, 0, 0, int(self.a[0].size))])
            # the biases, updated by the plain-SGD table kernel from db
            self.bias_update = _Table(cp, table_entries(biases, ws.db, []))

    def stage(self, x: Any, y: Any) -> None:
        """Copy the batch into the captured input buffers (converting dtype on the device);
        nothing to do where the step reads a gather's buffers (``inputs``), which hold it."""
        if self.adopted:
            return
        self.a[0][...] = x
        if self.labels:
            self.labels_in[...] = y
        else:
            self.y_in[...] = y.reshape(self.y_in.shape)

    def set_hyperparameters(self, optimizer: Any, step: int) -> None:
        """Before step ``step`` (1 first): upload what changed (:meth:`.scalars.StepScalars.set`),
        so a steady step uploads nothing."""
        self.scalars.set(self.ctx.device().ring.upload, optimizer, step)

    def run(self) -> None:
        """Enqueue one step: the graph if there is one, else eagerly (capturing on the 2nd run)."""
        cp = self.ctx.cp
        if self.graph is None and self.graphs and self.runs >= 1:
            self.graph = self._capture()
        if self.graph is not None and self.graph is not False:
            self.graph.launch(stream=cp.cuda.get_current_stream())
            self.log.graph_steps += 1
        else:
            self.record(self.status)
            self.log.eager_steps += 1
        self.runs += 1

    def _capture(self) -> Any:
        """The step as a CUDA graph; ``False`` (and a warning, once) if it cannot be captured,
        or :class:`GraphCaptureError` naming the first offending call where graphs are required.

        The first run is eager: the cuBLAS handle, its workspace and the kernels are then made
        and compiled, which must not happen during capture. The handle's stream is set to the
        capture stream before the capture begins (a host-side call), and back afterwards.
        """
        cp = self.ctx.cp
        stream = cp.cuda.Stream(non_blocking=True)
        stream.wait_event(cp.cuda.get_current_stream().record())
        blas = self.ctx.cublas()
        first: Exception | None = None  # the first failure: the call that broke the capture
        try:
            blas.set_stream(stream.ptr)
            with stream:
                stream.begin_capture()
                try:
                    self.record(self.status)
                except Exception as exc:
                    first = exc
                finally:
                    try:
                        graph = stream.end_capture()
                    except Exception as exc:  # the capture invalidated (by ``first``)
                        first = first or exc
            if first is None:
                graph.upload(stream)
                stream.synchronize()
                return graph
        except Exception as exc:  # any capture failure: eager launches give the same results
            first = first or exc
        finally:
            blas.set_stream(cp.cuda.get_current_stream().ptr)
        module_file = getattr(cp, "__file__", None)
        library = Path(module_file).resolve().parent if module_file else None
        why = f"{type(first).__name__}: {first} (at {offending_call(first, library)})"
        if why not in self.log.failures:
            self.log.failures.append(why)
        if self.log.mode == "require":
            raise GraphCaptureError(
                "the train step could not be captured as a CUDA graph, and graphs are required "
                f"(GPUBP_CUDA_GRAPHS=require): {why}; nothing was updated. Run that call "
                "outside the recorded step, or allow eager steps (GPUBP_CUDA_GRAPHS=1)"
            ) from first
        self.on_eager(why)
        return False

    def record(self, status: Any) -> None:
        """Enqueue the whole step on the current stream (eagerly, or into a capture)."""
        ctx, buf, ws = self.ctx, self.buf, self.buf.ws
        kern = self.kernels
        L = len(self.W)
        hp = self.scalars.hp if self.optimizer is not None else ctx.constants(self.dtype)
        self.scalars.record(kern)  # this step's block (the GEMMs' constants too)
        # forward
        for i in range(L):
            out = ws.a[i + 1] if i < L - 1 else ws.z_out
            ctx.gemm(False, True, self.a[i], self.W[i], out, "ONE", "ZERO", hp)
            if i < L - 1:
                launch.bias_activation(kern, out, self.b[i], self.activation, status)
        # output layer: bias, activation, loss per row, delta in place; the fixed-order total
        launch.output_layer(
            kern,
            ws.z_out,
            self.b[L - 1],
            None if self.labels else self.y_in,
            self.labels_in if self.labels else None,
            self.output,
            self.loss,
            buf.row_loss,
            buf.loss,
            status,
            partial=buf.partial,
        )
        # backward: every delta before any update (the deltas read the old weights)
        for i in range(L - 1, 0, -1):
            g = ws.d[i]
            ctx.gemm(False, False, self.deltas[i], self.W[i], g, "ONE", "ZERO", hp)
            launch.hidden_delta(kern, g, self.a[i], self.activation, status)
        if self.optimizer is None:  # gradients only
            for i in range(L):
                ctx.gemm(True, False, self.deltas[i], self.a[i], ws.dW[i], "ONE", "ZERO", hp)
            bias_grad_layers(kern, self.bias, buf.partial, status)
            return
        if self.fold:
            # Every flag is up before anything is written: the bias sums (a float32 overflow is
            # flagged), then the input batch, which the first folded GEMM reads and whose NaN a
            # ReLU hides from the forward flags. If any flag is up the deltas and activations are
            # zeroed, so the folded GEMMs add exactly 0 to W, and the bias update skips itself.
            bias_grad_layers(kern, self.bias, buf.partial, status)
            t = self.inputs
            launch.check_finite_table(kern, self.dtype, t.dev, t.n, t.biggest, status)
            t = self.bias_update  # the new biases, before anything is written
            launch.check_update_table(kern, self.optimizer, self.dtype, t.dev, t.n, t.chunks, hp,
                                      status)  # fmt: skip
            t = self.zeroed
            launch.zero_if_bad_table(kern, self.dtype, t.dev, t.n, t.biggest, status)
            for i in range(L):  # W = -lr * delta.T @ a + 1 * W
                ctx.gemm(True, False, self.deltas[i], self.a[i], self.W[i], "NEG_LR", "ONE", hp)
            t = self.bias_update
            launch.update_table(kern, self.optimizer, self.dtype, t.dev, t.n, t.chunks, hp, status)
        else:
            for i in range(L):
                ctx.gemm(True, False, self.deltas[i], self.a[i], ws.dW[i], "ONE", "ZERO", hp)
            bias_grad_layers(kern, self.bias, buf.partial, status)
            u = self.update
            assert u is not None  # made in __init__ whenever there is an optimizer and no fold
            # every new parameter and state value checked (a NaN gradient gives a NaN one)
            # before the update writes any
            launch.check_update_table(kern, self.optimizer, self.dtype, u.dev, u.n, u.chunks, hp,
                                      status)  # fmt: skip
            launch.update_table(kern, self.optimizer, self.dtype, u.dev, u.n, u.chunks, hp, status)
            self.scalars.counted(kern, status)
        launch.finish_step(kern, status)
        if self.ledger is not None:
            launch.record_loss(kern, buf.loss, float(ws.batch), self.ledger)
