"""gpubp's ``.npz`` files: the formats, and reading them with every check made before memory is
spent.

A model file (:data:`FORMAT`) or checkpoint (:data:`CHECKPOINT_FORMAT`) is a zip archive of
``.npy`` members: ``meta`` (JSON as uint8) and the parameter and optimizer arrays it describes.
:func:`write_npz` writes one atomically (:func:`gpubp.files.write_atomic`), uncompressed and
without pickle. :func:`read_npz` reads ``meta`` first
(capped at :data:`META_MAX_BYTES`), derives from the model it declares the name, shape and size
of every other member, checks their declared sizes together against the memory budget
(:func:`gpubp.budget.check_memory`), then reads each member's ``.npy`` header and checks its
dtype (float32 or float64), shape and size against that plan before it reads the data. Members
are stored or deflated (bzip2 and LZMA are refused: :mod:`zipfile` inflates them with no cap);
a member is inflated here, in chunks, straight into its array and never past the size its
header declares, and its CRC-32 is checked. An archive member not in the plan, a size the
archive cannot hold (a zip bomb), a truncated or corrupt member, or a NaN / infinite value
raises the given error naming the file: never another exception.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zipfile
import zlib
from typing import IO, Any

import numpy as np

from .budget import check_memory
from .errors import ModelFileError, OutputWriteError
from .files import open_regular, write_atomic
from .optim import make_optimizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_MEMBERS",
    "META_MAX_BYTES",
    "layout",
    "parse_json",
    "parse_meta",
    "read_npz",
    "saved_parameters",
    "write_npz",
    "write_npz_atomic",
]

#: The ``format`` a model file's metadata names (:meth:`gpubp.MLP.save`).
FORMAT = "gpubp-mlp"
#: The ``format`` a checkpoint's metadata names (:func:`gpubp.train.train`).
CHECKPOINT_FORMAT = "gpubp-checkpoint"
#: The version of both formats that this gpubp writes and reads.
FORMAT_VERSION = 1

#: The largest ``meta`` member read (its JSON holds the configuration and the run's history:
#: a run of 5,000 epochs tracking the gradients of 20 layers writes about 5 MiB). Parsed JSON
#: takes up to about 15 times its text, so this bounds the memory of the metadata too.
META_MAX_BYTES = 8 << 20
#: Deflate cannot shrink data by more than about 1032:1; a member claiming more lies.
_MAX_DEFLATE_RATIO = 1100
_MAX_MEMBERS = 4096
#: The most bytes a ``.npy`` header may take (NumPy writes 128 or so; it reads up to 10,000).
_HEADER_MAX = 1 << 16
_CHUNK = 1 << 20
_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}
_MAX_LAYERS = 1024
#: Optional members both formats may hold: the input preprocessing
#: ``x' = (x - input_shift) * input_scale``, one value per input.
INPUT_MEMBERS = ("input_shift", "input_scale")
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    MemoryError,
)


def parse_json(raw: bytes, path: Any, error: type[Exception]) -> Any:
    """``raw`` parsed as JSON, or ``error`` naming ``path`` (bad UTF-8, bad JSON, nesting too
    deep, integers beyond Python's digit limit)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise error(f"{path}: the metadata is not valid JSON ({why})") from None


def _positive_ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value
    )


def layout(meta: Any, path: Any, error: type[Exception]) -> dict[str, tuple[int, ...]]:
    """The shape of every array member ``meta`` allows: ``W<i>``, ``b<i>``, the optional input
    preprocessing, and for a checkpoint ``opt_<slot>_<j>`` for its optimizer's slots (``j`` in
    the order ``W0..W{L-1}, b0..b{L-1}``)."""
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, CHECKPOINT_FORMAT):
        raise error(
            f"{path}: not a gpubp model file or checkpoint (its metadata names no gpubp format)"
        )
    config = meta.get("config")
    sizes: Any = config.get("layer_sizes") if isinstance(config, dict) else None
    if not _positive_ints(sizes) or not 2 <= len(sizes) <= _MAX_LAYERS + 1:
        raise error(
            f"{path}: the saved configuration has no valid layer_sizes (expected a list "
            "of 2 or more positive integers)"
        )
    L = len(sizes) - 1
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(L):
        shapes[f"W{i}"] = (sizes[i + 1], sizes[i])
        shapes[f"b{i}"] = (sizes[i + 1],)
    for name in INPUT_MEMBERS:
        shapes[name] = (sizes[0],)
    if meta["format"] == CHECKPOINT_FORMAT:
        opt = meta.get("optimizer")
        kind = opt.get("kind") if isinstance(opt, dict) else None
        try:
            slots = make_optimizer(kind).slots if isinstance(kind, str) else ()
        except ValueError:
            slots = ()  # the checkpoint's own checks name the bad optimizer
        order = [shapes[f"W{i}"] for i in range(L)] + [shapes[f"b{i}"] for i in range(L)]
        for slot in slots:
            for j, shape in enumerate(order):
                shapes[f"opt_{slot}_{j}"] = shape
    return shapes


def _member_names(zf: zipfile.ZipFile, path: Any, error: type[Exception]) -> dict[str, Any]:
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise error(f"{path}: an archive of {len(infos)} members; a gpubp file holds far fewer")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if not info.filename.endswith(".npy") or "/" in info.filename:
            raise error(
                f"{path}: holds {info.filename[:80]!r}, which is not an array (.npy) "
                "member; the file is not a gpubp model file"
            )
        name = info.filename[:-4]
        if name in members:
            raise error(f"{path}: holds the member {name!r} twice")
        members[name] = info
    return members


def _check_sizes(info: zipfile.ZipInfo, file_bytes: int, path: Any, error: type[Exception]) -> None:
    name = info.filename[:-4]
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
        raise error(
            f"{path}: the member {name!r} is compressed with {method}; gpubp reads stored or "
            "deflated members only (write the file with MLP.save or numpy.savez)"
        )
    if info.flag_bits & 0x1:
        raise error(f"{path}: the member {name!r} is encrypted; gpubp files never are")
    if info.header_offset + info.compress_size > file_bytes:
        raise error(f"{path}: the member {name!r} runs past the end of the file (truncated)")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise error(f"{path}: the member {name!r} declares inconsistent sizes")
    elif info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
        raise error(
            f"{path}: the member {name!r} claims {info.file_size} bytes from "
            f"{info.compress_size} compressed ones (a zip bomb?); refused"
        )


class _MemberStream:
    """A member's bytes, read straight from the archive and inflated (deflate) as they are
    read, never more than :attr:`cap` bytes in all: what the caller allows so far (the
    ``.npy`` header's most, then the size its header declares). Its CRC-32 is kept as it goes.
    """

    def __init__(self, fh: IO[bytes], info: zipfile.ZipInfo, path: Any, error: type[Exception]):
        self.name, self.path, self.error = info.filename[:-4], path, error
        fh.seek(info.header_offset)
        head = fh.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise error(f"{path}: the member {self.name!r} has no valid local header (damaged)")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        self.fh, self.left = fh, info.compress_size  # compressed bytes not yet read
        self.inflate = (
            zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
        )
        self.cap = 0  # how many more bytes may come out
        self.done = 0
        self.crc = 0

    def _raw(self, n: int) -> bytes:
        data = self.fh.read(min(n, self.left))
        if not data and self.left:
            raise self.error(f"{self.path}: the member {self.name!r} is truncated")
        self.left -= len(data)
        return data

    def _chunk(self, want: int) -> bytes:
        if self.inflate is None:
            return self._raw(want)
        while True:
            data = self.inflate.unconsumed_tail
            if not data:
                if self.inflate.eof or not self.left:
                    return b""
                data = self._raw(_CHUNK)
            out = self.inflate.decompress(data, want)
            if out or self.inflate.eof:
                return out

    def read(self, n: int = -1) -> bytes:
        """At most ``n`` bytes (``-1``: all that the cap allows), fewer only at the end."""
        n = self.cap if n < 0 else min(n, self.cap)
        parts, got = [], 0
        while got < n:
            chunk = self._chunk(min(n - got, _CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.cap -= len(data)
        self.done += len(data)
        self.crc = zlib.crc32(data, self.crc)
        return data

    def readinto(self, out: memoryview) -> int:
        """Fill ``out`` (bytes) in chunks; how many bytes came."""
        pos = 0
        while pos < len(out):
            chunk = self.read(min(len(out) - pos, _CHUNK))
            if not chunk:
                break
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return pos


def _read_header(fh: Any, name: str, path: Any, error: type[Exception]) -> tuple[Any, ...]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except error:
        raise
    except Exception as exc:  # NumPy parses the header as Python text: any error may come
        raise error(f"{path}: the member {name!r} has no valid .npy header ({exc})") from None
    if fortran:
        raise error(f"{path}: the member {name!r} is stored in Fortran order; gpubp writes C order")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise error(
            f"{path}: the member {name!r} declares the shape {shape!r:.80}; expected sizes "
            "that are whole numbers >= 0"
        )
    return tuple(shape), np.dtype(dtype)


def _read_member(
    fh: IO[bytes],
    info: zipfile.ZipInfo,
    expect: tuple[tuple[int, ...] | None, tuple[str, ...], int],
    path: Any,
    error: type[Exception],
) -> np.ndarray:
    """One member, its header checked against ``expect`` = (shape or None for any 1-D,
    allowed dtype names, the most bytes) before its data is read; the data is inflated into
    the array itself, never past the size the header declares."""
    name = info.filename[:-4]
    want_shape, dtypes, max_bytes = expect
    stream = _MemberStream(fh, info, path, error)
    stream.cap = min(info.file_size, _HEADER_MAX)
    shape, dtype = _read_header(stream, name, path, error)
    header_bytes = stream.done
    if dtype.name not in dtypes or dtype.hasobject:
        raise error(f"{path}: {name} holds {dtype} values; expected {' or '.join(dtypes)}")
    if want_shape is None and len(shape) != 1:
        raise error(f"{path}: {name} has shape {shape}; expected a 1-D array")
    if want_shape is not None and shape != want_shape:
        raise error(f"{path}: {name} has shape {shape}; the saved configuration says {want_shape}")
    nbytes = dtype.itemsize
    for n in shape:  # Python ints: no overflow
        nbytes *= int(n)
    if nbytes > max_bytes:
        raise error(f"{path}: {name} declares {nbytes} bytes; at most {max_bytes} expected")
    if info.file_size != header_bytes + nbytes:
        raise error(
            f"{path}: the member {name!r} holds {info.file_size - header_bytes} "
            f"bytes of data; its header declares {nbytes}"
        )
    arr = np.empty(shape, dtype=dtype)
    stream.cap = nbytes + 1  # one byte more shows a member longer than declared
    got = stream.readinto(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    if got != nbytes or stream.read(1):
        raise error(f"{path}: the member {name!r} is truncated or longer than it declares")
    if stream.crc != info.CRC:
        raise error(f"{path}: the member {name!r} fails its CRC-32 check (the file is damaged)")
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_npz(
    path: str | os.PathLike[str], error: type[ModelFileError] = ModelFileError
) -> dict[str, np.ndarray]:
    """All arrays of a gpubp ``.npz`` file, loaded without pickle.

    Each member's name, dtype (float32/float64; ``meta`` uint8), shape and size are checked
    against the metadata before its data is read, and the values are checked finite (see the
    module's docstring). Float arrays come back in native byte order.

    Parameters
    ----------
    path : path-like
        A model file or checkpoint; it must be a regular file.
    error : type, optional
        The :class:`~gpubp.errors.ModelFileError` subclass to raise (``CheckpointError`` for a
        checkpoint).

    Returns
    -------
    dict
        ``meta`` (uint8 JSON), ``W<i>`` ``(n_{i+1}, n_i)``, ``b<i>`` ``(n_{i+1},)``, and where
        present ``input_shift`` / ``input_scale`` ``(n_0,)`` and ``opt_<slot>_<j>``.

    Raises
    ------
    ModelFileError
        (``error``) naming ``path``, for anything missing, malformed, oversized, non-finite or
        not a regular file.
    """
    with open_regular(path, error) as fh:
        file_bytes = os.fstat(fh.fileno()).st_size
        try:
            with zipfile.ZipFile(fh) as zf:
                members = _member_names(zf, path, error)
                if "meta" not in members:
                    raise error(f"{path}: no gpubp metadata; was it written by MLP.save?")
                for info in members.values():
                    _check_sizes(info, file_bytes, path, error)
                meta_raw = _read_member(
                    fh, members["meta"], (None, ("uint8",), META_MAX_BYTES), path, error
                )
                shapes = layout(parse_json(meta_raw.tobytes(), path, error), path, error)
                unknown = sorted(set(members) - set(shapes) - {"meta"})
                if unknown:
                    raise error(
                        f"{path}: holds arrays {unknown[:8]} that its metadata does not "
                        "describe; the file is inconsistent"
                    )
                declared = sum(i.file_size for n, i in members.items() if n != "meta")
                check_memory(  # the arrays, and the model or run built from them
                    2 * declared,
                    f"{path}: its arrays ({declared} bytes declared)",
                    error=error,
                )
                arrays: dict[str, Any] = {"meta": meta_raw}
                for name, info in members.items():
                    if name == "meta":
                        continue
                    shape = shapes[name]
                    most = 8 * int(np.prod(shape, dtype=object))
                    arr = _read_member(fh, info, (shape, ("float32", "float64"), most), path, error)
                    if not np.isfinite(arr).all():
                        raise error(
                            f"{path}: {name} holds NaN or infinite values; the file was "
                            "written by a run that diverged, or is damaged"
                        )
                    arrays[name] = arr
                return arrays
        except error:
            raise
        except zipfile.BadZipFile as exc:
            raise error(
                f"{path}: not a gpubp model file or checkpoint, or one that is truncated or "
                f"damaged (expected a whole .npz archive: {exc})"
            ) from None
        except _READ_ERRORS as exc:
            raise error(
                f"{path}: not a readable gpubp model file ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None


def parse_meta(
    arrays: dict[str, np.ndarray],
    path: Any,
    expected: str,
    error: type[ModelFileError] = ModelFileError,
) -> dict[str, Any]:
    """The JSON metadata stored in ``arrays["meta"]``, checked for format (``expected``: one of
    :data:`FORMAT`, :data:`CHECKPOINT_FORMAT`), version and a configuration."""
    raw = arrays.get("meta")
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise error(f"{path}: no gpubp metadata; was it written by MLP.save?")
    meta = parse_json(raw.tobytes(), path, error)
    found = meta.get("format") if isinstance(meta, dict) else None
    if found == CHECKPOINT_FORMAT and expected == FORMAT:
        raise error(
            f"{path} is a checkpoint of gpubp train, not a model file: continue the run with "
            f"gpubp train --resume {path}; a run writes its model with --save PATH (MLP.save)"
        )
    if found == FORMAT and expected == CHECKPOINT_FORMAT:
        raise error(
            f"{path} is a model file (written by --save or MLP.save), not a checkpoint: "
            "--resume takes the file a run wrote with --checkpoint; load this model with "
            f"MLP.load, or score it with gpubp evaluate {path}"
        )
    if found != expected:
        raise error(f"{path}: not a {expected} file")
    if meta.get("version") != FORMAT_VERSION:
        raise error(
            f"{path}: format version {meta.get('version')!r}; this gpubp reads version "
            f"{FORMAT_VERSION}"
        )
    if not isinstance(meta.get("config"), dict):
        raise error(f"{path}: the metadata has no configuration")
    return meta


def saved_parameters(
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    path: Any,
    error: type[ModelFileError] = ModelFileError,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(weights, biases)`` of a file read by :func:`read_npz`, every layer's pair present
    (their shapes were checked against ``layer_sizes`` as they were read)."""
    n_layers = len(meta["config"]["layer_sizes"]) - 1
    for i in range(n_layers):
        if f"W{i}" not in arrays or f"b{i}" not in arrays:
            raise error(f"{path}: missing the parameter arrays of layer {i} (W{i}, b{i})")
    return (
        [arrays[f"W{i}"] for i in range(n_layers)],
        [arrays[f"b{i}"] for i in range(n_layers)],
    )


def write_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` atomically (see
    :func:`gpubp.files.write_atomic`: an unpredictable temporary name that follows no link,
    fsync, rename)."""
    write_atomic(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def write_npz(
    path: str | os.PathLike[str], meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    """Write ``arrays`` and ``meta`` (as the uint8 JSON member ``meta``) atomically; a ``meta``
    larger than :data:`META_MAX_BYTES`, which :func:`read_npz` would refuse, is an
    :class:`~gpubp.errors.OutputWriteError` and nothing is written."""
    encoded = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if encoded.size > META_MAX_BYTES:
        raise OutputWriteError(
            errno.EFBIG,
            f"could not write {os.fspath(path)}: its metadata (configuration and history) is "
            f"{encoded.size} bytes, more than the {META_MAX_BYTES} a gpubp file may hold; "
            "nothing was written",
        )
    write_npz_atomic(path, {**arrays, "meta": encoded})
