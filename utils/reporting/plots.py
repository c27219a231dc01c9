"""The pictures of a run, drawn with matplotlib into PNG files: training and evaluation curves, a
retrieval grid, and autoencoder reconstructions.

Figures are built with matplotlib's object API (Figure, no pyplot): no GUI backend, no global state,
safe in DataLoader workers and on machines without a display.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from utils.data.image_dataset import ImageDataset, load_image
from utils.evaluation.knn import exact_knn, make_searcher, prepare
from utils.evaluation.metrics import CHUNK_BYTES

Embeddings = Tensor | np.ndarray  # one row per image
Series = dict[str, list]  # sacred's metrics.json entry: {"steps": [...], "values": [...]}
RIGHT, WRONG = "#1a9641", "#d7191c"  # neighbour frames: green, red
TILE_PX = 128  # images are shown at least this large, whatever their size on disk
DPI = 100


def draw_curves(metrics: dict[str, Series], path: str | Path, title: str = "") -> None:
    """One figure of a run's metrics.json: a panel of the training loss terms per iteration, one of
    the other training series (accuracy), and one per evaluation metric per epoch (R@1, R@2, MAP@R,
    reconstruction, ...), each with a line per distance or split (cosine, l2, test)."""
    panels = curve_panels(metrics) or {"no metrics were logged": []}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.5 * columns, 3.8 * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (panel, lines) in zip(axes, panels.items(), strict=False):
        x_label = "epoch (per iteration)" if panel.startswith("training") else "epoch"
        for names in lines:
            ax.plot(
                metrics[names[0]]["steps"],
                metrics[names[0]]["values"],
                label=" = ".join(curve_label(name) for name in names),
                marker=None if panel.startswith("training") else "o",
                markersize=3,
            )
        ax.set(title=panel, xlabel=x_label)
        ax.ticklabel_format(axis="y", useOffset=False)  # a loss near 1.609 reads as 1.609, not +1.609
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path)


def curve_panels(metrics: dict[str, Series]) -> dict[str, list[list[str]]]:
    """Panel title -> its lines, each the names of the series it draws. Loss terms share a panel, as do the
    distances of one evaluation metric; a series that is neither gets its own panel. Panels and lines follow the
    names in numeric order (R@2 before R@16), and series identical to another of their panel are one line (the
    loss equals its only term): drawn apart, the last would hide the others."""
    panels: dict[str, list[list[str]]] = {}
    for name in sorted(metrics, key=lambda name: (not name.startswith("train."), numeric_order(name))):
        split, _, metric = name.partition(".")
        if split == "train":
            panel = "training loss terms" if metric != "accuracy" else "training accuracy"
        else:
            # eval: the test split's, val: the validation split's; the frozen backbone's point (on the test split)
            # joins the test split's panel of its metric.
            panel = f"{'eval' if split == 'backbone' else split} {metric.rpartition('/')[2]}"
        lines = panels.setdefault(panel, [])
        same = next((line for line in lines if same_curve(metrics[line[0]], metrics[name])), None)
        if same is None:
            lines.append([name])
        else:
            same.append(name)
    return panels


def same_curve(a: Series, b: Series) -> bool:
    """The same points (metrics.json also stamps each point with the time it was logged)."""
    return a["steps"] == b["steps"] and a["values"] == b["values"]


def numeric_order(name: str) -> list:
    """A sort key reading the numbers in a name as numbers: R@1, R@2, R@16 rather than R@1, R@16, R@2."""
    # re.split with a group alternates text and numbers, starting with text (maybe empty).
    return [int(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+)", name))]


def curve_label(name: str) -> str:
    """train.cross_entropy -> cross_entropy; eval.cosine/R@1 -> cosine (the panel names the metric); the frozen
    backbone's point beside them, backbone.cosine/R@1 -> backbone cosine."""
    split, _, metric = name.partition(".")
    label = metric if split == "train" or "/" not in metric else metric.rpartition("/")[0]
    return f"backbone {label}" if split == "backbone" else label


def retrieval_examples(
    query: Embeddings,
    gallery: Embeddings | None = None,
    count: int = 8,
    k: int = 5,
    seed: int = 0,
    distance: str = "cosine",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded choice of count queries and their k nearest gallery items by the project's exact k-NN.

    gallery None searches the query set itself, the query excluded by index (as the evaluation does).
    Returns (query indices, neighbour indices count x k, distances count x k): the cosine distance
    1 - cos or the Euclidean distance (the search orders by -cos and squared distance). The queries
    are sorted, so the same seed picks the same images whatever the embeddings.
    """
    self_search = gallery is None
    q = prepare(torch.as_tensor(query), distance)
    g = q if self_search else prepare(torch.as_tensor(gallery), distance)
    chosen = np.sort(np.random.default_rng(seed).choice(len(q), size=min(count, len(q)), replace=False))
    searcher = make_searcher(q, g, distance, "torch" if q.is_cuda else "faiss")
    dist, idx = exact_knn(searcher, chosen, k + self_search, CHUNK_BYTES)
    if self_search:
        keep = idx != chosen[:, None]
        # Each row holds its query at most once, so k items remain; rows without it drop the last.
        keep[keep.all(axis=1), -1] = False
        dist, idx = dist[keep].reshape(len(chosen), -1), idx[keep].reshape(len(chosen), -1)
    return chosen, idx, 1 + dist if distance == "cosine" else np.sqrt(np.maximum(dist, 0))


def draw_retrieval_grid(
    query_images: Sequence[Image.Image],
    query_labels: Sequence[int],
    neighbour_images: Sequence[Sequence[Image.Image]],
    neighbour_labels: Sequence[Sequence[int]],
    distances: np.ndarray,
    path: str | Path,
    title: str = "",
) -> None:
    """A row per query: the query (its label above) and its neighbours, framed green when their
    label is the query's and red otherwise, with label and distance under each."""
    rows, k = len(query_images), len(neighbour_images[0])
    figure = Figure(figsize=((k + 1) * 1.7, rows * 1.95 + 0.5), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, k + 1, squeeze=False)
    for row, (query, label) in enumerate(zip(query_images, query_labels, strict=True)):
        show_tile(axes[row, 0], query, f"query, class {label}", "black", above=True)
        decimals = distance_decimals(distances[row])
        for col in range(k):
            right = neighbour_labels[row][col] == label
            caption = f"class {neighbour_labels[row][col]}\nd = {distances[row][col]:.{decimals}f}"
            show_tile(axes[row, col + 1], neighbour_images[row][col], caption, RIGHT if right else WRONG)
    figure.suptitle(title or f"top-{k} neighbours: green = same class, red = another class")
    figure.savefig(path)


def distance_decimals(row: Sequence[float], least: int = 3, most: int = 7) -> int:
    """The fewest decimals, from least, that print the distinct distances of a row apart and a distance above zero
    as more than zero; most at most, as float32 distances carry about seven significant digits."""
    values = np.unique(np.asarray(row, dtype=np.float64))
    for decimals in range(least, most):
        printed = [f"{value:.{decimals}f}" for value in values]
        above_zero = all(float(text) > 0 for value, text in zip(values, printed, strict=True) if value > 0)
        if len(set(printed)) == len(values) and above_zero:
            return decimals
    return most


def draw_dataset_retrieval(
    query_set: ImageDataset,
    query: Embeddings,
    path: str | Path,
    gallery_set: ImageDataset | None = None,
    gallery: Embeddings | None = None,
    count: int = 8,
    k: int = 5,
    seed: int = 0,
    distance: str = "cosine",
) -> None:
    """The retrieval grid of a seeded choice of query_set's images, from their embeddings (rows in the
    data set's order); without a gallery the query set searches itself."""
    gallery_set = query_set if gallery_set is None else gallery_set
    chosen, idx, dist = retrieval_examples(query, gallery, count, k, seed, distance)
    draw_retrieval_grid(
        [load_image(query_set.paths[i]) for i in chosen],
        [query_set.targets[i] for i in chosen],
        [[load_image(gallery_set.paths[j]) for j in row] for row in idx],
        [[gallery_set.targets[j] for j in row] for row in idx],
        dist,
        path,
        title=f"{distance} top-{k} neighbours of {len(chosen)} test queries (seed {seed}): "
        "green = same class, red = another class",
    )


def show_tile(ax: Axes, image: Image.Image, caption: str, colour: str, above: bool = False) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(color=colour, linewidth=4)
    if above:
        ax.set_title(caption, fontsize=9)
    else:
        ax.set_xlabel(caption, fontsize=9, color=colour)


def draw_reconstructions(
    images: Tensor, reconstructions: Tensor, path: str | Path, title: str = "", first_epoch: Tensor | None = None
) -> None:
    """Rows of inputs above rows of their reconstructions (and, given first_epoch, the first epoch's
    reconstructions of the same inputs below them), labelled; tiles scaled up to at least TILE_PX.

    images and reconstructions are (N, C, H, W) tensors in [0, 1]; N a multiple of the row length
    is not required: the last row may be short.
    """
    rows = {"input": images, "reconstruction": reconstructions}
    if first_epoch is not None:
        rows = {"input": images, "best epoch": reconstructions, "first epoch": first_epoch}
    per_row = min(8, len(images))
    blocks = -(-len(images) // per_row)
    scale = max(1.0, TILE_PX / images.shape[-1])
    tile_inches = images.shape[-1] * scale / DPI
    figure = Figure(
        figsize=(per_row * tile_inches + 1.6, blocks * len(rows) * (tile_inches + 0.1) + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    axes = figure.subplots(blocks * len(rows), per_row, squeeze=False)
    for block in range(blocks):
        for offset, (label, batch) in enumerate(rows.items()):
            row = axes[block * len(rows) + offset]
            for col, ax in enumerate(row):
                draw_image(ax, batch, block * per_row + col)
            row[0].set_ylabel(label, fontsize=10, rotation=0, ha="right", va="center")
    figure.suptitle(title or f"inputs above their reconstructions ({', '.join(list(rows)[1:])})")
    figure.savefig(path)


def draw_image(ax: Axes, batch: Tensor, index: int) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if index >= len(batch):
        ax.set_axis_off()
        return
    pixels = batch[index].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    ax.imshow(
        pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )
