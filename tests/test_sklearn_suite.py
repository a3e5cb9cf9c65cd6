"""scikit-learn's own MLP test module, run against gpubp.sklearn on the NumPy and Numba backends.

The module is the installed scikit-learn's ``sklearn/neural_network/tests/test_mlp.py``, read
at collection time (so it follows whichever scikit-learn is installed) with one change: its
line ``from sklearn.neural_network import MLPClassifier, MLPRegressor`` imports gpubp's
estimators instead. Its tests are collected here as they are (their own parametrisation kept),
each run once per backend: an autouse fixture wraps it in :func:`gpubp.backends.use_backend`,
so the estimators' default ``backend='auto'`` means that backend.

``KNOWN_FAILURES`` lists the tests still expected to fail, each with its reason; they run as
strict xfails, so one that starts to pass fails until it is taken off the list.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("sklearn", minversion="1.6")

from gpubp.backends import available_backends, use_backend

BACKENDS = [b for b in ("numpy", "numba") if b in available_backends()]

ORIGINAL_IMPORT = "from sklearn.neural_network import MLPClassifier, MLPRegressor"
GPUBP_IMPORT = "from gpubp.sklearn import MLPClassifier, MLPRegressor"

#: test name (a shell pattern), optionally with a pattern over its parameters, e.g.
#: ``test_x[numba-*]`` -> why it still fails on gpubp (see the module docstring).
KNOWN_FAILURES: dict[str, str] = {}


def _suite_path() -> Path:
    spec = importlib.util.find_spec("sklearn.neural_network")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "tests" / "test_mlp.py"


def _load_suite() -> dict[str, object]:
    """The copied module's namespace: scikit-learn's source with the import line changed."""
    path = _suite_path()
    if not path.exists():
        pytest.skip(f"this scikit-learn ships no {path}", allow_module_level=True)
    source = path.read_text(encoding="utf-8")
    if source.count(ORIGINAL_IMPORT) != 1:
        raise AssertionError(
            f"{path} no longer has the line {ORIGINAL_IMPORT!r} exactly once; update "
            "ORIGINAL_IMPORT in tests/test_sklearn_suite.py to its new import of the estimators"
        )
    namespace: dict[str, object] = {"__name__": __name__ + ".test_mlp", "__file__": str(path)}
    exec(compile(source.replace(ORIGINAL_IMPORT, GPUBP_IMPORT), str(path), "exec"), namespace)
    return namespace


_SUITE = _load_suite()
for _name, _obj in _SUITE.items():
    if _name.startswith("test_") and callable(_obj):
        globals()[_name] = _obj


def _matches(node_name: str, pattern: str) -> bool:
    """Whether ``test_x[numpy-a-b]`` matches ``test_x`` (any parameters) or
    ``test_x[*-a-*]`` (the parameters matched as a shell pattern)."""
    name, _, params = node_name.partition("[")
    want, _, want_params = pattern.partition("[")
    return fnmatch.fnmatchcase(name, want) and (
        not want_params or fnmatch.fnmatchcase(params, want_params.removesuffix("]"))
    )


@pytest.fixture(autouse=True, params=BACKENDS)
def _backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every copied test once per backend: ``backend='auto'`` means ``request.param``; a test
    named in ``KNOWN_FAILURES`` is a strict xfail."""
    for pattern, reason in KNOWN_FAILURES.items():
        if _matches(request.node.name, pattern):
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    with use_backend(request.param):
        yield


@pytest.fixture
def global_random_seed() -> int:
    """scikit-learn's own conftest fixture, at its default seed (42)."""
    return 42


def test_the_copy_uses_gpubp_estimators() -> None:
    """The changed import took effect (else this module would test scikit-learn itself)."""
    assert _SUITE["MLPClassifier"].__module__.startswith("gpubp.sklearn")
    assert _SUITE["MLPRegressor"].__module__.startswith("gpubp.sklearn")
    for pattern in KNOWN_FAILURES:
        assert fnmatch.filter(_SUITE, pattern.split("[")[0]), f"{pattern} names no test"
