"""Packaging, the kernels folder, the README's code and the CI script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gpubp
from gpubp.activations import ACTIVATION_IDS
from gpubp.kernel_sources import kernel_files, read_kernel

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_are_found_through_importlib_resources():
    assert "activations.cuh" in kernel_files()
    assert "namespace gpubp" in read_kernel("activations.cuh")


def test_missing_kernel_names_what_exists():
    try:
        read_kernel("nope.cu")
    except FileNotFoundError as exc:
        assert "activations.cuh" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("read_kernel accepted a file that does not exist")


def test_activation_ids_match_the_cuda_header():
    src = read_kernel("activations.cuh")
    ids = {m[0].lower(): int(m[1]) for m in re.findall(r"ACT_([A-Z_]+)\s*=\s*(\d+)", src)}
    assert ids == ACTIVATION_IDS


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_training_loop_runs_as_written(tmp_path, monkeypatch):
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README lost its training-loop example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "model.npz").exists()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd.strip() in [line.strip() for line in ci]


def test_python_dash_m_gpubp():
    out = subprocess.run(
        [sys.executable, "-m", "gpubp", "--version"], capture_output=True, text=True, check=True
    )
    assert gpubp.__version__ in out.stdout


def test_ci_runs_the_readme_quickstart_command():
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert first in [line.strip() for line in ci]


def test_readme_train_options_exist():
    """Every option the README documents for ``gpubp train`` is one the parser knows."""
    from gpubp import cli

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training on real data") : readme.index("### Datasets")]
    documented = set(re.findall(r"`(--[a-z-]+)", section))
    sub = next(
        a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    known = set(sub.choices["train"]._option_string_actions)  # type: ignore[attr-defined]
    assert documented and documented <= known, documented - known


def test_import_gpubp_then_gpubp_train_works():
    """The README writes ``gpubp.train.train(...)`` after a plain ``import gpubp``."""
    code = "import gpubp; print(gpubp.train.train.__name__, gpubp.train.TrainConfig.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["train", "TrainConfig"]
