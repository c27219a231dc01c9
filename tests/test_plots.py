"""The run's pictures: each is opened with Pillow as a PNG of the size its layout promises."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from tests.conftest import digits_updates
from utils.data.image_dataset import ImageDataset, load_image
from utils.reporting.plots import (
    RIGHT,
    WRONG,
    curve_label,
    curve_panels,
    distance_decimals,
    draw_curves,
    draw_dataset_retrieval,
    draw_reconstructions,
    retrieval_examples,
)


def open_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def colour_pixels(pixels: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).sum(axis=-1) < 30).sum())


def series(steps: list[float], values: list[float]) -> dict[str, list]:
    return {"steps": steps, "values": values}


METRICS = {
    "train.loss": series([0, 0.5, 1, 1.5], [2.0, 1.5, 1.2, 1.0]),
    "train.cross_entropy": series([0, 0.5, 1, 1.5], [1.8, 1.3, 1.0, 0.9]),
    "train.mixed_contrastive": series([0, 0.5, 1, 1.5], [0.5, 0.5, 0.4, 0.3]),
    "train.accuracy": series([0, 0.5, 1, 1.5], [0.1, 0.3, 0.5, 0.6]),
    "eval.cosine/R@1": series([0, 1, 2], [0.2, 0.4, 0.5]),
    "eval.l2/R@1": series([0, 1, 2], [0.2, 0.35, 0.45]),
    "eval.cosine/R@2": series([0, 1, 2], [0.3, 0.5, 0.6]),
    "eval.test/reconstruction": series([0, 1, 2], [300.0, 120.0, 60.0]),
}


def test_curves_group_loss_terms_and_distances():
    assert curve_panels(METRICS) == {
        "training accuracy": [["train.accuracy"]],
        "training loss terms": [["train.cross_entropy"], ["train.loss"], ["train.mixed_contrastive"]],
        "eval R@1": [["eval.cosine/R@1"], ["eval.l2/R@1"]],
        "eval R@2": [["eval.cosine/R@2"]],
        "eval reconstruction": [["eval.test/reconstruction"]],
    }


def test_panels_follow_the_numbers_in_their_names():
    recalls = [32, 16, 8, 4, 2, 1, 100]
    metrics = {f"eval.{distance}/R@{k}": series([0], [k / 100]) for k in recalls for distance in ("l2", "cosine")}
    metrics["eval.cosine/MAP@R"] = series([0], [0.1])
    assert [panel for panel in curve_panels(metrics)] == [
        "eval MAP@R",
        *(f"eval R@{k}" for k in sorted(recalls)),
    ]


def test_a_series_identical_to_another_is_one_line_named_after_both():
    # The total loss of a lone cross-entropy term is that term: drawn apart, one line would hide the other.
    lone = series([0, 0.5, 1], [1.6, 1.5, 1.2])
    metrics = {
        "train.loss": {**lone, "timestamps": ["12:00:01", "12:00:02", "12:00:03"]},  # logged a moment apart
        "train.cross_entropy": {**lone, "timestamps": ["12:00:00", "12:00:01", "12:00:02"]},
        "train.contrastive": series([0, 0.5, 1], [1.6, 1.5, 1.3]),  # equal but for one point: a line of its own
        "eval.cosine/R@1": series([0, 1], [0.2, 0.3]),
        "eval.l2/R@1": series([0, 1], [0.2, 0.3]),
    }
    assert curve_panels(metrics) == {
        "training loss terms": [["train.contrastive"], ["train.cross_entropy", "train.loss"]],
        "eval R@1": [["eval.cosine/R@1", "eval.l2/R@1"]],
    }


def test_curves_of_a_real_run_are_in_numeric_order_with_no_line_hidden(digits_path, experiment, tmp_path):
    outcome = experiment(
        f"-F {tmp_path / 'runs'} with epochs=1 evaluation.recalls=[1,2,4,8,16,32]", *digits_updates(digits_path)
    )
    assert outcome.code == 0, outcome.err
    metrics = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())
    panels = curve_panels(metrics)
    assert [panel for panel in panels if panel.startswith("eval R@")] == [f"eval R@{k}" for k in (1, 2, 4, 8, 16, 32)]
    # The lone cross-entropy term is the loss: one line named after both.
    assert panels["training loss terms"] == [["train.cross_entropy", "train.loss"]]
    drawn = [name for lines in panels.values() for line in lines for name in line]
    assert sorted(drawn) == sorted(metrics)  # every series is drawn, once


def test_the_frozen_backbone_point_joins_its_metric_panel_under_its_own_label():
    metrics = {**METRICS, "backbone.cosine/R@1": series([0], [0.15])}
    assert curve_panels(metrics)["eval R@1"] == [["backbone.cosine/R@1"], ["eval.cosine/R@1"], ["eval.l2/R@1"]]
    assert [curve_label(line[0]) for line in curve_panels(metrics)["eval R@1"]] == ["backbone cosine", "cosine", "l2"]


def test_curves_png(tmp_path):
    draw_curves(METRICS, tmp_path / "curves.png", title="a run")
    pixels = open_png(tmp_path / "curves.png")
    assert pixels.shape == (760, 1650, 3)  # 5 panels in 3 columns of 5.5 x 3.8 inches at 100 dpi


def test_curves_of_a_run_that_logged_nothing(tmp_path):
    draw_curves({}, tmp_path / "curves.png")
    assert open_png(tmp_path / "curves.png").shape == (380, 550, 3)


@pytest.fixture(scope="module")
def test_set(digits_path) -> ImageDataset:
    return ImageDataset(digits_path, "test_small.txt")


def pixel_embeddings(dataset: ImageDataset) -> torch.Tensor:
    """Raw 8 x 8 thumbnails: a real, imperfect embedding, so the grid shows right and wrong neighbours."""
    return torch.tensor(
        np.stack([np.asarray(load_image(path).resize((8, 8))).ravel() for path in dataset.paths]), dtype=torch.float32
    )


def test_retrieval_examples_exclude_the_query_and_follow_the_seed():
    torch.manual_seed(0)
    embeddings = torch.randn(40, 6)
    chosen, idx, dist = retrieval_examples(embeddings, count=8, k=5, seed=3, distance="l2")
    assert chosen.tolist() == sorted(np.random.default_rng(3).choice(40, size=8, replace=False).tolist())
    brute = torch.cdist(embeddings[chosen], embeddings)
    brute[np.arange(8), chosen] = float("inf")  # the query is never its own neighbour
    expected = brute.topk(5, largest=False)
    assert idx.tolist() == expected.indices.tolist()
    np.testing.assert_allclose(dist, expected.values.numpy(), rtol=1e-5)
    again = retrieval_examples(embeddings, count=8, k=5, seed=3, distance="l2")
    assert all(np.array_equal(a, b) for a, b in zip(again, (chosen, idx, dist), strict=True))


def test_retrieval_examples_against_a_gallery_use_cosine_distance():
    query, gallery = torch.eye(3), torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 1, 0]])
    chosen, idx, dist = retrieval_examples(query, gallery, count=3, k=2, seed=0)
    assert chosen.tolist() == [0, 1, 2] and idx[:2].tolist() == [[0, 2], [1, 2]]
    np.testing.assert_allclose(dist[:2], [[0, 1 - 2**-0.5], [0, 1 - 2**-0.5]], atol=1e-6)


def test_retrieval_grid_png(test_set, tmp_path):
    embeddings = pixel_embeddings(test_set)
    draw_dataset_retrieval(test_set, embeddings, tmp_path / "retrieval.png", count=8, k=5, seed=0)
    pixels = open_png(tmp_path / "retrieval.png")
    assert pixels.shape == (1610, 1020, 3)  # 8 rows of 1.95 in + title, 6 columns of 1.7 in
    _, idx, _ = retrieval_examples(embeddings, count=8, k=5, seed=0)
    assert len(idx) == 8
    # Both kinds of neighbour are on this embedding, so both frame colours are drawn.
    assert colour_pixels(pixels, RIGHT) > 1000 and colour_pixels(pixels, WRONG) > 1000


def test_reconstructions_png(test_set, tmp_path):
    images = torch.stack([to_tensor(load_image(path)) for path in test_set.paths[:12]])
    draw_reconstructions(images, images.flip(-1), tmp_path / "reconstructions.png", first_epoch=images * 0.5)
    pixels = open_png(tmp_path / "reconstructions.png")
    # 8 tiles a row, 32 px shown at 128 px: 2 blocks of 3 labelled rows (input, best epoch, first epoch).
    assert pixels.shape == (888, 1184, 3)
    draw_reconstructions(images[:4], images[:4], tmp_path / "two_rows.png", title="AE, epoch 3")
    assert open_png(tmp_path / "two_rows.png").shape == (336, 672, 3)


@pytest.mark.parametrize(
    ("row", "decimals"),
    [
        ([0.00001, 0.00002, 0.00004, 0.00008, 0.00016], 5),  # near-duplicates: 0.000 across the row at 3 decimals
        ([0.51234, 0.51237, 0.6, 0.7, 0.8], 4),
        ([0.0, 0.0, 0.0003, 0.9, 1.2], 4),  # equal distances may print alike; 0.0003 must not print as 0.000
        ([0.2, 0.25, 0.3, 0.9, 1.2], 3),
    ],
)
def test_distances_of_a_row_get_the_fewest_decimals_that_print_them_apart(row, decimals):
    assert distance_decimals(row) == decimals


def test_distances_that_differ_only_in_float32_noise_stop_at_seven_decimals():
    assert distance_decimals([0.5, 0.5 + 1e-12]) == 7
    assert distance_decimals([0.25, 0.5, 0.75]) == 3
