"""Autoencoder baselines: how well the latent codes of an AE or a VAE retrieve images of the same class.

    python autoencoder_experiment.py with vae.ae                    # digits on the CPU, under a minute
    python autoencoder_experiment.py with vae.vae
    python autoencoder_experiment.py -F result_dir with dataset.cub_vae vae.ae   # also cars_vae, sop_vae, inshop_vae
    python autoencoder_experiment.py print_config with dataset.sop_vae vae.vae

The training loop is utils/engine/driver.py's; this script says what is its own: the model (an autoencoder), the
objective (reconstruction error plus the VAE's KL term), the evaluation (Recall@K of the codes, the posterior
means for the VAE, and the test losses) and the result (by select_by), plus a grid of test images beside
their reconstructions.
"""

import itertools
import math
from collections.abc import Callable

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds
from torch.utils.data import DataLoader

from losses.autoencoder import AutoencoderLoss
from models.vae import Autoencoder
from models.vae_ingredient import get_vae, vae_ingredient
from utils import distributed
from utils.data.ingredient import MetricLoaders, data_ingredient, get_loaders
from utils.engine.checkpoint import best_model
from utils.engine.config import TrainingConfig, training_config
from utils.engine.driver import Task, fit, select_device
from utils.engine.training import progress
from utils.errors import InputError, check_choice
from utils.evaluation.inference import commands_config, embed_images, evaluate_checkpoint, evaluation_data, restore
from utils.evaluation.ingredient import (
    Evaluator,
    check_evaluation,
    draw_retrieval,
    evaluation_ingredient,
    get_evaluator,
)
from utils.evaluation.protocol import comparability_card
from utils.reporting.plots import draw_reconstructions
from utils.reporting.sacred_run import (
    SacredLogger,
    continue_with_checkpoint_settings,
    keep_run_records,
    observe_with_run_records,
    output_directory,
    quiet_other_ranks,
    run_loggers,
)
from utils.settings import choice, register, settings_hook

SETTINGS.CAPTURE_MODE = "sys"
ex = Experiment("autoencoder", ingredients=[data_ingredient, evaluation_ingredient, vae_ingredient])
ex.config_hook(settings_hook)  # every setting against utils/settings.py's table, before anything runs
ex.option_hook(quiet_other_ranks)  # under torchrun only rank 0 observes the run and prints
observe_with_run_records(ex)  # -F: records that survive a failure (utils/reporting/sacred_run.py)
continue_with_checkpoint_settings(ex)  # resume=PATH: the checkpoint's settings, under what the command line gives
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt
ex.config(training_config)
ex.config(commands_config)

# Where each selection metric lives in the evaluation results, and whether lower is better.
SELECTION = {"recall": ("cosine/R@1", False), "reconstruction": ("test/reconstruction", True)}
PLOT_TITLES = {"/R@1": "Recall@1", "/reconstruction": "Test losses", "/kl": "Test losses"}
GRID_IMAGES = 16  # test images shown above their reconstructions (best and first epoch), 8 per row


@ex.config
def config(dataset):
    epochs = 20 if dataset["name"] == "digits" else 30  # training epochs
    select_by = "recall"  # recall: highest cosine R@1 | reconstruction: lowest test reconstruction error


register({"select_by": choice(tuple(SELECTION))})


@torch.no_grad()
def test_losses(
    model: Autoencoder, objective: AutoencoderLoss, loaders: MetricLoaders, device: torch.device
) -> dict[str, float]:
    """The mean of each loss term (test/<term>) over the test images (In-Shop: queries and gallery); the model
    must be in eval mode."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for loader in filter(None, (loaders.query, loaders.gallery)):
        for images, _ in progress(loader, "Reconstructing test images"):
            images = images.to(device, non_blocking=True)
            reconstructions, mean, logvar = model(images)
            for key, value in objective.terms(images, reconstructions, mean, logvar).items():
                sums[key] = sums.get(key, 0) + value * len(images)
            count += len(images)
    return {f"test/{key}": (value / count).item() for key, value in sums.items()}


@torch.no_grad()
def test_images(loader: DataLoader, count: int) -> torch.Tensor:
    """The first count test images, the same for every picture of the run."""
    batches = itertools.islice(loader, math.ceil(count / loader.batch_size))
    return torch.cat([batch for batch, _ in batches])[:count]


@torch.no_grad()
def reconstruct(model: Autoencoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    return model(images.to(device))[0].cpu()


def autoencoder_objective(arch: str, kl_weight: float) -> AutoencoderLoss:
    if arch == "ae" and kl_weight:
        raise InputError(
            f"vae.kl_weight={kl_weight} needs a variational model: add vae.vae (or vae.arch=vae), "
            f"or drop the kl_weight setting"
        )
    return AutoencoderLoss(kl_weight)


def evaluation(
    model: Autoencoder, objective: AutoencoderLoss, loaders: MetricLoaders, evaluate: Evaluator, device: torch.device
) -> Callable[[list[str]], dict[str, float]]:
    """metrics -> the retrieval metrics of the latent means, and the mean test losses."""
    return lambda metrics: (
        evaluate(lambda images: model(images)[1], metrics) | test_losses(model, objective, loaders, device)
    )


def rebuild_autoencoder(rebuild: dict, settings: dict) -> Autoencoder:
    """The autoencoder a run trained, without its weights: rebuild is what main stored with the checkpoint,
    settings the run's config."""
    options = settings["vae"]
    return Autoencoder(
        image_size=rebuild["image_size"],
        variational=rebuild["arch"] == "vae",
        in_channels=options["in_channels"],
        latent_dim=options["latent_dim"],
        hidden_dims=tuple(rebuild["hidden_dims"]),
    )


@ex.main
@keep_run_records
def main(select_by: str, _config: dict, _run) -> float:
    """Train an autoencoder and evaluate its codes (the default command)."""
    check_choice("select_by", select_by, SELECTION)
    if _config["evaluation"]["protocol"] != "test":
        raise InputError(
            "evaluation.protocol=validation is experiment.py's: the autoencoder baseline chooses its epoch on the "
            "test set by select_by; drop evaluation.protocol"
        )
    device = select_device(_config["cpu"], _config["cudnn_flag"], _config["dist_timeout"])
    check_evaluation(device)
    torch.manual_seed(_config["seed"])
    # The model first: a bad architecture or image size fails before any image is read.
    model = get_vae(image_size=_config["dataset"]["crop_size"])
    _run.info["vae"] = {"hidden_dims": list(model.hidden_dims)}
    objective = autoencoder_objective(_config["vae"]["arch"], _config["vae"]["kl_weight"])
    loaders = get_loaders()
    evaluate = get_evaluator(loaders, device)
    stem = f"{_config['vae']['arch']}_{_config['dataset']['name']}"
    rebuild = {"arch": _config["vae"]["arch"], "image_size": _config["dataset"]["crop_size"], **_run.info["vae"]}
    shown = test_images(loaders.query, GRID_IMAGES)
    first_epoch = {}  # the first epoch's reconstructions, for comparison with the best epoch's

    def after_epoch(epoch: int) -> None:
        if epoch == 1:
            first_epoch["reconstructions"] = reconstruct(model, shown, device)

    task = Task(
        model,
        objective,
        evaluation(model, objective, loaders, evaluate, device),
        *SELECTION[select_by],
        rebuild=rebuild,
        after_epoch=after_epoch,
    )
    outcome = fit(
        task,
        loaders.train,
        metrics=evaluate.metrics,
        final_metrics=evaluate.final_metrics,
        device=device,
        config=TrainingConfig.from_settings(_config, _run.experiment_info),
        directory=output_directory(_run, _config["output_dir"], stem),
        loggers=run_loggers(_run, _config["visdom_port"], PLOT_TITLES, stem),
        device_augment=loaders.device_augment,
    )
    if not distributed.is_main():  # only rank 0 writes
        return outcome.metrics[task.best_key]
    # The codes are the encoder's (posterior) means: trained from scratch (BatchNorm too), unpooled, unnormalised.
    described = dict(
        embedding_size=_config["vae"]["latent_dim"],
        normalized=False,
        backbone=_config["vae"]["arch"],
        weights=None,
        pooling=None,
        bn_frozen=False,
    )
    _run.info["card"] = comparability_card(_config, described, outcome.epochs_run)
    draw_reconstructions(
        shown,
        reconstruct(model, shown, device),
        outcome.directory / "reconstructions.png",
        f"{stem}: test images above their reconstructions by the best epoch ({outcome.best_epoch}) and the first",
        first_epoch.get("reconstructions"),
    )
    draw_retrieval(evaluate, outcome.directory / "retrieval.png", _config["seed"])
    print(
        f"Best epoch {outcome.best_epoch}: {task.best_key} {outcome.metrics[task.best_key]:.4f}; results in "
        f"{outcome.directory} (checkpoint.pt, curves.png, reconstructions.png, retrieval.png)"
    )
    return outcome.metrics[task.best_key]


@ex.command
@keep_run_records
def evaluate(checkpoint: str | None, _config: dict, _run) -> float:
    """Evaluate the best weights of checkpoint=PATH with every final metric (on the run's data by default)."""
    saved, config, device = restore(checkpoint, _config, _run)
    loaders, evaluator = evaluation_data(config, device)
    model = best_model(saved, rebuild_autoencoder).to(device).eval()
    objective = autoencoder_objective(config["vae"]["arch"], config["vae"]["kl_weight"])
    select_key = SELECTION[config["select_by"]][0]
    return evaluate_checkpoint(
        evaluation(model, objective, loaders, evaluator, device), evaluator.final_metrics, saved, [SacredLogger(_run)]
    )[select_key]


@ex.command
@keep_run_records
def embed(checkpoint: str | None, images: str | None, out: str | None, bad_images: str, _config: dict, _run) -> str:
    """Embed images=DIR_OR_SPLIT_FILE (latent means) with the best weights of checkpoint=PATH into out=FILE.npz."""
    saved, config, device = restore(checkpoint, _config, _run)
    model = best_model(saved, rebuild_autoencoder).to(device).eval()
    embedded = embed_images(
        lambda batch: model(batch)[1], config, device, images=images, out=out, bad_images=bad_images
    )
    return str(embedded)


if __name__ == "__main__":
    ex.run_commandline()
