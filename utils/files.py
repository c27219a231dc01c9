"""Files that are never half-written."""

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open file for path that is in fact a hidden temporary beside it (.NAME.<pid>.<thread>.tmp). When the
    block ends, the data is flushed to disk and the temporary renamed over path: readers find the old file or the
    new one, never a part of it. On an error (a full disk, a check of the block's) the temporary goes and path
    stays as it was."""
    # One temporary per process and thread: two writers of one file (sacred's heartbeat thread and the run's own
    # events, or two ranks) must not rename or remove each other's.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
