"""Durable runs: the checkpoint's one owner. Its schema, where a run writes it, writing it atomically and verified,
reading it back (refusing, in one line, what another version of the code or the other experiment wrote), restoring
a training state from it, rebuilding its best model, and what resuming checks.

A checkpoint is one dict holding everything a run needs to go on: the model, the objective's parameters
(a classifier, proxies), the optimizer, the schedule, the gradient scaler, the epoch and the iterations done in
it, the best epoch with its metrics and weights and the evaluations since it (for early stopping; FORMAT 1
checkpoints written before it was kept count 0), every random state, the run's config, the code version (which
experiment wrote it, from which sources) and what rebuilds the model without the data. It loads with
torch.load(..., weights_only=True). No other module reads its keys.
"""

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.errors import InputError, RunFailed
from utils.files import atomic_write

FORMAT = 1
CHECKPOINT = "checkpoint.pt"
# What evaluate and embed read (the best weights and how to rebuild their model), and what resuming also needs.
WEIGHTS_KEYS = ("format", "best", "config", "code", "rebuild")
TRAINING_KEYS = (
    "epoch",
    "iteration",
    "iterations",
    "model",
    "objective",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "curves",
)
# Settings a resumed run may change: where and how it is observed, evaluated and loaded, and epochs (to extend
# a run). Every other setting changes the training, and a resumed run must keep the checkpoint's.
RESUMABLE = (
    "epochs",
    "resume",
    "output_dir",
    "checkpoint_every",
    "visdom_port",
    "visdom_freq",
    "eval_every",
    "cpu",
    "cudnn_flag",
    "dist_timeout",
    "evaluation.",
    "dataset.data_path",
    "dataset.num_workers",
    "dataset.pin_memory",
    "dataset.test_batch_size",
    "checkpoint",
    "images",
    "out",
    "bad_images",
)
# Evaluation settings that choose the best epoch, and so change the run: not resumable although "evaluation." is.
SELECTION_SETTINGS = ("evaluation.protocol",)


def training_checkpoint(
    *,
    epoch: int,
    iteration: int,
    iterations: int,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    best: tuple[int | None, dict[str, float], dict[str, torch.Tensor]],
    stale_evaluations: int,
    settings: dict,
    code: dict,
    rebuild: dict,
    curves: dict,
) -> dict:
    """The checkpoint after `iteration` iterations of epoch (0: the epoch is complete, go on with the next one,
    given as epoch), `iterations` in all; best is the best epoch, its metrics and its weights, stale_evaluations
    the evaluations since the best epoch's (the early-stopping counter). settings and code
    are plain dicts (the run's config and its experiment's name, main file and sources)."""
    return {
        "format": FORMAT,
        "epoch": epoch,
        "iteration": iteration,
        "iterations": iterations,
        "model": model.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "best": {"epoch": best[0], "metrics": best[1], "model": best[2], "stale_evaluations": stale_evaluations},
        "rng": rng_state(),
        "config": settings,
        "code": code,
        "rebuild": rebuild,
        "curves": curves,
    }


def restore_training(
    checkpoint: dict,
    *,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> tuple[int, int]:
    """Load a checkpoint's training state and random states; returns the epoch and iteration to go on from."""
    model.load_state_dict(checkpoint["model"])
    objective.load_state_dict(checkpoint["objective"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["epoch"], checkpoint["iteration"]


def best_epoch(checkpoint: dict) -> tuple[int | None, dict[str, float], dict[str, torch.Tensor]]:
    """The best epoch, its metrics and its weights."""
    best = checkpoint["best"]
    return best["epoch"], best["metrics"], best["model"]


def stale_evaluations(checkpoint: dict) -> int:
    """The evaluations since the best epoch's (0 in FORMAT 1 checkpoints written before early stopping)."""
    return checkpoint["best"].get("stale_evaluations", 0)


def saved_curves(checkpoint: dict) -> dict:
    return checkpoint["curves"]


def saved_settings(checkpoint: dict) -> dict:
    """The config of the run that wrote the checkpoint."""
    return checkpoint["config"]


def best_model(checkpoint: dict, build: Callable[[dict, dict], nn.Module]) -> nn.Module:
    """The checkpoint's model with its best epoch's weights; build(rebuild, settings) makes the empty model from
    what the experiment stored to rebuild it and the run's config."""
    model = build(checkpoint["rebuild"], checkpoint["config"])
    model.load_state_dict(checkpoint["best"]["model"])
    return model


def changed_sources(checkpoint: dict, code: dict) -> list[str]:
    """The source files whose version differs between the checkpoint's code and code (added or removed included)."""
    old, new = dict(map(tuple, checkpoint["code"].get("sources", []))), dict(map(tuple, code.get("sources", [])))
    return sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))


def rng_state() -> dict:
    """Python's, numpy's, torch's and every CUDA device's random state, in types torch.load reads safely."""
    version, keys, gauss = random.getstate()
    kind, np_keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_bytes(*modules: torch.nn.Module) -> int:
    """About what a checkpoint of these modules takes: their weights twice (current and best) and two optimizer
    slots per parameter (Adam's moments; SGD keeps at most one)."""
    parameters = sum(p.numel() * p.element_size() for module in modules for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for module in modules for b in module.buffers())
    return 2 * (parameters + buffers) + 2 * parameters


def prepare_directory(directory: Path, needed: int) -> None:
    """Create directory, check that it is writable and has room for a few checkpoints of `needed` bytes."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as error:
        raise InputError(
            f"cannot write in the output folder {directory} ({error.strerror or error}): make it "
            f"writable or choose another with output_dir=... (or -F another folder)"
        ) from None
    free = shutil.disk_usage(directory).free
    if free < 3 * needed:
        raise InputError(
            f"the output folder {directory} has {free / 2**20:,.0f} MiB free, but a checkpoint takes "
            f"about {needed / 2**20:,.0f} MiB and the run needs room for 3: free some space or choose "
            f"another folder with output_dir=... (or -F)"
        )


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically (utils.files.atomic_write) and read the file back before it replaces the previous one, so
    that the checkpoint on disk is always complete. A failed write keeps the previous checkpoint and fails the
    run with one line."""
    try:
        with atomic_write(path, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            written = torch.load(file.name, map_location="cpu", weights_only=True)
            if written.get("format") != FORMAT or written.get("iterations") != checkpoint["iterations"]:
                raise OSError("the file read back differs from what was written")
    except (OSError, RuntimeError) as error:
        kept = f"the previous checkpoint {path} is kept" if path.exists() else "no checkpoint was written"
        raise RunFailed(
            f"could not write the checkpoint {path} ({error}): {kept}; free some space or fix the "
            f"folder, then resume with resume={path.parent}"
        ) from None


def checkpoint_file(path: str, key: str) -> Path:
    """The checkpoint of key=PATH: PATH itself, or the checkpoint.pt of a run directory."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / CHECKPOINT
    if not file.is_file():
        raise InputError(
            f"{key}={path}: no checkpoint there (expected a run directory holding {CHECKPOINT}, or a checkpoint file)"
        )
    return file


def settings_at(path: str, experiment: str) -> dict | None:
    """The settings of the run whose checkpoint is at path, when it is a readable checkpoint of this experiment (its
    name); else None, and load_checkpoint says why in one line when the run starts."""
    try:
        checkpoint = torch.load(checkpoint_file(path, "resume"), map_location="cpu", weights_only=True)
    except Exception:  # a missing, damaged or foreign file: the run's own loading names it
        return None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        return None
    code = checkpoint.get("code")
    return checkpoint.get("config") if isinstance(code, dict) and code.get("name") == experiment else None


def load_checkpoint(path: str, code: dict, key: str = "resume") -> dict:
    """The checkpoint of key=PATH (resume=: to continue training; checkpoint=: for its best weights), or one line
    saying why it cannot be used: not a checkpoint, written by the other experiment (code: the current run's
    experiment_info, whose name and main file are compared), or lacking what key needs."""
    file = checkpoint_file(path, key)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        reason = str(error).splitlines()[0].split(". ")[0] if str(error) else ""
        raise InputError(
            f"{file} cannot be read as a checkpoint ({type(error).__name__}: {reason}); point {key}= at another one"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(
            f"{file} holds only weights (written before runs kept full checkpoints) or is not one of "
            f"our checkpoints: {key}= cannot use it; train again to get one"
        )
    missing = [name for name in WEIGHTS_KEYS if name not in checkpoint]
    if not missing:
        check_experiment(file, checkpoint["code"], code, key)
    if key == "resume":
        missing += [name for name in TRAINING_KEYS if name not in checkpoint]
    if missing:
        use = "continue training from it" if key == "resume" else "rebuild its best model"
        raise InputError(
            f"{file} lacks {', '.join(missing)} (written by another version of the code): {key}= cannot {use}; "
            f"train again with this version to get one"
        )
    return checkpoint


def check_experiment(file: Path, saved: dict, code: dict, key: str) -> None:
    """Refuse a checkpoint written by the other experiment, naming the script that reads it."""
    name, script = saved.get("name"), saved.get("mainfile")
    if name != code.get("name"):
        command = "" if key == "resume" else "evaluate (or embed) "
        raise InputError(
            f"{file} was written by {script} (experiment {name!r}), not by {code.get('mainfile')}: "
            f"run `python {script} {command}with {key}={file}` instead"
        )


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resumable(checkpoint: dict, current: dict) -> None:
    """Refuse, in one line, settings (current: the run's config) that change the training, and fewer epochs than
    were already done."""
    old, new = flatten(checkpoint["config"]), flatten(current)
    done_epochs = checkpoint["epoch"] - 1
    changed = sorted(
        key
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key) and (key in SELECTION_SETTINGS or not key.startswith(RESUMABLE))
    )
    if changed:
        listing = ", ".join(f"{key}={new.get(key)!r} (checkpoint: {old.get(key)!r})" for key in changed)
        raise InputError(
            f"resume: these settings differ from the checkpoint's and would change the training: "
            f"{listing}; drop them (only {', '.join(RESUMABLE)} may change, {', '.join(SELECTION_SETTINGS)} aside)"
        )
    if new["epochs"] < done_epochs:
        raise InputError(
            f"resume: epochs={new['epochs']} but the checkpoint has done {done_epochs}; "
            f"set epochs to at least {done_epochs}"
        )
