"""The one error type for bad user input."""

from sacred.utils import SacredError


class InputError(SacredError):
    """Bad user input (names, files, images, settings).

    The message says what is wrong and how to fix it. Sacred prints it as one line, without a
    traceback, and exits with status 1.
    """

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises our error as InputError("Caught InputError in DataLoader
        # worker ...\nOriginal Traceback ..."): keep only the original one-line message.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message, print_traceback=False)
