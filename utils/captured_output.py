"""Keep a failed run's last output in sacred's captured output (cout.txt)."""

import functools
from collections.abc import Callable
from typing import Any


def keep_output_on_failure(main: Callable) -> Callable:
    """Decorate a sacred main function that takes `_run`.

    Sacred 0.8 closes its capture of stdout/stderr before the last heartbeat of a failed run, so
    the observers lose everything printed since the previous beat (up to 10 s: often all the lines
    that led to the failure). Reading the output into the run while the capture is still open keeps it.
    """

    @functools.wraps(main)  # sacred reads the configuration parameters from main's signature
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except BaseException:
            kwargs["_run"]._get_captured_output()
            raise

    return wrapper
