"""The CUDA kernels without a GPU: every instantiation compiles (NVRTC from PyPI), none spills
registers (where nvcc exists), the backend asks for exactly the compiled instantiations, the launch
wrappers pass arguments that match the kernels' C++ signatures and refuse wrong arrays, and the
host-side pieces (constants, launch plans, pointer tables, hyper-parameters) are right. The GEMM
layout and the cuBLAS binding: tests/test_cublas_binding.py.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from gpubp import activations as act
from gpubp import optim
from gpubp import reference as ref
from gpubp.backends.cuda import catalogue as ck
from gpubp.backends.cuda import context, launch, memory, scalars
from gpubp.backends.cuda import sparse as cuda_sparse
from gpubp.backends.cuda.nvrtc import Nvrtc, find_nvrtc
from gpubp.kernel_sources import read_kernel
from gpubp.losses import LOSSES
from gpubp.optim import SGD, Adam
from gpubp.schedules import FORMULAS

ARCHS = ("sm_80", "sm_90")


# --- the catalogue and the sources ----------------------------------------------------------------


def _enum(src: str, prefix: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(rf"\b{prefix}([A-Z0-9_]+)\s*=\s*(\d+)", src)}


def test_header_constants_match_the_host():
    src = read_kernel("common.cuh")
    assert _enum(src, "STATUS_") == {
        "BAD": ck.STATUS_BAD,
        "SKIPPED": ck.STATUS_SKIPPED,
        "LAUNCH": ck.STATUS_LAUNCH,
        "SLOTS": ck.STATUS_SLOTS,
    }
    assert _enum(src, "HP_") == {**ck.HP, "SLOTS": ck.HP_SLOTS}
    kinds = {f"KIND_{k.upper()}": v for k, v in FORMULAS.items()}
    assert _enum(src, "SCHED_") == {**ck.SCHED, "SLOTS": ck.SCHED_SLOTS, "KIND_HOST": 0, **kinds}
    assert _enum(src, "TARGET_") == {
        "DENSE": ck.TARGET_DENSE,
        "LABELS": ck.TARGET_LABELS,
        "NONE": ck.TARGET_NONE,
    }
    tab = _enum(src, "TAB_")
    assert tab == {
        "PARAM": ck.TAB_PARAM,
        "GRAD": ck.TAB_GRAD,
        "STATE1": ck.TAB_STATE1,
        "STATE2": ck.TAB_STATE2,
        "SIZE": ck.TAB_SIZE,
        "CHUNK0": ck.TAB_CHUNK0,
    }
    assert _enum(src, "TABLE_") == {"COLS": ck.TABLE_COLS}
    bias = ("DELTA", "DB", "ROWS", "N", "PER", "SPLITS", "ITEM0", "TILE0", "COLS")
    assert _enum(read_kernel("bias_grad.cu"), "BIAS_") == {
        **{k: getattr(ck, f"BIAS_{k}") for k in bias},
        "GROUPS": ck.BIAS_GROUPS,
    }
    assert ck.THREADS % 32 == 0 and ck.CHUNK % 4 == 0


def test_the_elementwise_losses_share_one_kernel_body():
    """mse_loss (elementwise outputs), bce_loss and poisson_loss are elementwise_loss with a
    loss functor each (their bits unchanged: test_emulated_kernels' output_layer checks)."""
    src = read_kernel("output_layer.cu")
    for name, term in (("bce_loss", "BceTerm"), ("poisson_loss", "PoissonTerm"),
                       ("mse_loss", "MseTerm")):  # fmt: skip
        body = src[src.index(f"void {name}(") :].split("\n}\n", 1)[0]
        assert f"elementwise_loss<T, TGT>({term}<" in body, name
    assert src.count("for (i64 r = global_thread() >> 5; r < rows; r += warps)") == 3


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_every_kernel_template_is_instantiated(family):
    templates = set(ck.kernel_templates(family))
    names = ck.name_expressions(family)
    assert len(names) == len(set(names)), "an instantiation is listed twice"
    used = {re.match(r"gpubp::(\w+)", n)[1] for n in names}
    assert used == templates, f"{family}: templates {templates} vs instantiated {used}"


def _names_for_every_configuration() -> set[str]:
    """Every kernel name the backend's builders give for every configuration a model can have."""
    names: set[str] = set()
    flags = (False, True)
    for dt in ck.CUDA_TYPES:
        for a in act.HIDDEN_ACTIVATIONS:
            names |= {ck.bias_activation(dt, a), ck.hidden_delta(dt, a)}
        for o in act.OUTPUT_ACTIVATIONS:  # inference through every output activation
            names.add(ck.bias_softmax(dt) if o == "softmax" else ck.bias_activation(dt, o))
        for loss, outputs in LOSSES.items():
            for o, labels in itertools.product(outputs, flags):
                names.add(ck.output_kernel(dt, o, loss, labels))
        # the backend ops' Poisson loss (scikit-learn's MLPRegressor(loss='poisson')): its exp
        # output for inference and its output-layer kernel
        names.add(ck.bias_activation(dt, "exp"))
        names |= {ck.output_kernel(dt, "exp", "poisson", labels) for labels in flags}
        names |= {ck.loss_partial(dt), ck.finalize_loss(dt), ck.record_loss(dt)}
        names.add(ck.bias_grad_partial(dt))
        names.add(ck.bias_grad_finish(dt))
        # every layer's bias gradients of a train step in two launches
        names |= {ck.bias_grad_partial_layers(dt), ck.bias_grad_finish_layers(dt)}
        for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
            names.add(ck.sgd_update_table(dt, momentum != 0, nesterov))
            names.add(ck.sgd_check_table(dt, momentum != 0, nesterov))
        names |= {ck.adam_update_table(dt, d) for d in flags}
        names |= {ck.adam_check_table(dt, d) for d in flags}
        names.add(ck.adam_step_scalars(dt))  # Adam's block in the graph step
        names.add(ck.schedule_lr(dt))  # a schedule's rate in the graph step
        names |= {ck.check_finite_table(dt), ck.zero_if_bad_table(dt)}
        names |= {ck.argmax_accuracy(dt, t) for t in (0, 1, 2)} | {ck.threshold_accuracy(dt)}
        names.add(ck.csr_dense(dt))  # the first layer's products on sparse input
    names.add(ck.finish_step())
    names.add(ck.count_step())
    return names


def test_backend_names_are_exactly_the_compiled_catalogue():
    catalogue = {n for f in ck.FAMILIES for n in ck.name_expressions(f)}
    assert _names_for_every_configuration() == catalogue


def test_builders_refuse_what_is_not_compiled():
    with pytest.raises(ValueError, match="float16"):
        ck.bias_activation("float16", "relu")
    with pytest.raises(ValueError, match="softmax"):
        ck.bias_activation("float32", "softmax")
    with pytest.raises(ValueError, match="not defined"):
        ck.output_kernel("float32", "tanh", "cross_entropy", True)
    with pytest.raises(KeyError):
        ck.family_of("gpubp::bias_activation<float, 9>")


def test_the_backend_compiles_each_family_with_exactly_its_catalogue():
    made: list[dict] = []

    class FakeModule:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def get_function(self, name):
            assert name in made[-1]["name_expressions"]
            return name

    kernels = context.Kernels(SimpleNamespace(RawModule=FakeModule))
    for family in ck.FAMILIES:
        first = ck.name_expressions(family)[0]
        assert kernels(first) == first
        assert kernels(first) == first  # cached: compiled once per device and family
        assert made[-1]["name_expressions"] == ck.name_expressions(family)
        assert made[-1]["code"] == ck.source(family)
        assert made[-1]["options"] == ck.COMPILE_OPTIONS
    assert len(made) == len(ck.FAMILIES)


def test_sources_are_self_contained():
    for family in ck.FAMILIES:
        src = ck.source(family)
        assert '#include "' not in src
        assert src.count("namespace gpubp {") >= 3  # activations, common, the family
        assert src.count("enum Activation") == 1  # each header inlined once


def test_importing_gpubp_needs_no_cupy():
    code = "import gpubp, gpubp.backends.cuda, sys; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- compiling: NVRTC from PyPI, and nvcc where it exists ---------------------------------------

nvrtc_missing = pytest.mark.skipif(
    find_nvrtc() is None, reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc)"
)


@pytest.fixture(scope="module")
def nvrtc():
    return Nvrtc()


@nvrtc_missing
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", ck.FAMILIES)
def test_every_instantiation_compiles_without_warnings(nvrtc, family, arch):
    names = ck.name_expressions(family)
    result = nvrtc.compile(ck.source(family), f"{family}.cu", names, arch, ck.COMPILE_OPTIONS)
    assert not result.warnings, result.log
    assert "error" not in result.log.lower(), result.log
    assert set(result.lowered) == set(names)
    assert all(low.startswith("_Z") for low in result.lowered.values()), result.lowered
    assert len(result.cubin) > 1000


@nvrtc_missing
def test_the_compile_check_catches_warnings_and_errors(nvrtc):
    warn = nvrtc.compile("__global__ void k(float* p) { int x; p[0] = 1; }", "w.cu", [], "sm_90")
    assert warn.warnings
    from gpubp.backends.cuda.nvrtc import NvrtcError

    with pytest.raises(NvrtcError, match="undefined"):
        nvrtc.compile("__global__ void k(float* p) { p[0] = nope; }", "e.cu", [], "sm_90")


def _nvcc_source(family: str) -> str:
    # taking each instantiation's address in host code makes nvcc instantiate it
    refs = ",\n".join(f"    (void*)&{n}" for n in ck.name_expressions(family))
    return f"{ck.source(family)}\nvoid* gpubp_instances[] = {{\n{refs}\n}};\n"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", ck.FAMILIES)
def test_no_kernel_spills_registers(tmp_path, family, arch):
    src = tmp_path / f"{family}.cu"
    src.write_text(_nvcc_source(family))
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "--std=c++17", "-Xptxas", "-v"]
    cmd += ["-Werror", "all-warnings", "-o", str(tmp_path / "k.cubin"), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = out.stdout + out.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    functions = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(functions) == len(ck.name_expressions(family)), report
    assert len(spills) >= len(functions), report
    assert all(s == ("0", "0") for s in spills), report


# --- host-side plans ------------------------------------------------------------------------------


def _tensor_of_chunk(table: np.ndarray, ch: int) -> int:
    lo, hi = 0, len(table) - 1  # the kernel's binary search, transcribed
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if table[mid, ck.TAB_CHUNK0] <= ch:
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.mark.parametrize("chunk", [4, 8, ck.CHUNK])
def test_update_table_chunks_cover_every_element_once(chunk):
    sizes = [1, 3, 4, 5, 4097, 8192, 10, 1]
    entries = [(1000 * (i + 1), 0, 0, 0, s) for i, s in enumerate(sizes)]
    table, total = ck.build_table(entries, chunk)
    seen = [np.zeros(s, dtype=int) for s in sizes]
    for ch in range(total):
        t = _tensor_of_chunk(table, ch)
        begin = (ch - table[t, ck.TAB_CHUNK0]) * chunk
        end = min(begin + chunk, table[t, ck.TAB_SIZE])
        assert begin < end and begin % 4 == 0
        seen[t][begin:end] += 1
    assert all((s == 1).all() for s in seen)
    with pytest.raises(ValueError, match="empty"):
        ck.build_table([(1, 1, 0, 0, 0)])


@pytest.mark.parametrize(
    "rows,n", [(1, 1), (7, 3), (64, 128), (1024, 10), (262144, 64), (8192, 4096)]
)
def test_bias_grad_plan_covers_every_row_once(rows, n):
    splits, per = ck.bias_grad_plan(rows, n)
    assert per >= 32 or splits == 1
    assert (splits - 1) * per < rows <= splits * per
    assert ck.blocks_for(splits * n) >= 1


def _apply_rule(opt, hp, p, g, s1, s2, dtype):
    """The update kernels' per-element rule (optimizers.cu), transcribed, in ``dtype``."""
    T = np.dtype(dtype).type
    h = {k: T(hp[i]) for k, i in ck.HP.items()}
    p, g, s1, s2 = (np.asarray(v, dtype) for v in (p, g, s1, s2))
    if opt.kind == "sgd":
        gg = g + p * h["WEIGHT_DECAY"] if h["WEIGHT_DECAY"] != 0 else g
        if opt.momentum:
            s1 = s1 * h["MOMENTUM"] + gg
            if opt.nesterov:
                p = p - gg * h["LR"]
                p = p - s1 * h["LR_MOMENTUM"]
            else:
                p = p - s1 * h["LR"]
        else:
            p = p - gg * h["LR"]
        return p, s1, s2
    gg = g
    if opt.decoupled and h["WEIGHT_DECAY"] != 0:
        p = p * h["DECAY"]
    elif h["WEIGHT_DECAY"] != 0:
        gg = g + p * h["WEIGHT_DECAY"]
    s1 = s1 * h["BETA1"] + gg * h["ONE_MINUS_BETA1"]
    s2 = s2 * h["BETA2"] + (gg * gg) * h["ONE_MINUS_BETA2"]
    denom = np.sqrt(s2) + h["EPS_HAT"]
    return p - (s1 / denom) * h["ALPHA"], s1, s2


@pytest.mark.parametrize(
    "opt",
    [
        SGD(lr=0.1),
        SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
        SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        Adam(lr=0.01, eps=1e-3, weight_decay=0.01),
        Adam(lr=0.01, weight_decay=0.1, decoupled=True),
    ],
    ids=["sgd", "momentum_wd", "nesterov_wd", "adam_l2", "adamw"],
)
def test_hyperparameter_block_and_update_rule_match_the_reference(opt, rng):
    p, g = rng.normal(size=50), rng.normal(size=50)
    m, v = rng.normal(size=50), rng.random(50)
    for step in (1, 2, 7):
        hp = ck.hyperparameters(opt, step, np.float64)
        got_p, got_1, got_2 = _apply_rule(opt, hp, p, g, m, v, np.float64)
        if opt.kind == "sgd":
            buf = m if opt.momentum else None
            want_p, want_1 = ref.sgd_update(
                p, g, buf, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay
            )
            np.testing.assert_allclose(got_p, want_p, rtol=1e-12)
            if opt.momentum:
                np.testing.assert_allclose(got_1, want_1, rtol=1e-12)
        else:
            b1, b2 = opt.betas
            want = ref.adam_update(p, g, m, v, step, opt.lr, b1, b2, opt.eps, opt.weight_decay,
                                   opt.decoupled)  # fmt: skip
            for got, w in zip((got_p, got_1, got_2), want):
                np.testing.assert_allclose(got, w, rtol=1e-12)
    if opt.kind == "adam":  # the scalars are optim.adam_scalars', as NumPy's and Numba's
        k = optim.adam_scalars(7, opt.lr, *opt.betas, opt.eps, opt.weight_decay, opt.decoupled)
        hp = ck.hyperparameters(opt, 7, np.float64)
        assert (hp[ck.HP["ALPHA"]], hp[ck.HP["EPS_HAT"]], hp[ck.HP["DECAY"]]) == (
            k.alpha,
            k.eps_hat,
            k.shrink,
        )
    hp32 = ck.hyperparameters(opt, 3, np.float32)
    assert hp32.dtype == np.float32 and hp32[ck.HP["ONE"]] == 1 and hp32[ck.HP["ZERO"]] == 0
    assert hp32[ck.HP["NEG_LR"]] == np.float32(-opt.lr)


@pytest.mark.parametrize("sizes", [(784, 128, 10), (4096, 4096, 4096, 4096), (64, 64, 16)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_out_of_memory_estimate_gives_a_batch_that_fits(sizes, dtype):
    fixed, per_sample = memory.workspace_bytes(sizes, 1, dtype)
    assert fixed > 0 and per_sample > 0
    free = 8 * 2**30
    batch = memory.fitting_batch(free, sizes, dtype)
    assert batch > 0
    assert fixed + per_sample * batch <= 0.9 * free < fixed + per_sample * (batch + 1)
    assert memory.fitting_batch(fixed // 2, sizes, dtype) == 0


# --- the launch wrappers: arguments match the C++ signatures; wrong arrays are refused ----------


def _signatures() -> dict[str, list[str]]:
    sigs = {}
    for fam in ck.FAMILIES:
        for m in re.finditer(r"__global__\s+void\s+(\w+)\s*\((.*?)\)\s*\{", ck.source(fam), re.S):
            sigs[m[1]] = [" ".join(p.split()) for p in m[2].split(",")]
    return sigs


_SIGS = _signatures()
_POINTEE = {"i64": np.int64, "int": np.int32, "double": np.float64, "unsigned long long": np.uint64}


class _Recorder:
    """A ``kernels`` getter whose kernels check every argument against the C++ signature."""

    def __init__(self):
        self.launched: list[tuple[str, int, int]] = []

    def __call__(self, name):
        ck.family_of(name)  # a catalogue instantiation

        def fn(grid, block, args):
            base = re.match(r"gpubp::(\w+)", name)[1]
            T = {"float": np.float32, "double": np.float64}.get(
                (re.findall(r"<(\w+)", name) or [""])[0]
            )
            params = _SIGS[base]
            assert len(params) == len(args), (name, params, args)
            for p, a in zip(params, args):
                if "*" in p:
                    elem = p.split("*")[0].replace("const", "").strip()
                    want = T if elem == "T" else _POINTEE[elem]
                    if isinstance(a, np.ndarray):
                        assert a.dtype == want and a.flags.c_contiguous, (name, p, a.dtype)
                    else:
                        assert type(a) is np.uint64 and a == 0, (name, p, a)  # null
                elif p.startswith("i64"):
                    assert type(a) is np.int64, (name, p, type(a))
                elif p.startswith("int"):
                    assert type(a) is np.int32, (name, p, type(a))
                elif p.startswith("double"):
                    assert type(a) is np.float64, (name, p, type(a))
                elif p.startswith("T "):
                    assert type(a) is T, (name, p, type(a))
                else:
                    raise AssertionError((name, p))
            # whole warps, at most THREADS (block-wide sums take fewer threads for few items)
            assert len(grid) == 1 and grid[0] >= 1 and len(block) == 1
            assert block[0] % 32 == 0 and 32 <= block[0] <= ck.THREADS, (name, block)
            self.launched.append((name, grid[0], block[0]))

        return fn


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_wrapper_launches_what_the_kernel_signature_takes(dtype):
    k = _Recorder()
    rows, n = 9, 5
    z, a = np.zeros((rows, n), dtype), np.zeros((rows, n), dtype)
    b = np.zeros(n, dtype)
    status = np.zeros(ck.STATUS_SLOTS, np.int32)
    hp = ck.hyperparameters(SGD(lr=0.1), 1, dtype)
    labels = np.zeros(rows, np.int64)
    row_loss, loss_out = np.zeros(rows, dtype), np.zeros(1, dtype)
    for activation in act.ACTIVATION_IDS:
        launch.bias_activation(k, z, b, activation, status)
    for activation in act.HIDDEN_ACTIVATIONS:
        launch.hidden_delta(k, z, a, activation, status)
    for loss, outputs in LOSSES.items():
        for output in outputs:
            parts = np.zeros(ck.LOSS_PARTS)
            launch.output_layer(k, z, b, None, labels, output, loss, row_loss, loss_out, status,
                                partial=parts)  # fmt: skip
            launch.output_layer(k, z, None, a, None, output, loss, row_loss, loss_out, status,
                                partial=parts)  # fmt: skip
    plan = ck.bias_grad_plan(rows, n)
    partial = np.zeros(plan[0] * n)
    launch.bias_grad(k, z, b, partial, plan, status)
    table, chunks = ck.build_table([(1, 2, 3, 4, 10), (5, 6, 7, 8, 3)])
    for opt in (SGD(lr=0.1), SGD(lr=0.1, momentum=0.9, nesterov=True), Adam(decoupled=True)):
        launch.update_table(k, opt, dtype, table, 2, chunks, hp, status)
    launch.check_finite_table(k, dtype, table, 2, 10, status)
    launch.zero_if_bad_table(k, dtype, table, 2, 10, status)
    launch.finish_step(k, status)
    steps = np.zeros(1, np.int64)
    hp64 = ck.hyperparameters(Adam(), 1, np.float64)
    scalars.adam_step_scalars(k, hp, hp64, steps)
    scalars.schedule_lr(k, hp, hp64, ck.schedule_block(SGD(lr=0.1), None), steps)
    scalars.count_step(k, steps, status)
    pred, correct = np.zeros(rows, np.int64), np.zeros(1, np.uint64)
    for Y, lab in ((None, None), (a, None), (None, labels)):
        launch.argmax_accuracy(k, z, Y, lab, pred, correct, status)
    launch.threshold_accuracy(k, z, a, correct)
    m = cuda_sparse.DeviceCsr(np, sp.csr_array(np.eye(rows, n)), dtype)
    cuda_sparse.csr_dense(k, m, np.zeros((n, 4), dtype), np.zeros((rows, 4), dtype))
    cuda_sparse.csr_dense(k, m, np.zeros((4, n), dtype).T, np.zeros((4, rows), dtype).T)
    families = {ck.family_of(name) for name, _, _ in k.launched}
    assert families == set(ck.FAMILIES)


def test_csr_dense_refuses_wrong_arrays_saying_what_was_expected():
    k = _Recorder()
    m = cuda_sparse.DeviceCsr(np, sp.csr_array(np.eye(3, 4)), np.float32)
    with pytest.raises(ValueError, match=r"w is float32 \(5, 2\); expected float32 \(4, n\)"):
        cuda_sparse.csr_dense(k, m, np.zeros((5, 2), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"out is float64 \(3, 2\); expected \(3, 2\)"):
        cuda_sparse.csr_dense(k, m, np.zeros((4, 2), np.float32), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="out must be C-contiguous or the transpose"):
        w, strided = np.zeros((4, 2), np.float32), np.zeros((3, 4), np.float32)[:, ::2]
        cuda_sparse.csr_dense(k, m, w, strided)
    assert not k.launched


def test_wrappers_refuse_wrong_arrays_saying_what_was_expected():
    k = _Recorder()
    status = np.zeros(ck.STATUS_SLOTS, np.int32)
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"bias_activation: b has shape \(4,\); expected \(3,\)"):
        launch.bias_activation(k, z, np.zeros(4, np.float32), "relu", status)
    with pytest.raises(TypeError, match="b is float64; expected float32"):
        launch.bias_activation(k, z, np.zeros(3), "relu", status)
    with pytest.raises(TypeError, match="expected a float32 or float64 array"):
        launch.hidden_delta(k, z.astype(np.float16), z, "relu", status)
    with pytest.raises(ValueError, match="C-contiguous"):
        launch.hidden_delta(k, np.zeros((3, 4), np.float32).T, z, "relu", status)
    with pytest.raises(ValueError, match=r"status has shape \(2,\)"):
        launch.finish_step(k, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="exactly one of y"):
        launch.output_layer(k, z, None, None, None, "softmax", "cross_entropy",
                            np.zeros(4, np.float32), np.zeros(1, np.float32), status,
                            partial=np.zeros(ck.LOSS_PARTS))  # fmt: skip
    with pytest.raises(TypeError, match="labels is int32; expected int64"):
        launch.output_layer(k, z, None, None, np.zeros(4, np.int32), "softmax", "cross_entropy",
                            np.zeros(4, np.float32), np.zeros(1, np.float32), status,
                            partial=np.zeros(ck.LOSS_PARTS))  # fmt: skip
    with pytest.raises(ValueError, match="does not cover"):
        launch.bias_grad(k, z, np.zeros(3, np.float32), np.zeros(3), (1, 2), status)
    cols = ck.TABLE_COLS
    with pytest.raises(ValueError, match=rf"table has shape \(1, {cols}\); expected \(2, {cols}\)"):
        launch.check_finite_table(k, "float32", np.zeros((1, cols), np.int64), 2, 10, status)
    with pytest.raises(TypeError, match="must be a device array"):
        launch.finish_step(k, [0, 0, 0, 0])
    assert k.launched == []  # nothing was launched by a refused call
