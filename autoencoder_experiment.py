"""Autoencoder baselines: how well the latent codes of an AE or a VAE retrieve images of the same class.

    python autoencoder_experiment.py with vae.ae                    # digits on the CPU, under a minute
    python autoencoder_experiment.py with vae.vae
    python autoencoder_experiment.py -F result_dir with dataset.cub_vae vae.ae   # also cars_vae, sop_vae, inshop_vae
    python autoencoder_experiment.py print_config with dataset.sop_vae vae.vae

The training loop is utils/driver.py's; this script says what is its own: the model (an autoencoder), the
objective (reconstruction error plus the VAE's KL term), the evaluation (Recall@K of the codes, the posterior
means for the VAE, and the test losses) and the result (by select_by), plus a grid of test images beside
their reconstructions.
"""

import itertools
import math

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from losses.autoencoder import AutoencoderLoss
from models.vae import Autoencoder
from models.vae_ingredient import get_vae, vae_ingredient
from utils.data.ingredient import MetricLoaders, data_ingredient, get_loaders
from utils.driver import Task, artifact_path, fit, keep_output_on_failure, select_device, training_config
from utils.errors import InputError, check_choice
from utils.evaluation import check_evaluation, evaluation_ingredient, get_evaluator
from utils.training import progress

SETTINGS.CAPTURE_MODE = "sys"
ex = Experiment("autoencoder", ingredients=[data_ingredient, evaluation_ingredient, vae_ingredient])
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt
ex.config(training_config)

# Where each selection metric lives in the evaluation results, and whether lower is better.
SELECTION = {"recall": ("cosine/R@1", False), "reconstruction": ("test/reconstruction", True)}
PLOT_TITLES = {"/R@1": "Recall@1", "/reconstruction": "Test losses", "/kl": "Test losses"}
GRID_IMAGES = 32  # test images shown beside their reconstructions, 8 pairs per row


@ex.config
def config(dataset):
    epochs = 20 if dataset["name"] == "digits" else 30  # training epochs
    select_by = "recall"  # recall: highest cosine R@1 | reconstruction: lowest test reconstruction error


@torch.no_grad()
def test_losses(model: Autoencoder, objective: AutoencoderLoss, loaders: MetricLoaders, device: torch.device
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
def reconstruction_grid(model: Autoencoder, loader: DataLoader, num_images: int, device: torch.device
                        ) -> torch.Tensor:
    """The first num_images images of loader, each followed by its reconstruction."""
    model.eval()
    batches = itertools.islice(loader, math.ceil(num_images / loader.batch_size))
    images = torch.cat([batch for batch, _ in batches])[:num_images]
    reconstructions = model(images.to(device))[0].cpu()
    return torch.stack([images, reconstructions], dim=1).flatten(0, 1)


def autoencoder_objective(arch: str, kl_weight: float) -> AutoencoderLoss:
    if arch == "ae" and kl_weight:
        raise InputError(f"vae.kl_weight={kl_weight} needs a variational model: add vae.vae (or vae.arch=vae), "
                         f"or drop the kl_weight setting")
    return AutoencoderLoss(kl_weight)


@ex.automain
@keep_output_on_failure
def main(select_by: str, _config: dict, _run) -> float:
    check_choice("select_by", select_by, SELECTION)
    device = select_device(_config["cpu"], _config["cudnn_flag"])
    check_evaluation(device)
    torch.manual_seed(_config["seed"])
    # The model first: a bad architecture or image size fails before any image is read.
    model = get_vae(image_size=_config["dataset"]["crop_size"])
    _run.info["vae"] = {"hidden_dims": list(model.hidden_dims)}
    objective = autoencoder_objective(_config["vae"]["arch"], _config["vae"]["kl_weight"])
    loaders = get_loaders()
    evaluate = get_evaluator(loaders, device)

    def evaluate_autoencoder(metrics: list[str]) -> dict[str, float]:
        """The retrieval metrics of the latent means, and the mean test losses."""
        return evaluate(lambda images: model(images)[1], metrics) | test_losses(model, objective, loaders, device)

    stem = f"{_config['vae']['arch']}_{_config['dataset']['name']}"
    task = Task(model, objective, evaluate_autoencoder, *SELECTION[select_by], name=stem, plot_titles=PLOT_TITLES)
    best_epoch, final, checkpoint = fit(task, loaders.train, (evaluate.metrics, evaluate.final_metrics), device,
                                        _config, _run, device_augment=loaders.device_augment)
    grid = artifact_path(_config["temp_dir"], stem, ".png")
    save_image(reconstruction_grid(model, loaders.query, GRID_IMAGES, device), grid, nrow=16)
    _run.add_artifact(grid, name="reconstructions.png")
    print(f"Best epoch {best_epoch}: {task.best_key} {final[task.best_key]:.4f}; weights saved to {checkpoint}, "
          f"reconstructions to {grid}")
    return final[task.best_key]
