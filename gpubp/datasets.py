"""Datasets by name: the registry, where the files are looked for, download, loading, splits.

``mnist`` and ``fashion-mnist`` are IDX files (:mod:`gpubp.idx`); ``digits`` is scikit-learn's
bundled 8x8 set. Where the IDX files are looked for, in order (the first folder holding all four
files wins):

1. the ``data_dir`` argument (``--data-dir`` on the command line): when given, the only place
   looked (``data_dir/<name>``, then ``data_dir``), and where ``--download`` writes;
2. ``$GPUBP_DATA/<name>`` and ``$GPUBP_DATA`` itself;
3. the cache, ``~/.cache/gpubp/<name>`` (``$XDG_CACHE_HOME`` respected), where ``--download``
   writes;
4. for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

:func:`load_dataset` standardises the features with the training set's statistics
(:mod:`gpubp.preprocessing`); :func:`train_val_split` holds out a validation set.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .errors import DatasetError, DatasetNotFoundError
from .fetch import fetch
from .idx import (
    IDX_NAMES,
    check_idx_arrays,
    check_idx_headers,
    check_idx_split,
    idx_file,
    idx_paths,
    read_idx_in,
)
from .preprocessing import pixel_statistics, pixels_to_float32, standardize_in_place

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "Dataset",
    "IdxSource",
    "cache_dir",
    "download",
    "find_dataset",
    "input_files",
    "load_dataset",
    "load_digits_dataset",
    "load_idx_dataset",
    "local_datasets",
    "read_test_split",
    "search_dirs",
    "train_val_split",
    "verify",
]


@dataclass(frozen=True)
class IdxSource:
    """Where a dataset's official files come from and how each is verified.

    ``sha256`` holds the SHA-256 of each downloaded (gzipped) file where the publisher's files
    are pinned by it. Fashion-MNIST's publisher lists only MD5 sums of its archives; for it
    ``content_sha256`` pins the SHA-256 of each *decompressed* file (the same bytes whoever
    compressed them, so Debian's re-packed copy verifies too), checked beside the MD5.
    """

    name: str
    title: str
    urls: tuple[str, ...]
    classes: tuple[str, ...]
    sha256: dict[str, str] = field(default_factory=dict)
    md5: dict[str, str] = field(default_factory=dict)
    content_sha256: dict[str, str] = field(default_factory=dict)
    system_dirs: tuple[str, ...] = ()


DATASETS: dict[str, IdxSource] = {
    "mnist": IdxSource(
        "mnist",
        "MNIST handwritten digits",
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        tuple(str(d) for d in range(10)),
        sha256={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # noqa: E501
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # noqa: E501
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",  # noqa: E501
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",  # noqa: E501
        },
    ),
    "fashion-mnist": IdxSource(
        "fashion-mnist",
        "Fashion-MNIST (Zalando Research, MIT licence)",
        ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        content_sha256={
            # SHA-256 of the decompressed files, computed from Debian's dataset-fashion-mnist
            # (whose archives were re-compressed, so their MD5s differ from the official ones)
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",  # noqa: E501
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # noqa: E501
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",  # noqa: E501
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # noqa: E501
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}
#: Every name ``--dataset`` accepts besides ``auto``, largest first.
DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "mnist", "digits")


@dataclass
class Dataset:
    """A train/test split as float32 features ``(N, d)`` and int64 labels ``(N,)``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str
    normalization: dict[str, float] = field(default_factory=dict)
    #: the test inputs ``(N, d)`` as the files store them (IDX pixels 0..255 as uint8, digits'
    #: intensities 0..16), before any scaling: what a saved model, which carries its
    #: preprocessing, is scored on; None for a dataset built by hand
    x_test_raw: np.ndarray | None = None
    #: a dataset read from your own file (:mod:`gpubp.filedata`): its task, column names,
    #: standardisation and fingerprints; None for the built-in datasets
    file: Any = None

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        if self.file is not None:
            what = f"{self.n_classes} classes" if self.file.task == "classification" else "a value"
            return (
                f"{self.name}: {len(self.x_train)} training and {len(self.x_test)} test rows, "
                f"{self.n_features} features, target {self.file.target!r}: {self.file.task}, "
                f"{what} (from {self.source})"
            )
        return (
            f"{self.name}: {len(self.x_train)} training and {len(self.x_test)} test samples, "
            f"{self.n_features} features, {self.n_classes} classes (from {self.source})"
        )


# --- lookup --------------------------------------------------------------------------------------


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for ``name``'s files, in order: with ``data_dir`` only
    ``data_dir/<name>`` and ``data_dir`` (a folder given explicitly is never passed over for
    another copy)."""
    if data_dir is not None:  # given explicitly: there and nowhere else
        return [Path(data_dir) / name, Path(data_dir)]
    dirs: list[Path] = []
    env = os.environ.get("GPUBP_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs.append(cache_dir() / name)
    dirs += [Path(d) for d in DATASETS[name].system_dirs]
    return dirs


def cache_dir() -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/gpubp`` or ``~/.cache/gpubp``."""
    return files.user_cache_dir()


def find_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first searched folder holding all four IDX files of ``name``, or None.

    A ``data_dir`` holding some of the four files but not all raises
    :class:`~gpubp.errors.DatasetError` naming the missing ones, rather than quietly taking the
    dataset from another folder.
    """
    if data_dir is not None:
        given = (Path(data_dir) / name, Path(data_dir))
        missing_in = {f: [s for s in IDX_NAMES if idx_file(f, s) is None] for f in given}
        for folder, missing in missing_in.items():
            if 0 < len(missing) < len(IDX_NAMES) and all(missing_in.values()):
                raise DatasetError(
                    f"{folder} holds only part of {DATASETS[name].title}: missing "
                    f"{', '.join(missing)} (gzipped or not); add them or pass another --data-dir"
                )
    for folder in search_dirs(name, data_dir):
        if all(idx_file(folder, stem) for stem in IDX_NAMES):
            return folder
    return None


def input_files(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Every IDX file a dataset could be read from (each searched folder of each dataset), by
    a name for messages: files an output must never overwrite."""
    found: dict[str, Path] = {}
    for name in DATASETS:
        for folder in search_dirs(name, data_dir):
            found.update({f"{k} in {folder}": p for k, p in idx_paths(folder).items()})
    return found


def _how_to_get(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    into = _download_dir(name, data_dir)
    steps = [f"run with --download to fetch the official files into {into}"]
    if data_dir is not None:
        steps.append(f"or put the four IDX files in {data_dir}")
        steps.append("or leave out --data-dir to search $GPUBP_DATA, the cache and system folders")
        return "; ".join(steps)
    if name == "fashion-mnist":
        steps.append("or, on Debian/Ubuntu, apt-get install dataset-fashion-mnist")
    steps.append("or put the four IDX files in a folder and pass --data-dir (or set GPUBP_DATA)")
    return "; ".join(steps)


def _download_dir(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """Where ``--download`` writes: ``data_dir/<name>`` when a folder is given, else the cache."""
    return Path(data_dir) / name if data_dir is not None else cache_dir() / name


def load_idx_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download_missing: bool = False,
    progress: bool = True,
    standardize: bool = False,
) -> Dataset:
    """MNIST or Fashion-MNIST as a :class:`Dataset`, pixels scaled to ``[0, 1]`` as float32.

    With ``standardize``, the features are ``(x / 255 - mean) / std`` instead, with the training
    images' mean and standard deviation (:func:`~gpubp.preprocessing.pixel_statistics`,
    recorded in ``Dataset.normalization``), converted from the raw pixels in one pass.
    """
    folder = _locate(name, data_dir, download_missing, progress)
    check_idx_headers(folder)  # sizes, shapes and memory, before any data is read
    arrays = [read_idx_in(folder, stem) for stem in IDX_NAMES]
    check_idx_arrays(folder, arrays, DATASETS[name].classes)
    xtr, ytr, xte, yte = arrays

    mean, std = 0.0, 1.0
    if standardize:
        mean, std = pixel_statistics(xtr)
        std = std or 1.0
    return Dataset(
        name,
        pixels_to_float32(xtr, mean, std),
        ytr.astype(np.int64),
        pixels_to_float32(xte, mean, std),
        yte.astype(np.int64),
        DATASETS[name].classes,
        str(folder),
        {"mean": mean, "std": std} if standardize else {},
        xte.reshape(len(xte), -1),
    )


def read_test_split(
    name: str, data_dir: str | os.PathLike[str] | None = None, download_missing: bool = False
) -> tuple[np.ndarray, np.ndarray, Path]:
    """The test split of the IDX dataset ``name`` as stored: images ``(N, rows * cols)``
    (uint8 pixels for MNIST and Fashion-MNIST), int64 labels ``(N,)`` and the folder, checked
    as :func:`load_idx_dataset` checks them; only the two test files are read (all four are
    fetched first with ``download_missing`` when absent)."""
    folder = _locate(name, data_dir, download_missing)
    check_idx_headers(folder, IDX_NAMES[2:])
    images, labels = (read_idx_in(folder, stem) for stem in IDX_NAMES[2:])
    check_idx_split(folder, images, labels, "t10k", DATASETS[name].classes)
    return images.reshape(len(images), -1), labels.astype(np.int64), folder


def _check_data_dir(
    data_dir: str | os.PathLike[str] | None, download_missing: bool, name: str = "auto"
) -> None:
    """:class:`~gpubp.errors.DatasetNotFoundError` where ``data_dir`` is given but is no
    folder: missing (unless ``download_missing`` will make it) or a file. The IDX datasets are
    looked for there only; digits, which comes with scikit-learn, never reads it."""
    if data_dir is None:
        return
    folder = Path(data_dir)
    if folder.is_dir() or (download_missing and not folder.exists()):
        return
    what = "is not a folder" if folder.exists() else "does not exist"
    fetch = ""
    if name in DATASETS and not folder.exists():
        fetch = f", add --download to fetch {name} into it"
    raise DatasetNotFoundError(
        f"--data-dir {data_dir} {what}; give the folder that holds the dataset's IDX "
        f"files{fetch}, or leave out --data-dir to look in the usual places"
    )


def _locate(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    download_missing: bool = False,
    progress: bool = True,
) -> Path:
    """The folder holding ``name``'s four IDX files (downloaded there if asked), or
    :class:`~gpubp.errors.DatasetNotFoundError` saying where it looked and how to get them."""
    _check_data_dir(data_dir, download_missing, name)
    folder = find_dataset(name, data_dir)
    if folder is None and download_missing:
        folder = download(name, _download_dir(name, data_dir), progress=progress)
    if folder is None:
        looked = "\n  ".join(str(d) for d in search_dirs(name, data_dir))
        where = "" if data_dir is None else f" in --data-dir {data_dir}"
        raise DatasetNotFoundError(
            f"{DATASETS[name].title} was not found{where}. Looked in:\n  {looked}\nTo get it: "
            f"{_how_to_get(name, data_dir)}"
        )
    return folder


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split by a seeded stratified shuffle."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetNotFoundError(
            "the digits dataset comes with scikit-learn, which is not installed; "
            "pip install 'gpubp[data]' (or pip install scikit-learn)"
        ) from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test[idx[: round(len(idx) * test_fraction)]] = True
    return Dataset(
        "digits",
        x[~test],
        y[~test],
        x[test],
        y[test],
        tuple(str(d) for d in range(10)),
        "sklearn.datasets.load_digits",
        x_test_raw=bunch.data[test],
    )


def local_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Datasets that can be loaded here without a network, largest first."""
    found = [name for name in ("fashion-mnist", "mnist") if find_dataset(name, data_dir)]
    try:
        import sklearn  # noqa: F401

        found.append("digits")
    except ImportError:
        pass
    return found


def load_dataset(
    name: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    download_missing: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Dataset:
    """Load ``name`` (``auto``, ``mnist``, ``fashion-mnist`` or ``digits``), standardised.

    Features are scaled to ``[0, 1]`` and then standardised with the training set's global mean
    and standard deviation (recorded in ``Dataset.normalization``). ``auto`` takes the largest
    dataset present locally: Fashion-MNIST, then MNIST, then digits.
    """
    if name == "auto":
        _check_data_dir(data_dir, download_missing)
        found = local_datasets(data_dir)
        if data_dir is not None and not set(found) & set(DATASETS):
            raise DatasetNotFoundError(
                f"--data-dir {data_dir} holds neither Fashion-MNIST's nor MNIST's four IDX "
                f"files (looked in {Path(data_dir)}/<name> and {data_dir}); put them there, "
                "or leave out --data-dir to look in the usual places (auto takes the largest "
                "dataset found, else scikit-learn's digits)"
            )
        if not found:
            raise DatasetNotFoundError(
                "no dataset was found locally: neither Fashion-MNIST nor MNIST IDX files, nor "
                "scikit-learn's digits. "
                + _how_to_get("fashion-mnist")
                + "; or pip install scikit-learn for the small digits set"
            )
        name = found[0]
    if name in DATASETS:  # standardised from the raw pixels, in one pass
        return load_idx_dataset(name, data_dir, download_missing, progress, standardize=True)
    if name != "digits":
        raise ValueError(
            f"dataset={name!r} is not known; expected one of auto, {', '.join(DATASET_NAMES)}"
        )
    ds = load_digits_dataset()  # one fixed test set, whatever the training seed
    mean, std = standardize_in_place(ds.x_train, ds.x_test)
    ds.normalization = {"mean": mean, "std": std}
    return ds


# --- download --------------------------------------------------------------------------------


def _digest(data: bytes, algo: str) -> str:
    return hashlib.new(algo, data).hexdigest()


def verify(name: str, filename: str, data: bytes) -> None:
    """Check downloaded ``data`` of ``filename`` against the pinned digests; raise if wrong."""
    src = DATASETS[name]
    checks: list[tuple[str, str, bytes]] = []
    if filename in src.sha256:
        checks.append(("sha256", src.sha256[filename], data))
    if filename in src.md5:
        checks.append(("md5", src.md5[filename], data))
    stem = filename.removesuffix(".gz")
    if not checks and stem not in src.content_sha256:
        raise DatasetError(f"no checksum is pinned for {name}/{filename}; refusing to trust it")
    for algo, expected, blob in _content_checks(checks, src, stem, data):
        got = _digest(blob, algo)
        if got != expected:
            raise DatasetError(
                f"{filename}: {algo} is {got}, expected {expected}; the download is damaged or "
                "not the official file, and was discarded"
            )


def _content_checks(
    checks: list[tuple[str, str, bytes]], src: IdxSource, stem: str, data: bytes
) -> Any:
    """``checks`` (of the downloaded bytes) first, then the pinned digest of the decompressed
    content: a download is decompressed only after its own digests matched."""
    yield from checks
    if stem in src.content_sha256:
        content = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        yield ("sha256", src.content_sha256[stem], content)


def download(name: str, dest: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Fetch ``name``'s four official files into ``dest`` (default: the cache), verified.

    Each file is checked against its pinned digests before it is written, then written to a
    temporary name, flushed, fsynced and renamed, so the cache never holds a half-written or
    unverified file. Mirrors are tried in turn, over https only, each file at most 64 MiB and
    within 10 minutes (:func:`gpubp.fetch.fetch`). Returns the folder; every failure is a
    :class:`~gpubp.errors.DatasetNotFoundError` listing what each mirror answered.
    """
    src = DATASETS[name]
    folder = Path(dest) if dest is not None else cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    for stem in IDX_NAMES:
        if idx_file(folder, stem):
            continue
        filename = f"{stem}.gz"
        errors = []
        for base in src.urls:
            try:
                data = fetch(base + filename, progress)
                verify(name, filename, data)
            except (OSError, EOFError, zlib.error, DatasetError) as exc:  # a damaged gzip too
                errors.append(f"{base}{filename}: {exc}")
                continue
            files.write_atomic(folder / filename, data)
            break
        else:
            raise DatasetNotFoundError(
                f"could not download {filename} of {src.title}:\n  " + "\n  ".join(errors)
            )
    return folder


# --- splitting ------------------------------------------------------------------


def train_val_split(
    x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_val, y_val)``: a seeded random ``val_fraction`` held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = round(len(x) * val_fraction)
    if n_val >= len(x):  # a DatasetError is a ValueError
        raise DatasetError(
            f"val_fraction={val_fraction!r} (--val-fraction) holds out all {len(x)} training "
            "samples, leaving none to train on; choose a smaller fraction"
        )
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]
