"""JPEG files decoded one box at a time (jpeg_box.c on the system's libjpeg-turbo), for dataset.gpu_augment's workers.

A training crop covers on average about half of its image, and decoding is most of a gpu_augment worker's time:
decoding only the box skips the transform and upsampling of the rest, and the entropy decoding of the rows below
it. The pixels are those of a full decode (tested against PIL's), and black where a box leaves the image, as PIL's
crop. The kernel is built in the main process (build_split_pipeline calls `kernel`) before the DataLoader workers
fork and inherit it; a worker never builds it. Where it cannot be built (no compiler, no libjpeg headers: Debian's
libjpeg62-turbo-dev), one warning says so and `open_jpeg` returns None: the images are decoded whole with PIL.
"""

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from utils.data import native

SOURCE = Path(__file__).with_name("jpeg_box.c")


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The box decoder, or None where it cannot be built, or in a worker whose main process did not build it
    (building there would repeat the build and its warning in every worker of every epoch)."""
    if get_worker_info() is not None:
        return None
    library = native.load(SOURCE, libraries=("jpeg",))
    if library is not None:
        library.jpeg_box.argtypes = [
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
            *[ctypes.c_int] * 4,
            ctypes.c_void_p,
        ]
    return library


def call_kernel(data: bytes, box: tuple[int, int, int, int], out: Tensor | None) -> tuple[int, int] | None:
    """(height, width) of the JPEG in data, with box (top, left, height, width) decoded into out where given; None
    where libjpeg reports an error or corrupt data, or cannot make RGB."""
    size = np.zeros(2, dtype=np.int32)
    failed = kernel().jpeg_box(data, len(data), size.ctypes.data, *box, None if out is None else native.pointer(out))
    return None if failed else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class JpegFile:
    """A JPEG's bytes and size, read but not decoded; `box` decodes the part a crop needs."""

    path: Path
    data: bytes
    height: int
    width: int

    def box(self, top: int, left: int, bottom: int, right: int) -> Tensor | None:
        """uint8 (bottom - top, right - left, 3) RGB pixels of rows [top, bottom) and columns [left, right), black
        outside the image, or None where libjpeg reports an error or corrupt data (the caller then decodes the file
        the ordinary way)."""
        pixels = torch.empty(bottom - top, right - left, 3, dtype=torch.uint8)
        decoded = call_kernel(self.data, (top, left, bottom - top, right - left), pixels)
        return None if decoded is None else pixels

    def whole(self) -> Tensor | None:
        return self.box(0, 0, self.height, self.width)


def open_jpeg(path: Path) -> JpegFile | None:
    """The file at path, read and its header parsed, if it is a JPEG that the kernel turns into RGB (greyscale,
    YCbCr or RGB); None otherwise (another format, CMYK, a corrupt header, or no kernel)."""
    if path.suffix.lower() not in (".jpg", ".jpeg") or kernel() is None:
        return None
    data = path.read_bytes()
    size = call_kernel(data, (0, 0, 0, 0), None)
    return None if size is None else JpegFile(path, data, *size)
