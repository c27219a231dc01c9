"""Metric learning: cross-entropy, pairwise losses and Metrix mixup, evaluated with Recall@K.

    python experiment.py                                  # digits on the CPU, a few minutes
    python experiment.py with dataset.cub model.resnet50 epochs=30 lr=0.02
    python experiment.py -F result_dir with dataset.cub   # config, metrics, output, checkpoint
    python experiment.py print_config with dataset.sop    # every option and its value
    python experiment.py evaluate with checkpoint=result_dir/1              # its best weights, every final metric
    python experiment.py embed with checkpoint=result_dir/1 images=DIR out=embeddings.npz

The training loop is utils/engine/driver.py's; this script says what is its own: the model (backbone and
embedding head), the objective (losses and Metrix) and the result (cosine R@1 of the best epoch).
"""

import torch
from sacred import SETTINGS, Experiment
from sacred.utils import apply_backspaces_and_linefeeds

from losses.ingredient import get_criterion, loss_ingredient, metrix_ingredient
from models.ingredient import classifier_options, get_model, model_ingredient, rebuild_model, resolve_model
from utils import distributed
from utils.data.ingredient import data_ingredient, get_loaders
from utils.engine.checkpoint import best_model
from utils.engine.config import TrainingConfig, training_config
from utils.engine.driver import Task, best_epoch_words, fit, select_device
from utils.evaluation.inference import commands_config, embed_images, evaluate_checkpoint, evaluation_data, restore
from utils.evaluation.ingredient import (
    SELECTION_KEYS,
    check_evaluation,
    draw_retrieval,
    evaluation_ingredient,
    get_evaluator,
    validation_evaluator,
)
from utils.evaluation.protocol import comparability_card, save_fold_embeddings
from utils.reporting.sacred_run import (
    SacredLogger,
    add_artifacts,
    continue_with_checkpoint_settings,
    keep_run_records,
    observe_with_run_records,
    observers_config,
    output_directory,
    quiet_other_ranks,
    run_commandline,
    run_loggers,
)
from utils.settings import CrossRule, add_named_config, boolean, choice, integer, number, register, settings_hook

SETTINGS.CAPTURE_MODE = "sys"
BEST_KEY = "cosine/R@1"  # the run's result (selection_metric picks the best epoch)
ex = Experiment(
    "metric_learning",
    ingredients=[data_ingredient, evaluation_ingredient, model_ingredient, loss_ingredient, metrix_ingredient],
)
ex.config_hook(settings_hook)  # every setting against utils/settings.py's table, before anything runs
ex.option_hook(quiet_other_ranks)  # under torchrun only rank 0 observes the run and prints
observe_with_run_records(ex)  # -F: records that survive a failure (utils/reporting/sacred_run.py)
continue_with_checkpoint_settings(ex)  # resume=PATH: the checkpoint's settings, under what the command line gives
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt
ex.config(training_config)
ex.config(commands_config)
ex.config(observers_config)


@ex.config
def config(dataset, evaluation):
    # The digits default is a from-scratch CPU demo with Adam; the real data sets follow the CE paper:
    # SGD with a warm cosine schedule from ImageNet weights.
    epochs = 30 if dataset["name"] == "digits" else 20  # training epochs
    optimizer = "adam" if dataset["name"] == "digits" else "sgd"  # sgd | adam | adamw
    lr = 1e-3 if optimizer != "sgd" else 0.02  # learning rate
    weight_decay = 5e-4 if optimizer == "sgd" else 1e-4  # L2 penalty (decoupled with adamw)
    scheduler = "warmcos"  # warmcos | cos | step | warmstep | constant (warm*: warmup_iterations)
    warm_epochs = 0  # first epochs train only the new layers (embedding head, classifier, proxies)
    label_smoothing = 0.1  # of the cross-entropy loss
    # The metric that chooses the best epoch: recall (cosine R@1, the papers') | map_at_r | r_precision
    selection_metric = "map_at_r" if evaluation["protocol"] == "validation" else "recall"
    baseline = True  # before training, evaluate the backbone's pooled features (no head) with the final metrics


register(
    {
        "warm_epochs": integer(0),
        "label_smoothing": number(0, 1, high_open=True),
        "selection_metric": choice(tuple(SELECTION_KEYS)),
        "baseline": boolean(),
    },
    [CrossRule(("warm_epochs", "epochs"), lambda warm, epochs: warm <= epochs, "warm_epochs <= epochs")],
)


# The Metrix paper's training recipe. A named config cannot read the data set's name (sacred runs it before the
# dataset ingredient's config), so pair_batches lets the dataset ingredient pick the sampler from the data set's
# specification: random batches on CUB and Cars, balanced (5 images per class) on SOP and In-Shop, as the released
# code draws them.
METRIX_RECIPE = dict(
    epochs=60,
    optimizer="adam",
    lr=1e-4,
    weight_decay=1e-4,
    scheduler="step",
    lr_step=10,
    lr_gamma=0.1,
    warm_epochs=1,
    grad_clip=10.0,
    model=dict(
        arch="resnet50", pooling="avg+max", num_features=512, remap=True, normalize=True, freeze_bn=True, dropout=0.0
    ),
    dataset=dict(batch_size=100, pair_batches=True, images_per_class=5),
)
add_named_config(
    ex,
    "metrix_recipe",
    METRIX_RECIPE,
    "the Metrix paper's recipe (ResNet-50, 512-d, main.py --embedding_size 512 --warm 1); add a loss and a mode, "
    "e.g. `with dataset.cub metrix_recipe loss.contrastive metrix.feature`",
)


# The Reality Check's fixed settings (Musgrave, Belongie and Lim, ECCV 2020), from its released benchmarker's default
# configs; docs/evaluation.md says where each comes from and what differs here.
REALITY_CHECK = dict(
    epochs=1000,  # num_epochs_train: the runs end by early stopping
    eval_every=2,  # save_interval
    patience=5,  # training stops once epoch - best_epoch > 9 (patience: 9), with evaluations every 2 epochs
    optimizer="adam",  # the benchmarker's RMSprop is not one of ours: Adam at its lr and weight decay
    lr=1e-6,
    weight_decay=1e-4,
    scheduler="constant",
    warm_epochs=0,
    model=dict(
        arch="bninception",
        pretrained=True,
        num_features=128,  # the embedder: one linear layer to 128
        remap=True,
        normalize=True,  # eval_normalize_embeddings (the losses' distances normalise them too)
        set_bn_eval=True,  # freeze_trunk_batchnorm
        pooling="avg",
    ),
    dataset=dict(
        folds=4,  # num_training_partitions
        batch_size=32,
        sampler="random_id",  # the paper: 8 classes x 4 images per batch
        images_per_class=4,
        num_iterations=100,  # iterations_per_epoch
        resize=256,  # transforms: Resize 256, RandomResizedCrop 227 (scale 0.16-1, ratio 3/4-4/3), flips
        crop_size=227,
        scale=(0.16, 1.0),
        ratio=(0.75, 1.33),
        hflip=True,
        color_jitter=None,
    ),
    evaluation=dict(protocol="validation", metrics=["recall", "map_at_r", "r_precision"]),
)
add_named_config(
    ex,
    "reality_check",
    REALITY_CHECK,
    "the Reality Check's fixed settings (BN-Inception, 128-d, 4 folds, validation); add a loss and a fold, e.g. "
    "`with dataset.cub reality_check loss.contrastive dataset.fold=1`, then `python -m utils.report --reality-check`",
)


# Hyp-ViT's sphere variant (Ermolov et al., CVPR 2022; github.com/htdt/hyp_metric, train.py --model dino_vits16
# --hyp_c 0 --t 0.1 --emb 384): ViT-S/16 DINO, its class token projected to 384-d and L2-normalised, the pairwise
# cross-entropy at temperature 0.1 on batches of 900 images of distinct classes, AdamW at a constant 1e-5 (torch's
# weight decay 0.01), gradient norms clipped at 3, 224 px crops of scale 0.2-1. The data set's images per class,
# length and test resize go on the command line (docs/recipes.md).
VIT_RECIPE = dict(
    optimizer="adamw",
    lr=1e-5,
    weight_decay=0.01,
    scheduler="constant",
    grad_clip_norm=3.0,
    model=dict(arch="vit_s16_dino", num_features=384, remap=True, normalize=True),
    loss=dict(ce_weight=0.0, pairwise="ntxent", nt_temperature=0.1),
    # Hyp-ViT's sampler: distinct classes per batch, images of a class without replacement.
    dataset=dict(
        batch_size=900,
        sampler="random_id",
        images_per_class=2,
        resize=224,
        crop_size=224,
        scale=(0.2, 1.0),
        ratio=(3 / 4, 4 / 3),
        color_jitter=None,
        hflip=True,
    ),
)
add_named_config(
    ex,
    "vit_recipe",
    VIT_RECIPE,
    "Hyp-ViT's sphere recipe (ViT-S/16 DINO, 384-d, pairwise cross-entropy at 0.1, AdamW 1e-5); add the data set's "
    "length, e.g. `with dataset.sop vit_recipe epochs=200 dataset.num_iterations=25 eval_every=200`",
)


@ex.main
@keep_run_records
def main(label_smoothing: float, warm_epochs: int, selection_metric: str, baseline: bool, _config: dict, _run) -> float:
    """Train an embedding and evaluate it (the default command)."""
    device = select_device(_config["cpu"], _config["cudnn_flag"], _config["dist_timeout"])
    check_evaluation(device)
    torch.manual_seed(_config["seed"])
    validation = _config["evaluation"]["protocol"] == "validation"
    loaders = get_loaders(hold_out=validation)
    evaluate = get_evaluator(loaders, device)  # the test set
    # Every evaluated epoch is scored on the validation split under evaluation.protocol=validation, else on the test
    # set; the final evaluation is always the test set's.
    metrics = list(dict.fromkeys([*evaluate.metrics, selection_metric]))
    select = validation_evaluator(evaluate, metrics) if validation else evaluate
    default_arch = "small_cnn" if _config["dataset"]["name"] == "digits" else "resnet18"
    _run.info["model"] = resolve_model(default_arch)
    model = get_model(default_arch=default_arch)
    criterion = get_criterion(
        num_classes=loaders.num_classes,
        embedding_size=model.head.num_features,
        label_smoothing=label_smoothing,
        classifier=classifier_options(),
    )
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    rebuild = {**_run.info["model"], "num_classes": loaders.num_classes, "embedding_size": model.head.num_features}
    task = Task(
        model,
        criterion,
        lambda metrics: select(model, metrics),
        best_key=SELECTION_KEYS[selection_metric],
        rebuild=rebuild,
        warmup_frozen=backbone,
        warm_epochs=warm_epochs,
        final_evaluate=lambda metrics: evaluate(model, metrics),
        series="val" if validation else "eval",
        # What training adds to: the frozen backbone's pooled features, before any head (info.json "backbone").
        baseline=(lambda metrics: evaluate(model.pooled_features, metrics)) if baseline else None,
    )
    name = f"{rebuild['arch']}_{_config['dataset']['name']}"
    directory = output_directory(_run, _config["output_dir"], name)
    outcome = fit(
        task,
        loaders.train,
        metrics=metrics,
        final_metrics=evaluate.final_metrics,
        device=device,
        config=TrainingConfig.from_settings(_config, _run.experiment_info),
        directory=directory,
        loggers=run_loggers(_run, _config["visdom_port"], {"/R@1": "Recall@1"}, name, directory),
        device_augment=loaders.device_augment,
    )
    if not distributed.is_main():  # only rank 0 writes
        return outcome.metrics["cosine/R@1"]
    resolved = _run.info["model"]
    described = {
        "embedding_size": model.head.num_features,
        "normalized": _config["model"]["normalize"],
        "backbone": resolved["arch"],
        "weights": resolved["weights"],
        "pooling": model.head.pooling,  # resolved: None is the backbone's default
        "bn_frozen": resolved["set_bn_eval"],
    }
    _run.info["card"] = comparability_card(_config, described, outcome.epochs_run)
    if _config["dataset"]["folds"]:  # what `python -m utils.report --reality-check` combines, without the data
        save_fold_embeddings(
            evaluate, outcome.directory, fold=_config["dataset"]["fold"], folds=_config["dataset"]["folds"]
        )
    draw_retrieval(evaluate, outcome.directory / "retrieval.png", _config["seed"])
    add_artifacts(_run, outcome.directory, _config["checkpoint_artifact"])  # to every observer (-F, -m, ...)
    print(
        f"Best epoch {best_epoch_words(outcome.best_epoch)}: cosine R@1 {outcome.metrics['cosine/R@1']:.4f}; "
        f"results in {outcome.directory} (checkpoint.pt, curves.png, retrieval.png)"
    )
    return outcome.metrics[BEST_KEY]


@ex.command
@keep_run_records
def evaluate(checkpoint: str | None, _config: dict, _run) -> float:
    """Evaluate the best weights of checkpoint=PATH with every final metric (on the run's data by default)."""
    saved, config, device = restore(checkpoint, _config, _run)
    _, evaluator = evaluation_data(config, device)
    model = best_model(saved, rebuild_model).to(device).eval()
    results = evaluate_checkpoint(
        lambda metrics: evaluator(model, metrics), evaluator.final_metrics, saved, [SacredLogger(_run)]
    )
    return results[BEST_KEY]


@ex.command
@keep_run_records
def embed(checkpoint: str | None, images: str | None, out: str | None, bad_images: str, _config: dict, _run) -> str:
    """Embed images=DIR_OR_SPLIT_FILE with the best weights of checkpoint=PATH into out=FILE.npz."""
    saved, config, device = restore(checkpoint, _config, _run)
    model = best_model(saved, rebuild_model).to(device).eval()
    # Checkpoints written before selection_metric existed were all selected by R@1.
    selected_by = SELECTION_KEYS[config.get("selection_metric", "recall")]
    embedded = embed_images(
        model, config, device, images=images, out=out, bad_images=bad_images, selected_by=selected_by
    )
    return str(embedded)


if __name__ == "__main__":
    run_commandline(ex)
