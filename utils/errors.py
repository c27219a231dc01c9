"""The one error type for bad user input, and the one check of a name against its choices."""

from collections.abc import Iterable

from sacred.utils import SacredError


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
