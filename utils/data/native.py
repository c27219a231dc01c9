"""Small C kernels, compiled with the machine's C compiler and loaded with ctypes, each optional.

A kernel is one C file next to the Python code that calls it. It is built once per machine and set of macros into
a shared library under ~/.cache/metric-learning/kernels (XDG_CACHE_HOME moves it), named by a hash of the source, the
compiler command and the CPU's features, so that an edit, another compiler or another CPU sharing the cache builds
afresh. Only what this user built is loaded: the cache folder must be the user's own and writable by no one else
(it is created 0700), and each library must match the SHA-256 recorded beside it when it was built (a truncated,
damaged or planted file does not). Anything else (no compiler, a compilation error, a cache that cannot be written
or is not private, a library that fails the check) gives one warning and `load` returns None: the caller then runs
the code the kernel replaces, with the same results, more slowly.
"""

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

# -march=native: the library runs on the CPU that built it (the hash names that CPU). No -ffast-math: the kernels
# compare floating-point values exactly and must see NaN.
FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")


class Refused(Exception):
    """Why a kernel is not used, in words for the one warning."""


def cache_dir() -> Path:
    # A folder for the libraries alone, created private (0700); nothing else of the project lives in it.
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metric-learning" / "kernels"


def cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def compile_command(macros: dict[str, str]) -> list[str]:
    compiler = os.environ.get("CC", "cc")
    return [compiler, *FLAGS, *(f"-D{name}={value}" for name, value in sorted(macros.items()))]


def library_path(source: Path, libraries: tuple[str, ...] = (), **macros: str) -> Path:
    """Where the library built from source with these macros and libraries lies in the cache."""
    links = [f"-l{name}" for name in libraries]
    parts = [source.read_text(), *compile_command(macros), *links, platform.machine(), cpu_features()]
    return cache_dir() / f"{source.stem}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def record_path(library: Path) -> Path:
    """The file beside a library holding the SHA-256 of its bytes, written when it was built."""
    return library.with_suffix(".sha256")


@functools.cache
def load(source: Path, libraries: tuple[str, ...] = (), **macros: str) -> ctypes.CDLL | None:
    """The library built from source with -D<name>=<value> for each macro and linked with -l<name> for each of
    libraries, built now if the cache lacks it; or None, after one warning saying why (see the module docstring).
    Cached per process: call it in the main process before DataLoader workers fork, and they inherit the result."""
    try:
        return ctypes.CDLL(str(verified_build(source, libraries, macros)))
    except Refused as reason:
        warnings.warn(
            f"{reason}: {source.name} is not used, and the slower code it replaces runs instead", stacklevel=2
        )
    except OSError as failure:  # a verified file that the loader still rejects
        warnings.warn(
            f"{source.name} cannot be loaded ({failure}): the slower code it replaces runs instead", stacklevel=2
        )
    return None


def verified_build(source: Path, libraries: tuple[str, ...], macros: dict[str, str]) -> Path:
    """The path of the library, built if missing, and checked (see verify); Refused says why not."""
    library = library_path(source, libraries, **macros)
    private_folder(library.parent)
    # One process builds while the others (torchrun's ranks) wait, then all read the finished library and record.
    with open(library.parent / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.lexists(library):
            build(compile_command(macros), source, library, [f"-l{name}" for name in libraries])
        verify(library)
    return library


def private_folder(folder: Path) -> None:
    """Creates folder (0700) if missing; Refused unless it is a folder of this user's that no one else can write."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.stat()
    except OSError as failure:
        raise Refused(
            f"the kernel cache {folder} cannot be made ({failure.strerror or failure}); set XDG_CACHE_HOME to a "
            "writable folder"
        ) from None
    if status.st_uid != os.getuid():
        raise Refused(f"the kernel cache {folder} belongs to another user; set XDG_CACHE_HOME to a folder of yours")
    if status.st_mode & 0o022:
        raise Refused(f"the kernel cache {folder} can be written by other users; run chmod 700 {folder}")


def verify(library: Path) -> None:
    """Refused unless library is a plain file of this user's, writable by no one else, whose bytes have the
    SHA-256 recorded beside it at build time."""
    remedy = f"remove {library} to build it again"
    try:
        status = os.lstat(library)
        if not stat.S_ISREG(status.st_mode):
            raise Refused(f"{library} is not a file; {remedy}")
        if status.st_uid != os.getuid() or status.st_mode & 0o022:
            raise Refused(f"{library} belongs to another user or can be written by others; {remedy}")
        recorded = record_path(library).read_text().strip()
        digest = hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError as failure:
        raise Refused(f"{library} cannot be checked ({failure.strerror or failure}); {remedy}") from None
    if digest != recorded:
        raise Refused(f"{library} is not the library built here (its SHA-256 is not the one recorded); {remedy}")


def build(command: list[str], source: Path, library: Path, links: list[str]) -> None:
    """Compiles source into library, linked with links (after the source, where the linker looks for them), and
    records its SHA-256; Refused with the compiler's first error line if it fails."""
    if shutil.which(command[0]) is None:
        raise Refused(f"no C compiler ({command[0]!r}); install gcc or set CC")
    try:
        with tempfile.TemporaryDirectory(dir=library.parent) as building:
            built = Path(building) / library.name
            result = subprocess.run([*command, "-o", str(built), str(source), *links], capture_output=True, text=True)
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines() or ["no message"]
                error = next((line for line in lines if "error" in line or "cannot find" in line), lines[0])
                raise Refused(f"{command[0]} could not build {source.name} ({error})")
            record = record_path(built)
            record.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
            # The record first: a library present always has its record.
            os.replace(record, record_path(library))
            os.replace(built, library)
    except OSError as failure:
        raise Refused(
            f"{library.parent}: {failure.strerror or failure}; set XDG_CACHE_HOME to a writable folder"
        ) from None


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    """The address of a contiguous CPU tensor's first element, for a kernel's argument."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("a native kernel needs contiguous CPU tensors")
    return ctypes.c_void_p(tensor.data_ptr())
