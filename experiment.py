"""Metric learning: cross-entropy, pairwise losses and Metrix mixup, evaluated with Recall@K.

    python experiment.py                                  # digits on the CPU, a few minutes
    python experiment.py with dataset.cub model.resnet50 epochs=30 lr=0.02
    python experiment.py -F result_dir with dataset.cub   # config, metrics, output, checkpoint
    python experiment.py print_config with dataset.sop    # every option and its value

The training loop is utils/driver.py's; this script says what is its own: the model (backbone and
embedding head), the objective (losses and Metrix) and the result (cosine R@1 of the best epoch).
"""

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds

from losses.ingredient import get_criterion, loss_ingredient, metrix_ingredient
from models.ingredient import classifier_options, get_model, model_ingredient, resolve_model
from utils.data.ingredient import data_ingredient, get_loaders
from utils.driver import Task, fit, keep_output_on_failure, select_device, training_config
from utils.evaluation import check_evaluation, evaluation_ingredient, get_evaluator

SETTINGS.CAPTURE_MODE = "sys"
ex = Experiment("metric_learning", ingredients=[data_ingredient, evaluation_ingredient, model_ingredient,
                                                    loss_ingredient, metrix_ingredient])
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt
ex.config(training_config)


@ex.config
def config(dataset):
    # The digits default is a from-scratch CPU demo with Adam; the real data sets follow the CE paper:
    # SGD with a warm cosine schedule from ImageNet weights.
    epochs = 30 if dataset["name"] == "digits" else 20  # training epochs
    optimizer = "adam" if dataset["name"] == "digits" else "sgd"  # sgd | adam | adamw
    lr = 1e-3 if optimizer != "sgd" else 0.02  # learning rate
    weight_decay = 5e-4 if optimizer == "sgd" else 1e-4
    scheduler = "warmcos"  # warmcos | cos | step | warmstep | constant (warm*: 100 warm-up iterations)
    warm_epochs = 0  # first epochs train only the new layers (embedding head, classifier, proxies)
    label_smoothing = 0.1  # of the cross-entropy loss


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
def main(label_smoothing: float, warm_epochs: int, _config: dict, _run) -> float:
    device = select_device(_config["cpu"], _config["cudnn_flag"])
    check_evaluation(device)
    torch.manual_seed(_config["seed"])
    loaders = get_loaders()
    evaluate = get_evaluator(loaders, device)
    default_arch = "small_cnn" if _config["dataset"]["name"] == "digits" else "resnet18"
    _run.info["model"] = resolve_model(default_arch)
    model = get_model(default_arch=default_arch)
    criterion = get_criterion(num_classes=loaders.num_classes, embedding_size=model.head.num_features,
                              label_smoothing=label_smoothing, classifier=classifier_options())
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    name = f"{_run.info['model']['arch']}_{_config['dataset']['name']}"
    task = Task(model, criterion, lambda metrics: evaluate(model, metrics), best_key="cosine/R@1", name=name,
                warmup_frozen=backbone, warm_epochs=warm_epochs)
    best_epoch, final, checkpoint = fit(task, loaders.train, (evaluate.metrics, evaluate.final_metrics), device,
                                        _config, _run, device_augment=loaders.device_augment)
    print(f"Best epoch {best_epoch}: cosine R@1 {final['cosine/R@1']:.4f}; weights saved to {checkpoint}")
    return final["cosine/R@1"]
