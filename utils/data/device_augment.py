"""The split training pipeline (dataset.gpu_augment=True): decoding and crop boxes in the workers on uint8, resampling
and colour on the device.

The default pipeline (utils.data.transforms) does everything in a worker on PIL images: resize, colour jitter,
random resized crop, flip, conversion to float. One CPU core then prepares about 290 CUB-sized images per
second, far from what a GPU consumes. Here a worker only draws the crop box and the flip, and hands over the box's
uint8 pixels (`WorkerCrop`), decoding only the box of a JPEG once it knows the image's grey level (utils.data.
jpeg_box); `pack_crops` collates crops of any size into one buffer; the device (`DeviceAugment`) resamples every
crop to the training size, flips it, jitters the colours of the whole batch at once and turns it into floats (the
backbone normalises). Decoding is then most of a worker's work.

The augmentation distribution is the default pipeline's:

- The crop box is drawn by torchvision's own RandomResizedCrop.get_params in the coordinates of the resized
  image, as the default pipeline draws it, and mapped back to the decoded image (to whole pixels there), which
  is resampled once (crop and resize in one antialiased bilinear step, where the default resamples twice), in
  float on the device where the default rounds to uint8 twice. The flip is drawn after the box, as the default
  draws it.
- Colour jitter draws its factors and their order per image as torchvision's ColorJitter does, and applies the
  same formulas to float pixels. Jitter is per pixel except contrast, which blends towards the mean grey level
  of the whole image, not of the crop: the worker measures that mean on the full image (on every 4th row) the
  first time it decodes it, and remembers it for the later epochs (GreyLevels), and
  the device carries it through a brightness change applied before the contrast (exactly, unless pixels clip
  at 1) and keeps it through saturation (exact) and hue (an approximation: hue rotation moves the grey level a
  little).

tests/test_device_augment.py checks both distributions against the default pipeline's; docs/speed.md has the
figures.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from utils.data import jpeg_box
from utils.data.images import check_image_size, load_image
from utils.data.jpeg_box import JpegFile, open_jpeg
from utils.errors import InputError

GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale


def resized_size(width: int, height: int, resize: int | Sequence[int] | None) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resize): an int sets the shorter side, a pair (h, w) both."""
    if resize is None:
        return width, height
    if not isinstance(resize, int):
        return int(resize[1]), int(resize[0])
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def load_pixels(path: Path) -> Tensor:
    """The image at path as uint8 (3, H, W), the pixels load_image gives. A JPEG is decoded by the box decoder
    (jpeg_box: libjpeg-turbo straight into a tensor, where PIL's decoder plus its RGB copy take ~10% longer) where
    it is built; anything it does not decode (other formats, CMYK, corrupt files) goes through load_image, which
    reads it or names the file. torchvision's decoders are deprecated since 0.29 for TorchCodec's."""
    jpeg = open_jpeg(path)
    whole = jpeg.whole() if jpeg is not None else None
    return whole.permute(2, 0, 1) if whole is not None else pil_pixels(load_image(path))


def pil_pixels(image: Image.Image) -> Tensor:
    """An RGB PIL image as uint8 (3, H, W) over its (H, W, 3) pixels, the layout torchvision decodes into."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class WorkerCrop:
    """Image (a JpegFile, PIL, or uint8 (3, H, W) from load_pixels) -> (uint8 (h, w, 3) pixels of the crop box,
    whether to flip it, grey-level mean in [0, 1]); pack_crops collates them, DeviceAugment resamples them.

    A JpegFile is decoded whole the first time (its grey level needs every row), and only its crop's box once
    grey_levels (share_grey_levels) holds its mean: the same pixels, 1.33-1.38x the images/s (docs/speed.md)."""

    def __init__(
        self, resize: int | Sequence[int] | None, scale: Sequence[float], ratio: Sequence[float], hflip: bool
    ) -> None:
        self.resize, self.hflip = resize, hflip
        self.scale, self.ratio = list(scale), list(ratio)
        self.grey_levels: GreyLevels | None = None

    def share_grey_levels(self, paths: Sequence[Path]) -> None:
        """Remember the grey levels of the images at paths, across epochs and DataLoader workers."""
        self.grey_levels = GreyLevels(paths)

    def __call__(self, image: JpegFile | Image.Image | Tensor) -> tuple[Tensor, bool, float]:
        if isinstance(image, JpegFile):
            return self.crop_jpeg(image)
        pixels = image if isinstance(image, Tensor) else pil_pixels(image)  # PIL: preloaded images
        (y0, x0, y1, x1), flip = self.draw(*pixels.shape[1:])
        rows = pixels.permute(1, 2, 0)  # (H, W, 3): the decoders' memory layout
        return rows[y0:y1, x0:x1], flip, grey_mean(rows)

    def crop_jpeg(self, jpeg: JpegFile) -> tuple[Tensor, bool, float]:
        (y0, x0, y1, x1), flip = self.draw(jpeg.height, jpeg.width)
        grey = self.grey_levels.get(jpeg.path) if self.grey_levels is not None else None
        crop = None if grey is None else jpeg.box(y0, x0, y1, x1)
        if crop is None:
            whole = jpeg.whole()
            # What libjpeg calls corrupt, torchvision or PIL may still read; else load_image names the file.
            rows = whole if whole is not None else load_pixels(jpeg.path).permute(1, 2, 0)
            grey, crop = grey_mean(rows), rows[y0:y1, x0:x1]
            if self.grey_levels is not None:
                self.grey_levels.remember(jpeg.path, grey)
        return crop, flip, grey

    def draw(self, full_height: int, full_width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box (top, left, bottom, right) in the decoded image's pixels, and the flip."""
        width, height = resized_size(full_width, full_height, self.resize)
        # get_params reads only the size of its image: an uninitialised tensor of the resized shape.
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(0, height, width), self.scale, self.ratio)
        sy, sx = full_height / height, full_width / width
        # At least one whole pixel inside the image: rounding a box of less than a pixel (a tiny image, a small
        # dataset.scale) may otherwise land it on the far edge, where the crop would be empty.
        y0, x0 = min(round(top * sy), full_height - 1), min(round(left * sx), full_width - 1)
        y1 = min(max(round((top + h) * sy), y0 + 1), full_height)
        x1 = min(max(round((left + w) * sx), x0 + 1), full_width)
        return (y0, x0, y1, x1), self.hflip and bool(torch.rand(1) < 0.5)


class GreyLevels:
    """Each training image's mean grey level, measured on its first whole decode, in shared memory: DataLoader
    workers fork with it, so what one worker measures every other one reads, in this epoch and the next ones
    (new workers each epoch included). NaN: not measured yet. A grey level depends only on the file, so which
    worker measures it first does not change any result."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.slots = {path: slot for slot, path in enumerate(paths)}
        self.values = torch.full((len(paths),), float("nan"), dtype=torch.float64).share_memory_()

    def get(self, path: Path) -> float | None:
        value = self.values[self.slots[path]].item()
        return None if math.isnan(value) else value

    def remember(self, path: Path, grey: float) -> None:
        self.values[self.slots[path]] = grey


def load_for_crop(path: Path) -> JpegFile | Tensor:
    """What WorkerCrop takes from a file: a JpegFile where the box decoder reads it, else load_pixels' pixels."""
    check_image_size(path)  # before the decoders allocate whatever the header claims
    return open_jpeg(path) or load_pixels(path)


def grey_mean(rows: Tensor) -> float:
    """The mean grey level in [0, 1] of an (H, W, 3) uint8 image, measured on every 4th row: a tenth of the
    worker's time for the whole image, and within a fraction of a grey level of it on photos (PIL's contrast,
    which the default pipeline runs, rounds it to a whole level). Summed down the rows, then across: along the
    decoders' memory (contiguous H x W x 3 rows), where a sum per channel would stride through it."""
    sampled = rows[::4]
    sums = sampled.flatten(1).sum(dim=0, dtype=torch.float32).view(-1, 3).sum(dim=0)
    return sum(w * s for w, s in zip(GREY, sums.tolist(), strict=True)) / (sampled.shape[0] * sampled.shape[1] * 255)


def pack_crops(items: Sequence[tuple[tuple[Tensor, bool, float], int]]) -> tuple[list[Tensor], Tensor]:
    """A DataLoader's collate_fn for WorkerCrop's items: ([pixels, sizes, flips, greys], labels), where pixels holds
    every crop's (h, w, 3) uint8 values one after another (one buffer, one copy to the device) and sizes their
    (h, w)."""
    crops = [crop for (crop, _, _), _ in items]
    sizes = torch.tensor([crop.shape[:2] for crop in crops], dtype=torch.long).view(-1, 2)
    pixels = torch.empty(sum(crop.numel() for crop in crops), dtype=torch.uint8)
    offset = 0
    for crop in crops:  # one copy of each crop (concatenating them would copy a strided crop twice)
        pixels[offset : offset + crop.numel()].view(crop.shape).copy_(crop)
        offset += crop.numel()
    flips = torch.tensor([flip for (_, flip, _), _ in items], dtype=torch.bool)
    greys = torch.tensor([grey for (_, _, grey), _ in items], dtype=torch.float32)
    return [pixels, sizes, flips, greys], torch.tensor([label for _, label in items])


class DeviceAugment(nn.Module):
    """A batch of pack_crops -> float (B, 3, crop_size, crop_size) in [0, 1] on the device: each crop resampled
    to crop_size (antialiased bilinear, as the default pipeline's resize), flipped where the worker drew it, and
    torchvision ColorJitter(brightness, contrast, saturation, hue) drawn per image (None or 0: off)."""

    def __init__(self, crop_size: int, color_jitter: Sequence[float] | None) -> None:
        super().__init__()
        self.crop_size = crop_size
        # torchvision's own checks and ranges: (1 - x, 1 + x) for the factors, (-x, x) for hue, None when off.
        jitter = T.ColorJitter(*(color_jitter or ()))
        self.ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]

    def forward(self, batch: Sequence[Tensor], device: torch.device) -> Tensor:
        images, grey = self.resample(batch, device), batch[3]
        if all(r is None for r in self.ranges):
            return images
        grey = grey.to(device, non_blocking=True).float().view(-1, 1, 1, 1)
        order, factors = self.draw(images.shape[0], device)
        for position in range(4):
            for op, factor in enumerate(factors):
                if factor is None:
                    continue
                chosen = (order[:, position] == op).view(-1, 1, 1, 1)
                adjusted, new_grey = self.adjust(op, images, grey, factor.view(-1, 1, 1, 1))
                images, grey = torch.where(chosen, adjusted, images), torch.where(chosen, new_grey, grey)
        return images

    def resample(self, batch: Sequence[Tensor], device: torch.device) -> Tensor:
        """(B, 3, crop_size, crop_size) floats in [0, 1]: the crops moved to the device in one copy, resampled one
        by one (their sizes differ) and flipped. The sizes and flips stay on the host: no device read."""
        pixels, sizes, flips = batch[0].to(device, non_blocking=True), batch[1].tolist(), batch[2].tolist()
        images = pixels.new_empty(len(sizes), 3, self.crop_size, self.crop_size, dtype=torch.float32)
        offset = 0
        for image, (h, w), flip in zip(images, sizes, flips, strict=True):
            crop = pixels[offset : offset + h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2).float()
            offset += h * w * 3
            resized = nn.functional.interpolate(
                crop, size=(self.crop_size, self.crop_size), mode="bilinear", antialias=True
            )[0]
            image.copy_(resized.flip(-1) if flip else resized)
        return images.div_(255).clamp_(0, 1)

    def draw(self, count: int, device: torch.device) -> tuple[Tensor, list[Tensor | None]]:
        """Per image: the order of the four adjustments (a permutation, as ColorJitter's randperm(4)) and the
        factors, uniform in their ranges, drawn on the device."""
        order = torch.rand(count, 4, device=device).argsort(dim=1)
        factors = [None if r is None else torch.empty(count, device=device).uniform_(r[0], r[1]) for r in self.ranges]
        return order, factors

    @staticmethod
    def adjust(op: int, images: Tensor, grey: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
        """One adjustment of torchvision.transforms.functional, per image; also the image's new mean grey level."""
        if op == 0:  # brightness: blend with black
            return (images * factor).clamp(0, 1), (grey * factor).clamp(0, 1)
        if op == 1:  # contrast: blend with the whole image's mean grey level
            return (factor * images + (1 - factor) * grey).clamp(0, 1), grey
        if op == 2:  # saturation: blend with the pixel's grey level
            luma = (images * images.new_tensor(GREY).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
            return (factor * images + (1 - factor) * luma).clamp(0, 1), grey
        hsv = _rgb_to_hsv(images)
        hue = (hsv[:, :1] + factor) % 1.0
        return _hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1)), grey


def build_split_pipeline(
    crop_size: int,
    resize: int | Sequence[int] | None,
    scale: Sequence[float],
    ratio: Sequence[float],
    color_jitter: Sequence[float] | None,
    rotate: float | None,
    hflip: bool,
) -> tuple[WorkerCrop, DeviceAugment]:
    """The worker transform and the device module of dataset.gpu_augment=True; also builds the box decoder here,
    in the main process, so that the DataLoader workers inherit it (or its absence, after one warning)."""
    if rotate is not None:
        raise InputError(
            f"dataset.rotate={rotate} is not available with dataset.gpu_augment=True: set "
            f"dataset.rotate=None or dataset.gpu_augment=False"
        )
    jpeg_box.kernel()
    return WorkerCrop(resize, scale, ratio, hflip), DeviceAugment(crop_size, color_jitter)
