"""Autoencoder baselines: how well the latent codes of an AE or a VAE retrieve images of the same class.

    python autoencoder_experiment.py with vae.ae                    # digits on the CPU, under a minute
    python autoencoder_experiment.py with vae.vae
    python autoencoder_experiment.py -F result_dir with dataset.cub_vae vae.ae   # also cars_vae, sop_vae, inshop_vae
    python autoencoder_experiment.py print_config with dataset.sop_vae vae.vae

Each evaluated epoch (and before training) reports the test reconstruction error, the VAE's KL term and
Recall@K of the codes (the posterior means for the VAE). The best epoch's weights and a grid of
test images beside their reconstructions are saved as artifacts.
"""

import itertools
import math
import tempfile

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from losses.autoencoder import AutoencoderLoss
from models.vae import Autoencoder
from models.vae_ingredient import get_autoencoder_loss, get_vae, vae_ingredient
from utils.data.ingredient import MetricLoaders, data_ingredient, get_loaders
from utils.run import (
    BestEpoch,
    artifact_path,
    cudnn_benchmark,
    evaluated_epochs,
    keep_output_on_failure,
    log_evaluation,
    log_training,
    report_final,
    save_checkpoint,
    select_device,
)
from utils.settings import settings_hook
from utils.training import (
    build_optimizer,
    build_scheduler,
    check_choice,
    evaluate,
    parameter_groups,
    progress,
    train_one_epoch,
)
from utils.visdom_logger import VisdomLogger

SETTINGS.CAPTURE_MODE = "sys"
ex = Experiment("autoencoder", ingredients=[data_ingredient, vae_ingredient])
ex.config_hook(settings_hook)  # every setting against utils/settings.py's table, before anything runs
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt

# Where each selection metric lives in the evaluation results, and whether lower is better.
SELECTION = {"recall": ("cosine/R@1", False), "reconstruction": ("test/reconstruction", True)}
PLOT_TITLES = {"/R@1": "Recall@1", "/reconstruction": "Test losses", "/kl": "Test losses"}
GRID_IMAGES = 32  # test images shown beside their reconstructions, 8 pairs per row


@ex.config
def config(dataset):
    epochs = 20 if dataset["name"] == "digits" else 30
    optimizer = "adam"  # sgd | adam | adamw
    lr = 1e-3
    momentum = 0.0
    nesterov = False
    weight_decay = 0.0
    no_bias_decay = True  # no weight decay on biases and normalisation parameters
    scheduler = "cos"  # warmcos | cos | step | warmstep | constant (warm*: 100 warm-up iterations)
    lr_step = None  # step, warmstep: epochs between learning-rate decays
    lr_gamma = 0.1  # step, warmstep: decay factor
    select_by = "recall"  # recall: highest cosine R@1 | reconstruction: lowest test reconstruction error

    visdom_port = None  # live curves on the visdom server at this port of 127.0.0.1
    visdom_freq = 20  # iterations between two points of the training curves
    eval_every = 1  # epochs between evaluations (dataset.eval_metrics); the last epoch is always evaluated
    cpu = False  # train on the CPU even when a GPU is available
    cudnn_flag = "benchmark"  # benchmark | deterministic
    temp_dir = tempfile.gettempdir()  # where the best checkpoint and the reconstruction grid are written
    seed = 0


@torch.no_grad()
def test_losses(model: Autoencoder, criterion: AutoencoderLoss, loaders: MetricLoaders, device: torch.device
                ) -> dict[str, float]:
    """The mean of each loss term (test/<term>) over the test images (In-Shop: queries and gallery); the model
    must be in eval mode."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for loader in filter(None, (loaders.query, loaders.gallery)):
        for images, _ in progress(loader, "Reconstructing test images"):
            images = images.to(device, non_blocking=True)
            reconstructions, mean, logvar = model(images)
            for key, value in criterion.terms(images, reconstructions, mean, logvar).items():
                sums[key] = sums.get(key, 0) + value * len(images)
            count += len(images)
    return {f"test/{key}": (value / count).item() for key, value in sums.items()}


def evaluate_autoencoder(model: Autoencoder, criterion: AutoencoderLoss, loaders: MetricLoaders, device: torch.device,
                         metrics: list[str]) -> dict[str, float]:
    """The retrieval metrics of the latent means, and the mean test losses."""
    model.eval()
    retrieval = evaluate(lambda images: model(images)[1], loaders, device, metrics)
    return retrieval | test_losses(model, criterion, loaders, device)


@torch.no_grad()
def reconstruction_grid(model: Autoencoder, loader: DataLoader, num_images: int, device: torch.device
                        ) -> torch.Tensor:
    """The first num_images images of loader, each followed by its reconstruction."""
    model.eval()
    batches = itertools.islice(loader, math.ceil(num_images / loader.batch_size))
    images = torch.cat([batch for batch, _ in batches])[:num_images]
    reconstructions = model(images.to(device))[0].cpu()
    return torch.stack([images, reconstructions], dim=1).flatten(0, 1)


@ex.automain
@keep_output_on_failure
def main(epochs: int, optimizer: str, lr: float, momentum: float, nesterov: bool, weight_decay: float,
         no_bias_decay: bool, scheduler: str, lr_step: int | None, lr_gamma: float, select_by: str,
         visdom_port: int | None, visdom_freq: int, eval_every: int, cpu: bool, cudnn_flag: str, temp_dir: str,
         seed: int, _run) -> float:
    check_choice("select_by", select_by, SELECTION)
    device = select_device(cpu, cudnn_flag)
    evaluate_after = evaluated_epochs(epochs, eval_every)
    plot = VisdomLogger(visdom_port) if visdom_port else None

    torch.manual_seed(seed)
    # The model first: a bad architecture or image size fails before any image is read.
    model = get_vae(image_size=_run.config["dataset"]["crop_size"]).to(device)
    criterion = get_autoencoder_loss()
    loaders = get_loaders()
    optim = build_optimizer(parameter_groups(model, no_bias_decay), optimizer, lr, momentum, nesterov, weight_decay)
    schedule = build_scheduler(optim, len(loaders.train), epochs, scheduler, lr_step, lr_gamma)

    def evaluate_and_log(epoch: int) -> dict[str, float]:
        metrics = evaluate_autoencoder(model, criterion, loaders, device, loaders.eval_metrics)
        log_evaluation(_run, epoch, metrics, plot, PLOT_TITLES)
        return metrics

    best = BestEpoch(*SELECTION[select_by])
    best.update(0, evaluate_and_log(0), model)
    torch.manual_seed(seed)
    for epoch in range(1, epochs + 1):
        with cudnn_benchmark(cudnn_flag):
            history = train_one_epoch(model, criterion, loaders.train, optim, schedule, device, epoch,
                                      log_every=visdom_freq, plot=plot)
        log_training(_run, epoch, history)
        if epoch in evaluate_after:
            best.update(epoch, evaluate_and_log(epoch), model)

    model.load_state_dict(best.state)
    final = evaluate_autoencoder(model, criterion, loaders, device, loaders.final_metrics)
    report_final(_run, best.epoch, final)
    config = _run.config
    stem = f"{config['vae']['arch']}_{config['dataset']['name']}"
    checkpoint = save_checkpoint(_run, best.state, temp_dir, stem)
    grid = artifact_path(temp_dir, stem, ".png")
    save_image(reconstruction_grid(model, loaders.query, GRID_IMAGES, device), grid, nrow=16)
    _run.add_artifact(grid, name="reconstructions.png")
    print(f"Best epoch {best.epoch}: {best.key} {final[best.key]:.4f}; weights saved to {checkpoint}, "
          f"reconstructions to {grid}")
    return final[best.key]
