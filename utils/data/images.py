"""Split files of `relative/path,label` lines and the images they list, read strictly (no torch here)."""

import codecs
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import InputError


def read_split(split_file: Path) -> list[tuple[str, int]]:
    """Parse a split file into (relative path, label) pairs; a bad line names its file and number.

    UTF-8 (with or without a byte-order mark), LF or CRLF. Labels are non-negative ASCII integers that
    number the classes densely: the largest is below the number of lines, so no consumer ever allocates
    for classes that do not exist.
    """
    samples = []
    for number, line in enumerate(_split_text(split_file).splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.rpartition(",")
        label = label.strip()
        if not path or not (label.isascii() and label.isdigit()):
            raise InputError(f"{split_file}, line {number}: expected 'relative/path,label' with a label 0, 1, 2, ..., "
                             f"got {line!r}")
        samples.append((path.strip(), int(label)))
    if not samples:
        raise InputError(f"{split_file} lists no images; re-create it with prepare_data.py")
    largest = max(label for _, label in samples)
    if largest >= len(samples):
        raise InputError(f"{split_file}: largest label {largest:,} but only {len(samples):,} images: labels must number "
                         f"the classes densely from 0 (0, 1, 2, ...); renumber them")
    return samples


def _split_text(split_file: Path) -> str:
    data = split_file.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise InputError(f"{split_file} is UTF-16 or UTF-32 encoded: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")  # drops a byte-order mark
    except UnicodeDecodeError as error:
        raise InputError(f"{split_file} is not UTF-8 (byte {error.start:,} cannot be decoded): save it as UTF-8"
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
        # Floating-point images hold intensities in [0, 1].
        image = Image.fromarray((np.clip(np.asarray(image), 0, 1) * 255 + 0.5).astype(np.uint8))
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise InputError(f"image {path} is missing; re-run prepare_data.py or fix the split file") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"image {path} cannot be read ({error}); replace the file or remove its line") from None
