"""After training: the best weights of a run's checkpoint evaluated again, or used to embed any images.

Both commands rebuild the run from its checkpoint: its config, with the data set, evaluation and device
settings given on the command line instead (so `evaluate with checkpoint=PATH` on the run's own data
reproduces its final numbers, and `with dataset.sop evaluation.backend=torch ...` changes only those).
"""

import copy
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sacred.run import Run
from torch.utils.data import DataLoader, Dataset

from utils.data.images import load_image, read_split
from utils.data.ingredient import MetricLoaders, get_datasets, test_loaders
from utils.data.transforms import build_transforms
from utils.engine.checkpoint import best_epoch, flatten, load_checkpoint, saved_settings
from utils.engine.driver import report_final, select_device
from utils.engine.loggers import RunLogger
from utils.engine.training import progress
from utils.errors import InputError, check_choice
from utils.evaluation.ingredient import Evaluator, check_evaluation, get_evaluator
from utils.files import atomic_write
from utils.settings import choice, optional, register, text

OVERRIDABLE = ("dataset.", "evaluation.", "cpu", "cudnn_flag")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what embed finds in a folder
BAD_IMAGES = ("stop", "skip")


def commands_config():
    # The evaluate and embed commands (after training); both experiments add these keys.
    checkpoint = None  # evaluate, embed: a -F run directory or a checkpoint file whose best weights to use
    images = None  # embed: a folder of images, or a split file of `path,label` lines
    out = None  # embed: the .npz file to write (embeddings, paths, labels, skipped); a folder: its embeddings.npz
    bad_images = "stop"  # embed: an unreadable image stops the command | is skipped and listed


register(
    {
        "checkpoint": optional(text()),
        "images": optional(text()),
        "out": optional(text()),
        "bad_images": choice(BAD_IMAGES),
    }
)


def call_with(function: Callable, config: Mapping, **given: Any) -> Any:
    """Call a sacred captured function with the settings of config it names (not the run's own)."""
    raw = getattr(function, "__wrapped__", function)
    names = inspect.signature(raw).parameters
    return raw(**given, **{name: config[name] for name in names if name in config and name not in given})


def run_config(checkpoint: dict, current: dict, run: Run) -> dict:
    """The checkpoint's config with the data set, evaluation and device settings this command line set."""
    config = copy.deepcopy(saved_settings(checkpoint))
    current_flat = flatten(current)
    for key in run.config_modifications.modified:
        if key.startswith(OVERRIDABLE) and key in current_flat:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = current_flat[key]
    return config


def restore(path: str | None, current: dict, run: Run) -> tuple[dict, dict, torch.device]:
    """The checkpoint of `checkpoint=PATH`, the config to use with it and the device."""
    if not path:
        raise InputError("this command needs checkpoint=PATH: a -F run directory or a checkpoint.pt")
    checkpoint = load_checkpoint(path, run.experiment_info, key="checkpoint")
    config = run_config(checkpoint, current, run)
    return checkpoint, config, select_device(config["cpu"], config["cudnn_flag"], current["dist_timeout"])


def evaluation_data(config: dict, device: torch.device) -> tuple[MetricLoaders, Evaluator]:
    """The test images of config's data set and its evaluator (no training batches)."""
    call_with(check_evaluation, config["evaluation"], device=device)
    train, query, gallery, _ = call_with(get_datasets, config["dataset"])
    loaders = call_with(test_loaders, config["dataset"], train=train, query=query, gallery=gallery)
    return loaders, call_with(get_evaluator, config["evaluation"], loaders=loaders, device=device)


def evaluate_checkpoint(
    evaluate: Callable[[list[str]], dict[str, float]],
    metrics: list[str],
    checkpoint: dict,
    loggers: Sequence[RunLogger],
) -> dict[str, float]:
    """The metrics of the checkpoint's best weights (already in the model), printed and handed to the loggers."""
    results = evaluate(metrics)
    report_final(loggers, best_epoch(checkpoint)[0], results)
    return results


class ImageFiles(Dataset):
    """Images listed in a split file (with their labels) or found in a folder (label -1), for embedding.

    An unreadable image stops with its name, or with skip=True yields None, collected by the caller."""

    def __init__(self, source: str, transform: Callable, skip: bool) -> None:
        path = Path(source).expanduser()
        if path.is_dir():
            self.paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.labels = [-1] * len(self.paths)
        elif path.is_file():
            samples = read_split(path)
            self.paths = [path.parent / relative for relative, _ in samples]
            self.labels = [label for _, label in samples]
        else:
            raise InputError(f"images={source} is neither a folder of images nor a split file")
        if not self.paths:
            raise InputError(f"images={source} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        self.transform, self.skip = transform, skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            if not path.is_file():  # a FIFO named like an image would block its first read forever
                raise InputError(f"image {printable(path)} is not a regular file (a pipe, device or socket)")
            return self.transform(load_image(path)), index
        except InputError as error:
            if not self.skip:
                raise InputError(f"{printable(str(error))}, or skip unreadable images with bad_images=skip") from None
            return torch.empty(0), index


def embed_images(
    embed: Callable[[torch.Tensor], torch.Tensor],
    config: dict,
    device: torch.device,
    images: str | None,
    out: str | None,
    bad_images: str,
    selected_by: str,
) -> Path:
    """Embed every image of `images` with the test transform of the run's data set; write out.npz with
    embeddings (float32, N x D), paths and labels (-1 without), the skipped images' paths, whether the embeddings
    are L2-normalised, and the metric the run's best epoch was selected by (selected_by, e.g. cosine/R@1) with its
    distance (cosine, l2, or "" for a metric that is not a retrieval one): how to search them."""
    check_choice("bad_images", bad_images, BAD_IMAGES)
    if not images:
        raise InputError("embed needs images=DIR_OR_SPLIT_FILE: a folder of images or a split file")
    if not out:
        raise InputError("embed needs out=FILE, e.g. out=embeddings.npz")
    data = config["dataset"]
    _, transform = build_transforms(data["crop_size"], data["resize"], data["scale"], data["ratio"], None, None, False)
    files = ImageFiles(images, transform, skip=bad_images == "skip")
    loader = DataLoader(
        files, batch_size=data["test_batch_size"], num_workers=data["num_workers"], collate_fn=list
    )  # unreadable images are empty tensors: no stacking here
    embeddings, kept, skipped = [], [], []
    for batch in progress(loader, "Embedding images"):
        good = [(image, index) for image, index in batch if image.numel()]
        skipped += [str(files.paths[index]) for image, index in batch if not image.numel()]
        if good:
            with torch.no_grad():
                embeddings.append(embed(torch.stack([image for image, _ in good]).to(device)).float().cpu())
            kept += [index for _, index in good]
    if not kept:
        raise InputError(f"no image of images={images} could be read")
    target = npz_path(out)
    vectors = torch.cat(embeddings)
    normalized = bool(torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-4))
    distance = selected_by.split("/")[0] if selected_by.startswith(("cosine/", "l2/")) else ""
    arrays = {
        "embeddings": vectors.numpy(),
        "paths": np.array([str(files.paths[i]) for i in kept]),
        "labels": np.array([files.labels[i] for i in kept], dtype=np.int64),
        "skipped": np.array(skipped, dtype=str),
        "normalized": np.array(normalized),
        "selected_by": np.array(selected_by),
        "distance": np.array(distance),
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb") as file:  # a full disk leaves no half-written file behind
            np.savez(file, **arrays)
    except OSError as error:
        raise InputError(
            f"out={out}: cannot write it ({error.strerror or error}): free some space or choose another out="
        ) from None
    search = f": search them by {distance} distance" if distance else ""
    print(
        f"Embedded {len(kept):,} images into {printable(target)} ({'' if normalized else 'not '}L2-normalised; "
        f"the run was selected by {selected_by}{search})"
        + (f"; skipped {len(skipped)} unreadable: {', '.join(map(printable, skipped))}" if skipped else "")
    )
    return target


def npz_path(out: str) -> Path:
    """The file embed writes for out=: out itself when it ends in .npz, embeddings.npz inside an existing folder,
    else out with .npz appended."""
    target = Path(out).expanduser()
    if target.is_dir():
        return target / "embeddings.npz"
    return target if target.suffix == ".npz" else target.with_name(target.name + ".npz")


def printable(name: str | Path) -> str:
    """name (or a message holding one) with the bytes that are not UTF-8 written as \\xNN: the printed line must
    survive a UTF-8 stream (the terminal, the -F run's cout.txt), which a name's surrogate escapes would break."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
