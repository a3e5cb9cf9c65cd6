"""How the command line says what went wrong: one usage line (not the whole usage) before an
argparse error, "did you mean" for a mistyped option, choice or command, and the option whose
input file an error concerns (a checkpoint given where a model file is wanted, and the reverse,
is said by :func:`gpubp.npzfile.parse_meta` itself).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Any, NoReturn

from .backends import EMULATOR_HINT
from .backends.cuda.cupy_module import injected
from .distributed import DistributedError
from .errors import (
    BackendUnavailableError,
    DatasetError,
    DatasetNotFoundError,
    MemoryBudgetError,
    ModelFileError,
    OutputPathError,
)
from .plots import PlotUnavailableError

__all__ = [
    "RUN_ERRORS",
    "Parser",
    "command_line_message",
    "did_you_mean",
    "print_error",
]


def did_you_mean(word: str, candidates: Any) -> str:
    """``"; did you mean X?"`` for the closest of ``candidates`` to ``word``, or ``""``; none
    where the two differ only in their numbers (``float16`` is another size, not a typo of
    ``float64``)."""
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    if not close or re.sub(r"\d+", "#", close[0]) == re.sub(r"\d+", "#", word):
        return ""
    return f"; did you mean {close[0]}?"


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are two lines: a one-line usage that
    points at ``--help``, and the error with a "did you mean" where a close match exists.
    Subparsers made by :meth:`add_subparsers` are of this class too."""

    def error(self, message: str) -> NoReturn:
        message += self._suggestion(message)
        self.exit(2, f"usage: {self.prog} ... (see {self.prog} --help)\n{self.prog}: {message}\n")

    def _suggestion(self, message: str) -> str:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            return did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for o in self._option_string_actions if o.startswith("--")]
            for word in unknown.group(1).split():
                if word.startswith("--"):
                    hint = did_you_mean(word.split("=")[0], options)
                    if hint:
                        return hint
        return ""


def input_named(message: str, args: Any) -> str:
    """``message`` with its option in front where it concerns a file an input option named
    (``--resume nope.ckpt: no such file``, ``--data x.csv: ...``)."""
    for dest in ("resume", "data"):
        value = getattr(args, dest, None)
        if value is not None and message.startswith(f"{os.fspath(value)}: "):
            return f"--{dest} {message}"
    return message


def print_error(command: str, message: str) -> None:
    """``gpubp <command>: <message>`` on stderr."""
    print(f"gpubp {command}: {message}", file=sys.stderr)


#: What makes a run fail without being a bug: the message says what to do; exit status 1.
RUN_ERRORS = (
    BackendUnavailableError,
    DatasetError,
    DatasetNotFoundError,
    DistributedError,
    MemoryBudgetError,
    ModelFileError,
    OutputPathError,
    PlotUnavailableError,
)


def command_line_message(exc: BaseException) -> str:
    """The error's text in the command line's words: an output path's error names its option
    (``--save``, not ``save_path=``), and an unavailable backend's way out is ``--backend auto``;
    both errors carry what they concern."""
    if isinstance(exc, BackendUnavailableError) and exc.backend == "cupy" and not injected():
        return f"{exc.command_line_message()}; {EMULATOR_HINT}"
    if isinstance(exc, (OutputPathError, BackendUnavailableError)):
        return exc.command_line_message()
    return str(exc)
