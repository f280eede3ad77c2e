"""The project's exceptions, one root, and the one rule every command maps them to an exit status with.

    SmartEditError
      InputError (also a ValueError)     the caller can fix it: a bad argument, image, model folder or artifact
        CheckpointError                    a model folder or release that cannot be loaded as it is
        ArtifactError                      an export folder that cannot be run as it is (missing, damaged, foreign)
      RunError (also a RuntimeError)     the work itself failed, or cannot be done on this machine
        ExportError                        an export or a check of one failed
        UnavailableError                   what the call needs is not here (TensorRT, a GPU, a package)
        Cancelled                          the work was stopped because nobody waits for it (a server's client left)

Exit status of every command: 0 done, 2 bad input (InputError, and argparse's own usage errors), 1 anything else
that failed (RunError, OSError such as a full disk), 130 interrupted. The message is one line, naming the value.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class SmartEditError(Exception):
    """Root of the project's own exceptions."""


class InputError(SmartEditError, ValueError):
    """Bad input: the message names the value and what would be accepted."""


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded as is: missing file, unexpected/missing keys, shape mismatch, unsafe pickle."""


class ArtifactError(InputError):
    """An export folder that cannot be run as is: no manifest, a missing or damaged file, built for something else."""


class RunError(SmartEditError, RuntimeError):
    """The work failed, or cannot be done here."""


class ExportError(RunError):
    """An export, or the check of an exported artifact against PyTorch, failed."""


class UnavailableError(RunError):
    """What the call needs is not on this machine (a backend's library, a GPU)."""


class Cancelled(RunError):
    """The work was stopped on purpose: every caller it was for has gone away."""


def exit_status(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT if isinstance(e, InputError) else EXIT_FAILED


def one_line(e: BaseException) -> str:
    """The message of an exception as one line (OSError: the reason and the file)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError) and not isinstance(e, SmartEditError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")) if len(text) < 2000 else text[:2000] + " ..."


def run_command(prog: str, body: Callable[[], object]) -> None:
    """Run a command's typed function; project errors, OS errors and Ctrl-C become one line on stderr and the exit
    status above. Anything else is a bug and keeps its traceback."""
    try:
        body()
    except (SmartEditError, OSError, KeyboardInterrupt) as e:
        fail(prog, e)


def fail(prog: str, e: BaseException) -> NoReturn:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
    raise SystemExit(exit_status(e)) from None
