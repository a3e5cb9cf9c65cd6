"""One memory budget: every size taken from an input is turned into bytes and checked here
before anything that large is allocated.

The inputs are a model file's or checkpoint's declared shapes and its JSON metadata, the IDX
headers of a dataset, and the sizes of options (``--layers``, ``--batch-size``, ``gradflow
--depth/--width``). :func:`check_memory` refuses, with
:class:`~gpubp.errors.MemoryBudgetError`, an estimate beyond :func:`memory_limit`: the
machine's physical memory (or the cgroup limit of this process, where smaller), or
``GPUBP_MEMORY_LIMIT`` (bytes, or a number with ``K``, ``M``, ``G`` or ``T``) where set. The
estimates are upper bounds of what gpubp itself allocates, not of what a run needs in all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import MemoryBudgetError

__all__ = [
    "LIMIT_VARIABLE",
    "check_memory",
    "check_network",
    "format_bytes",
    "memory_limit",
    "network_bytes",
    "parse_size",
]

#: The environment variable that sets the budget (bytes, or e.g. ``64G``).
LIMIT_VARIABLE = "GPUBP_MEMORY_LIMIT"
_LAYER_OVERHEAD = 2048
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``text`` as bytes: an integer, optionally followed by ``K``, ``M``, ``G`` or ``T``
    (powers of 1024; a trailing ``B`` or ``iB`` is allowed). :class:`ValueError` otherwise."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not number or not 0 < value < 2**63 or value != value:
        raise ValueError(
            f"{LIMIT_VARIABLE}={text!r}: expected a positive size such as 8G or 512M or a "
            "number of bytes"
        )
    return int(value * _UNITS[unit])


def _physical_memory() -> int | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 0
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            text = fh.read().strip()
        if text.isdigit() and (total <= 0 or int(text) < total):
            total = int(text)
    except OSError:
        pass
    return total if total > 0 else None


def memory_limit() -> tuple[int | None, str]:
    """``(bytes, where the figure comes from)``: ``GPUBP_MEMORY_LIMIT`` where set, else the
    machine's memory (``None`` where it cannot be told: then nothing is refused)."""
    text = os.environ.get(LIMIT_VARIABLE)
    if text:
        return parse_size(text), f"{LIMIT_VARIABLE}={text}"
    return _physical_memory(), "this machine's memory"


def format_bytes(n: float) -> str:
    """``n`` bytes in words: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(
    nbytes: int, what: str, fix: str = "", error: type[Exception] = MemoryBudgetError
) -> None:
    """Raise ``error`` (default :class:`~gpubp.errors.MemoryBudgetError`) when ``nbytes`` is
    more than :func:`memory_limit`; ``what`` names the input (the option or the file, and what
    it declares), ``fix`` says what to do instead (appended)."""
    limit, source = memory_limit()
    if limit is None or nbytes <= limit:
        return
    suggest = format_bytes(nbytes * 1.25).replace(" ", "").replace("iB", "")
    raise error(
        f"{what} needs about {format_bytes(nbytes)} of memory, more than the "
        f"{format_bytes(limit)} allowed ({source}); "
        + (f"{fix}; " if fix else "")
        + f"to try anyway, set {LIMIT_VARIABLE}={suggest.removesuffix('.0')}"
    )


def network_bytes(layer_sizes: Sequence[int], itemsize: int, batch: int = 0, slots: int = 0) -> int:
    """An upper bound of the bytes a network ``n_0 -> ... -> n_L`` takes: its parameters
    ``P = sum(n_{l+1} (n_l + 1))`` in float64 while they are drawn, then ``(2 + slots) P``
    values of ``itemsize`` bytes (parameters, gradients, optimizer slots), and for a batch of
    ``batch`` rows ``4 batch sum(n_l)`` values (pre-activations, activations, deltas and a
    gathered batch), plus 2 KiB of Python objects per layer (its arrays' headers)."""
    sizes = [int(n) for n in layer_sizes]
    params = sum(sizes[i + 1] * (sizes[i] + 1) for i in range(len(sizes) - 1))
    largest = max((sizes[i + 1] * sizes[i] for i in range(len(sizes) - 1)), default=0)
    overhead = _LAYER_OVERHEAD * (len(sizes) - 1)
    return overhead + 8 * largest + itemsize * ((2 + slots) * params + 4 * batch * sum(sizes))


def check_network(
    layer_sizes: Sequence[int],
    itemsize: int,
    batch: int = 0,
    slots: int = 0,
    fix: str = "choose smaller layer_sizes",
) -> None:
    """:func:`check_memory` of :func:`network_bytes`: a network too large for this machine is
    refused, naming its sizes, before any of it is allocated."""
    sizes = [int(n) for n in layer_sizes]
    params = sum(sizes[i + 1] * (sizes[i] + 1) for i in range(len(sizes) - 1))
    shown = str(sizes) if len(sizes) <= 8 else f"[{sizes[0]}, ... {len(sizes) - 2} layers ...]"
    rows = f", trained in batches of {batch} rows" if batch else ""
    check_memory(
        network_bytes(sizes, itemsize, batch, slots),
        f"a network of layer_sizes {shown} ({params:,} parameters{rows})",
        fix,
    )
