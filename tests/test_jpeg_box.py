"""dataset.gpu_augment's box decoder (utils/data/jpeg_box.c): a box's pixels are those of PIL's whole decode, a
worker that knows an image's grey level decodes only the box and gives what a whole decode gives, the grey levels
reach every DataLoader worker and epoch, and whatever the kernel does not read goes the ordinary way."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import SHRINK
from utils.data import jpeg_box, native
from utils.data.device_augment import build_split_pipeline, load_for_crop, load_pixels, pack_crops
from utils.data.image_dataset import ImageDataset
from utils.errors import InputError

SETTINGS = dict(
    crop_size=48, resize=64, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), rotate=None, hflip=True, color_jitter=None
)


@pytest.fixture(autouse=True)
def kernel():
    if jpeg_box.kernel() is None:
        pytest.skip("jpeg_box.c cannot be built here (no compiler or no libjpeg headers): the workers decode whole")


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour with noise: every 8x8 block and every chroma sample differs, so a misplaced one shows."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("size", "options"),
    [
        ((500, 375), dict(subsampling="4:2:0")),
        ((333, 251), dict(subsampling="4:2:2")),
        ((97, 61), dict(subsampling="4:4:4")),
        ((201, 150), dict(subsampling="4:2:0", progressive=True)),
        ((121, 77), dict(mode="L")),
        ((64, 48), dict(subsampling="4:2:0", restart_marker_blocks=3)),
    ],
)
def test_a_box_has_the_pixels_of_the_whole_decode(tmp_path: Path, size, options) -> None:
    image = textured(*size)
    if options.pop("mode", None) == "L":
        image = image.convert("L")
    image.save(tmp_path / "x.jpg", quality=90, **options)
    whole = torch.from_numpy(np.array(Image.open(tmp_path / "x.jpg").convert("RGB")))
    jpeg = jpeg_box.open_jpeg(tmp_path / "x.jpg")
    assert (jpeg.height, jpeg.width) == whole.shape[:2]
    assert torch.equal(jpeg.whole(), whole)
    width, height = size
    rng = np.random.default_rng(1)
    corners = [(0, 0, 1, 1), (height - 1, width - 1, height, width), (0, width - 17, height, width)]
    boxes = corners + [
        tuple(int(v) for v in (top, left, rng.integers(top + 1, height + 1), rng.integers(left + 1, width + 1)))
        for top, left in zip(rng.integers(0, height, 100), rng.integers(0, width, 100), strict=True)
    ]
    for top, left, bottom, right in boxes:
        box = jpeg.box(top, left, bottom, right)
        assert torch.equal(box, whole[top:bottom, left:right]), (top, left, bottom, right)


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
def test_a_box_leaving_the_image_has_the_pixels_of_pils_crop(tmp_path: Path, subsampling: str) -> None:
    """Boxes across the right and bottom edges, wider than the image, and wholly outside it: PIL's crop (black
    outside the image) is the oracle."""
    textured(61, 45).save(tmp_path / "x.jpg", quality=90, subsampling=subsampling)
    image = Image.open(tmp_path / "x.jpg").convert("RGB")
    jpeg = jpeg_box.open_jpeg(tmp_path / "x.jpg")
    boxes = [
        (0, 50, 45, 75),
        (40, 59, 52, 64),
        (10, 60, 11, 61),
        (0, 0, 60, 80),
        (-3, -5, 4, 6),
        (0, 61, 45, 70),
        (45, 0, 50, 61),
        (50, 70, 53, 74),
        (-9, -9, -1, -1),
    ]
    for top, left, bottom, right in boxes:
        expected = torch.from_numpy(np.array(image.crop((left, top, right, bottom))))
        assert torch.equal(jpeg.box(top, left, bottom, right), expected), (top, left, bottom, right)


def test_a_worker_that_knows_the_grey_level_decodes_only_the_box_and_gives_the_same(tmp_path, monkeypatch):
    textured(150, 110).save(tmp_path / "x.jpg", quality=90)
    outputs = []
    for epochs in range(3):  # torchvision's whole decode; the first epoch (box decoder, whole); a later epoch
        worker, _ = build_split_pipeline(**SETTINGS)
        worker.share_grey_levels([tmp_path / "x.jpg"])
        if epochs == 2:
            worker(load_for_crop(tmp_path / "x.jpg"))
            monkeypatch.setattr(jpeg_box.JpegFile, "whole", lambda self: pytest.fail("decoded whole again"))
        image = load_pixels(tmp_path / "x.jpg") if epochs == 0 else load_for_crop(tmp_path / "x.jpg")
        assert isinstance(image, jpeg_box.JpegFile) == (epochs > 0)
        torch.manual_seed(0)
        outputs.append([worker(image) for _ in range(30)])
    for crops in zip(*outputs, strict=True):
        (crop, flip, grey), *others = crops
        for other_crop, other_flip, other_grey in others:
            assert torch.equal(crop, other_crop) and flip == other_flip and grey == other_grey


def test_grey_levels_reach_every_worker_and_epoch(tmp_path: Path) -> None:
    for index in range(12):
        textured(40 + index, 30, seed=index).save(tmp_path / f"{index}.jpg", quality=85)
    (tmp_path / "train.txt").write_text("".join(f"{index}.jpg,{index % 3}\n" for index in range(12)))
    worker, _ = build_split_pipeline(**SETTINGS)
    dataset = ImageDataset(tmp_path, "train.txt", worker, decode=load_for_crop)
    worker.share_grey_levels(dataset.paths)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=pack_crops)  # new workers each epoch
    first = torch.cat([batch[3] for batch, _ in loader])
    measured = worker.grey_levels.values.clone()  # written by the workers, read here
    second = torch.cat([batch[3] for batch, _ in loader])
    assert torch.equal(first, second) and torch.equal(measured.float(), first)
    expected = [torch.from_numpy(np.array(Image.open(path).convert("L"), dtype=np.float64)) for path in dataset.paths]
    torch.testing.assert_close(
        first.double(), torch.stack([grey[::4].mean() / 255 for grey in expected]), atol=1 / 255, rtol=0
    )


@pytest.mark.parametrize("kind", ["cmyk", "png named .jpg", "png"])
def test_what_the_kernel_does_not_read_goes_through_load_pixels(tmp_path: Path, kind: str) -> None:
    name = "x.png" if kind == "png" else "x.jpg"
    image = textured(50, 40)
    image.convert("CMYK").save(tmp_path / name, format="JPEG") if kind == "cmyk" else image.save(
        tmp_path / name, format="PNG"
    )
    assert jpeg_box.open_jpeg(tmp_path / name) is None
    assert torch.equal(load_for_crop(tmp_path / name), load_pixels(tmp_path / name))


@pytest.mark.parametrize("damage", ["truncate", "garbage after the header", "garbage"])
def test_an_unreadable_jpeg_is_named(tmp_path: Path, damage: str) -> None:
    textured(120, 90).save(tmp_path / "x.jpg", quality=90)
    data = (tmp_path / "x.jpg").read_bytes()
    damaged = {
        "truncate": data[: len(data) // 2],
        "garbage after the header": data[:700] + b"\xff\x00" * 200,
        "garbage": data[:2] + b"garbage" * 40,
    }[damage]
    (tmp_path / "x.jpg").write_bytes(damaged)
    worker, _ = build_split_pipeline(**SETTINGS)
    worker.share_grey_levels([tmp_path / "x.jpg"])
    with pytest.raises(InputError, match=r"image .*x\.jpg cannot be read .* replace the file or remove its line"):
        worker(load_for_crop(tmp_path / "x.jpg"))


def test_without_the_kernel_workers_decode_whole_images(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(jpeg_box, "kernel", lambda: None)
    textured(50, 40).save(tmp_path / "x.jpg")
    assert torch.equal(load_for_crop(tmp_path / "x.jpg"), load_pixels(tmp_path / "x.jpg"))


def test_a_missing_library_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "linked.c"
    source.write_text("int f(void) { return 0; }\n")
    with pytest.warns(UserWarning, match="could not build linked.c .*cannot find -lno_such_library"):
        assert native.load(source, libraries=("no_such_library",)) is None


@pytest.mark.slow
def test_a_run_whose_kernel_cannot_be_built_warns_once(datasets, tmp_path: Path) -> None:
    """A real run, 3 epochs of 2 DataLoader workers, with a compiler that fails: one warning, from the main
    process, and the workers decode whole images."""
    environment = os.environ | {"CC": "false", "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONWARNINGS": "default"}
    updates = [*SHRINK, "epochs=3", "dataset.num_workers=2", f"dataset.data_path={datasets['cub']}"]
    command = [sys.executable, "experiment.py", "with", "dataset.cub", "model.small_cnn", "dataset.gpu_augment=True"]
    result = subprocess.run(
        [*command, *updates, f"output_dir={tmp_path / 'runs'}"],
        cwd=Path(__file__).parents[1],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("could not build jpeg_box.c") == 1, result.stderr[-3000:]
