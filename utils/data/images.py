"""Split files of `relative/path,label` lines and the images they list, read strictly (no torch here)."""

import codecs
import posixpath
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import InputError


def read_split(split_file: Path) -> list[tuple[str, int]]:
    """Parse a split file into (relative path, label) pairs; a bad line names its file and number.

    UTF-8 (with or without a byte-order mark), LF or CRLF. Labels are non-negative ASCII integers that
    number the classes densely: the largest is below the number of lines, so no consumer ever allocates
    for classes that do not exist. Paths stay inside the split file's data folder (no absolute path, no
    climbing out with '..').
    """
    samples = []
    for number, line in enumerate(_split_text(split_file).splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.rpartition(",")
        label = label.strip()
        if not path or not (label.isascii() and label.isdigit()):
            raise InputError(
                f"{split_file}, line {number}: expected 'relative/path,label' with a label 0, 1, 2, ..., got {line!r}"
            )
        relative = path.strip()
        if leaves_folder(relative):
            raise InputError(
                f"{split_file}, line {number}: {relative!r} leads outside the data folder; list "
                f"paths relative to the folder, inside it"
            )
        samples.append((relative, int(label)))
    if not samples:
        raise InputError(f"{split_file} lists no images; re-create it with prepare_data.py")
    largest = max(label for _, label in samples)
    if largest >= len(samples):
        raise InputError(
            f"{split_file}: largest label {largest:,} but only {len(samples):,} images: labels must number "
            f"the classes densely from 0 (0, 1, 2, ...); renumber them"
        )
    return samples


def leaves_folder(path: str) -> bool:
    """Whether a split file's path is absolute or climbs out of its folder with '..' (read as text: links inside
    the folder are the user's own)."""
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive or PureWindowsPath(path).root:
        return True
    return posixpath.normpath(path.replace("\\", "/")).split("/", 1)[0] == ".."


def _split_text(split_file: Path) -> str:
    data = split_file.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise InputError(f"{split_file} is UTF-16 or UTF-32 encoded: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")  # drops a byte-order mark
    except UnicodeDecodeError as error:
        raise InputError(
            f"{split_file} is not UTF-8 (byte {error.start:,} cannot be decoded): save it as UTF-8"
        ) from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with NULs
        raise InputError(f"{split_file} holds NUL characters (UTF-16 without a byte-order mark?): save it as UTF-8")
    return text


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; high-bit-depth greyscale is scaled to 8 bits (convert('RGB') would saturate it at 255)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow opens 16-bit greyscale PNG and TIFF as I;16* or I: 0-65535 maps onto 0-255.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image)
        image = Image.fromarray((np.clip(values / float_white(values), 0, 1) * 255 + 0.5).astype(np.uint8))
    return image.convert("RGB")


def float_white(values: np.ndarray) -> float:
    """The white of a floating-point image: 1 when its values lie in [0, 1], 255 when some exceed 1 (8-bit
    intensities stored as floats), 65535 beyond 255."""
    largest = float(np.nanmax(values, initial=0))
    return next((white for white in (1.0, 255.0) if largest <= white), 65535.0)


# One limit on every decoder's path: the width x height in the header, read before any pixel is decoded, so
# a small file cannot claim gigabytes of pixels. Pillow's own threshold (89.5 M pixels, 268 MB as 8-bit RGB):
# Pillow refuses twice as many itself (DecompressionBombError), and this check takes the band between.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Pillow warns about that band before check_image_size refuses it: the refusal says all the warning would.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _too_large(path: Path, size: str) -> InputError:
    return InputError(
        f"image {path} claims {size}, more than the {MAX_PIXELS:,} pixels allowed (a corrupt or "
        f"hostile header?); replace the file or remove its line"
    )


def _bomb_size(error: Image.DecompressionBombError) -> str:
    """The pixel count in Pillow's message ("Image size (400000000 pixels) exceeds limit ...")."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,} pixels" if found else "more than twice that many pixels"


@contextmanager
def opened(path: Path) -> Iterator[Image.Image]:
    """The image at path, opened (header read, pixels not decoded) and its size checked; any problem with the
    file, in opening it or in decoding it within the block, is an InputError naming it."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise _too_large(path, f"{image.width:,} x {image.height:,} pixels")
            yield image
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"image {path} is missing; re-run prepare_data.py or fix the split file") from None
    except Image.DecompressionBombError as error:
        raise _too_large(path, _bomb_size(error)) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"image {path} cannot be read ({error}); replace the file or remove its line") from None


def check_image_size(path: Path) -> None:
    """Refuse, without decoding, an image over MAX_PIXELS or one that cannot be opened: the check for decoders
    other than Pillow's."""
    with opened(path):
        pass


def load_image(path: Path) -> Image.Image:
    with opened(path) as image:
        return to_rgb(image)
