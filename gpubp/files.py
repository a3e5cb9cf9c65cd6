"""Files written atomically without following planted links, and files opened for reading only
when they are regular files.

Every file gpubp writes (models, checkpoints, JSON records, downloads) goes through
:func:`write_atomic`: the bytes go to a new temporary file beside the target, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` under an unpredictable name (:func:`tempfile.mkstemp`), are
flushed and fsynced, and the temporary file is renamed over the target. A symlink planted in
the folder is never followed, a failed write leaves the target as it was and removes its
temporary file, and temporary files left by killed gpubp processes are removed on the next
write to the same target.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .errors import MissingFolderError, OutputPathError, OutputWriteError

__all__ = [
    "OUTPUT_OPTIONS",
    "TMP_SUFFIX",
    "check_output_folders",
    "check_outputs",
    "open_regular",
    "remove_stale_temps",
    "same_file",
    "write_atomic",
    "write_json",
]

#: How the names of gpubp's temporary files end: ``.<target>.<pid>.<random>.gpubp-tmp``.
TMP_SUFFIX = ".gpubp-tmp"
#: The command-line option of each path argument of gpubp's jobs (``train``, ``gradflow``),
#: carried by the errors of the checks below so a command line can name its own option.
OUTPUT_OPTIONS = {
    "save_path": "--save",
    "json_path": "--json",
    "plot_path": "--plot",
    "checkpoint": "--checkpoint",
    "resume": "--resume",
}


def _temp_pattern(name: str) -> re.Pattern[str]:
    # ours: .<name>.<pid>.<random>.gpubp-tmp; and the names older versions used
    # (.<name>.<pid>.tmp for models and checkpoints, .<name>.<pid>.part for downloads)
    return re.compile(
        rf"\.{re.escape(name)}\.(\d+)\.(?:[A-Za-z0-9_]+{re.escape(TMP_SUFFIX)}|tmp|part)"
    )


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not a pid: leave its file alone
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files a killed gpubp process left for ``path`` (regular files
    owned by this user, named as gpubp names them, whose process is gone); their names."""
    target = Path(os.path.abspath(path))
    pattern = _temp_pattern(target.name)
    removed: list[str] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            continue
    return removed


def _intact(path: Path) -> str:
    if os.path.lexists(path):
        return f"{path} was not changed"
    return f"nothing was written under {path}"


def write_error(path: str | os.PathLike[str], exc: OSError, what: str = "") -> OutputWriteError:
    """An :class:`OutputWriteError` for a failed write of ``path`` saying why and what is intact
    (``what`` appended)."""
    p = Path(os.path.abspath(path))
    if exc.errno == errno.ENOSPC:
        why = f"the disk holding {p.parent} is full"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"the folder {p.parent} is not writable ({exc.strerror})"
    else:
        why = exc.strerror or str(exc)
    message = f"could not write {os.fspath(path)}: {why}; {_intact(p)}"
    return OutputWriteError(exc.errno or errno.EIO, message + (f"; {what}" if what else ""))


def write_atomic(path: str | os.PathLike[str], content: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` to ``path`` atomically.

    A temporary file beside ``path`` (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random name, the
    user's umask) is written, flushed, fsynced and renamed over ``path``; the folder is then
    fsynced so the rename is durable. Temporary files of ``path`` left by killed processes are
    removed first (:func:`remove_stale_temps`).

    Parameters
    ----------
    path : path-like
        The file to write; a link at ``path`` is replaced, not followed.
    content : bytes or callable
        The bytes, or a function that writes them to the binary file it is given.

    Raises
    ------
    OutputWriteError
        ``path`` is a folder, or an OS error (a full disk, a read-only folder) occurred; the
        message names ``path`` and says it was not changed. The temporary file is removed on
        every failure, an interrupt included.
    """
    target = Path(os.path.abspath(path))
    if target.is_dir():
        raise OutputWriteError(
            errno.EISDIR, f"{os.fspath(path)} is a folder; give a file name to write to"
        )
    remove_stale_temps(target)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=target.parent
        )
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise write_error(path, exc) from None
        raise
    _fsync_dir(target.parent)


def _umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` where Linux offers it: setting and
    restoring it (the portable way) would race with other threads creating files meanwhile."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened: the rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike[str], error: type[Exception]) -> BinaryIO:
    """``path`` opened for reading, or ``error`` raised naming it when it is missing or not a
    regular file (a FIFO would block the reader forever, a device never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{os.fspath(path)}: no such file") from None
    except OSError as exc:
        raise error(f"{os.fspath(path)}: cannot be opened ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise error(f"{os.fspath(path)}: {kind} (a FIFO, device or folder cannot be read)")
    return os.fdopen(fd, "rb")


def _check_folder(what: str, path: str | os.PathLike[str], target: str) -> None:
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise MissingFolderError(
            what,
            path,
            f": the folder {folder} does not exist; create it or choose another path",
            options=OUTPUT_OPTIONS,
        )


def check_output_folders(**paths: str | os.PathLike[str] | None) -> None:
    """Raise :class:`~gpubp.errors.MissingFolderError` (a :class:`FileNotFoundError`) for a
    path whose folder does not exist, naming the argument: called before a run, so it fails now
    rather than after the work it would have saved."""
    for what, path in paths.items():
        if path is not None:
            _check_folder(what, path, os.path.abspath(path))


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links are resolved, or (both
    existing) the same inode, which a hard link shares."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: Bytes the pre-check writes into its probe file: a full disk with inodes left fails now.
_PROBE_BYTES = 1 << 16


def _probe(what: str, path: str | os.PathLike[str], folder: str) -> None:
    """Create a file in ``folder``, write :data:`_PROBE_BYTES` into it and fsync, remove it."""
    name = os.path.basename(os.path.abspath(path))
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise write_error(
            path, exc, f"{what} cannot be written there: choose another folder"
        ) from None
    try:
        os.write(fd, bytes(_PROBE_BYTES))
        os.fsync(fd)
    except OSError as exc:
        raise write_error(
            path, exc, f"{what} cannot be written there: choose another folder"
        ) from None
    finally:
        os.close(fd)
        os.unlink(probe)


def check_outputs(
    paths: Mapping[str, str | os.PathLike[str] | None],
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """Check, before a run, that every output can be written and destroys no input.

    Parameters
    ----------
    paths : dict
        Argument name -> output path (None: not written). Each folder (that of the path itself:
        a link there is replaced, not followed) must exist and take a new file with real bytes
        in it (a probe file is written, fsynced and removed), no path may be a folder, and no
        two outputs may share a file.
    inputs : dict, optional
        Name -> a file the run reads (the checkpoint resumed from, the dataset's files, the
        model evaluated): no output may be one of them (the same path, through links, or a hard
        link), except that ``checkpoint`` may be the ``resume`` file it continues.

    Raises
    ------
    MissingFolderError
        An output's folder does not exist (a :class:`FileNotFoundError`).
    OutputPathError
        A folder given as an output, one file given twice, an input given as an output. The
        errors carry the argument's command-line option (:data:`OUTPUT_OPTIONS`).
    OutputWriteError
        An output's folder is read-only or full.
    """
    seen: dict[str, str | os.PathLike[str]] = {}
    for what, path in paths.items():
        if path is None:
            continue
        where = os.path.abspath(path)  # where the write goes: a link there is replaced
        _check_folder(what, path, where)
        if os.path.isdir(where):
            raise OutputPathError(
                what, path, " is a folder; give a file name inside it", options=OUTPUT_OPTIONS
            )
        for other, before in seen.items():
            if same_file(before, path):
                raise OutputPathError(
                    what,
                    path,
                    " is the same file as {other}; one would overwrite the other: give each "
                    "output its own path",
                    other=other,
                    options=OUTPUT_OPTIONS,
                )
        seen[what] = path
        for name, source in (inputs or {}).items():
            if (what, name) == ("checkpoint", "resume") or source is None:
                continue
            if same_file(source, path):
                raise OutputPathError(
                    what,
                    path,
                    " is the {other} file it reads; writing it would destroy it: give the "
                    "output another path",
                    other=name,
                    options=OUTPUT_OPTIONS,
                )
        _probe(what, path, os.path.dirname(where))


def write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON atomically (:func:`write_atomic`)."""
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


def user_cache_dir() -> Path:
    """gpubp's cache folder: ``$XDG_CACHE_HOME/gpubp``, or ``~/.cache/gpubp`` (downloads,
    compiled kernels)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpubp"
