"""The emulated ``cupy.ndarray`` and the module-level array functions (``zeros``, ``asarray`` ...).

A device array wraps a NumPy array in device (host) memory; operators and functions run by
delegation to NumPy, refuse NumPy arrays as CuPy does, and are guarded against stream capture.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._common import stats
from ._device import Device
from ._memory import MemoryPointer, _alloc, _is_device, _root, _to_device
from ._stream import _guard

# --- the array ------------------------------------------------------------------------------------

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
    "NumPy array explicitly."
)


def _unsupported(x: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}")


def _operand(x: Any) -> Any:
    """The NumPy value of an operator's other operand; NotImplemented for unknown objects."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        raise _unsupported(x)
    return NotImplemented


def _unwrap(x: Any) -> Any:
    """Function arguments: device arrays to their NumPy arrays; NumPy arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(a: np.ndarray) -> ndarray:
    out = object.__new__(ndarray)
    out._a = a if _is_device(a) else _to_device(a)
    return out


def _result(r: Any, out: Any = None, self: Any = None) -> Any:
    """Wrap NumPy results (arrays and scalars become device arrays, like CuPy's 0-d results)."""
    if isinstance(out, ndarray) and r is out._a:
        return out
    if isinstance(self, ndarray) and r is self._a:
        return self
    if isinstance(r, np.ndarray):
        return _wrap(r)
    if isinstance(r, np.generic):
        return _wrap(np.asarray(r))
    if isinstance(r, (tuple, list)):
        return type(r)(_result(v) for v in r)
    return r


def _binop(f: Callable[..., Any], reflected: bool = False) -> Callable[[ndarray, Any], Any]:
    def op(self: ndarray, other: Any) -> Any:
        o = _operand(other)
        if o is NotImplemented:
            return NotImplemented
        _guard(f"the operator {f.__name__}")
        return _result(f(o, self._a) if reflected else f(self._a, o))

    return op


def _iop(f: Callable[..., Any]) -> Callable[[ndarray, Any], Any]:
    def op(self: ndarray, other: Any) -> Any:
        o = _operand(other)
        if o is NotImplemented:
            return NotImplemented
        _guard(f"the in-place operator {f.__name__}")
        f(self._a, o, out=self._a)
        return self

    return op


def _unop(f: Callable[..., Any]) -> Callable[[ndarray], Any]:
    def op(self: ndarray) -> Any:
        _guard(f"the operator {f.__name__}")
        return _result(f(self._a))

    return op


def _basic_index(idx: Any) -> bool:
    parts = idx if isinstance(idx, tuple) else (idx,)
    return all(
        p is None
        or p is Ellipsis
        or (isinstance(p, (slice, int, np.integer)) and not isinstance(p, bool))
        for p in parts
    )


def _index(idx: Any) -> Any:
    if isinstance(idx, ndarray):
        return idx._a
    if isinstance(idx, tuple):
        return tuple(p._a if isinstance(p, ndarray) else p for p in idx)
    return idx


#: Methods that return a view when they can (no device work), else a copy (device work).
_VIEW_METHODS = frozenset({"reshape", "ravel", "view", "transpose", "swapaxes", "squeeze"})
#: Methods run on the device by delegation to NumPy.
_METHODS = frozenset(
    {
        "astype", "copy", "fill", "sum", "max", "min", "mean", "prod", "std", "var", "argmax",
        "argmin", "any", "all", "cumsum", "clip", "dot", "flatten", "take", "put", "repeat",
        "sort", "argsort", "nonzero", "round", "conj", "diagonal", "trace",
    }
)  # fmt: skip


class ndarray:
    """A device array: a NumPy array in device (host) memory, with CuPy's manners.

    Constructed by the module functions (``ndarray(shape, dtype)`` also allocates, as in CuPy).
    """

    __slots__ = ("__weakref__", "_a")
    __array_priority__ = 100.0
    __array_ufunc__ = None  # NumPy defers to our reflected operators (np.float32(2) * x works)
    __hash__ = None  # type: ignore[assignment]

    _a: np.ndarray

    def __init__(
        self, shape: Any, dtype: Any = float, memptr: Any = None, order: str = "C"
    ) -> None:
        if memptr is not None:
            raise NotImplementedError("emulated cupy.ndarray: memptr= is not supported")
        self._a = _alloc(shape, dtype, order)

    # metadata (no device work; legal during capture)
    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self, int(self._a.__array_interface__["data"][0]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._a.dtype

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def nbytes(self) -> int:
        return self._a.nbytes

    @property
    def itemsize(self) -> int:
        return self._a.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        return self._a.strides

    @property
    def flags(self) -> Any:
        return self._a.flags

    @property
    def T(self) -> ndarray:
        return _wrap(self._a.T)

    @property
    def device(self) -> Device:
        return Device()

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        a = self._a
        return {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (self.data.ptr, False),
            "strides": None if a.flags.c_contiguous else a.strides,
            "version": 3,
        }

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:  # a debugging aid: reads without counting a sync
        return "emulated " + repr(self._a).replace("array(", "cupy.ndarray(", 1)

    # host transfers (synchronising reads are counted in stats["get"])
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> Any:
        _guard("ndarray.get() (a device-to-host copy that synchronises)")
        stats["get"] += 1
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)  # type: ignore[call-overload]

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        _guard("ndarray.set() (a host-to-device copy)")
        stats["h2d"] += 1
        self._a[...] = arr

    def item(self) -> Any:
        _guard("ndarray.item() (a synchronising read)")
        stats["get"] += 1
        return self._a.item()

    def tolist(self) -> Any:
        _guard("ndarray.tolist() (a synchronising read)")
        stats["get"] += 1
        return self._a.tolist()

    def __float__(self) -> float:
        _guard("float(ndarray) (a synchronising read)")
        stats["get"] += 1
        return float(self._a)

    def __int__(self) -> int:
        _guard("int(ndarray) (a synchronising read)")
        stats["get"] += 1
        return int(self._a)

    def __bool__(self) -> bool:
        if self._a.size != 1:
            return bool(self._a)  # NumPy's ValueError for an ambiguous truth value
        _guard("bool(ndarray) (a synchronising read)")
        stats["get"] += 1
        return bool(self._a)

    # indexing: basic indices give views (no device work), others gather on the device
    def __getitem__(self, idx: Any) -> ndarray:
        if _basic_index(idx):
            parts = idx if isinstance(idx, tuple) else (idx,)
            if Ellipsis not in parts:
                parts = (*parts, Ellipsis)  # a 0-d view rather than a NumPy scalar
            return _wrap(self._a[parts])
        _guard("advanced indexing (a gather)")
        for part in idx if isinstance(idx, tuple) else (idx,):
            if isinstance(part, (np.ndarray, list)):  # CuPy uploads a host index array first
                stats["h2d"] += 1
                stats["alloc"] += 1
        return _wrap(np.asarray(self._a[_index(idx)]))

    def __setitem__(self, idx: Any, value: Any) -> None:
        _guard("an assignment x[...] = v")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (np.ndarray, list, tuple)):
            stats["h2d"] += 1  # CuPy copies a host value over first
        self._a[_index(idx)] = value

    def __iter__(self) -> Iterator[ndarray]:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getattr__(self, name: str) -> Any:
        if name in _VIEW_METHODS:
            return functools.partial(_view_method, self, name)
        if name in _METHODS:
            return functools.partial(_method, self, name)
        raise AttributeError(f"'cupy.ndarray' (emulated) object has no attribute {name!r}")

    __add__ = _binop(np.add)
    __radd__ = _binop(np.add, True)
    __sub__ = _binop(np.subtract)
    __rsub__ = _binop(np.subtract, True)
    __mul__ = _binop(np.multiply)
    __rmul__ = _binop(np.multiply, True)
    __truediv__ = _binop(np.true_divide)
    __rtruediv__ = _binop(np.true_divide, True)
    __floordiv__ = _binop(np.floor_divide)
    __rfloordiv__ = _binop(np.floor_divide, True)
    __mod__ = _binop(np.remainder)
    __rmod__ = _binop(np.remainder, True)
    __pow__ = _binop(np.power)
    __rpow__ = _binop(np.power, True)
    __matmul__ = _binop(np.matmul)
    __rmatmul__ = _binop(np.matmul, True)
    __and__ = _binop(np.bitwise_and)
    __rand__ = _binop(np.bitwise_and, True)
    __or__ = _binop(np.bitwise_or)
    __ror__ = _binop(np.bitwise_or, True)
    __xor__ = _binop(np.bitwise_xor)
    __rxor__ = _binop(np.bitwise_xor, True)
    __lshift__ = _binop(np.left_shift)
    __rshift__ = _binop(np.right_shift)
    __eq__ = _binop(np.equal)
    __ne__ = _binop(np.not_equal)
    __lt__ = _binop(np.less)
    __le__ = _binop(np.less_equal)
    __gt__ = _binop(np.greater)
    __ge__ = _binop(np.greater_equal)
    __iadd__ = _iop(np.add)
    __isub__ = _iop(np.subtract)
    __imul__ = _iop(np.multiply)
    __itruediv__ = _iop(np.true_divide)
    __ifloordiv__ = _iop(np.floor_divide)
    __imod__ = _iop(np.remainder)
    __ipow__ = _iop(np.power)
    __iand__ = _iop(np.bitwise_and)
    __ior__ = _iop(np.bitwise_or)
    __ixor__ = _iop(np.bitwise_xor)
    __neg__ = _unop(np.negative)
    __pos__ = _unop(np.positive)
    __abs__ = _unop(np.absolute)
    __invert__ = _unop(np.invert)


# gpubp.backends.to_numpy (and other code) knows a CuPy array by its type's module, "cupy"
ndarray.__module__ = "cupy"


def _view_method(self: ndarray, name: str, *args: Any, **kwargs: Any) -> Any:
    r = getattr(self._a, name)(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
    if isinstance(r, np.ndarray) and _root(r) is _root(self._a):
        return _wrap(r)
    _guard(f"ndarray.{name}() (a copy)")
    return _result(r)


def _method(self: ndarray, name: str, *args: Any, **kwargs: Any) -> Any:
    _guard(f"ndarray.{name}()")
    kw = {k: _unwrap(v) for k, v in kwargs.items()}
    return _result(getattr(self._a, name)(*_unwrap(args), **kw), kwargs.get("out"), self)


# --- module functions -----------------------------------------------------------------------------


def _shape_order(a: ndarray, order: str) -> str:
    if order in ("K", "A"):
        return "F" if a._a.flags.f_contiguous and not a._a.flags.c_contiguous else "C"
    return order


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _wrap(_alloc(shape, dtype, order))


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _wrap(_alloc(shape, dtype, order, fill=0))


def ones(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    out = _alloc(shape, dtype, order)
    out.fill(1)
    return _wrap(out)


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    if dtype is None:
        dtype = np.asarray(_unwrap(fill_value)).dtype
    out = _alloc(shape, dtype, order)
    out[...] = _operand(fill_value)
    return _wrap(out)


def _like(a: Any, dtype: Any, order: str, shape: Any) -> tuple[Any, Any, str]:
    if not isinstance(a, ndarray):
        raise _unsupported(a)
    return (
        a.shape if shape is None else shape,
        a.dtype if dtype is None else dtype,
        _shape_order(a, order),
    )


def empty_like(
    a: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    return empty(*_like(a, dtype, order, shape))


def zeros_like(
    a: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    return zeros(*_like(a, dtype, order, shape))


def ones_like(
    a: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    return ones(*_like(a, dtype, order, shape))


def full_like(
    a: Any, fill_value: Any, dtype: Any = None, order: str = "K", shape: Any = None
) -> ndarray:
    s, d, o = _like(a, dtype, order, shape)
    return full(s, fill_value, d, o)


def arange(start: Any, stop: Any = None, step: Any = None, dtype: Any = None) -> ndarray:
    _guard("cupy.arange()")
    return _wrap(_to_device(np.arange(start, stop, step, dtype=dtype)))


def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
    """A device array: ``a`` itself if it is one of the right dtype, else a copy."""
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return a.astype(dtype)
    _guard("a host-to-device copy (cupy.asarray)")
    host = np.asarray(a, dtype=dtype, order=order)
    stats["h2d"] += 1
    return _wrap(_to_device(host))


def array(
    obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", subok: bool = False,
    ndmin: int = 0, *, blocking: bool = False,
) -> ndarray:  # fmt: skip
    if isinstance(obj, ndarray):
        _guard("cupy.array() (a device copy)")
        r = np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin)  # type: ignore[call-overload]
        return obj if r is obj._a else _wrap(_to_device(r))
    _guard("a host-to-device copy (cupy.array)")
    stats["h2d"] += 1
    return _wrap(_to_device(np.array(obj, dtype=dtype, order=order, ndmin=ndmin)))  # type: ignore[call-overload]


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise _unsupported(a)
    if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    _guard("cupy.ascontiguousarray() (a copy)")
    return _wrap(_to_device(np.ascontiguousarray(a._a, dtype=dtype)))


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)  # type: ignore[call-overload]


def _function(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(f)
    def fn(*args: Any, **kwargs: Any) -> Any:
        _guard(f"cupy.{name}()")
        kw = {k: _unwrap(v) for k, v in kwargs.items()}
        return _result(f(*_unwrap(args), **kw), kwargs.get("out"))

    return fn


class _Namespace:
    """A NumPy submodule (``linalg``, ``random``, ``fft``) with its functions wrapped."""

    def __init__(self, mod: types.ModuleType, name: str) -> None:
        self._mod, self._name = mod, name

    def __getattr__(self, name: str) -> Any:
        obj = getattr(self._mod, name)
        return _function(obj, f"{self._name}.{name}") if callable(obj) else obj
