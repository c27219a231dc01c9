"""The errors a user sees as one line: bad input, a run that failed, a run that was stopped."""

from collections.abc import Iterable

from sacred.utils import SacredError, SacredInterrupt


class InputError(SacredError, ValueError):
    """Bad user input (names, files, images, settings).

    The message says what is wrong and how to fix it. Sacred prints it as one line, without a
    traceback, and exits with status 1. It is a ValueError too, so that callers of the library
    functions (evaluate_embeddings, the losses) catch bad arguments as they would anywhere else.
    """

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises our error as InputError("Caught InputError in DataLoader
        # worker ...\nOriginal Traceback ..."): keep only the original one-line message.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message, print_traceback=False)


def check_choice(key: str, value: object, choices: Iterable) -> None:
    """Refuse a value that is not one of choices, naming the key and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"unknown {key} {value!r}: choose one of {', '.join(map(str, choices))}")


class RunFailed(SacredError):
    """A run that cannot go on (a non-finite loss, a failed write): one line saying why and what was kept.

    Sacred marks the run FAILED and prints the line without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, print_traceback=False)


class RunInterrupted(SacredInterrupt, SacredError):
    """A run stopped by a signal after writing its checkpoint: sacred marks it INTERRUPTED and prints the one line
    saying how to resume; the exit status is 1."""

    def __init__(self, message: str) -> None:
        SacredError.__init__(self, message, print_traceback=False)
