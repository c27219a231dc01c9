"""The -F run folder, checked before a run starts: sacred itself fails with a traceback when the run starts
(a file in the way) or at its first write (a read-only folder)."""

import tempfile
from pathlib import Path

from utils.errors import InputError


def check_run_folder(options: dict) -> None:
    """A sacred option hook (ex.option_hook): refuse a -F folder that is a file or cannot be written, in one line."""
    folder = options.get("--file_storage")
    if not folder:
        return
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"-F {folder} is a file, not a folder: give -F a folder (a new or an existing one)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # permissions, a read-only file system, a full quota
            pass
    except OSError as error:
        raise InputError(
            f"-F {folder} cannot be written ({error.strerror or error}): give -F a folder you can write to"
        ) from None
