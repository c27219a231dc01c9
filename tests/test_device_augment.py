"""The split pipeline (decoding and crop boxes in the workers on uint8, resampling and colour jitter on the device)
draws the same distribution of crops and colours as the default PIL pipeline: two-sample Kolmogorov-Smirnov tests
on the same images, with fixed seeds."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from tests.conftest import SHRINK, assert_input_error, digits_updates
from utils.data.device_augment import build_split_pipeline, load_for_crop, load_pixels, pack_crops
from utils.data.images import load_image
from utils.data.transforms import build_transforms
from utils.errors import InputError

SAMPLES = 400
SETTINGS = dict(crop_size=48, resize=64, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), rotate=None, hflip=True)
CPU = torch.device("cpu")


def ramps() -> Image.Image:
    """Red grows with x and green with y: a crop's pixels tell where it was taken and whether it was flipped."""
    x, y = np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 90))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))


def photo() -> Image.Image:
    """Smooth colour blobs with texture: pixels away from the extremes, so that jitter moves them freely."""
    rng = np.random.default_rng(0)
    low = rng.uniform(30, 225, size=(6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((120, 90), Image.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))


def default_pipeline(image: Image.Image, color_jitter, seed: int = 0) -> torch.Tensor:
    transform, _ = build_transforms(color_jitter=color_jitter, **SETTINGS)
    torch.manual_seed(seed)
    return torch.stack([transform(image) for _ in range(SAMPLES)])


def split_pipeline(image: Image.Image, color_jitter, seed: int = 1) -> torch.Tensor:
    worker, device_jitter = build_split_pipeline(color_jitter=color_jitter, **SETTINGS)
    torch.manual_seed(seed)
    images, _ = pack_crops([(worker(image), 0) for _ in range(SAMPLES)])
    return device_jitter(images, CPU)


def geometry(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Crop positions and sizes are whole pixels, so these take few values; rounded to a grid coarser than
    the two resamplings' differences (see the paired test), the atoms of both pipelines coincide, where a KS
    test would otherwise read an offset of 1e-4 between two atoms as a difference of distributions."""
    red, green = images[:, 0], images[:, 1]
    statistics = {
        "centre x": red.mean(dim=(1, 2)),
        "centre y": green.mean(dim=(1, 2)),
        "signed width": (red[:, :, -1] - red[:, :, 0]).mean(dim=1),  # negative when flipped
        "height": (green[:, -1] - green[:, 0]).mean(dim=1),
    }
    return {key: (value * 100).round() / 100 for key, value in statistics.items()}


def colours(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        **{f"mean {c}": images[:, i].mean(dim=(1, 2)) for i, c in enumerate("RGB")},
        **{f"std {c}": images[:, i].std(dim=(1, 2)) for i, c in enumerate("RGB")},
    }


def p_values(statistics, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    first, second = statistics(a), statistics(b)
    return {key: ks_2samp(first[key].numpy(), second[key].numpy()).pvalue for key in first}


def test_same_draws_give_the_same_crops():
    """The worker draws the box and the flip as the default pipeline does, in the same order: with one seed
    the two pipelines crop the same boxes and differ only by resampling once instead of twice."""
    default, split = default_pipeline(ramps(), None, seed=0), split_pipeline(ramps(), None, seed=0)
    assert (default - split).abs().mean(dim=(1, 2, 3)).max() < 0.01


def test_same_distribution_of_crops():
    p = p_values(geometry, default_pipeline(ramps(), None), split_pipeline(ramps(), None))
    assert min(p.values()) > 0.001, p


@pytest.mark.parametrize("color_jitter", [(0.25, 0.25, 0.25, 0), (0.3, 0.3, 0.3, 0.1)])  # CUB's, Cars'
def test_same_distribution_of_colours(color_jitter):
    p = p_values(colours, default_pipeline(photo(), color_jitter), split_pipeline(photo(), color_jitter))
    assert min(p.values()) > 0.001, p


def test_the_colour_test_sees_a_missing_jitter():
    p = p_values(colours, default_pipeline(photo(), (0.3, 0.3, 0.3, 0.1)), split_pipeline(photo(), None))
    assert min(p.values()) < 1e-6, p


def test_worker_output_is_the_uint8_crop_box():
    worker, _ = build_split_pipeline(color_jitter=None, **SETTINGS)
    torch.manual_seed(0)
    pixels, flip, grey = worker(photo())
    assert pixels.dtype == torch.uint8 and pixels.shape[2] == 3 and isinstance(flip, bool)
    # The box is drawn in the 64 px resized image (85 x 64) and mapped to the 120 x 90 photo.
    assert 1 <= pixels.shape[0] <= 90 and 1 <= pixels.shape[1] <= 120
    assert grey == pytest.approx(np.asarray(photo().convert("L")).mean() / 255, abs=0.01)


def test_crops_of_any_size_are_packed_and_resampled_to_the_crop_size():
    """pack_crops keeps every crop's pixels and size; the device resamples each as torch's antialiased bilinear
    resize of that crop alone would, and flips the ones the worker drew."""
    generator = torch.Generator().manual_seed(0)
    crops = [
        torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
        for h, w in ((30, 40), (48, 48), (7, 90), (100, 20))
    ]
    flips = [False, True, False, True]
    items = [((crop, flip, 0.5), label) for label, (crop, flip) in enumerate(zip(crops, flips, strict=True))]
    batch, labels = pack_crops(items)
    assert labels.tolist() == [0, 1, 2, 3] and batch[1].tolist() == [[30, 40], [48, 48], [7, 90], [100, 20]]
    _, device = build_split_pipeline(color_jitter=None, **SETTINGS)
    images = device(batch, CPU)
    assert images.shape == (4, 3, 48, 48) and images.dtype == torch.float32
    for image, crop, flip in zip(images, crops, flips, strict=True):
        want = (
            torch.nn.functional.interpolate(
                crop.permute(2, 0, 1)[None].float(), size=(48, 48), mode="bilinear", antialias=True
            )[0]
            .div(255)
            .clamp(0, 1)
        )
        torch.testing.assert_close(image, want.flip(-1) if flip else want)


def test_an_empty_batch_packs():
    batch, labels = pack_crops([])
    assert batch[0].numel() == 0 and batch[1].shape == (0, 2) and labels.numel() == 0


@pytest.mark.parametrize(
    ("mode", "name"),
    [("RGB", "a.jpg"), ("L", "grey.jpeg"), ("CMYK", "cmyk.JPG"), ("RGB", "png-named.jpg"), ("I;16", "deep.png")],
)
def test_load_pixels_gives_load_images_pixels(tmp_path, mode, name):
    """torchvision's JPEG decoder and PIL's are both libjpeg-turbo: the same pixels. What torchvision does not
    decode (here a PNG named .jpg, and a 16-bit PNG) goes through load_image."""
    image = photo()
    image = image.convert("I;16") if mode == "I;16" else image.convert(mode)
    image.save(tmp_path / name, format="PNG" if "png" in name else "JPEG")
    pixels = load_pixels(tmp_path / name)
    assert pixels.dtype == torch.uint8
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(load_image(tmp_path / name))))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_load_pixels_names_an_unreadable_jpeg(tmp_path, damage):
    photo().save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:2] + b"garbage" * 40)
    with pytest.raises(InputError, match=r"image .*x\.jpg cannot be read .* replace the file or remove its line"):
        load_pixels(tmp_path / "x.jpg")


def test_worker_takes_pil_images_and_tensors_alike(tmp_path):
    """Preloaded images are PIL images, the others come from load_pixels: the same draws, the same output."""
    photo().save(tmp_path / "x.png")
    worker, _ = build_split_pipeline(color_jitter=None, **SETTINGS)
    outputs = []
    for image in (load_image(tmp_path / "x.png"), load_pixels(tmp_path / "x.png")):
        torch.manual_seed(0)
        outputs.append([worker(image) for _ in range(20)])
    for (a, flip_a, grey_a), (b, flip_b, grey_b) in zip(*outputs, strict=True):
        assert torch.equal(a, b) and flip_a == flip_b and grey_a == grey_b


def test_rotation_is_refused():
    with pytest.raises(InputError, match=r"dataset\.rotate=10 .* dataset\.gpu_augment"):
        build_split_pipeline(**(SETTINGS | {"rotate": 10}), color_jitter=None)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["experiment", "autoencoder_experiment"])
def test_experiments_train_with_gpu_augment(script, datasets, request):
    run = request.getfixturevalue(script)
    words = "with dataset.cub model.small_cnn" if script == "experiment" else "with dataset.cub_vae vae.ae"
    outcome = run(
        f"{words} dataset.gpu_augment=True dataset.pin_memory=True", *SHRINK, f"dataset.data_path={datasets['cub']}"
    )
    assert outcome.code == 0, outcome.err


def test_experiment_refuses_rotation_with_gpu_augment(digits_path, experiment):
    outcome = experiment("with epochs=1 dataset.gpu_augment=True dataset.rotate=15", *digits_updates(digits_path))
    assert_input_error(outcome, "dataset.rotate=15", "dataset.gpu_augment")


@pytest.mark.parametrize(("name", "size"), [("one.jpg", (1, 1)), ("one.png", (1, 1)), ("thin.jpg", (3, 200))])
def test_tiny_images_and_tiny_crops_give_whole_pixels(tmp_path, name, size):
    """dataset.scale=[0.01, 0.02] on a 1x1 (or 3 px wide) image: every box keeps at least one pixel of the image,
    whose values it holds, and the device resamples it."""
    pixels = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / name, quality=100)
    decoded = np.array(load_image(tmp_path / name))
    worker, device = build_split_pipeline(color_jitter=None, **(SETTINGS | {"scale": (0.01, 0.02)}))
    worker.share_grey_levels([tmp_path / name])
    torch.manual_seed(0)
    items = [(worker(load_for_crop(tmp_path / name)), 0) for _ in range(40)]
    for (crop, _, _), _ in items:
        assert crop.shape[0] >= 1 and crop.shape[1] >= 1
        windows = np.lib.stride_tricks.sliding_window_view(decoded, crop.shape)
        assert (windows == crop.numpy()).all(axis=(-3, -2, -1)).any()
    assert device(pack_crops(items)[0], CPU).shape == (40, 3, 48, 48)
