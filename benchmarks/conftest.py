"""Cases of the pytest-benchmark suite: every available backend x dtype x shape.

Run with ``pytest benchmarks/ --benchmark-only`` (they are not part of the normal ``pytest``
run). The shapes are the standard ones of ``gpubp bench`` unless ``GPUBP_BENCH_SHAPES`` names
others (same syntax as ``gpubp bench --shapes``: names or ``SIZES@BATCH``); ``GPUBP_BENCH_DTYPES``
picks dtypes (default ``float32,float64``). Each case uses the batch size of its backend's device
(a shape without one for that device is left out).
"""

from __future__ import annotations

import pytest
from bench_cases import CASES, Case


@pytest.fixture(params=CASES, ids=[str(c) for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    """Every available backend x dtype x shape (with the batch size of the backend's device)."""
    return request.param
