"""Packaging, the kernels folder, the README's code and the CI script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _shipped_files() -> set[Path]:
    """The files pyproject's setuptools tables put in the wheel: every listed package's modules
    and its package-data globs (``.ci/run`` builds the wheel itself and checks the same)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped: set[Path] = set()
    for package in tool["packages"]:
        folder = ROOT / tool.get("package-dir", {}).get(package, package.replace(".", "/"))
        shipped |= set(folder.glob("*.py"))
        for pattern in tool.get("package-data", {}).get(package, []):
            shipped |= set(folder.glob(pattern))
    return shipped


def test_the_wheel_ships_the_kernels_and_no_emulator():
    """cudaemu/ (the CPU emulation of CUDA and CuPy, with its C++ headers) is for the tests and
    CI: no file of it, and no C++ header outside the CUDA sources, is installed."""
    shipped = _shipped_files()
    emulator = {p for p in (ROOT / "cudaemu").rglob("*") if p.is_file()}
    assert emulator and not shipped & emulator
    assert not [p for p in shipped if p.suffix in (".h", ".hpp", ".cpp")]
    cuda = {p.name for p in shipped if p.parent == ROOT / "kernels"}
    assert set(kernel_files()) <= cuda and "output_layer.cu" in cuda
    # every package of the source tree is listed, so that the list above is the whole wheel
    packages = {p.parent for p in (ROOT / "gpubp").rglob("__init__.py")}
    assert packages <= {p.parent for p in shipped}, "a package of gpubp/ is not in pyproject"


def test_activation_ids_match_the_cuda_header():
    src = read_kernel("activations.cuh")
    ids = {m[0].lower(): int(m[1]) for m in re.findall(r"ACT_([A-Z_]+)\s*=\s*(\d+)", src)}
    assert ids == ACTIVATION_IDS


def _section(text: str, heading: str) -> str:
    """The README's text from ``heading`` to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading)
    end = text.find(f"\n{level} ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def _python_example() -> str:
    """The Python block of "Your own training loop" (.ci/run runs the same one)."""
    section = _section((ROOT / "README.md").read_text(), "## Your own training loop")
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README lost its training-loop example"
    return blocks[0]


def _quickstart_commands() -> list[str]:
    section = _section((ROOT / "README.md").read_text(), "## Quickstart")
    return [c.strip() for c in re.findall(r"```bash\n(.*?)\n```", section, re.S)]


def test_readme_training_loop_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(_python_example(), "README.md", "exec"), namespace)
    assert (tmp_path / "model.npz").exists()


def test_every_readme_python_block_runs_on_its_own(tmp_path, monkeypatch):
    """Each ```python block of the README, alone in a fresh namespace, as a reader pastes it into
    a file of their own (the PyTorch ones where PyTorch is installed)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 4, "the README's Python blocks were not found"
    monkeypatch.chdir(tmp_path)
    torch_blocks = [b for b in blocks if "torch" in b]  # to_torch, from_torch, torch.nn
    for block in [b for b in blocks if b not in torch_blocks]:
        exec(compile(block, "README.md", "exec"), {})
    if torch_blocks:  # last, so that a machine without PyTorch still runs the others
        pytest.importorskip("torch")
    for block in torch_blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_quickstart_commands_verbatim_and_in_order():
    """.ci/run runs the README's two Quickstart commands exactly as written, one line each
    (a trailing ``|| fail ...`` allowed, since ``set -e`` ignores failures inside ``&&``)."""
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    install, test = commands
    assert "\n" not in install and "\n" not in test, "each Quickstart command is one line"
    assert "-m venv" in install and ". .venv/bin/activate" in install, install
    assert "gpubp train" in install and "pytest" in test, commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    runs = [re.sub(r"\s+\|\|\s+fail\b.*$", "", line) for line in ci]
    where = []
    for cmd in commands:
        assert cmd in runs, f".ci/run does not run the README's Quickstart command {cmd!r}"
        where.append(runs.index(cmd))
    assert where == sorted(where), "the Quickstart commands run out of order in .ci/run"


def test_the_quickstart_install_has_what_the_next_commands_need():
    """The README's next commands (``--plot``, ``gpubp gradflow``) need matplotlib: the
    Quickstart's install asks for an extra that brings it, besides numba and scikit-learn."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    install = _quickstart_commands()[0]
    asked = re.search(r'pip install "\.\[([a-z0-9,]+)\]"', install)
    assert asked, install
    wanted = " ".join(" ".join(extras[name]) for name in asked.group(1).split(","))
    for package in ("numba", "scikit-learn", "matplotlib"):
        assert package in wanted, f"the Quickstart's install does not bring {package}"


def test_the_readme_says_what_the_test_suite_costs_and_prints():
    """After the test command: its time on 2 cores, that skips and xfails are expected, and a
    quick subset whose files exist."""
    section = _section((ROOT / "README.md").read_text(), "## Quickstart")
    after = section[section.index(_quickstart_commands()[1]) :]
    for said in ("minutes", "2 cores", "skips", "xfails", "expected", "filtered"):
        assert said in after, said
    quick = re.search(r"```\n(pytest -q [^\n]+)\n```", after)
    assert quick, "no quick subset"
    files = [w for w in quick.group(1).split() if w.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files), files


def test_the_expected_warnings_are_filtered():
    """The suite's deliberate float32 overflows and short fits print no warning lines."""
    import warnings

    import numpy as np

    with warnings.catch_warnings(record=True) as caught:
        big = np.full((2, 2), 3e38, np.float32)
        _ = big @ big
        _ = np.full((2, 2), np.inf) @ np.zeros((2, 2))  # inf * 0: invalid
        _ = np.add.reduce(np.array([np.inf, -np.inf]))
        warnings.warn(
            "Stochastic Optimizer: Maximum iterations (3) reached and the optimization hasn't "
            "converged yet.",
            UserWarning,
            stacklevel=1,
        )
    assert not [str(w.message) for w in caught]


def test_ci_tries_the_first_hour_outside_the_checkout():
    """After the Quickstart, .ci/run runs ``gpubp info``, ``gpubp train --help`` and the README's
    Python example from a temporary folder, failing if any fails."""
    ci = (ROOT / ".ci" / "run").read_text()
    start = ci.find(_quickstart_commands()[1])
    assert start != -1, ".ci/run does not run the README's second Quickstart command"
    after = ci[start:]
    outside = after[after.index('cd "$outside"') : after.index('cd "$checkout"')]
    assert 'outside="$(mktemp -d)"' in after
    for step in ("gpubp info ||", "gpubp train --help", "## Your own training loop"):
        assert step in outside, step
    assert "python readme_example.py || fail" in outside


def _own_data_commands() -> list[str]:
    section = _section((ROOT / "README.md").read_text(), "### Your own data")
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("gpubp ")]


def test_ci_runs_the_readme_own_data_commands_outside_the_checkout():
    ci = (ROOT / ".ci" / "run").read_text()
    outside = ci[ci.index('cd "$outside"') : ci.index('cd "$checkout"')]
    assert '"### Your own data"' in outside and "bash own_data.sh || fail" in outside
    commands = _own_data_commands()
    for piece in ("train --data", "--resume", "evaluate", "predict", ".parquet"):
        assert any(piece in c for c in commands), piece


def test_readme_own_data_commands_name_options_that_exist():
    """Each ``gpubp COMMAND --option`` of the README's own-data section parses."""
    import shlex

    from gpubp import cli

    commands = _own_data_commands()
    assert len(commands) >= 5
    for line in commands:
        words = shlex.split(line)[1:]
        args = cli.build_parser().parse_args(words)  # SystemExit on an unknown option
        assert args.command == words[0]


def test_python_dash_m_gpubp():
    out = subprocess.run(
        [sys.executable, "-m", "gpubp", "--version"], capture_output=True, text=True, check=True
    )
    assert gpubp.__version__ in out.stdout


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


def _private_imports(source: str, where: str) -> list[str]:
    """``from M import _name`` of a gpubp module in ``source``: another module's private name."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        ours = node.level > 0 or (node.module or "").split(".")[0] == "gpubp"
        for alias in node.names if ours else ():
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{where}:{node.lineno} {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    """DESIGN.md section 3: a name with a leading underscore stays in its module (a private
    *module*, such as ``_checks.py``, is imported by its public names)."""
    offenders = [
        hit
        for p in sorted((ROOT / "gpubp").rglob("*.py"))
        for hit in _private_imports(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    ]
    assert not offenders, offenders


def test_the_private_import_finder_finds_them():
    source = (
        "from .launch import _check\n"
        "from gpubp.x import _y, ok\n"
        "from . import _checks\n"
        "from __future__ import annotations\n"
        "from sklearn.utils import _private\n"
    )
    assert [h.split()[-1] for h in _private_imports(source, "probe")] == ["_check", "_y", "_checks"]
