"""How a command's errors reach the user: one line on stderr and an exit status.

Every `glmv` command runs under `reporting_errors`: an error glmv raises (`GlmvError`), a
`UsageError` or `CommandFailure` of the command's own checks, a file that cannot be read or written, or Ctrl-C
becomes one line, `glmv <command>: error: <what was wrong>; <what to do>`, instead of a
traceback. The exit status says whose mistake it was: 2 for a usage error (bad arguments, missing
or unsuitable files, a setting that cannot work), 1 for a failure at run time (the engine, a
server, the disk). A traceback is left only for what is none of these: a bug.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from glmv.errors import CheckpointError, ConfigError, GlmvError

__all__ = [
    "FAILURE",
    "INTERRUPTED",
    "USAGE",
    "CommandFailure",
    "UsageError",
    "error_line",
    "exit_status",
    "one_line",
    "reporting_errors",
]

USAGE = 2
FAILURE = 1
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT

# Errors about what the user passed in (a flag, a checkpoint folder): usage errors.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError)

# What to do, where the message of a library error says only what was wrong.
_HINTS: dict[type[GlmvError], str] = {
    CheckpointError: "pass a checkpoint directory (config.json, the tokenizer files and *.safetensors weights)",
}

F = TypeVar("F", bound=Callable[..., Any])


class CommandFailure(Exception):
    """A failure at run time that the command explains itself, e.g. a server that cannot be
    reached (exit status 1). The message says what is wrong and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(Exception):
    """A mistake in a command's arguments, found before anything slow starts (exit status 2).
    The message says what is wrong and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(text).split())


def exit_status(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, (UsageError, *_USAGE_ERRORS)):
        return USAGE
    return FAILURE


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, UsageError | CommandFailure):
        return exc.message
    if isinstance(exc, GlmvError):
        hint = next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), None)
        return f"{exc.message}; {hint}" if hint and hint not in exc.message else exc.message
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc)


def error_line(prog: str, exc: BaseException) -> str:
    """The one line `prog` prints for `exc`."""
    return f"{prog}: error: {one_line(_message(exc))}"


def reporting_errors(prog: str) -> Callable[[F], F]:
    """Run a command function (`args -> exit status`) with its errors turned into one line on
    stderr and the matching exit status (see the module docstring)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return int(func(*args, **kwargs) or 0)
            except (UsageError, CommandFailure, GlmvError, OSError, KeyboardInterrupt) as exc:
                print(error_line(prog, exc), file=sys.stderr, flush=True)
                return exit_status(exc)

        return run  # type: ignore[return-value]

    return decorate
