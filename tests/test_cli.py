"""``gpubp check`` and ``gpubp info``."""

from __future__ import annotations

import numpy as np
import pytest

from gpubp import cli
from gpubp.backends.numpy_backend import NumpyBackend


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "softmax+cross_entropy" in out and "binary_cross_entropy" in out
    assert "within tolerance" in out


def test_check_runs_the_cupy_backend_on_the_emulated_gpu(tmp_path):
    """``GPUBP_CUPY_MODULE=cudaemu.cupy gpubp check --backends cupy``, as a kernel developer
    without a GPU runs it from the repository root: a fresh process, the kernels built for the
    CPU, every configuration within tolerance."""
    import os
    import subprocess
    import sys

    from .conftest import EMULATED_GPU, EMULATOR_MODULE

    if not EMULATED_GPU:
        pytest.skip("a real GPU is here: gpubp check --backends cupy runs on it")
    env = {
        **os.environ,
        "GPUBP_CUPY_MODULE": EMULATOR_MODULE,
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    cmd = [sys.executable, "-m", "gpubp", "check", "--backends", "cupy", "--dtypes", "float32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "cupy     float32  softmax+cross_entropy" in res.stdout
    assert "within tolerance" in res.stdout


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    # a backend whose hidden delta forgets f'(a): the check must notice and exit 1
    def wrong_hidden_delta(self, delta_next, W_next, a, activation, *, out=None, scratch=None):
        return np.matmul(delta_next, W_next, out=out)

    monkeypatch.setattr(NumpyBackend, "hidden_delta", wrong_hidden_delta)
    assert cli.main(["check", "--backends", "numpy", "--dtypes", "float64"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "sigmoid" in out


def test_check_fails_on_a_wrong_update(monkeypatch, capsys):
    original = NumpyBackend.adam_update

    def off_by_eps(self, param, grad, m, v, step, lr, beta1, beta2, eps, *rest, **kw):
        wrong_eps = 10 * eps + 1e-3
        return original(self, param, grad, m, v, step, lr, beta1, beta2, wrong_eps, *rest, **kw)

    monkeypatch.setattr(NumpyBackend, "adam_update", off_by_eps)
    assert cli.main(["check", "--backends", "numpy", "--dtypes", "float64"]) == 1
    assert "step:adam" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--backends", "tpu"], "unknown backend 'tpu'"),
        (["check", "--dtypes", "float16"], "'float16' is not supported"),
    ],
)
def test_check_rejects_bad_arguments(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_check_unavailable_backend_says_why(capsys):
    import gpubp

    missing = [n for n, why in gpubp.backend_status().items() if why is not None]
    if not missing:
        pytest.skip("needs a backend that cannot run here, and every backend runs here")
    assert cli.main(["check", "--backends", missing[0]]) == 2
    assert "cannot run here" in capsys.readouterr().err


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "numba", "cupy"):
        assert name in out


def test_info_names_the_cublas_the_cupy_backend_calls(capsys, monkeypatch):
    from gpubp.backends.cuda import cublas

    monkeypatch.setattr(cli, "backend_status", lambda: {"numpy": None, "numba": None, "cupy": None})
    monkeypatch.setattr(cublas, "cupy_cublas", lambda: ("/opt/cu13/lib/libcublas.so.13", None))
    monkeypatch.setenv("GPUBP_CUPY_MODULE", "cupy")
    assert cli.main(["info"]) == 0
    assert "cuBLAS (cupy backend): /opt/cu13/lib/libcublas.so.13" in capsys.readouterr().out
    monkeypatch.setattr(cublas, "cupy_cublas", lambda: (None, "CuPy's cuBLAS module did not load"))
    assert cli.main(["info"]) == 0
    assert "cuBLAS (cupy backend): not loaded: CuPy's cuBLAS" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "check" in capsys.readouterr().out


def test_info_into_a_closed_pipe_is_no_traceback():
    """``gpubp info | head -3``: the reader goes away, gpubp ends quietly."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubp", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as head does once it has its lines
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_an_unavailable_backend_error_carries_its_fields():
    """The error names the backend, why and what can run; Python and the command line each get
    their own way out, without rewriting text."""
    from gpubp.errors import BackendUnavailableError

    e = BackendUnavailableError("cupy", "no GPU", ["numba", "numpy"])
    assert (e.backend, e.why, e.available) == ("cupy", "no GPU", ["numba", "numpy"])
    assert "pass backend='auto'" in str(e) and "--backend" not in str(e)
    assert "pass --backend auto" in e.command_line_message()
