#!/usr/bin/env python3
"""Mutation testing of gpubp's numerical core and its checks (stdlib only; not part of gpubp).

Each mutant below is one realistic slip (a sign, an off-by-one in a range, ``and`` for ``or``,
``>`` for ``>=``, a dropped term, a wrong axis or dtype) written as an exact source snippet and
its replacement, with the tests that should notice it (a targeted subset, so a mutant costs
seconds, not the whole suite). The script copies the repository to a temporary folder once
(without ``.git``, ``.venv`` and caches), then for each mutant writes the mutated file into the
copy, runs the tests there (``PYTHONPATH`` and the working folder set to the copy, Numba's cache
inside it), restores the file, and prints a table: the mutant, killed or survived, and the test
that killed it. The working tree is never written, so an interrupted run (Ctrl-C) leaves
nothing behind but the temporary folder, which is removed on the way out.

Editing the table: code moves. A mutant whose snippet is not found (or found more than once)
in its file is reported "skipped" with the reason, never a crash; update its path or snippet.
A mutant that survives must either be shown equivalent (give the reason in ``equivalent``: it
is printed in the table's note column) or get a test that kills it.

Usage (from the repository root, in the environment the tests run in)::

    python tools/mutate.py                 # every mutant, then the table
    python tools/mutate.py -k numba        # mutants whose name contains "numba"
    python tools/mutate.py --list          # the table of mutants, nothing run
    python tools/mutate.py --check         # only whether each snippet is found exactly once
    python tools/mutate.py --tests-from main   # the same mutants against another revision's tests

Exit status: 0 when every mutant run was killed or is documented as equivalent, 1 when one
survived unexplained or its tests failed on the unmutated code, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mutant:
    """One slip: ``snippet`` (found exactly once in ``path``) becomes ``replacement``."""

    name: str
    path: str
    snippet: str
    replacement: str
    tests: str  # pytest arguments (shlex-split), relative to the repository root
    equivalent: str = ""  # why no test can tell the mutant from the original, if none can


M = Mutant

# --- test selections shared by several mutants ----------------------------------------------

REF = (
    "tests/test_reference.py "
    "tests/test_optim.py::test_reference_update_parameters_matches_torch_rules"
)
NUMPY_OPS = "tests/test_backends.py -k numpy"
#: the update ops and the checked update on NumPy (and the MLP-level non-finite tests)
NUMPY_CHECKS = (
    "tests/test_optim.py tests/test_update_finite.py tests/test_bad_input.py "
    "tests/test_backends.py -k 'numpy and not matches_reference'"
)
#: (not the on-disk cache and allocation tests: slow, and about neither numbers nor checks)
NOT_NUMBA = "not numpy and not cupy and not cache and not allocates"
# test_backends.py first: its train steps compile the kernels before test_numba.py's spies
# replace one (a cold compile under a spy fails to type)
NUMBA = f"tests/test_backends.py tests/test_numba.py -k '{NOT_NUMBA}'"
NUMBA_UPDATE = (
    "tests/test_optim.py tests/test_bad_input.py tests/test_update_proof.py "
    f"tests/test_update_finite.py tests/test_numba.py -k '{NOT_NUMBA}'"
)
LOOP = "tests/test_loop.py tests/test_model.py -k 'gather or fit'"
NPZ = "tests/test_fuzz_files.py tests/test_model.py -k 'not idx'"
IDX = "tests/test_fuzz_files.py tests/test_data.py -k 'idx or read or mismatched'"
SKLEARN = "tests/test_sklearn.py -k 'not cupy and not numba'"

# --- the mutants ------------------------------------------------------------------------------
# name                       file                  snippet -> replacement          tests

MUTANTS: list[Mutant] = [
    # the float64 reference
    M(
        "reference: sigmoid sign",
        "gpubp/reference.py",
        "return 1.0 / (1.0 + np.exp(-z))",
        "return 1.0 / (1.0 + np.exp(z))",
        REF,
    ),
    M(
        "reference: relu' at 0 (>=)",
        "gpubp/reference.py",
        "return (a > 0).astype(np.float64)",
        "return (a >= 0).astype(np.float64)",
        REF,
    ),
    M(
        "reference: sigmoid' sign",
        "gpubp/reference.py",
        "return a * (1.0 - a)",
        "return a * (1.0 + a)",
        REF,
    ),
    M(
        "reference: softmax sum axis",
        "gpubp/reference.py",
        "return e / e.sum(axis=1, keepdims=True)",
        "return e / e.sum(axis=0, keepdims=True)",
        REF,
    ),
    M(
        "reference: one-hot for 3+ outputs only",
        "gpubp/reference.py",
        "if y.ndim == 1 and n_out > 1:",
        "if y.ndim == 1 and n_out > 2:",
        REF,
    ),
    M(
        "reference: mse softmax Jacobian term dropped",
        "gpubp/reference.py",
        "delta = a * (g - np.sum(g * a, axis=1, keepdims=True))",
        "delta = a * g",
        REF,
    ),
    M(
        "reference: log-sum-exp loses its shift",
        "gpubp/reference.py",
        "log_a = z - m - np.log(",
        "log_a = z - np.log(",
        REF,
    ),
    M(
        "reference: backprop stops a layer early",
        "gpubp/reference.py",
        "for layer in range(len(weights) - 1, 0, -1):",
        "for layer in range(len(weights) - 1, 1, -1):",
        REF,
    ),
    M(
        "reference: db a mean, not a sum",
        "gpubp/reference.py",
        "return delta.T @ _f64(a_prev), delta.sum(axis=0)",
        "return delta.T @ _f64(a_prev), delta.mean(axis=0)",
        REF,
    ),
    M(
        "reference: nesterov branches swapped",
        "gpubp/reference.py",
        "g = g + momentum * buf if nesterov else buf",
        "g = buf if nesterov else g + momentum * buf",
        REF,
    ),
    M(
        "reference: adam v bias correction without the step",
        "gpubp/reference.py",
        "v_hat = v / (1.0 - beta2**step)",
        "v_hat = v / (1.0 - beta2)",
        REF,
    ),
    # activations and losses (the NumPy backend's ops, MLP)
    M(
        "activations: leaky relu max -> min",
        "gpubp/activations.py",
        "xp.maximum(z, s, out=z)",
        "xp.minimum(z, s, out=z)",
        NUMPY_OPS,
    ),
    M(
        "activations: sigmoid 1 - exp",
        "gpubp/activations.py",
        "z += 1.0",
        "z -= 1.0",
        NUMPY_OPS,
    ),
    M(
        "activations: softmax without the row-max shift",
        "gpubp/activations.py",
        "    z -= rowbuf\n    xp.exp(z, out=z)",
        "    xp.exp(z, out=z)",
        NUMPY_OPS,
    ),
    M(
        "activations: leaky relu' slope sign",
        "gpubp/activations.py",
        "s *= 1.0 - LEAKY_SLOPE",
        "s *= 1.0 + LEAKY_SLOPE",
        NUMPY_OPS,
    ),
    M(
        "activations: He init 1/n",
        "gpubp/activations.py",
        "float(np.sqrt(2.0 / n_in))",
        "float(np.sqrt(1.0 / n_in))",
        "tests/test_model.py -k initialisation",
    ),
    M(
        "losses: is_classifier > 2 (two-output MSE)",
        "gpubp/losses.py",
        'return loss != "mse" or n_outputs > 1',
        'return loss != "mse" or n_outputs > 2',
        "tests/test_model.py -k 'predict or evaluate'",
    ),
    # the backend ops on NumPy (base.py)
    M(
        "base: cross-entropy value sign",
        "gpubp/backends/base.py",
        "value = (xp.sum(rb) - yz) / B",
        "value = (xp.sum(rb) + yz) / B",
        NUMPY_OPS,
    ),
    M(
        "base: sigmoid output Jacobian sign",
        "gpubp/backends/base.py",
        "            g *= a\n            xp.subtract(1.0, a, out=a)\n            a *= g",
        "            g *= a\n            xp.subtract(a, 1.0, out=a)\n            a *= g",
        NUMPY_OPS,
    ),
    M(
        "base: relu output Jacobian >= 0",
        "gpubp/backends/base.py",
        "xp.greater(a, 0, out=a)",
        "xp.greater_equal(a, 0, out=a)",
        NUMPY_OPS,
    ),
    M(
        "base: one-hot row stride n - 1",
        "gpubp/backends/base.py",
        "xp.multiply(ws.rows, n, out=idx)",
        "xp.multiply(ws.rows, n - 1, out=idx)",
        NUMPY_OPS,
    ),
    M(
        "base: gradients skip the first layer",
        "gpubp/backends/base.py",
        "for i in range(L - 1, -1, -1):\n            self.parameter_gradients(",
        "for i in range(L - 1, 0, -1):\n            self.parameter_gradients(",
        NUMPY_OPS,
    ),
    M(
        "base: check_loss lets inf through",
        "gpubp/backends/base.py",
        "if not math.isfinite(float(value)):",
        "if math.isnan(float(value)):",
        NUMPY_CHECKS,
    ),
    M(
        "base: check_finite and -> or (float32 sum overflow)",
        "gpubp/backends/base.py",
        "if not math.isfinite(float(xp.sum(g))) and not bool(xp.isfinite(g).all()):",
        "if not math.isfinite(float(xp.sum(g))) or not bool(xp.isfinite(g).all()):",
        NUMPY_CHECKS,
    ),
    # the update ops and the checked update (update.py)
    M(
        "update: sgd weight decay on the gradient",
        "gpubp/backends/update.py",
        "xp.multiply(param, weight_decay, out=s)\n",
        "xp.multiply(grad, weight_decay, out=s)\n",
        NUMPY_CHECKS,
    ),
    M(
        "update: nesterov step without momentum",
        "gpubp/backends/update.py",
        "xp.multiply(b_out, lr * momentum, out=s)",
        "xp.multiply(b_out, lr, out=s)",
        NUMPY_CHECKS,
    ),
    M(
        "optim: adam eps without its bias correction",
        "gpubp/optim.py",
        "eps_hat=eps * root_bc2,",
        "eps_hat=eps,",
        NUMPY_CHECKS,
    ),
    M(
        "update: staged check reads only the new parameters",
        "gpubp/backends/update.py",
        "if not all(_all_finite(xp, a) for a in row)]",
        "if not all(_all_finite(xp, a) for a in row[:1])]",
        NUMPY_CHECKS,
    ),
    M(
        "update: _all_finite or -> and (sum overflow rejects a good step)",
        "gpubp/backends/update.py",
        "math.isfinite(float(xp.sum(a))) or bool(xp.isfinite(a).all())",
        "math.isfinite(float(xp.sum(a))) and bool(xp.isfinite(a).all())",
        NUMPY_CHECKS,
    ),
    # the Numba kernels
    M(
        "numba kernels: relu at 0 (<=)",
        "gpubp/backends/numba/kernels.py",
        "return 0.0 if v < 0 else v",
        "return 0.0 if v <= 0 else v",
        NUMBA,
        equivalent="at v = 0 both give a zero (0.0 for v, or v itself: +0.0 or -0.0, equal in "
        "every comparison, product and sum the backward pass makes of it)",
    ),
    M(
        "numba kernels: leaky relu' slope 0",
        "gpubp/backends/numba/kernels.py",
        "return 1.0 if a > 0 else LEAKY_SLOPE",
        "return 1.0 if a > 0 else 0.0",
        NUMBA,
    ),
    M(
        "numba kernels: row sum drops the last element",
        "gpubp/backends/numba/kernels.py",
        "    while j < n:\n        s0 += row[j]",
        "    while j < n - 1:\n        s0 += row[j]",
        NUMBA,
    ),
    M(
        "numba kernels: row max skips the last element",
        "gpubp/backends/numba/kernels.py",
        "    if j < n:\n        m0 = max(m0, row[j])",
        "    if j < n - 1:\n        m0 = max(m0, row[j])",
        NUMBA,
    ),
    M(
        "numba kernels: f' taken from g, not a",
        "gpubp/backends/numba/kernels.py",
        "grow[j] *= act_prime(arow[j], TANH)",
        "grow[j] *= act_prime(grow[j], TANH)",
        NUMBA,
    ),
    M(
        "numba kernels: ReLU's f' taken from g, not a",
        "gpubp/backends/numba/kernels.py",
        "grow[j] *= one if arow[j] > zero else zero",
        "grow[j] *= one if grow[j] > zero else zero",
        NUMBA,
    ),
    M(
        "numba kernels: bce loss sign",
        "gpubp/backends/numba/kernels.py",
        "(1.0 - yj) * max(zf, 0.0) - yj * min(zf, 0.0)",
        "(1.0 - yj) * max(zf, 0.0) + yj * min(zf, 0.0)",
        NUMBA,
    ),
    M(
        "numba kernels: cross-entropy label term 1 for 1/B",
        "gpubp/backends/numba/kernels.py",
        "orow[lab] -= inv_b",
        "orow[lab] -= 1.0",
        NUMBA,
    ),
    M(
        "numba kernels: label n allowed",
        "gpubp/backends/numba/kernels.py",
        "        lab = labels[i]\n        if lab < 0 or lab >= n:",
        "        lab = labels[i]\n        if lab < 0 or lab > n:",
        NUMBA,
    ),
    M(
        "numba kernels: exp32 range reduction off by half",
        "gpubp/backends/numba/exp.py",
        "n = np.floor(xc * _LOG2E + _HALF)",
        "n = np.floor(xc * _LOG2E)",
        "tests/test_numba.py -k exp",
    ),
    M(
        "numba kernels: activation maximum without abs (gradient bound)",
        "gpubp/backends/numba/kernels.py",
        "                cmax[j] = max(cmax[j], abs(row[j]))\n            for j in range(n):\n"
        "                bad[j]",
        "                cmax[j] = max(cmax[j], row[j])\n            for j in range(n):\n"
        "                bad[j]",
        NUMBA,
    ),
    M(
        "numba kernels: a NaN gradient bound (0 * inf) taken as a bound",
        "gpubp/backends/numba/layers.py",
        "    if x != x:\n        return np.inf\n    return max(G, x)",
        "    return max(G, x)",
        NUMBA_UPDATE,
    ),
    M(
        "numba kernels: has_nonfinite skips the last element",
        "gpubp/backends/numba/kernels.py",
        "for k in range(flat.shape[0]):",
        "for k in range(flat.shape[0] - 1):",
        NUMBA_UPDATE,
    ),
    # the Numba optimizer kernels and their proof
    M(
        "numba proof: drops |g'|^2 (Adam + L2 writes inf into v)",
        "gpubp/backends/numba/checked.py",
        "sizes = np.array([b1, omb1, b2, omb2, alpha, l2, g2, g2 * g2, m, v, m / eps, shrunk])",
        "sizes = np.array([b1, omb1, b2, omb2, alpha, l2, g2, m, v, m / eps, shrunk])",
        NUMBA_UPDATE,
    ),
    M(
        "numba proof: ignores AdamW's shrink",
        "gpubp/backends/numba/checked.py",
        "shrunk = abs(shrink) * P if abs(shrink) > 1.0 else 0.0",
        "shrunk = 0.0",
        NUMBA_UPDATE,
    ),
    M(
        "numba optim: adam eps inside the root",
        "gpubp/backends/numba/optim_kernels.py",
        "p[k] = pk * shrink - mk / (math.sqrt(vk) + eps) * alpha",
        "p[k] = pk * shrink - mk / math.sqrt(vk + eps) * alpha",
        NUMBA_UPDATE,
    ),
    M(
        "numba optim: adam check drops v",
        "gpubp/backends/numba/optim_kernels.py",
        "d = (q - q) + (mk - mk) + (vk - vk)",
        "d = (q - q) + (mk - mk)",
        NUMBA_UPDATE,
    ),
    M(
        "numba optim: absmax skips the last element",
        "gpubp/backends/numba/optim_kernels.py",
        "    for k in range(whole, n):\n        a = abs(x[k])",
        "    for k in range(whole, n - 1):\n        a = abs(x[k])",
        NUMBA_UPDATE,
    ),
    M(
        "numba proof: accepts a negative v",
        "gpubp/backends/numba/checked.py",
        "b2 >= 0.0 and omb2 >= 0.0 and vneg == 0.0 and eps",
        "b2 >= 0.0 and omb2 >= 0.0 and eps",
        NUMBA_UPDATE,
        equivalent="the recorded min(0, min v') comes from a write pass, where v' = b2 v + "
        "(1 - b2) g'^2 >= 0: b2 is in [0, 1) (Adam refuses others) and v >= 0 (new or loaded "
        "state has no record, so its first step takes the exact check, which refuses a "
        "negative v': its root is NaN)",
    ),
    M(
        "numba proof: change bound as loose as the size bound",
        "gpubp/backends/numba/checked.py",
        "return np.array([big * 2.0**-8, big * 2.0**-60, float(info.tiny)])",
        "return np.array([big * 2.0**-8, big * 2.0**-8, float(info.tiny)])",
        NUMBA_UPDATE,
    ),
    M(
        "numba proof: never reads |p| for SGD weight decay",
        "gpubp/backends/numba/checked.py",
        "        return s[7] != 0.0 or not abs(s[6]) <= 1.0\n    return s[3] != 0.0",
        "        return s[7] != 0.0 or not abs(s[6]) <= 1.0\n    return False",
        NUMBA_UPDATE,
    ),
    # the epoch loop
    M(
        "loop: the partial last batch dropped",
        "gpubp/loop.py",
        "self.n_batches = math.ceil(n / batch_size)",
        "self.n_batches = n // batch_size",
        LOOP,
    ),
    M(
        "gather: row n allowed",
        "gpubp/gather.py",
        "int(whole.max()) >= n",
        "int(whole.max()) > n",
        LOOP,
    ),
    M(
        "loop: epoch loss over batches, not samples",
        "gpubp/loop.py",
        "total / max(pos.seen, 1)",
        "total / max(pos.batch, 1)",
        LOOP,
    ),
    # the file readers
    M(
        "npz: member shapes not checked against the plan",
        "gpubp/npzfile.py",
        "if want_shape is not None and shape != want_shape:",
        "if want_shape is None and shape != want_shape:",
        NPZ,
    ),
    M(
        "npz: infinity allowed",
        "gpubp/npzfile.py",
        "if not np.isfinite(arr).all():",
        "if np.isnan(arr).any():",
        NPZ,
    ),
    M(
        "npz: preprocessing planned with n_outputs",
        "gpubp/npzfile.py",
        "shapes[name] = (sizes[0],)",
        "shapes[name] = (sizes[-1],)",
        NPZ,
    ),
    M(
        "npz: no check for data past the declared size",
        "gpubp/npzfile.py",
        "if got != nbytes or stream.read(1):",
        "if got != nbytes:",
        NPZ,
        equivalent="the check just above already requires the member's size to be the header "
        "plus the declared bytes, and the capped inflater reads no further than a member's size",
    ),
    M(
        "npz: zip-bomb ratio check on the wrong size",
        "gpubp/npzfile.py",
        "elif info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:",
        "elif info.compress_size > _MAX_DEFLATE_RATIO * info.file_size + 1024:",
        NPZ,
        equivalent="deflate cannot pass ~1032:1, so only a directory that lies about a size "
        "trips this check, and the checks after it refuse a lying size anyway, naming the "
        "member (the plan's size, the .npy header's, zipfile's end of stream and CRC), before "
        "more than the data really there is decompressed",
    ),
    M(
        "idx: magic number and/or",
        "gpubp/idx.py",
        "if len(head) < 4 or head[0] != 0 or head[1] != 0:",
        "if len(head) < 4 or head[0] != 0 and head[1] != 0:",
        IDX,
    ),
    M(
        "idx: zero dimensions allowed",
        "gpubp/idx.py",
        "if not 1 <= ndim <= IDX_MAX_DIMS:",
        "if not 0 <= ndim <= IDX_MAX_DIMS:",
        IDX,
    ),
    M(
        "idx: a longer file not noticed",
        "gpubp/idx.py",
        "body = _read_up_to(stream, nbytes + 1)",
        "body = _read_up_to(stream, nbytes)",
        IDX,
    ),
    M(
        "idx: element size taken as 1 byte",
        "gpubp/idx.py",
        "nbytes = dtype.itemsize\n    for n in shape:",
        "nbytes = 1\n    for n in shape:",
        IDX,
    ),
    # the scikit-learn solver
    M(
        "sklearn: momentum buffer rescaled upside down",
        "gpubp/sklearn/_solver.py",
        "buf *= self._buffer_lr / lr",
        "buf *= lr / self._buffer_lr",
        SKLEARN,
    ),
    M(
        "sklearn: adam eps times the root",
        "gpubp/sklearn/_solver.py",
        "eps = self.epsilon / root",
        "eps = self.epsilon * root",
        SKLEARN,
    ),
    M(
        "sklearn: the L2 penalty on the biases too",
        "gpubp/sklearn/_solver.py",
        "decay = [l2] * L + [0.0] * L  # weights only",
        "decay = [l2] * (2 * L)",
        SKLEARN,
    ),
    M(
        "sklearn: squared error not averaged over the outputs",
        "gpubp/sklearn/_solver.py",
        "value = value / y.shape[1]",
        "value = value  # / y.shape[1]",
        SKLEARN,
    ),
]

# --- running them -----------------------------------------------------------------------------

IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache",
    "build", "dist",
)  # fmt: skip
FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$")


@dataclass
class Outcome:
    mutant: Mutant
    result: str  # killed, survived, equivalent, skipped, error
    detail: str = ""
    seconds: float = 0.0


def locate(root: Path, m: Mutant) -> str | None:
    """Why ``m`` cannot be applied in ``root`` (None if its snippet is there exactly once)."""
    path = root / m.path
    if not path.is_file():
        return f"file {m.path} not found"
    count = path.read_text(encoding="utf-8").count(m.snippet)
    if count == 0:
        return "snippet not found"
    if count > 1:
        return f"snippet found {count} times"
    return None


def run_tests(tree: Path, tests: str, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """``(exit status, first failing test or the tail of the output)`` of pytest in ``tree``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--tb=no", "-rfE", "-p", "no:cacheprovider"]
    cmd += shlex.split(tests)
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -1, f"timed out after {timeout:.0f} s"
    except BaseException:  # Ctrl-C: stop the tests too, then let it through
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    for line in out.splitlines():
        hit = FAILED.match(line)
        if hit:
            return proc.returncode, hit.group(1)
    tail = [line for line in out.splitlines() if line.strip()][-1:] or [""]
    return proc.returncode, tail[0][:160]


def make_tree(repo: Path, tests_from: str | None) -> Path:
    """A copy of ``repo`` to mutate, in a new temporary folder; with ``tests_from``, its
    ``tests`` folder is that git revision's."""
    top = Path(tempfile.mkdtemp(prefix="gpubp-mutate-"))
    tree = top / "repo"
    shutil.copytree(repo, tree, ignore=IGNORE, symlinks=True)
    if tests_from:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", tests_from, "tests"],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        shutil.rmtree(tree / "tests")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    return tree


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    env["NUMBA_CACHE_DIR"] = str(tree.parent / "numba-cache")  # never the user's cache
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_import(tree: Path, env: dict[str, str]) -> None:
    """Refuse to run if ``import gpubp`` in the copy finds another gpubp (an install)."""
    out = subprocess.run(
        [sys.executable, "-c", "import gpubp; print(gpubp.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = Path(out.stdout.strip() or "?").resolve()
    if tree.resolve() not in found.parents:
        sys.exit(f"mutate.py: the copy imports gpubp from {found}, not from {tree}: {out.stderr}")


def run(
    mutants: list[Mutant], repo: Path, timeout: float, baseline: bool, tests_from: str | None
) -> list[Outcome]:
    tree = make_tree(repo, tests_from)
    outcomes: list[Outcome] = []
    try:
        env = environment(tree)
        check_import(tree, env)
        broken: dict[str, str] = {}
        if baseline:  # each selection must pass on the unmutated code, or its verdicts mean nothing
            for tests in dict.fromkeys(m.tests for m in mutants if locate(tree, m) is None):
                status, detail = run_tests(tree, tests, env, timeout)
                print(f"baseline {'ok  ' if status == 0 else 'FAIL'} {tests}", flush=True)
                if status != 0:
                    broken[tests] = detail
        for m in mutants:
            why = locate(tree, m)
            if why is not None:
                outcomes.append(Outcome(m, "skipped", why))
            elif m.tests in broken:
                outcomes.append(Outcome(m, "error", f"fails unmutated: {broken[m.tests]}"))
            else:
                outcomes.append(apply_and_test(tree, m, env, timeout))
            o = outcomes[-1]
            print(f"{o.result:<10} {o.seconds:6.1f}s  {m.name}  {o.detail}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: the table so far", file=sys.stderr)
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)
    return outcomes


def apply_and_test(tree: Path, m: Mutant, env: dict[str, str], timeout: float) -> Outcome:
    path = tree / m.path
    original = path.read_bytes()
    stat = path.stat()
    t0 = time.perf_counter()
    try:
        text = original.decode("utf-8")
        path.write_text(text.replace(m.snippet, m.replacement, 1), encoding="utf-8")
        status, detail = run_tests(tree, m.tests, env, timeout)
    finally:
        path.write_bytes(original)  # the copy back as it was, its time stamp too (Numba's cache)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    seconds = time.perf_counter() - t0
    if status == 0:
        return Outcome(m, "equivalent" if m.equivalent else "survived", m.equivalent, seconds)
    if status == 5:
        return Outcome(m, "error", "no tests selected", seconds)
    return Outcome(m, "killed", detail, seconds)


def table(outcomes: list[Outcome]) -> str:
    rows = ["| mutant | file | result | killed by / note |", "|---|---|---|---|"]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|")
        rows.append(f"| {o.mutant.name} | {o.mutant.path} | {o.result} | {detail} |")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    summary = ", ".join(f"{n} {r}" for r, n in counts.items())
    return "\n".join(rows) + f"\n\n{len(outcomes)} mutants: {summary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k",
        dest="select",
        action="append",
        help="only mutants whose name contains this (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="print the mutants; run nothing")
    parser.add_argument("--check", action="store_true", help="only check that snippets are found")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--tests-from", metavar="REV", help="use this git revision's tests/")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    words = [w.lower() for w in args.select or []]
    mutants = [m for m in MUTANTS if not words or any(w in m.name.lower() for w in words)]
    if not mutants:
        parser.error(f"no mutant name contains any of {words}")
    if args.list or args.check:
        bad = 0
        for m in mutants:
            why = locate(repo, m)
            bad += why is not None
            if args.list or why:
                print(f"{m.name:<62} {m.path:<34} {why or m.tests}")
        return int(bad > 0)
    t0 = time.perf_counter()
    outcomes = run(mutants, repo, args.timeout, not args.no_baseline, args.tests_from)
    print()
    print(table(outcomes))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    unexplained = [o for o in outcomes if o.result in ("survived", "error")]
    return int(bool(unexplained))


if __name__ == "__main__":
    sys.exit(main())
