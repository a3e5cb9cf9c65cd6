"""Streams, events, capture and graphs of the emulated CuPy, and the capture guard.

Work runs when it is submitted (:func:`_submit`), unless its stream is capturing: it is then
recorded as an :class:`_Op` of the :class:`Graph` that ``end_capture()`` returns. :func:`_guard`
refuses, and invalidates the capture for, anything a CUDA graph cannot hold.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from ._common import CUDARuntimeError, StreamCaptureError, _int, stats

# --- streams, capture and graphs ------------------------------------------------------------------


class _Op:
    """One node of a captured graph: what it is, and how to run it."""

    __slots__ = ("kind", "name", "run")

    def __init__(self, kind: str, name: str, run: Callable[[], None]) -> None:
        self.kind, self.name, self.run = kind, name, run

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


_capturing: list[Stream] = []  # at most one
_streams: dict[int, weakref.ref[Stream]] = {}
_stream_ptrs = itertools.count(0x5000_0000, 0x100)


def _guard(what: str) -> None:
    """Raise if a stream is capturing: ``what`` cannot go into a CUDA graph."""
    if _capturing:
        s = _capturing[0]
        s._invalidate(what)
        raise StreamCaptureError(
            f"emulated CUDA: {what} during stream capture (stream {s.ptr:#x}); a CUDA graph holds "
            "only kernel launches, cuBLAS calls on the captured stream, memcpyAsync and NCCL "
            "collectives; do this before begin_capture() or after end_capture()"
        )


def _submit(stream: Stream, op: _Op) -> None:
    """Run ``op`` now, or record it if ``stream`` is capturing."""
    if stream._ops is not None:
        stream._ops.append(op)
        stats["captured_" + op.kind] += 1
        return
    if _capturing:
        _guard(f"{op.kind} {op.name} on stream {stream.ptr:#x} (not the capturing stream)")
    stats["eager_" + op.kind] += 1  # (a graph replay runs its ops without coming here)
    op.run()


class Stream:
    """Stands in for ``cupy.cuda.Stream``: ``with stream:`` makes it current."""

    null: ClassVar[Stream]

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr: int = 0 if null else next(_stream_ptrs)
        self.non_blocking = non_blocking
        self._ops: list[_Op] | None = None
        self._invalid: str | None = None
        self._prev: list[Stream] = []
        _streams[self.ptr] = weakref.ref(self)

    def __repr__(self) -> str:
        return f"<emulated Stream {self.ptr:#x}>"

    def __enter__(self) -> Stream:
        self._prev.append(_current[0])
        _current[0] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _current[0] = self._prev.pop()

    def use(self) -> Stream:
        _current[0] = self
        return self

    def _invalidate(self, what: str) -> None:
        if self._invalid is None:
            self._invalid = what

    def begin_capture(self, mode: Any = None) -> None:
        if self.ptr == 0:
            raise CUDARuntimeError(
                "cudaErrorStreamCaptureUnsupported: the null stream cannot be captured"
            )
        if self._ops is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        if _capturing:
            raise CUDARuntimeError("emulated CUDA: one capture at a time (another stream captures)")
        self._ops, self._invalid = [], None
        _capturing.append(self)

    def end_capture(self) -> Graph:
        if self._ops is None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        ops, self._ops = self._ops, None
        _capturing.remove(self)
        if self._invalid is not None:
            why, self._invalid = self._invalid, None
            raise CUDARuntimeError(
                f"cudaErrorStreamCaptureInvalidated: the capture was invalidated by {why}"
            )
        return Graph(ops)

    def is_capturing(self) -> bool:
        return self._ops is not None

    def synchronize(self) -> None:
        _guard("Stream.synchronize()")
        stats["sync"] += 1

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        """Everything is already done when it is called (no-op, legal during capture too)."""

    @property
    def done(self) -> bool:
        return True


Stream.null = Stream(null=True)
_current: list[Stream] = [Stream.null]


def ExternalStream(ptr: int) -> Stream:
    ref = _streams.get(int(ptr))
    s = ref() if ref is not None else None
    if s is None:
        raise CUDARuntimeError(f"cudaErrorInvalidResourceHandle: no stream {int(ptr):#x}")
    return s


def get_current_stream() -> Stream:
    return _current[0]


def _stream_of(ptr: Any) -> Stream:
    if isinstance(ptr, Stream):
        return ptr
    return ExternalStream(_int(ptr))


class Event:
    """Stands in for ``cupy.cuda.Event`` (work is done when queued, so it is always complete)."""

    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self.disable_timing = disable_timing
        self.time: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        _guard("Event.synchronize()")
        stats["sync"] += 1

    @property
    def done(self) -> bool:
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    if start.time is None or end.time is None or start.disable_timing or end.disable_timing:
        raise CUDARuntimeError("cudaErrorInvalidResourceHandle: event not recorded with timing")
    return (end.time - start.time) * 1e3


class Graph:
    """A captured sequence; :meth:`launch` replays it (``launches`` counts the replays)."""

    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops
        self.launches = 0
        self.uploaded = False

    @property
    def nodes(self) -> list[str]:
        """What was captured, in order: ``"launch <kernel>"``, ``"gemm ..."``, ``"memcpy ..."``."""
        return [f"{op.kind} {op.name}" for op in self.ops]

    def upload(self, stream: Stream | None = None) -> None:
        _guard("Graph.upload()")
        self.uploaded = True

    def _run(self) -> None:
        for op in self.ops:
            op.run()
        self.launches += 1
        stats["graph_launch"] += 1

    def launch(self, stream: Stream | None = None) -> None:
        s = get_current_stream() if stream is None else stream
        _submit(s, _Op("graph", f"of {len(self.ops)} nodes", self._run))
