"""Images whose header claims more pixels than the one limit are refused by file name before any decoder
allocates them, on every path (Pillow's, gpu_augment's); float images holding 8-bit values; split-file paths
that leave the data folder."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.device_augment import load_for_crop
from utils.data.images import MAX_PIXELS, load_image, read_split
from utils.errors import InputError
from utils.evaluation.inference import embed_images


def claiming_jpeg(path: Path, height: int, width: int) -> Path:
    """A real 16 x 16 JPEG (under a kilobyte) whose SOF0 header is patched to claim height x width."""
    Image.new("RGB", (16, 16), (200, 30, 60)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


# 10,000 x 10,000 lies between the limit and twice it (Pillow only warns); 20,000 x 20,000 and 65,000 x 65,000
# are Pillow's DecompressionBombError.
SIZES = [(10_000, 10_000), (20_000, 20_000), (65_000, 65_000)]


@pytest.mark.parametrize("height, width", SIZES)
def test_load_image_refuses_a_header_claiming_too_many_pixels(tmp_path, height, width):
    path = claiming_jpeg(tmp_path / "huge.jpg", height, width)
    assert path.stat().st_size < 2_000
    if height * width <= 2 * MAX_PIXELS:  # the patch took: Pillow reads the claimed size from the header
        with Image.open(path) as image:
            assert image.size == (width, height)
    with pytest.raises(InputError, match=f"^image {path} claims {height * width:,} pixels|{width:,} x {height:,}"):
        load_image(path)


@pytest.mark.parametrize("height, width", SIZES[:2])
def test_the_gpu_augment_decoders_are_not_reached(tmp_path, height, width):
    path = claiming_jpeg(tmp_path / "huge.jpg", height, width)
    with pytest.raises(InputError, match=f"^image {path} claims .* more than the {MAX_PIXELS:,} pixels allowed"):
        load_for_crop(path)


def test_an_image_at_the_limit_still_loads(tmp_path):
    side = int(MAX_PIXELS**0.5)
    Image.new("L", (side, side)).save(tmp_path / "large.png")
    assert load_image(tmp_path / "large.png").size == (side, side)


def test_embed_skips_a_bomb_with_bad_images_skip(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(folder / "good.jpg")
    bomb = claiming_jpeg(folder / "bomb.jpg", 20_000, 20_000)
    config = {
        "dataset": {
            "crop_size": 16,
            "resize": 20,
            "scale": (0.16, 1.0),
            "ratio": (0.75, 1.33),
            "test_batch_size": 4,
            "num_workers": 0,
        }
    }

    def mean_colour(batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(2, 3))

    out = embed_images(
        mean_colour, config, torch.device("cpu"), str(folder), str(tmp_path / "out"), "skip", "cosine/R@1"
    )
    saved = np.load(out)
    assert saved["paths"].tolist() == [str(folder / "good.jpg")]
    assert saved["skipped"].tolist() == [str(bomb)]
    with pytest.raises(InputError, match=f"image {bomb} claims 400,000,000 pixels"):
        embed_images(mean_colour, config, torch.device("cpu"), str(folder), str(tmp_path / "out"), "stop", "cosine/R@1")


def test_a_float_tiff_of_8_bit_values_keeps_its_levels(tmp_path):
    levels = np.array([[0.0, 64.0, 128.0, 255.0]], dtype=np.float32)
    Image.fromarray(levels).save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as image:
        assert image.mode == "F"
    assert np.asarray(load_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 64, 128, 255]


@pytest.mark.parametrize("path", ["../outside.jpg", "images/../../outside.jpg", "/etc/passwd", "C:/x.jpg"])
def test_split_paths_leaving_the_data_folder_are_refused(tmp_path, path):
    (tmp_path / "train.txt").write_text(f"images/a.jpg,0\n{path},1\n")
    with pytest.raises(InputError, match=f"train.txt, line 2: '{path}' leads outside the data folder"):
        read_split(tmp_path / "train.txt")


def test_split_paths_that_stay_inside_are_read(tmp_path):
    (tmp_path / "train.txt").write_text("images/../images/a.jpg,0\n./b..c.jpg,1\n")
    assert read_split(tmp_path / "train.txt") == [("images/../images/a.jpg", 0), ("./b..c.jpg", 1)]
