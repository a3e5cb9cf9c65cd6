"""Fuzzed and hand-made malformed files: model files, checkpoints and IDX files.

Every malformed file must raise exactly the loader's error class (ModelFileError for model
files, CheckpointError for checkpoints, DatasetError for IDX files) naming the file, spend no
more memory than the file holds, and change nothing: the file and its folder are as before.
The probe classes (one test each, the count of cases in its name or parameters): truncations,
byte flips, huge declared shapes, zip and gzip bombs, extra members, wrong dtypes and types,
broken metadata, non-finite values, non-regular files, and random bytes (Hypothesis).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import threading
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpubp import MLP
from gpubp.checkpoint import load_checkpoint, save_checkpoint
from gpubp.config import TrainConfig
from gpubp.errors import CheckpointError, DatasetError, ModelFileError
from gpubp.idx import read_idx
from gpubp.npzfile import read_npz
from gpubp.optim import Adam

from .idx_files import idx_bytes

SIZES = [7, 5, 3]  # small, and no width a multiple of anything
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- making files ----------------------------------------------------------------------------


def model_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "made-model.npz"
    MLP(SIZES, backend="numpy", seed=3).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def checkpoint_bytes(tmp_path: Path) -> bytes:
    model = MLP(SIZES, backend="numpy", seed=3)
    opt = Adam(lr=0.01)
    rng = np.random.default_rng(0)
    model.train_step(rng.normal(size=(4, 7)), rng.integers(0, 3, 4), opt)
    train = TrainConfig(dataset="digits", layers=(5,), optimizer="adam", batch_size=2).as_dict()
    train.update(track_gradients=False, backend="numpy")
    position = {
        "epoch": 0,
        "batch": 1,
        "seen": 2,
        "loss_sum": 1.5,
        "rng_state": dict(np.random.default_rng([0, 1]).bit_generator.state),
    }
    path = tmp_path / "made.ckpt"
    save_checkpoint(path, model, opt, train, position, {"epoch": []}, {"samples": 2.0})
    data = path.read_bytes()
    path.unlink()
    return data


def npy(arr: Any = None, *, header: dict[str, Any] | None = None, body: bytes = b"") -> bytes:
    """A ``.npy`` member: ``arr`` written by NumPy, or a hand-made ``header`` and ``body``."""
    buf = io.BytesIO()
    if header is None:
        np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(body)
    return buf.getvalue()


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rezip(parts: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, blob in parts.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def meta_of(data: bytes) -> dict[str, Any]:
    raw = members(data)["meta.npy"]
    return json.loads(np.load(io.BytesIO(raw)).tobytes())


def with_meta(data: bytes, meta: Any, raw: bytes | None = None) -> bytes:
    parts = members(data)
    blob = raw if raw is not None else json.dumps(meta).encode()
    parts["meta.npy"] = npy(np.frombuffer(blob, dtype=np.uint8))
    return rezip(parts)


# --- checking refusals -----------------------------------------------------------------------


def load_model(path: Path) -> Any:
    return MLP.load(path, backend="numpy")


def refused(tmp_path: Path, data: bytes, loader: Any, error: type[Exception]) -> str:
    """Write ``data``, load it: exactly ``error``, naming the file, nothing changed."""
    path = tmp_path / "probe.npz"
    path.write_bytes(data)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(Exception) as info:
        loader(path)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert str(path) in str(info.value)
    assert path.read_bytes() == data and sorted(os.listdir(tmp_path)) == before
    return str(info.value)


def handled(tmp_path: Path, data: bytes, loader: Any, error: type[Exception]) -> bool:
    """Load ``data``: it either loads (True) or raises exactly ``error`` (False)."""
    path = tmp_path / "probe.npz"
    path.write_bytes(data)
    try:
        loader(path)
    except Exception as exc:
        assert type(exc) is error, f"{type(exc).__name__}: {exc}"
        assert str(path) in str(exc)
        return False
    return True


KINDS = {
    "model": (model_bytes, load_model, ModelFileError),
    "checkpoint": (checkpoint_bytes, load_checkpoint, CheckpointError),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request, tmp_path):
    make, loader, error = KINDS[request.param]
    return make(tmp_path), loader, error


# --- probe classes: model files and checkpoints ----------------------------------------------


def test_the_valid_files_load(tmp_path, kind):
    data, loader, _ = kind
    assert handled(tmp_path, data, loader, ModelFileError)


def test_truncations(tmp_path, kind):
    """64 truncation points spread over the file, and the last 16 bytes one by one."""
    data, loader, error = kind
    cuts = sorted(
        {*np.linspace(0, len(data) - 1, 64).astype(int), *range(len(data) - 16, len(data))}
    )
    for cut in cuts:
        refused(tmp_path, data[:cut], loader, error)


def test_byte_flips(tmp_path, kind):
    """200 single-byte flips at seeded positions: each file loads or is refused, never crashes;
    a flip in the data itself is caught by the archive's CRC."""
    data, loader, error = kind
    rng = np.random.default_rng(17)
    loaded = 0
    for pos in rng.integers(0, len(data), 200):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        loaded += handled(tmp_path, bytes(flipped), loader, error)
    assert loaded < 200  # most flips are refused (flips in timestamps and padding are harmless)


@FUZZ
@given(st.binary(min_size=0, max_size=300), st.integers(0, 10_000))
def test_random_bytes_spliced_in(tmp_path_factory, blob, at):
    tmp = tmp_path_factory.mktemp("splice")
    for make, loader, error in KINDS.values():
        data = make(tmp)
        at %= len(data)
        handled(tmp, data[:at] + blob + data[at:], loader, error)


@pytest.mark.parametrize(
    "shape", [(10**6, 10**6), (2**40,), (5, 7, 2**30), (2**21, 2**21, 2**22), (0, 7), ()]
)
def test_huge_or_wrong_declared_shapes_cost_no_memory(tmp_path, kind, shape):
    data, loader, error = kind
    parts = members(data)
    parts["W0.npy"] = npy(header={"descr": "<f4", "fortran_order": False, "shape": shape})
    tracemalloc.start()
    try:
        refused(tmp_path, rezip(parts), loader, error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_huge_layer_sizes_in_the_metadata(tmp_path, kind):
    data, loader, error = kind
    meta = meta_of(data)
    meta["config"]["layer_sizes"] = [10**6, 10**6, 3]
    tracemalloc.start()
    try:
        message = refused(tmp_path, with_meta(data, meta), loader, error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "shape" in message and peak < 16 << 20


def test_an_extra_member_is_refused_before_it_is_read(tmp_path, kind):
    """A compressed 64 MiB extra member (about 64 KiB in the file): refused by its name."""
    data, loader, error = kind
    parts = members(data)
    parts["junk.npy"] = npy(np.zeros(16 << 20, dtype=np.float32))
    tracemalloc.start()
    try:
        message = refused(tmp_path, rezip(parts, zipfile.ZIP_DEFLATED), loader, error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "junk" in message and peak < 16 << 20


def test_a_zip_bomb_is_refused(tmp_path, kind):
    """W0 deflated, its declared size raised to 1 GiB in the archive's directory."""
    data, loader, error = kind
    blob = bytearray(rezip(members(data), zipfile.ZIP_DEFLATED))
    start = 0
    while True:  # the central-directory entry of W0.npy
        start = blob.find(b"PK\x01\x02", start)
        name_len = struct.unpack_from("<H", blob, start + 28)[0]
        if blob[start + 46 : start + 46 + name_len] == b"W0.npy":
            break
        start += 4
    struct.pack_into("<I", blob, start + 24, 1 << 30)  # uncompressed size
    message = refused(tmp_path, bytes(blob), loader, error)
    assert "W0" in message


@pytest.mark.parametrize(
    ("method", "name"), [(zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "LZMA")]
)
def test_bzip2_and_lzma_members_are_refused_unread(tmp_path, kind, method, name):
    """zipfile inflates a whole bzip2 or LZMA chunk at once, with no cap: refused by method."""
    data, loader, error = kind
    assert name in refused(tmp_path, rezip(members(data), method), loader, error)


def with_deflated_zeros(meta: dict[str, Any], shape: tuple[int, ...]) -> bytes:
    """An archive of ``meta`` and ``W0.npy``: a float64 header of ``shape`` and zeros,
    deflated as they are written (never all in memory)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("meta.npy", npy(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
        with zf.open("W0.npy", "w", force_zip64=True) as out:
            out.write(head.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(8 * int(np.prod(shape)) >> 20):
                out.write(zeros)
    return buf.getvalue()


def test_a_model_beyond_the_memory_budget_is_refused_before_it_is_read(tmp_path, kind, monkeypatch):
    """A 16 MiB W0 (deflated to 16 KiB) under a 24 MiB budget: refused, with the number and
    how to raise the limit, before the member is inflated; under 64 MiB it is read."""
    data, loader, error = kind
    meta = meta_of(data)
    meta["config"]["layer_sizes"] = [8, 1 << 18, 3]
    if "train" in meta:
        meta["train"]["layers"] = [1 << 18]
    blob = with_deflated_zeros(meta, (1 << 18, 8))
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "24M")
    tracemalloc.start()
    try:
        message = refused(tmp_path, blob, loader, error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "GPUBP_MEMORY_LIMIT=" in message and peak < 8 << 20, message
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "64M")  # within the budget: read, then found
    assert "missing the parameter arrays" in refused(tmp_path, blob, loader, error)  # incomplete


def test_oversized_metadata_is_refused_before_it_is_parsed(tmp_path, kind):
    """9 MiB of JSON (valid, mostly spaces; deflated to 9 KiB): refused by its declared size."""
    data, loader, error = kind
    raw = json.dumps(meta_of(data)).encode() + b" " * (9 << 20)
    parts = members(data)
    parts["meta.npy"] = npy(np.frombuffer(raw, np.uint8))
    tracemalloc.start()
    try:
        message = refused(tmp_path, rezip(parts, zipfile.ZIP_DEFLATED), loader, error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "meta" in message and peak < 4 << 20


@pytest.mark.parametrize(
    ("dtype", "what"),
    [
        (np.int64, "int64"),
        (np.float16, "float16"),
        (np.bool_, "bool"),
        (np.uint8, "uint8"),
        (np.complex128, "complex128"),
    ],
)
def test_non_float_parameters_are_refused(tmp_path, kind, dtype, what):
    data, loader, error = kind
    parts = members(data)
    parts["W1.npy"] = npy(np.ones((3, 5), dtype=dtype))
    assert what in refused(tmp_path, rezip(parts), loader, error)


@pytest.mark.parametrize("member", ["W0", "b1"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_parameters_are_refused(tmp_path, kind, member, value):
    data, loader, error = kind
    parts = members(data)
    arr = np.load(io.BytesIO(parts[f"{member}.npy"]))
    arr.flat[-1] = value
    parts[f"{member}.npy"] = npy(arr)
    assert "NaN or infinite" in refused(tmp_path, rezip(parts), loader, error)


@pytest.mark.parametrize(
    ("member", "blob"),
    [
        ("W0.npy", b"not an npy file at all"),
        ("W0.npy", b""),
        ("W0.npy", npy(np.zeros((5, 7), np.float32, order="F").T.T.copy(order="F"))),
        ("W0.npy", npy(np.array(["x"] * 35).reshape(5, 7))),
        ("W0.txt", b"hello"),
        ("sub/W0.npy", npy(np.zeros((5, 7), np.float32))),
        ("meta.npy", npy(np.zeros(3, np.float32))),
        ("meta.npy", npy(np.zeros((2, 2), np.uint8))),
        ("meta.npy", npy(header={"descr": "|u1", "fortran_order": False, "shape": (True,)})),
        ("b0.npy", npy(header={"descr": "<f4", "fortran_order": False, "shape": (True, 5)})),
    ],
)
def test_wrong_members_are_refused(tmp_path, kind, member, blob):
    data, loader, error = kind
    parts = members(data)
    parts[member] = blob
    refused(tmp_path, rezip(parts), loader, error)


def test_missing_members_are_refused(tmp_path, kind):
    data, loader, error = kind
    for name in members(data):
        parts = members(data)
        del parts[name]
        if name.startswith("opt_") or not parts:
            continue  # optimizer slots are checked when restored; an empty zip below
        refused(tmp_path, rezip(parts), loader, error)
    refused(tmp_path, rezip({}), loader, error)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,  # nested past the recursion limit
        b'{"format": ' + b"9" * 5000 + b"}",  # past Python's 4300-digit limit
        b"[]",
        b'"a string"',
        b'{"format": "gpubp-mlp", "version": 1}',
    ],
)
def test_broken_metadata_is_refused(tmp_path, kind, raw):
    data, loader, error = kind
    refused(tmp_path, with_meta(data, None, raw), loader, error)


@pytest.mark.parametrize(
    "sizes", [None, [], [7], "7,5,3", [7, 5.0, 3], [7, True, 3], [7, -5, 3], [7, 0, 3]]
)
def test_bad_layer_sizes_are_refused(tmp_path, kind, sizes):
    data, loader, error = kind
    meta = meta_of(data)
    meta["config"]["layer_sizes"] = sizes
    refused(tmp_path, with_meta(data, meta), loader, error)


def test_optional_preprocessing_members_are_read(tmp_path):
    """input_shift and input_scale, shape (n_inputs,), are part of the model format."""
    parts = members(model_bytes(tmp_path))
    parts["input_shift.npy"] = npy(np.zeros(7))
    arrays_path = tmp_path / "pre.npz"
    arrays_path.write_bytes(rezip(parts))
    assert read_npz(arrays_path)["input_shift"].shape == (7,)
    parts["input_scale.npy"] = npy(np.ones(6))
    refused(tmp_path, rezip(parts), read_npz, ModelFileError)


# --- checkpoint fields -----------------------------------------------------------------------


def pcg64_state(**change: Any) -> dict[str, Any]:
    """A valid PCG64 state with ``change`` applied (``state`` and ``inc`` inside ``state``)."""
    out = dict(np.random.default_rng([0, 1]).bit_generator.state)
    out["state"] = dict(out["state"])
    for key, value in change.items():
        (out["state"] if key in ("state", "inc") else out)[key] = value
    return out


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("position", "batch", "x"),
        ("position", "batch", -1),
        ("position", "epoch", 1.5),
        ("position", "seen", True),
        ("position", "loss_sum", None),
        ("position", "loss_sum", float("nan")),
        ("position", "rng_state", [1, 2]),
        ("optimizer", "step", None),
        ("optimizer", "step", "3"),
        ("optimizer", "kind", "sgd"),
        ("counters", "samples", "many"),
        ("counters", "samples", float("inf")),
        ("history", "epoch", 3),
        ("train", "lr", "fast"),
        ("train", "lr", 1e39),  # infinite in float32
        ("train", "layers", [5, 0]),
        ("train", "batch_size", 2.5),
        ("train", "optimizer", "rmsprop"),
        (None, "train", []),
        (None, "position", None),
        ("position", "rng_state", pcg64_state(state=2**200)),
        ("position", "rng_state", pcg64_state(inc=-5)),
        ("position", "rng_state", pcg64_state(state=10**1000)),
        ("position", "rng_state", pcg64_state(has_uint32=True)),
        ("position", "rng_state", pcg64_state(uinteger=2**32)),
        ("position", "rng_state", pcg64_state(bit_generator="MT19937")),
        ("position", "seen", 10**400),
        ("optimizer", "step", 10**400),
        ("optimizer", "step", 2**53 + 1),
        ("train", "seed", -1),
        ("train", "data_dir", 5),
        ("train", "data_dir", ["a"]),
        ("train", "layers", [10**9]),  # not the model's hidden widths
        ("train", "batch_size", 10**16),
        ("history", "loss", [1.0]),  # an entry for an epoch that never finished
        ("history", "epoch", ["one"]),
        ("history", "seconds", [None]),
        ("history", "delta_norm", [[1.0]]),
        ("history", "surprise", []),
        ("train", "backend", "\x1b[2Jnumpy"),
        ("train", "mpi_ranks", -2),
    ],
)
def test_checkpoint_fields_of_the_wrong_type_are_refused(tmp_path, section, key, value):
    data = checkpoint_bytes(tmp_path)
    meta = meta_of(data)
    if value is None and section is not None:
        del meta[section][key]
    else:
        (meta if section is None else meta[section])[key] = value
    refused(tmp_path, with_meta(data, meta), load_checkpoint, CheckpointError)


@pytest.mark.parametrize("value", [np.nan, np.inf, -1e-30])
def test_non_finite_optimizer_state_is_refused(tmp_path, value):
    parts = members(checkpoint_bytes(tmp_path))
    arr = np.load(io.BytesIO(parts["opt_exp_avg_sq_2.npy"]))
    arr.flat[0] = value
    parts["opt_exp_avg_sq_2.npy"] = npy(arr)
    message = refused(tmp_path, rezip(parts), load_checkpoint, CheckpointError)
    assert "opt_exp_avg_sq_2" in message


def test_integer_optimizer_state_is_refused(tmp_path):
    parts = members(checkpoint_bytes(tmp_path))
    parts["opt_exp_avg_0.npy"] = npy(np.zeros((5, 7), dtype=np.int32))
    refused(tmp_path, rezip(parts), load_checkpoint, CheckpointError)


# --- non-regular files -----------------------------------------------------------------------


def _finishes(fn: Any, *args: Any) -> BaseException | None:
    """Run ``fn(*args)`` in a thread; what it raised (the test fails if it hangs)."""
    out: list[BaseException | None] = [None]

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:
            out[0] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), f"{fn.__name__} hangs on {args}"
    return out[0]


@pytest.mark.parametrize(
    ("loader", "error"),
    [
        (load_model, ModelFileError),
        (load_checkpoint, CheckpointError),
        (read_idx, DatasetError),
    ],
)
def test_fifos_folders_and_devices_are_refused(tmp_path, loader, error):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, Path(os.devnull)):
        exc = _finishes(loader, path)
        assert type(exc) is error and str(path) in str(exc), repr(exc)


# --- IDX files -------------------------------------------------------------------------------


def idx_file(tmp_path: Path, blob: bytes, gz: bool) -> Path:
    path = tmp_path / ("probe.idx.gz" if gz else "probe.idx")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def read_refused(path: Path) -> str:
    before = path.read_bytes()
    with pytest.raises(Exception) as info:
        read_idx(path)
    assert type(info.value) is DatasetError, f"{type(info.value).__name__}: {info.value}"
    assert str(path) in str(info.value) and path.read_bytes() == before
    return str(info.value)


GOOD_IDX = idx_bytes(np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncations(tmp_path, gz):
    """Every truncation of a 76-byte IDX file (and of its gzip stream)."""
    np.testing.assert_array_equal(read_idx(idx_file(tmp_path, GOOD_IDX, gz)).shape, (5, 4, 3))
    blob = gzip.compress(GOOD_IDX) if gz else GOOD_IDX
    for cut in range(len(blob)):
        path = tmp_path / "cut.gz"
        path.write_bytes(blob[:cut])
        read_refused(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_byte_flips(tmp_path, gz):
    """Every byte of the file flipped in turn: each loads with the declared shape or is refused
    (a flip in the gzip stream is caught by its CRC)."""
    blob = gzip.compress(GOOD_IDX) if gz else GOOD_IDX
    for pos in range(len(blob)):
        flipped = bytearray(blob)
        flipped[pos] ^= 0xFF
        path = tmp_path / "flip"
        path.write_bytes(bytes(flipped))
        try:
            arr = read_idx(path)
        except DatasetError as exc:
            assert str(path) in str(exc)
            continue
        assert arr.size * arr.itemsize + 4 + 4 * arr.ndim == len(GOOD_IDX)


@pytest.mark.parametrize(
    "dims",
    [
        (2**21, 2**21, 2**22),  # overflows int64 to 0 in np.prod
        (2**32 - 1, 2**32 - 1),
        (0, 28, 28),  # no samples
        (60000, 28, 28),  # declared, not there
        (1,) * 65,  # more dimensions than numpy allows
    ],
)
@pytest.mark.parametrize("body", [b"", b"\0", b"\0" * 16])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_declared_sizes(tmp_path, dims, body, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + b"".join(
        struct.pack(">I", n) for n in dims
    )
    tracemalloc.start()
    try:
        read_refused(idx_file(tmp_path, header + body, gz))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\0",
        b"\1\0\x08\x01",  # bad magic
        b"\0\0\x07\x01",  # unknown type
        b"\0\0\x08\x00",  # zero dimensions
        b"\0\0\x08\x41" + b"\0\0\0\1" * 65,  # 65 dimensions
        b"\0\0\x08\xff",  # 255 dimensions, header truncated
    ],
)
def test_idx_bad_headers(tmp_path, head):
    read_refused(idx_file(tmp_path, head, gz=False))


def test_idx_gzip_bomb_is_read_no_further_than_declared(tmp_path):
    """A 50 KB gzip stream of 50 MB: the header declares 10 bytes; reading stops at 11."""
    blob = struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + bytes(50 << 20)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(blob, compresslevel=9))
    tracemalloc.start()
    try:
        message = read_refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "longer than its header says" in message and peak < 16 << 20


@pytest.mark.parametrize("where", ["block type", "middle", "crc"])
def test_idx_damaged_gzip(tmp_path, where):
    blob = bytearray(gzip.compress(GOOD_IDX))
    if where == "block type":  # zlib.error: invalid block type
        blob[10:] = b"\xff" * 20
    else:
        blob[len(blob) // 2 if where == "middle" else -6] ^= 0x55
    path = tmp_path / "damaged.gz"
    path.write_bytes(bytes(blob))
    message = read_refused(path)
    assert where == "middle" or "gzip stream is damaged" in message


@FUZZ
@given(
    st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
    st.binary(max_size=200),
    st.booleans(),
)
def test_idx_random_headers_and_bodies(tmp_path_factory, code, dims, body, gz):
    header = struct.pack(">BBBB", 0, 0, code, len(dims)) + b"".join(
        struct.pack(">I", n) for n in dims
    )
    path = idx_file(tmp_path_factory.mktemp("idx"), header + body, gz)
    try:
        arr = read_idx(path)
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    assert arr.shape == tuple(dims) and arr.nbytes == len(body)


# --- IDX datasets: headers checked together before any data is read ---------------------------


def idx_head(code: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, len(shape)) + b"".join(
        struct.pack(">I", n) for n in shape
    )


@pytest.fixture(scope="module")
def big_images_gz() -> bytes:
    """Train images declaring (100000, 28, 28): 78 MB of zero pixels gzipped to about 80 KB."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        gz.write(idx_head(0x08, (100_000, 28, 28)))
        zeros = bytes(28 * 28 * 1000)
        for _ in range(100):
            gz.write(zeros)
    return out.getvalue()


def idx_folder(tmp_path: Path, rng: Any, **replace: bytes) -> Path:
    """A small MNIST-layout folder (gzipped files), some files replaced by ``replace``."""
    from .idx_files import write_fake_idx_dataset

    folder = tmp_path / "mnist"
    write_fake_idx_dataset(folder, rng, n_train=30, n_test=10)
    for stem, blob in replace.items():
        (folder / f"{stem.replace('_', '-')}.gz").write_bytes(gzip.compress(blob, 1))
    return folder


def dataset_refused(folder: Path, limit: str | None = None) -> tuple[str, int]:
    """Load ``folder`` as MNIST: exactly DatasetError; its message and the traced peak."""
    from gpubp import datasets

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as info:
            datasets.load_dataset("mnist", data_dir=folder.parent)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(info.value) is DatasetError, f"{type(info.value).__name__}: {info.value}"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    return str(info.value), peak


def test_idx_images_and_labels_that_disagree_are_refused_unread(tmp_path, rng, big_images_gz):
    folder = idx_folder(tmp_path, rng)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(big_images_gz)
    message, peak = dataset_refused(folder)
    assert "do not match" in message and peak < 4 << 20


def test_idx_data_beyond_the_memory_budget_is_refused_unread(
    tmp_path, rng, big_images_gz, monkeypatch
):
    labels = idx_head(0x08, (100_000,)) + bytes(100_000)
    folder = idx_folder(tmp_path, rng, train_labels_idx1_ubyte=labels)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(big_images_gz)
    monkeypatch.setenv("GPUBP_MEMORY_LIMIT", "64M")
    message, peak = dataset_refused(folder)
    assert "GPUBP_MEMORY_LIMIT=" in message and str(folder) in message and peak < 4 << 20


def test_idx_sizes_a_file_cannot_hold_are_refused_unread(tmp_path, rng):
    """(4000000, 28, 28) declared by a 2 KB gzip file (labels to match): beyond deflate's most."""
    images = idx_head(0x08, (4_000_000, 28, 28)) + bytes(1 << 20)
    labels = idx_head(0x08, (4_000_000,)) + bytes(1 << 16)
    folder = idx_folder(
        tmp_path, rng, train_images_idx3_ubyte=images, train_labels_idx1_ubyte=labels
    )
    message, peak = dataset_refused(folder)
    assert "cannot hold" in message and peak < 4 << 20


@pytest.mark.parametrize(
    ("images", "words"),
    [
        (idx_head(0x08, (30, 0, 28)), "at least 1"),  # zero-width images
        (idx_head(0x0E, (30, 28, 28)) + np.full(30 * 784, 1e308, ">f8").tobytes(), "range"),
        (idx_head(0x0E, (30, 28, 28)) + np.full(30 * 784, -np.inf, ">f8").tobytes(), "range"),
    ],
    ids=["zero-width", "1e308", "-inf"],
)
def test_idx_images_of_no_pixels_or_absurd_values_are_refused(tmp_path, rng, images, words):
    folder = idx_folder(tmp_path, rng, train_images_idx3_ubyte=images)
    assert words in dataset_refused(folder)[0]


def test_metadata_too_large_to_read_back_is_never_written(tmp_path):
    from gpubp.errors import OutputWriteError
    from gpubp.npzfile import META_MAX_BYTES, write_npz

    path = tmp_path / "big.npz"
    with pytest.raises(OutputWriteError, match="nothing was written"):
        write_npz(path, {"history": "x" * META_MAX_BYTES}, {})
    assert list(tmp_path.iterdir()) == []
