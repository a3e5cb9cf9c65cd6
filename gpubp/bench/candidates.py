"""What is timed: a gpubp backend, PyTorch, and the floor (the step's GEMMs alone)."""

from __future__ import annotations

import functools
import gc
import importlib.util
import inspect
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import BACKEND_NAMES, backend_status, get_backend
from ..backends.cuda.cupy_module import CUPY_MODULE_ENV, cupy_module_name, injected
from ..machine import torch_status
from .candidate import Candidate, cupy_module
from .floors import FloorCandidate, ProviderFloorCandidate, provider_floor
from .problem import (
    ACTIVATION,
    ADAM_LR,
    CPU,
    GPU,
    LOSS,
    LR,
    OUTPUT,
    BenchConfig,
    Problem,
    reference_step,
    step_optimizer,
    validation_error,
)


class BackendCandidate(Candidate):
    """A gpubp backend's ``train_step`` on its own fresh backend instance (own workspaces)."""

    kind = "backend"

    def __init__(
        self,
        name: str,
        label: str | None = None,
        make: Callable[[], Any] | None = None,
        optimizer: str = "sgd",
        threads: int | None = None,
    ) -> None:
        """``make`` builds the backend instance (default: the class of ``get_backend(name)``,
        given ``threads=threads`` where it takes a thread count); ``optimizer`` is a
        :data:`STEP_OPTIMIZERS` name (label ``"numba adam"`` if not sgd)."""
        self.name = name
        self.optimizer = optimizer
        self.label = label or (name if optimizer == "sgd" else f"{name} {optimizer}")
        proto = get_backend(name)
        cls: Any = type(proto)
        if make is None and threads is not None and "threads" in inspect.signature(cls).parameters:
            make = functools.partial(cls, threads=threads)
        self._make = make or cls
        self.device = CPU if proto.xp is np else GPU

    def setup(self, problem: Problem) -> None:
        be = self.be = self._make()
        self.W = [be.asarray(w).copy() for w in problem.W]
        self.b = [be.asarray(v).copy() for v in problem.b]
        self._initial = [*problem.W, *problem.b]  # on the host: no second copy on a device
        self.x = be.asarray(problem.x)
        self.y = be.asarray(problem.y)
        self.opt = step_optimizer(self.optimizer)
        self._dtype = np.dtype(problem.dtype)
        self._bind()
        self.value: Any = None

    def _bind(self) -> None:
        """Fresh optimizer state (zero momentum and moments) for the parameters."""
        self.opt.reset()
        shapes = [tuple(p.shape) for p in (*self.W, *self.b)]
        self.state = self.opt.bind(self, self.be, shapes, self._dtype)

    def step(self) -> None:
        self.value, *_ = self.be.train_step(
            self.W, self.b, self.x, self.y, ACTIVATION, OUTPUT, LOSS, self.opt, self.state
        )

    def sync(self) -> None:
        self.be.synchronize()

    def reset(self) -> None:
        for p, p0 in zip([*self.W, *self.b], self._initial):
            p[...] = self.be.asarray(p0)
        if self.opt.slots:  # in place: a captured CUDA graph keeps the state's addresses
            for col in (self.state[s] for s in self.opt.slots):
                for a in col:
                    a.fill(0)
        self.state["step"] = 0

    def validate(self, problem: Problem) -> float:
        """The first step's error, with the optimizer of :func:`step_optimizer` ``for_check``."""
        timed, self.opt = self.opt, step_optimizer(self.optimizer, for_check=True)
        try:
            self._bind()
            self.reset()
            self.step()
            self.sync()
            reference = reference_step(problem, self.optimizer)
            return validation_error(problem, float(self.value), [*self.W, *self.b], reference)
        finally:
            self.opt = timed
            self._bind()

    def peak_bytes(self, problem: Problem) -> tuple[int | None, str]:
        if self.device == CPU:
            peak, self.step_bytes = _traced_peak(self, problem)
            return peak, "tracemalloc"
        cp = cupy_module()
        pool = cp.get_default_memory_pool()
        cp.cuda.Device().synchronize()
        pool.free_all_blocks()
        base = pool.total_bytes()
        self.setup(problem)
        for _ in range(2):
            self.step()
        self.sync()
        # the pool keeps every block it ever needed, so what it holds is its high-water mark
        return int(pool.total_bytes() - base), "CuPy memory pool"


def _traced_peak(c: Candidate, problem: Problem) -> tuple[int, int]:
    """Bytes traced by tracemalloc: the peak over a fresh setup and two steps of ``c``, and the
    peak of a third step above what was held before it (what a steady-state step allocates)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        c.setup(problem)
        for _ in range(2):
            c.step()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        c.step()
        return int(peak), int(tracemalloc.get_traced_memory()[1] - held)
    finally:
        tracemalloc.stop()


class TorchCandidate(Candidate):
    """The same network and step in PyTorch: ``nn.Linear``/``ReLU``, ``cross_entropy``, SGD or
    Adam, ``fused=True`` on the CPU where PyTorch has it (its fastest update).

    ``mode``: ``eager``; ``graph`` (the whole step captured once in a CUDA graph and replayed,
    as in PyTorch's "whole-network capture" recipe); ``compile`` (``torch.compile`` of the model
    and loss; backward and the optimizer as PyTorch runs them).
    """

    kind = "torch"

    def __init__(
        self, torch: Any, device: str, mode: str = "eager", optimizer: str = "sgd"
    ) -> None:
        self.torch, self.device, self.mode, self.optimizer = torch, device, mode, optimizer
        self.label = "torch" if device == CPU else f"torch {mode}"
        if optimizer != "sgd":
            self.label += f" {optimizer}"

    def setup(self, problem: Problem) -> None:
        t = self.torch
        dev = "cuda" if self.device == GPU else "cpu"
        dt = getattr(t, problem.dtype)
        layers: list[Any] = []
        self.linears: list[Any] = []
        L = len(problem.W)
        for i in range(L):
            n_out, n_in = problem.W[i].shape
            lin = t.nn.Linear(n_in, n_out, dtype=dt, device=dev)
            self.linears.append(lin)
            layers.append(lin)
            if i < L - 1:
                layers.append(t.nn.ReLU())
        model = t.nn.Sequential(*layers)
        self.problem = problem
        self._load(problem)
        self.x = t.as_tensor(problem.x, device=dev)
        self.y = t.as_tensor(problem.y, device=dev)
        params = list(model.parameters())
        if self.optimizer == "adam":
            kw: dict[str, Any] = {"lr": ADAM_LR}
            rule = t.optim.Adam
        else:
            kw, rule = (
                {"lr": LR, "momentum": 0.9 if self.optimizer == "momentum" else 0.0},
                t.optim.SGD,
            )
        self.fused = False
        if self.device == CPU:  # the fastest CPU update PyTorch has: one fused kernel
            try:
                self.opt, self.fused = rule(params, fused=True, **kw), True
            except (RuntimeError, TypeError, ValueError):  # an older PyTorch: its default
                pass
        if not self.fused:
            self.opt = rule(params, **kw)
        if self.mode == "compile":
            # forget earlier compilations: after a different batch size, torch.compile would
            # otherwise recompile for dynamic shapes, which is not what a fixed-shape loop gets
            t.compiler.reset()
        fn = t.compile(model) if self.mode == "compile" else model
        F = t.nn.functional

        def eager_step() -> None:
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.loss = loss

        self._step: Callable[[], None] = eager_step
        if self.mode == "graph":
            side = t.cuda.Stream()
            side.wait_stream(t.cuda.current_stream())
            with t.cuda.stream(side):  # warm up on a side stream before capture
                for _ in range(3):
                    eager_step()
            t.cuda.current_stream().wait_stream(side)
            graph = t.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with t.cuda.graph(graph, stream=side):  # the stream the warm-up ran on
                static_loss = F.cross_entropy(model(self.x), self.y)
                static_loss.backward()
                self.opt.step()
            self.loss = static_loss
            self._step = graph.replay

    def _load(self, problem: Problem) -> None:
        t = self.torch
        with t.no_grad():
            for lin, w, v in zip(self.linears, problem.W, problem.b):
                lin.weight.copy_(t.as_tensor(w))
                lin.bias.copy_(t.as_tensor(v))

    def step(self) -> None:
        self._step()

    def reset(self) -> None:
        self._load(self.problem)
        for st in self.opt.state.values():  # momentum, moments and step count to 0, in place
            for v in st.values():
                if self.torch.is_tensor(v):
                    v.zero_()

    def sync(self) -> None:
        if self.device == GPU:
            self.torch.cuda.synchronize()

    def validate(self, problem: Problem) -> float:
        """The first step's error; Adam's ``eps`` as :func:`step_optimizer` ``for_check`` has
        it."""
        self.reset()
        self._load(problem)  # in place: a captured graph keeps its addresses
        eps = step_optimizer(self.optimizer, for_check=True).hyperparameters().get("eps")
        timed = [g.get("eps") for g in self.opt.param_groups]
        if eps is not None:
            for g in self.opt.param_groups:
                g["eps"] = eps
        try:
            return self._validate(problem)
        finally:
            for g, e in zip(self.opt.param_groups, timed):
                if e is not None:
                    g["eps"] = e

    def _validate(self, problem: Problem) -> float:
        self.step()
        self.sync()
        params = [lin.weight for lin in self.linears] + [lin.bias for lin in self.linears]
        return validation_error(
            problem,
            float(self.loss.detach()),
            [p.detach().cpu().numpy() for p in params],
            reference_step(problem, self.optimizer),
        )

    def peak_bytes(self, problem: Problem) -> tuple[int | None, str]:
        if self.device == CPU:
            return None, "tracemalloc does not see PyTorch's CPU allocator"
        t = self.torch
        t.cuda.synchronize()
        t.cuda.empty_cache()
        t.cuda.reset_peak_memory_stats()
        base = t.cuda.memory_allocated()
        self.setup(problem)
        for _ in range(2):
            self.step()
        self.sync()
        return int(t.cuda.max_memory_allocated() - base), "torch.cuda.max_memory_allocated"


def gpu_status() -> str | None:
    """``None`` if CuPy sees a CUDA GPU, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "CuPy sees no CUDA GPU"
    except Exception as exc:
        return f"CuPy cannot reach a GPU ({type(exc).__name__}: {exc})"
    return None


@dataclass
class Maker:
    """Builds fresh instances of one candidate (timing and the memory pass each get their own)."""

    label: str
    kind: str
    make: Callable[[], Candidate]
    in_sweep: bool = True  # also timed in the --plot batch-size sweep


def make_candidates(
    config: BenchConfig, absent: list[str], gpu_why: str | None
) -> dict[str, list[Maker]]:
    """Per device, the candidates to run; what cannot run goes to ``absent``, with why."""
    status = backend_status()
    names = config.backends if config.backends is not None else list(BACKEND_NAMES)
    out: dict[str, list[Maker]] = {CPU: [], GPU: []}

    def add(device: str, make: Callable[[], Candidate], in_sweep: bool = True) -> None:
        proto = make()
        out[device].append(Maker(proto.label, proto.kind, make, in_sweep))

    for name in names:
        why = status[name]
        if why is None and name == "cupy" and injected():
            why = f"{CUPY_MODULE_ENV}={cupy_module_name()}: a stand-in for CuPy is not timed"
        if why is not None:
            absent.append(f"backend {name}: {why}")
            continue
        make = functools.partial(BackendCandidate, name, threads=config.threads)
        add(make().device, make)
    torch, torch_why = torch_status() if config.torch else (None, "left out by --no-torch")
    if torch is None:
        absent.append(f"PyTorch rows and the 'x torch' column: {torch_why}")
    else:
        add(CPU, functools.partial(TorchCandidate, torch, CPU))
        if torch.cuda.is_available():
            for mode in ("eager", "graph", "compile"):
                add(GPU, functools.partial(TorchCandidate, torch, GPU, mode), mode == "eager")
        else:
            absent.append(
                "PyTorch on a GPU (eager, CUDA graph, torch.compile): "
                "torch.cuda.is_available() is False"
            )
    add(CPU, functools.partial(FloorCandidate, np, CPU))
    if provider_floor() is not None:  # the fastest GEMM found here (MKL where installed)
        add(CPU, ProviderFloorCandidate)
    if gpu_why is None:
        cp = cupy_module()
        add(GPU, functools.partial(FloorCandidate, cp, GPU))
        add(GPU, functools.partial(FloorCandidate, cp, GPU, copy=True), False)
    else:
        absent.append(
            "GPU floors (cuBLAS GEMM, copy bandwidth), GPU batch sizes and the GPU-only "
            f"'wide' shape: {gpu_why}"
        )
    if all(m.kind == "floor" for m in out[GPU]):
        out[GPU] = []  # a floor alone compares nothing
    return out
