"""Metric learning: cross-entropy, pairwise losses and Metrix mixup, evaluated with Recall@K.

    python experiment.py                                  # digits on the CPU, a few minutes
    python experiment.py with dataset.cub model.resnet50 epochs=30 lr=0.02
    python experiment.py -F result_dir with dataset.cub   # config, metrics, output, checkpoint
    python experiment.py print_config with dataset.sop    # every option and its value
"""

import copy
import os
import tempfile
import time

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds
from torch.backends import cudnn

from losses.ingredient import get_criterion, loss_ingredient
from models.ingredient import get_model, model_ingredient
from utils.captured_output import keep_output_on_failure
from utils.data.ingredient import data_ingredient, get_loaders
from utils.training import (
    build_optimizer,
    build_scheduler,
    check_choice,
    evaluate,
    format_metrics,
    parameter_groups,
    train_one_epoch,
)
from utils.visdom_logger import VisdomLogger

SETTINGS.CAPTURE_MODE = "sys"
ex = Experiment("metric_learning", ingredients=[data_ingredient, model_ingredient, loss_ingredient])
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt


@ex.config
def config(dataset):
    # The digits default is a from-scratch CPU demo with Adam; the real data sets keep the CE
    # paper's recipe: SGD with a warm cosine schedule on an ImageNet-pretrained network.
    epochs = 30 if dataset["name"] == "digits" else 20
    optimizer = "adam" if dataset["name"] == "digits" else "sgd"  # sgd | adam | adamw
    lr = 0.02 if optimizer == "sgd" else 1e-3
    momentum = 0.0
    nesterov = False
    weight_decay = 5e-4 if optimizer == "sgd" else 1e-4
    no_bias_decay = True  # no weight decay on biases and normalisation parameters
    scheduler = "warmcos"  # warmcos | cos | step | warmstep | constant (warm*: 100 warm-up iterations)
    lr_step = None  # step, warmstep: epochs between learning-rate decays
    lr_gamma = 0.1  # step, warmstep: decay factor
    warm_epochs = 0  # first epochs train only the new layers (embedding head, classifier, proxies)
    grad_clip = None  # clip gradients by value
    label_smoothing = 0.1

    visdom_port = None  # live curves on the visdom server at this port of 127.0.0.1
    visdom_freq = 20  # iterations between two points of the training curves
    cpu = False  # train on the CPU even when a GPU is available
    cudnn_flag = "benchmark"  # benchmark | deterministic
    temp_dir = tempfile.gettempdir()  # where the best checkpoint is written
    seed = 0


@ex.automain
@keep_output_on_failure
def main(epochs: int, optimizer: str, lr: float, momentum: float, nesterov: bool, weight_decay: float,
         no_bias_decay: bool, scheduler: str, lr_step: int | None, lr_gamma: float, warm_epochs: int,
         grad_clip: float | None, label_smoothing: float, visdom_port: int | None, visdom_freq: int, cpu: bool,
         cudnn_flag: str, temp_dir: str, seed: int, _run) -> float:
    check_choice("cudnn_flag", cudnn_flag, ("benchmark", "deterministic"))
    device = torch.device("cuda:0" if torch.cuda.is_available() and not cpu else "cpu")
    cudnn.deterministic = cudnn_flag == "deterministic"
    plot = VisdomLogger(visdom_port) if visdom_port else None

    torch.manual_seed(seed)
    loaders = get_loaders()
    model = get_model(num_classes=loaders.num_classes).to(device)
    criterion = get_criterion(num_classes=loaders.num_classes, embedding_size=model.classifier.linear.in_features,
                              label_smoothing=label_smoothing).to(device)
    groups = parameter_groups(model, no_bias_decay) + criterion.parameter_groups(lr)
    optim = build_optimizer(groups, optimizer, lr, momentum, nesterov, weight_decay)
    schedule = build_scheduler(optim, len(loaders.train), epochs, scheduler, lr_step, lr_gamma)
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]

    def evaluate_and_log(epoch: int) -> dict[str, float]:
        model.eval()
        metrics = evaluate(lambda images: model(images)[1], loaders, device)
        print(format_metrics(epoch, metrics))
        for key, value in metrics.items():
            _run.log_scalar(f"eval.{key}", value, epoch)
            if plot is not None and key.endswith("/R@1"):
                plot(key, "Recall@1", epoch, value)
        return metrics

    best_epoch, best_metrics = 0, evaluate_and_log(0)
    best_state = copy.deepcopy(model.state_dict())
    torch.manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for p in backbone_parameters:
            p.requires_grad_(epoch > warm_epochs)
        cudnn.benchmark = cudnn_flag == "benchmark"
        history = train_one_epoch(model, criterion, loaders.train, optim, schedule, device, epoch, grad_clip,
                                  visdom_freq, plot)
        cudnn.benchmark = False
        for key, values in history.items():
            for i, value in enumerate(values):
                _run.log_scalar(f"train.{key}", value, epoch - 1 + i / len(values))
        metrics = evaluate_and_log(epoch)
        if metrics["cosine/R@1"] >= best_metrics["cosine/R@1"]:
            best_epoch, best_metrics = epoch, metrics
            best_state = copy.deepcopy(model.state_dict())

    _run.info["best_epoch"] = best_epoch
    _run.info["metrics"] = best_metrics
    config = _run.config
    checkpoint = os.path.join(temp_dir, f"{config['model']['arch']}_{config['dataset']['name']}_"
                                        f"{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.pt")
    torch.save({key: value.cpu() for key, value in best_state.items()}, checkpoint)
    ex.add_artifact(checkpoint, name="checkpoint.pt")
    print(f"Best epoch {best_epoch}: cosine R@1 {best_metrics['cosine/R@1']:.4f}; weights saved to {checkpoint}")
    return best_metrics["cosine/R@1"]
