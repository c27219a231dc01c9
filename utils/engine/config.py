"""The training driver's settings: their defaults (a sacred config scope both experiments add), their rules,
and the typed configuration `fit` takes, built from a run's config at the edge (the experiment script).
"""

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from utils.engine.speed import AMP_DTYPES
from utils.engine.training import OPTIMIZERS, SCHEDULERS
from utils.settings import (
    POSITIVE,
    SEED_LIMIT,
    SIZE,
    CrossRule,
    boolean,
    choice,
    integer,
    number,
    optional,
    register,
    text,
)

CUDNN_FLAGS = ("benchmark", "deterministic")
NONFINITE = ("stop", "skip")


def training_config():
    # The driver's configuration keys; an experiment's own config scope may change their defaults.
    epochs = 30  # training epochs
    optimizer = "adam"  # sgd | adam | adamw
    lr = 1e-3  # learning rate
    momentum = 0.0  # sgd
    nesterov = False  # sgd with momentum
    weight_decay = 0.0  # L2 penalty (decoupled with adamw)
    no_bias_decay = True  # no weight decay on biases and normalisation parameters
    scheduler = "cos"  # warmcos | cos | step | warmstep | constant (warm*: 100 warm-up iterations)
    lr_step = None  # step, warmstep: epochs between learning-rate decays
    lr_gamma = 0.1  # step, warmstep: decay factor
    grad_clip = None  # clip gradients by value
    nonfinite = "stop"  # a non-finite loss or gradient: stop the run (the last checkpoint is kept) | skip the step

    visdom_port = None  # live curves on the visdom server at this port of 127.0.0.1
    visdom_freq = 20  # iterations between two points of the training curves
    eval_every = 1  # epochs between evaluations (evaluation.metrics); the last epoch is always evaluated
    patience = None  # stop after this many evaluations without a new best epoch; None: train every epoch
    cpu = False  # train on the CPU even when a GPU is available
    cudnn_flag = "benchmark"  # benchmark | deterministic
    output_dir = "outputs"  # without -F, each run writes its checkpoint in a new folder here (with -F: its run dir)
    checkpoint_every = None  # also write the checkpoint every this many iterations (long epochs); None: per epoch
    resume = None  # a -F run directory or a checkpoint file to continue (same settings; epochs may be raised)
    seed = 0
    dist_timeout = 900  # under torchrun: seconds a rank waits for the others in a collective before the run fails

    # Speed options (utils/engine/speed.py), off by default: they change the numbers or help on GPUs only.
    amp = None  # None | bf16 | fp16 (with a gradient scaler): autocast the model; the losses stay in float32
    channels_last = False  # NHWC images and convolution weights (faster convolutions on tensor cores)
    compile = False  # torch.compile the model's parts (slow first steps, fused kernels afterwards)
    sync_bn = False  # under torchrun: BatchNorm in training mode uses the global batch's statistics


register(
    {
        "epochs": integer(0),
        "optimizer": choice(OPTIMIZERS),
        # At most what the optimizers' float32 arithmetic holds (3.4e38): a larger lr or weight_decay ends in a
        # traceback inside the first step. A merely huge one (lr=1e38 is what a test uses to make the loss
        # non-finite) is left to the nonfinite setting, which stops the run in one line.
        "lr": number(0, 1e38, low_open=True),
        "momentum": number(0, 1, high_open=True),
        "nesterov": boolean(),
        "weight_decay": number(0, 1e38),
        "no_bias_decay": boolean(),
        "scheduler": choice(SCHEDULERS),
        "lr_step": optional(integer(1)),
        "lr_gamma": number(0, 1, low_open=True),
        "grad_clip": optional(POSITIVE),
        "nonfinite": choice(NONFINITE),
        "visdom_port": optional(integer(1, 65535)),
        "visdom_freq": integer(1),
        "eval_every": integer(1),
        "patience": optional(integer(1)),
        "cpu": boolean(),
        "cudnn_flag": choice(CUDNN_FLAGS),
        "output_dir": text(),
        "checkpoint_every": optional(SIZE),
        "resume": optional(text()),
        "seed": integer(0, SEED_LIMIT),
        # Longer than any legitimate wait (rank 0 alone computing a large data set's final metrics takes minutes),
        # far shorter than torch's 30 minutes of a stalled run; a day at most (timedelta overflows beyond).
        "dist_timeout": number(1, 86400),
        "amp": choice(tuple(AMP_DTYPES)),
        "channels_last": boolean(),
        "compile": boolean(),
        "sync_bn": boolean(),
    },
    [
        CrossRule(
            ("scheduler", "lr_step"),
            lambda scheduler, step: scheduler not in ("step", "warmstep") or step is not None,
            "lr_step set (epochs between decays) when scheduler is step or warmstep",
        ),
        CrossRule(
            ("nesterov", "momentum"),
            lambda nesterov, momentum: not nesterov or momentum > 0,
            "momentum > 0 when nesterov=True",
        ),
    ],
)


@dataclass(frozen=True)
class TrainingConfig:
    """What `fit` reads: training_config's keys (visdom_port and output_dir stay with the experiment, which builds
    the loggers and the output folder), and the run's whole config and code version, which the checkpoint keeps so
    that a resumed run can be checked against them."""

    epochs: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    no_bias_decay: bool
    scheduler: str
    lr_step: int | None
    lr_gamma: float
    grad_clip: float | None
    nonfinite: str
    visdom_freq: int
    eval_every: int
    patience: int | None
    cudnn_flag: str
    checkpoint_every: int | None
    resume: str | None
    seed: int
    amp: str | None
    channels_last: bool
    compile: bool
    sync_bn: bool
    settings: dict = field(default_factory=dict)  # the run's whole config, as plain dicts and lists
    code: dict = field(default_factory=dict)  # the experiment's name, main file, sources and their versions

    @classmethod
    def from_settings(cls, settings: Mapping, code: Mapping) -> "TrainingConfig":
        """From a run's config (sacred's _config) and its code version (sacred's run.experiment_info)."""
        names = [item.name for item in dataclasses.fields(cls) if item.name not in ("settings", "code")]
        return cls(**{name: settings[name] for name in names}, settings=plain(settings), code=plain(code))


def plain(value: Any) -> Any:
    """Sacred's read-only dicts and tuples as plain dicts and lists, which torch.load(weights_only=True) reads."""
    return json.loads(json.dumps(value))
