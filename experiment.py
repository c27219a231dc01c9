"""Metric learning: cross-entropy, pairwise losses and Metrix mixup, evaluated with Recall@K.

    python experiment.py                                  # digits on the CPU, a few minutes
    python experiment.py with dataset.cub model.resnet50 epochs=30 lr=0.02
    python experiment.py -F result_dir with dataset.cub   # config, metrics, output, checkpoint
    python experiment.py print_config with dataset.sop    # every option and its value
"""

import tempfile

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds

from losses.ingredient import get_criterion, loss_ingredient, metrix_ingredient
from models.ingredient import get_model, model_ingredient
from utils.data.ingredient import data_ingredient, get_loaders
from utils.run import (
    BestEpoch,
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
from utils.training import build_optimizer, build_scheduler, evaluate, parameter_groups, train_one_epoch
from utils.visdom_logger import VisdomLogger

SETTINGS.CAPTURE_MODE = "sys"
ex = Experiment("metric_learning", ingredients=[data_ingredient, model_ingredient, loss_ingredient,
                                                    metrix_ingredient])
ex.config_hook(settings_hook)  # every setting against utils/settings.py's table, before anything runs
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
    eval_every = 1  # epochs between evaluations (dataset.eval_metrics); the last epoch is always evaluated
    cpu = False  # train on the CPU even when a GPU is available
    cudnn_flag = "benchmark"  # benchmark | deterministic
    temp_dir = tempfile.gettempdir()  # where the best checkpoint is written
    seed = 0


@ex.named_config
def metrix_recipe():
    """The Metrix paper's training recipe (ResNet-50, 512-d); add a loss and a mixing mode, e.g.
    `with dataset.cub metrix_recipe loss.contrastive metrix.feature` (main.py --embedding_size 512 --warm 1)."""
    epochs = 60
    optimizer = "adam"
    lr = 1e-4
    weight_decay = 1e-4
    scheduler = "step"
    lr_step = 10
    lr_gamma = 0.1
    warm_epochs = 1
    grad_clip = 10.0
    model = dict(arch="resnet50", pooling="avg+max", num_features=512, remap=True, normalize=True, freeze_bn=True,
                 dropout=0.0)
    dataset = dict(batch_size=100, sampler="balanced", images_per_class=5)


@ex.automain
@keep_output_on_failure
def main(epochs: int, optimizer: str, lr: float, momentum: float, nesterov: bool, weight_decay: float,
         no_bias_decay: bool, scheduler: str, lr_step: int | None, lr_gamma: float, warm_epochs: int,
         grad_clip: float | None, label_smoothing: float, visdom_port: int | None, visdom_freq: int,
         eval_every: int, cpu: bool, cudnn_flag: str, temp_dir: str, seed: int, _run) -> float:
    device = select_device(cpu, cudnn_flag)
    evaluate_after = evaluated_epochs(epochs, eval_every)
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

    def evaluate_model(metrics: list[str]) -> dict[str, float]:
        model.eval()
        return evaluate(lambda images: model(images)[1], loaders, device, metrics)

    def evaluate_and_log(epoch: int) -> dict[str, float]:
        metrics = evaluate_model(loaders.eval_metrics)
        log_evaluation(_run, epoch, metrics, plot)
        return metrics

    best = BestEpoch("cosine/R@1")
    best.update(0, evaluate_and_log(0), model)
    torch.manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for p in backbone_parameters:
            p.requires_grad_(epoch > warm_epochs)
        with cudnn_benchmark(cudnn_flag):
            history = train_one_epoch(model, criterion, loaders.train, optim, schedule, device, epoch, grad_clip,
                                      visdom_freq, plot)
        log_training(_run, epoch, history)
        if epoch in evaluate_after:
            best.update(epoch, evaluate_and_log(epoch), model)

    model.load_state_dict(best.state)
    final = evaluate_model(loaders.final_metrics)
    report_final(_run, best.epoch, final)
    config = _run.config
    checkpoint = save_checkpoint(_run, best.state, temp_dir, f"{config['model']['arch']}_{config['dataset']['name']}")
    print(f"Best epoch {best.epoch}: cosine R@1 {final['cosine/R@1']:.4f}; weights saved to {checkpoint}")
    return final["cosine/R@1"]
