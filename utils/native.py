"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

A kernel is one C file next to the Python code that calls it. It is built once per machine and set of macros into
a shared library under ~/.cache/metric-learning (XDG_CACHE_HOME moves it), named by a hash of the source, the
compiler command and the CPU's features, so that an edit, another compiler or another CPU sharing the cache builds
afresh. Where no library can be built (no compiler, a compilation error, no writable cache), `load` warns once and
returns None, and the caller runs the code the kernel replaces: the same results, more slowly.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# -march=native: the library runs on the CPU that built it (the hash names that CPU). No -ffast-math: the kernels
# compare floating-point values exactly and must see NaN.
FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metric-learning"


def cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@functools.cache
def load(source: Path, libraries: tuple[str, ...] = (), **macros: str) -> ctypes.CDLL | None:
    """The library built from source with -D<name>=<value> for each macro and linked with -l<name> for each of
    libraries, or None, with one warning naming what failed: no C compiler ($CC, else cc), a compilation error (a
    missing header or library among them), or a cache folder that cannot be written."""
    compiler = os.environ.get("CC", "cc")
    command = [compiler, *FLAGS, *(f"-D{name}={value}" for name, value in sorted(macros.items()))]
    links = [f"-l{name}" for name in libraries]
    key = hashlib.sha256("\0".join([source.read_text(), *command, *links, platform.machine(), cpu_features()]).encode())
    library = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    fallback = "the slower code it replaces runs instead"
    if not library.exists():
        if shutil.which(compiler) is None:
            warnings.warn(
                f"no C compiler ({compiler!r}): {source.name} is not built, and {fallback}; install gcc or set CC",
                stacklevel=2,
            )
            return None
        try:
            error = build(command, source, library, links)
        except OSError as failure:
            error = f"{library.parent}: {failure.strerror or failure}; set XDG_CACHE_HOME to a writable folder"
        if error:
            warnings.warn(f"{compiler} could not build {source.name} ({error}): {fallback}", stacklevel=2)
            return None
    return ctypes.CDLL(str(library))


def build(command: list[str], source: Path, library: Path, links: list[str]) -> str | None:
    """Compiles source into library, linked with links (after the source, where the linker looks for them); the
    compiler's first error line if it fails."""
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes starting together (torchrun) never load half a file.
    with tempfile.TemporaryDirectory(dir=library.parent) as building:
        built = Path(building) / library.name
        result = subprocess.run([*command, "-o", str(built), str(source), *links], capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["no message"]
            return next((line for line in lines if "error" in line or "cannot find" in line), lines[0])
        os.replace(built, library)
    return None


@functools.cache
def thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="native")


def thread_count(count: int) -> int:
    """How many parts in_parallel cuts range(count) into: torch's thread count, at most count, at least 1."""
    return max(1, min(torch.get_num_threads(), count))


def in_parallel(function: Callable[[int, int, int], object], count: int) -> None:
    """function(part, begin, end) on torch.get_num_threads() contiguous parts of range(count), each in its own
    thread (ctypes releases the GIL during a call); the parts depend only on count and the thread count, so that
    a kernel's results do not depend on timing."""
    threads = thread_count(count)
    bounds = [count * part // threads for part in range(threads + 1)]
    pending = [thread_pool(threads).submit(function, part, bounds[part], bounds[part + 1]) for part in range(threads)]
    for future in pending:
        future.result()


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    """The address of a contiguous CPU tensor's first element, for a kernel's argument."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("a native kernel needs contiguous CPU tensors")
    return ctypes.c_void_p(tensor.data_ptr())
