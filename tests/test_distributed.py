"""Data-parallel training: sharding, equivalence with one process, sync checks, faults.

The ``mpirun`` tests run real MPI jobs of two ranks (``.ci/run`` installs Open MPI); they are
skipped where ``mpirun`` or mpi4py is missing. The hang guard on each job is a timeout, not a
speed check: a job that stops making progress would otherwise wait forever.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpubp import MLP, optim
from gpubp.distributed import DataParallel, DistributedError, shard_bounds
from gpubp.train import TrainConfig, train

from .conftest import EMULATED_GPU, EMULATOR_MODULE, SCHEDULE_PLAN, set_scheduled_rate
from .idx_files import write_fake_idx_dataset

HANG_GUARD_S = 300


def flat(model):
    weights, biases = model.get_parameters()
    return [*weights, *biases]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 64, 101])
def test_shards_are_disjoint_and_cover_the_batch(n, size):
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (lo, hi), (lo2, _) in itertools.pairwise(bounds):
        assert lo <= hi == lo2
    lengths = [hi - lo for lo, hi in bounds]
    assert max(lengths) - min(lengths) <= 1


class LoopbackComm:
    """``size`` ranks simulated in one process: rank ``r``'s shard and, as the "sum", the
    contributions of the other ranks computed on twin models (so a step is checkable without
    MPI)."""

    def __init__(self, rank, size, others=None):
        self.rank, self.size = rank, size
        self.others = others or []  # callables that fill a buffer with another rank's share
        self.checksums = None

    def allreduce_sum(self, buf):
        total = buf.copy()
        for other in self.others:
            total += other()
        buf[...] = total

    def allgather(self, value):
        return self.checksums or [value] * self.size


def test_one_rank_step_equals_a_plain_step(rng):
    x = rng.normal(size=(37, 9))
    y = rng.integers(0, 4, 37)
    a = MLP([9, 19, 4], dtype="float64", seed=1)
    b = MLP([9, 19, 4], dtype="float64", seed=1)
    opt_a, opt_b = optim.Adam(lr=0.01), optim.Adam(lr=0.01)
    dp = DataParallel(LoopbackComm(0, 1), b, limit_threads=False)
    idx = np.arange(37)
    for _ in range(3):
        la = a.train_step(x, y, opt_a)
        lb = dp.step(x, y, idx, opt_b)
        assert la == pytest.approx(lb, rel=1e-13)
    for p, q in zip(flat(a), flat(b)):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("batch", [1, 2, 37])  # 1: one rank gets an empty shard
def test_two_simulated_ranks_equal_one_process(rng, batch):
    """Rank 0's step with rank 1's weighted gradient added (computed on a twin) is the
    single-process step on the whole batch."""
    x = rng.normal(size=(batch, 9)) * 10  # large values
    y = rng.integers(0, 4, batch)
    idx = np.arange(batch)
    ref = MLP([9, 19, 4], activation="tanh", dtype="float64", seed=2)
    ref.train_step(x, y, optim.SGD(lr=0.1, momentum=0.9))

    twin = MLP([9, 19, 4], activation="tanh", dtype="float64", seed=2)
    twin_dp = DataParallel(LoopbackComm(1, 2), twin, limit_threads=False)

    def rank1_share():
        lo, hi = shard_bounds(batch, 1, 2)
        if hi == lo:
            return np.zeros_like(twin_dp.flat)
        value, dWs, dbs = twin.backend.gradients(
            *twin.parameters, x[lo:hi], y[lo:hi], "tanh", "softmax", "cross_entropy"
        )
        share = (hi - lo) / batch
        return np.concatenate([g.ravel() * share for g in [*dWs, *dbs]] + [[value * share, 0, 0]])

    model = MLP([9, 19, 4], activation="tanh", dtype="float64", seed=2)
    dp = DataParallel(LoopbackComm(0, 2, [rank1_share]), model, limit_threads=False)
    dp.step(x, y, idx, optim.SGD(lr=0.1, momentum=0.9))
    for p, q in zip(flat(ref), flat(model)):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14)


def test_parameters_out_of_sync_is_an_error():
    comm = LoopbackComm(0, 2)
    comm.checksums = [1, 2]
    with pytest.raises(DistributedError, match="parameters differ"):
        DataParallel(comm, MLP([3, 4, 2]), limit_threads=False)


def test_missing_mpi4py_says_what_to_install(hide_module):
    from gpubp import distributed

    hide_module("mpi4py")
    with pytest.raises(DistributedError, match=r"pip install 'gpubp\[mpi\]'.*openmpi-bin"):
        distributed.init()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_step_keeps_parameters_on_every_rank(rng):
    from gpubp.errors import NonFiniteLossError

    model = MLP([5, 7, 3], dtype="float32", seed=0)
    dp = DataParallel(LoopbackComm(0, 1), model, limit_threads=False)
    before = model.get_parameters()
    x = np.full((4, 5), 3e38, dtype=np.float32)  # finite inputs whose products overflow
    with pytest.raises(NonFiniteLossError):
        dp.step(x, np.zeros(4, dtype=np.int64), np.arange(4), optim.SGD(lr=0.1))
    for p, q in zip(before[0] + before[1], flat(model)):
        np.testing.assert_array_equal(p, q)


# --- real MPI jobs ---------------------------------------------------------------------------


def _mpi_ready() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin)"
    try:
        from mpi4py import MPI  # noqa: F401  (loads the MPI library too)
    except Exception as exc:  # not installed, or no MPI library for it to load
        return f"mpi4py cannot be used here ({exc}); pip install 'gpubp[mpi]' and an MPI"
    return None


# CI (GPUBP_REQUIRE_EMULATOR=1) installs Open MPI: there a missing mpirun fails the MPI tests
_REQUIRED = os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1"
needs_mpi = pytest.mark.skipif(_mpi_ready() is not None and not _REQUIRED, reason=str(_mpi_ready()))


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
    )
    return env


def _mpirun(n, args, cwd):
    cmd = ["mpirun", "-n", str(n), sys.executable, *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=HANG_GUARD_S
    )


@pytest.fixture
def job(tmp_path, rng):
    write_fake_idx_dataset(tmp_path / "data" / "mnist", rng, n_train=300, n_test=50)
    return tmp_path


TRAIN = ["-m", "gpubp", "train", "--dataset", "mnist", "--data-dir", "data", "--quiet"]
TRAIN += ["--layers", "24,11", "--batch-size", "50", "--dtype", "float64", "--seed", "3"]


@needs_mpi
def test_two_ranks_reproduce_one_process(job):
    one = subprocess.run(
        [sys.executable, *TRAIN, "--epochs", "3", "--save", "one.npz", "--json", "one.json"],
        capture_output=True, text=True, env=_env(), cwd=job, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = _mpirun(2, [*TRAIN, "--epochs", "3", "--distributed", "--save", "two.npz",
                      "--json", "two.json"], job)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "data parallel over 2 MPI rank(s)" in two.stdout
    assert two.stdout.count("test accuracy") == 1  # rank 0 alone reports
    a, b = MLP.load(job / "one.npz"), MLP.load(job / "two.npz")
    for p, q in zip(flat(a), flat(b)):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12)
    la = json.loads((job / "one.json").read_text())["history"]["loss"]
    lb = json.loads((job / "two.json").read_text())["history"]["loss"]
    np.testing.assert_allclose(la, lb, rtol=1e-10)


@needs_mpi
def test_two_ranks_resume_exactly(job):
    args = [*TRAIN, "--schedule", "constant", "--distributed"]
    whole = _mpirun(2, [*args, "--epochs", "4", "--save", "whole.npz"], job)
    assert whole.returncode == 0, whole.stderr
    part = _mpirun(2, [*args, "--epochs", "2", "--checkpoint", "c.ckpt"], job)
    assert part.returncode == 0, part.stderr
    rest = _mpirun(2, [*args, "--epochs", "4", "--resume", "c.ckpt", "--save", "rest.npz"], job)
    assert rest.returncode == 0, rest.stderr
    a, b = MLP.load(job / "whole.npz"), MLP.load(job / "rest.npz")
    for p, q in zip(flat(a), flat(b)):
        np.testing.assert_array_equal(p, q)


FAULTY = textwrap.dedent(
    """
    import os, signal, sys
    from mpi4py import MPI
    from gpubp import cli, distributed

    mode = sys.argv[1]
    original = distributed.DataParallel.step
    calls = [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if MPI.COMM_WORLD.Get_rank() == 1 and calls[0] == 5:
            if mode == "raise":
                raise RuntimeError("injected failure")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    distributed.DataParallel.step = step
    sys.exit(cli.main(sys.argv[2:]))
    """
)


@needs_mpi
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_ends_the_whole_job(job, mode):
    (job / "faulty.py").write_text(FAULTY)
    result = _mpirun(2, ["faulty.py", mode, *TRAIN[2:], "--epochs", "50", "--distributed"], job)
    assert result.returncode != 0
    if mode == "raise":
        assert "gpubp train (rank 1 of 2)" in result.stderr
        assert "RuntimeError: injected failure" in result.stderr


def test_one_rank_comm_world_matches_plain_training(tmp_path, rng, monkeypatch):
    """In-process with MPI's COMM_SELF (one rank): the same run as without MPI."""
    try:
        from mpi4py import MPI
    except Exception as exc:
        pytest.skip(f"mpi4py cannot be used here: {exc}")

    from gpubp.distributed import init

    write_fake_idx_dataset(tmp_path / "mnist", rng, n_train=90, n_test=20)
    monkeypatch.setenv("GPUBP_DATA", str(tmp_path))
    cfg = TrainConfig(dataset="mnist", layers=(8,), batch_size=16, epochs=2, dtype="float64")
    quiet = dict(progress=False, log=lambda _: None)
    plain = train(cfg, **quiet)
    mpi = train(cfg, comm=init(MPI.COMM_SELF), **quiet)
    assert mpi.extra["mpi_ranks"] == 1
    for p, q in zip(flat(plain.model), flat(mpi.model)):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-15)


def test_cost_model():
    from gpubp.distributed import predict_step_seconds

    one = predict_step_seconds(1000, 64, 1, 1e9, 1e9, 1e-6)
    assert one["allreduce"] == 0 and one["speedup"] == pytest.approx(1.0)
    assert one["compute"] == pytest.approx(6 * 1000 * 64 / 1e9)
    four = predict_step_seconds(1000, 64, 4, 1e9, 1e9, 1e-6)
    assert four["compute"] == pytest.approx(one["compute"] / 4)
    assert four["allreduce"] == pytest.approx(2 * 3 / 4 * 1000 * 4 / 1e9 + 2 * 3 * 1e-6)
    assert four["speedup"] == pytest.approx(one["step"] / four["step"])


def test_local_rank_with_one_process():
    try:
        from mpi4py import MPI
    except Exception as exc:
        pytest.skip(f"mpi4py cannot be used here: {exc}")
    from gpubp.distributed import init, local_rank

    assert local_rank(init(MPI.COMM_SELF)) == 0


@needs_mpi
def test_two_ranks_on_the_emulated_gpu_reproduce_one_process(job):
    """The NCCL path: each rank takes its own (emulated) GPU, the all-reduce goes over NCCL
    (emulated over MPI), and the result is the single-process run's."""
    if not EMULATED_GPU:
        pytest.skip("a real GPU is here: this test runs two ranks on the emulated GPU only")
    env = {**_env(), "GPUBP_CUPY_MODULE": EMULATOR_MODULE, "GPUBP_EMU_DEVICES": "2"}
    args = [*TRAIN, "--backend", "cupy", "--epochs", "2"]
    one = subprocess.run(
        [sys.executable, *args, "--save", "one.npz"],
        capture_output=True, text=True, env=env, cwd=job, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    cmd = ["mpirun", "-n", "2", sys.executable, *args, "--distributed", "--save", "two.npz"]
    two = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=job, timeout=HANG_GUARD_S
    )
    assert two.returncode == 0, two.stderr
    assert "data parallel over 2 MPI rank(s)" in two.stdout and "nccl" in two.stdout.lower()
    a, b = MLP.load(job / "one.npz"), MLP.load(job / "two.npz")
    for p, q in zip(flat(a), flat(b)):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("broken", ["missing", "unavailable", "communicator"])
def test_nccl_missing_or_broken_is_a_distributed_error_naming_the_pip_package(broken):
    """NCCL is not in CuPy's [ctk] extra: without nvidia-nccl-cu1x CuPy's nccl module lacks
    get_unique_id (an AttributeError), says available = False, or fails to make a communicator."""
    from types import SimpleNamespace

    from gpubp.distributed import DistributedError, _NCCLReducer

    def no_id():
        raise AttributeError("module 'cupy.cuda.nccl' has no attribute 'get_unique_id'")

    def no_comm(*args):
        raise RuntimeError("NCCL_ERROR_UNHANDLED_CUDA_ERROR")

    nccl = SimpleNamespace(get_unique_id=no_id if broken == "missing" else lambda: b"id",
                           NcclCommunicator=no_comm)  # fmt: skip
    if broken == "unavailable":
        nccl.available = False
    cupy = SimpleNamespace(
        __name__="cupy",
        cuda=SimpleNamespace(nccl=nccl, runtime=SimpleNamespace(runtimeGetVersion=lambda: 13000)),
    )
    comm = SimpleNamespace(rank=0, size=1, bcast=lambda value: value)
    with pytest.raises(DistributedError, match=r"needs NCCL.*pip install nvidia-nccl-cu13"):
        _NCCLReducer(comm, cupy)


def _gpu_data_parallel(model):
    """A DataParallel over MPI's COMM_SELF on the emulated GPU (skips where there is neither)."""
    if not EMULATED_GPU:
        pytest.skip("counted by the emulated GPU")
    try:
        from mpi4py import MPI
    except Exception as exc:
        pytest.skip(f"mpi4py cannot be used here: {exc}")
    from gpubp.distributed import MPICommunicator

    return DataParallel(MPICommunicator(MPI.COMM_SELF), model)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_a_data_parallel_gpu_step_reads_the_device_once(rng, opt_name):
    """On the (emulated) GPU: the loss share is scaled on the device; after the all-reduce the
    loss is checked and the update checked and applied on the device (tables kept, nothing
    uploaded for them), and the verdict comes back with the loss and the stop flag in one read
    (it was two: the tail, then the check's status word; before that 7 for SGD, 15 for Adam)."""
    from cudaemu import _common

    model = MLP([20, 32, 5], backend="cupy", seed=0)
    dp = _gpu_data_parallel(model)
    X = model.backend.asarray(rng.normal(size=(256, 20)), "float32")
    Y = model.backend.xp.asarray(rng.integers(0, 5, 256))
    opt = optim.SGD(lr=0.05, momentum=0.9) if opt_name == "sgd" else optim.Adam(lr=1e-3)
    losses = [dp.step(X, Y, np.arange(64 * k, 64 * k + 64), opt) for k in range(2)]
    reads = _common.stats["get"]
    losses += [dp.step(X, Y, np.arange(64 * k, 64 * k + 64), opt) for k in range(2, 4)]
    assert (_common.stats["get"] - reads) / 2 <= 1
    assert all(np.isfinite(losses)) and opt.state["step"] == 4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shard_gradients_on_the_gpu_are_the_scaled_gradients_bit_for_bit(rng, dtype):
    """The CuPy backend's shard_gradients (the shard read from a gather's buffers, products
    written from the step's buffers) gives the bits of what DataParallel computed before:
    ``gradients``, each tensor times the share, the loss widened to float64 times the share."""
    if not EMULATED_GPU:
        pytest.skip("runs on the emulated GPU")
    from gpubp.gather import BatchGather

    model = MLP([9, 19, 4], activation="tanh", backend="cupy", dtype=dtype, seed=4)
    be, (W, b) = model.backend, model.parameters
    xp = be.xp
    X, Y = be.asarray(rng.normal(size=(40, 9)), dtype), xp.asarray(rng.integers(0, 4, 40))
    gather = BatchGather(X, Y, 13, xp=xp, buffers=be.batch_buffers)
    spec = ("tanh", "softmax", "cross_entropy")
    share = 13 / 40  # not a power of two: every product rounds
    for _ in range(2):  # a second step: the kept buffers reused
        idx = rng.permutation(40)[:13]
        grads = [xp.empty(p.shape, dtype=p.dtype) for p in [*W, *b]]
        tail = xp.zeros(3, dtype=dtype)
        be.shard_gradients(W, b, *gather(idx), spec, share, grads, tail)
        value, dWs, dbs = be.gradients(W, b, X[idx], Y[idx], *spec)
        for got, g in zip(grads, [*dWs, *dbs]):
            np.testing.assert_array_equal(xp.asnumpy(got), xp.asnumpy(g * share))
        want = xp.zeros(1, dtype=dtype)
        want[0] = xp.asarray(value, dtype=np.float64) * share
        assert xp.asnumpy(tail[:1]).tobytes() == xp.asnumpy(want).tobytes()


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_data_parallel_gpu_step_is_the_single_device_step(rng, opt_name, dtype):
    """One rank on the emulated GPU: the same losses and parameters as the backend's own train
    step, and as NumPy's step in float64."""
    x = rng.normal(size=(48, 9))
    y = rng.integers(0, 4, 48)

    def opt():
        return optim.make_optimizer(opt_name, lr=0.01, weight_decay=1e-3)

    gpu = MLP([9, 19, 4], activation="tanh", backend="cupy", dtype=dtype, seed=4)
    one = MLP([9, 19, 4], activation="tanh", backend="cupy", dtype=dtype, seed=4)
    ref = MLP([9, 19, 4], activation="tanh", dtype="float64", seed=4)
    dp = _gpu_data_parallel(gpu)
    X, Y = gpu.backend.asarray(x, dtype), gpu.backend.xp.asarray(y)
    opts = [opt(), opt(), opt()]
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == "float32" else dict(rtol=1e-10, atol=1e-13)
    for k in range(3):
        idx = np.arange(16 * k, 16 * k + 16)
        a = dp.step(X, Y, idx, opts[0])
        b = float(one.train_step(x[idx], y[idx], opts[1]))
        c = float(ref.train_step(x[idx], y[idx], opts[2]))
        assert a == pytest.approx(b, rel=1e-6 if dtype == "float32" else 1e-13)
        assert a == pytest.approx(c, rel=tol["rtol"])
    for p, q, r in zip(flat(gpu), flat(one), flat(ref)):
        np.testing.assert_allclose(p, q, **tol)
        np.testing.assert_allclose(p, r, **tol)
    assert opts[0].state["step"] == 3


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", ["loss", "update"])
def test_a_rejected_data_parallel_gpu_step_changes_nothing(rng, bad):
    """The device rejects the step (a non-finite loss, or finite gradients whose update
    overflows): parameters and optimizer state are unchanged, and the error is the one the
    NumPy path raises (the loss's, or the update naming the tensor)."""
    from gpubp.errors import NonFiniteLossError

    model = MLP([5, 7, 3], backend="cupy", dtype="float32", seed=0)
    dp = _gpu_data_parallel(model)
    opt = optim.SGD(lr=0.1, momentum=0.9)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    dp.step(model.backend.asarray(x), model.backend.xp.asarray(y), np.arange(8), opt)
    before = model.get_parameters()
    momentum = [np.array(model.backend.to_numpy(m)) for m in opt.state["momentum_buffer"]]
    if bad == "loss":
        x = np.full((8, 5), 3e38, dtype=np.float32)  # finite inputs whose products overflow
        match = "the loss is"
    else:
        x = x * 1e3
        opt.lr = 1e37  # finite gradients, an update past float32's range
        match = r"the update would make W\[0\]"
    with pytest.raises(NonFiniteLossError, match=match):
        dp.step(model.backend.asarray(x), model.backend.xp.asarray(y), np.arange(8), opt)
    for p, q in zip(before[0] + before[1], flat(model)):
        np.testing.assert_array_equal(p, q)
    for m, k in zip(momentum, opt.state["momentum_buffer"]):
        np.testing.assert_array_equal(m, model.backend.to_numpy(k))
    assert opt.state["step"] == 1


@pytest.mark.parametrize(
    "opt_name, dtype", [("sgd", "float32"), ("adamw", "float64"), ("adam", "float32")]
)
def test_a_data_parallel_gpu_schedule_computed_on_the_device_gives_the_hosts_steps(
    rng, opt_name, dtype
):
    """Under DataParallel on the (emulated) GPU an optimizer that follows a cosine schedule
    (Optimizer.follow) has its rate computed in the update from a global step counter on the
    device, as the single-device step does: the same bits as the steps with the rate set by the
    host, through a short batch, a rate set by hand, a jump of the global step (a resumed run),
    the last step and beyond; the counter is the device's."""
    from gpubp.schedules import Schedule

    sched = Schedule("cosine", 0.05, 8)
    x = rng.normal(size=(24, 7))
    y = rng.integers(0, 3, 24)
    plan = SCHEDULE_PLAN
    runs, steps = [], []
    for follow in (True, False):
        model = MLP([7, 11, 3], activation="tanh", backend="cupy", dtype=dtype, seed=2)
        dp = _gpu_data_parallel(model)
        X, Y = model.backend.asarray(x, dtype), model.backend.xp.asarray(y)
        opt = {
            "sgd": lambda: optim.SGD(lr=1.0, momentum=0.9, weight_decay=0.01),
            "adamw": lambda: optim.AdamW(lr=1.0, weight_decay=0.1),
            "adam": lambda: optim.Adam(lr=1.0),
        }[opt_name]()
        for t, short in plan:
            set_scheduled_rate(opt, sched, t, follow)
            dp.step(X, Y, np.arange(5) if short else np.arange(16), opt)
        runs.append(flat(model))
        steps.append(opt.state["step"])
        if follow:
            scalars = model.backend._tables.scalars(dtype, adam=opt.kind == "adam", schedule=True)
            assert int(scalars.count[0]) == 31  # the global step after step 30, on the device
    for p, q in zip(*runs):
        np.testing.assert_array_equal(p, q)
    assert steps == [len(plan), len(plan)]
