"""What prepare_data verified in a data folder (manifest.json), and the checks behind it.

A preparation holds the folder's lock (one preparation at a time), first marks the folder incomplete, then
checks that every listed image exists and decodes and that the split counts are the published ones, and only
then writes the split files and marks the folder complete. Training refuses a folder whose manifest says it is
incomplete; a folder without a manifest (made by hand, or the digits rendered on first use) is taken as it is.
"""

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from utils.data.images import load_image
from utils.errors import InputError
from utils.files import atomic_write

MANIFEST = "manifest.json"
Samples = list[tuple[str, int]]
# (images, classes) of each split, named by its file without .txt (sacred's keys hold no dots); classes None:
# not published, not checked.
Expected = Mapping[str, Sequence[int | None]]


def lock_path(data_path: Path) -> Path:
    """Beside the folder rather than in it: a failed first preparation removes the folder it made."""
    return data_path.parent / f".{data_path.name}.lock"


@contextmanager
def exclusive(data_path: Path) -> Iterator[None]:
    """Hold data_path's preparation lock, or refuse at once when another process holds it: a second preparation
    would mark the folder incomplete under the first one, and its failure would outlast the first one's success.

    The lock is an flock, which the system releases when its process ends, however it ends. The lock file, which
    holds its process's id for the message, goes when the lock does; a run that opened it just before must then
    find the path holding another file (or none) and refuses as well.
    """
    path = lock_path(data_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.path.samestat(os.stat(path), os.fstat(file.fileno()))
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise InputError(
                f"{data_path} is being prepared by another run of prepare_data.py (process {holder}): "
                f"wait until that run reports, and run again only if it failed"
            )
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before the lock goes with the file's closing


def read(data_path: Path) -> dict | None:
    try:
        return json.loads((data_path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write(data_path: Path, content: dict) -> None:
    """Replace the manifest atomically, so that it is never half-written."""
    data_path.mkdir(parents=True, exist_ok=True)
    with atomic_write(data_path / MANIFEST) as file:
        file.write(json.dumps(content, indent=1) + "\n")


def mark_incomplete(data_path: Path, dataset: str, reason: str) -> None:
    write(data_path, {"dataset": dataset, "complete": False, "reason": reason})


def mark_complete(data_path: Path, dataset: str, splits: dict[str, Samples]) -> None:
    write(
        data_path,
        {
            "dataset": dataset,
            "complete": True,
            "verified": datetime.now(UTC).isoformat(),
            "splits": {
                name: {
                    "images": len(samples),
                    "classes": len({label for _, label in samples}),
                    "sha256": digest(samples),
                }
                for name, samples in splits.items()
            },
        },
    )


def digest(samples: Samples) -> str:
    return hashlib.sha256("".join(f"{path},{label}\n" for path, label in samples).encode()).hexdigest()


def verified_before(manifest: dict | None, splits: dict[str, Samples]) -> bool:
    """Whether a complete manifest already vouches for exactly these split files."""
    if not manifest or manifest.get("complete") is not True:
        return False
    recorded = manifest.get("splits", {})
    return recorded.keys() == splits.keys() and all(
        recorded[name].get("sha256") == digest(samples) for name, samples in splits.items()
    )


def check_prepared(data_path: Path) -> None:
    """Refuse a data folder whose manifest says its preparation did not complete."""
    manifest = read(data_path)
    if manifest is not None and manifest.get("complete") is not True:
        name = manifest.get("dataset", "")
        raise InputError(
            f"data folder {data_path} is not completely prepared ({manifest.get('reason', 'unknown')}): "
            f"run `python prepare_data.py {name}` until it reports the data set ready"
        )


def check_counts(splits: dict[str, Samples], expected: Expected | None) -> None:
    """Refuse split counts other than the published ones (expected None: nothing to compare with)."""
    for split, (images, classes) in (expected or {}).items():
        name = f"{split}.txt"
        samples = splits.get(name, [])
        found = (len(samples), len({label for _, label in samples}))
        if found[0] != images or classes is not None and found[1] != classes:
            published = f"{images:,} images" + (f" / {classes:,} classes" if classes is not None else "")
            raise InputError(
                f"{name} would have {found[0]:,} images / {found[1]:,} classes, the published split "
                f"{published}: the data set is incomplete or not the official version; delete its "
                f"folder and run again (or set `expected` to the counts of your version)"
            )


def _problem(path: Path) -> str | None:
    try:
        load_image(path)
    except InputError as error:
        return str(error)
    return None


def verify_images(data_path: Path, splits: dict[str, Samples], workers: int | None = None) -> None:
    """Decode every image once, in threads (Pillow's decoders release the GIL, and threads are safe in a
    process that has loaded torch); refuse any image that fails."""
    paths = sorted({data_path / path for samples in splits.values() for path, _ in samples})
    with ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1)) as pool:
        problems = [
            problem
            for problem in tqdm(
                pool.map(_problem, paths), total=len(paths), desc="decoding images", unit=" images", leave=False
            )
            if problem
        ]
    if problems:
        raise InputError(
            f"{len(problems):,} of the {len(paths):,} images do not decode (first: {problems[0]}); "
            f"delete the data set's folder (keep the archive if its checksum was checked) and run again"
        )
