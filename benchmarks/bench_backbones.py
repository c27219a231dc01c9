"""Training steps of backbones side by side, in images/s and as ratios to the first: a ViT beside a ResNet.

    python benchmarks/bench_backbones.py                                  # CPU: resnet50 beside vit_s16_dino, 224 px
    python benchmarks/bench_backbones.py --archs vit_s16_dino vit_b16_dino --batch 128 --amp bf16 --compile  # a GPU

Each step is the engine's own (utils.engine.training.train_one_epoch: forward, cross-entropy on a 100-class
classifier, backward, AdamW) on device-resident random images, from random weights, with the embedding head a run
of the arch gets (a ViT's class token, a CNN's average pooling). The archs take turns, --rounds times after
--warmup steps each (torch.compile compiles then), and each figure is the median over the rounds, so that the
load of other processes on a shared machine spreads over all of them alike.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from losses.criterion import Criterion  # noqa: E402
from losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from models.ingredient import build_model  # noqa: E402
from utils.engine.speed import Precision, prepare_model  # noqa: E402
from utils.engine.training import optimizer_groups, train_one_epoch  # noqa: E402

CLASSES = 100


def make_steps(
    arch: str, *, batch: int, size: int, amp: str | None, compile: bool, device: torch.device
) -> Callable[[int], float]:
    """steps(n) runs n training steps of arch and returns their seconds."""
    torch.manual_seed(0)
    model = build_model(
        arch=arch,
        weights=None,
        set_bn_eval=False,
        num_features=None,
        pooling=None,
        norm_layer=None,
        remap=False,
        normalize=False,
        freeze_bn=False,
    ).to(device)
    prepare_model(model, channels_last=False, compile=compile)
    criterion = Criterion({"ce": (1.0, CrossEntropyLoss(model.head.num_features, CLASSES))}).to(device)
    groups = optimizer_groups(model, criterion.parameter_groups(), lr=1e-5, no_bias_decay=True)
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    precision = Precision(amp, device)
    images = torch.rand(batch, 3, size, size, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)

    def steps(count: int) -> float:
        start = time.perf_counter()
        train_one_epoch(
            model, criterion, [(images, labels)] * count, optimizer, schedule, device, 1, precision=precision
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vit_s16_dino"], help="model.arch names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="square image side")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast (the amp setting)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the compile setting)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {name}, {os.cpu_count()} CPUs, torch {torch.__version__}; {' '.join(sys.argv[1:]) or 'defaults'}")
    options = dict(batch=args.batch, size=args.size, amp=args.amp, compile=args.compile, device=device)
    runners = {arch: make_steps(arch, **options) for arch in args.archs}
    for steps in runners.values():
        steps(args.warmup)
    samples: dict[str, list[float]] = {arch: [] for arch in runners}
    for _ in range(args.rounds):
        for arch, steps in runners.items():
            samples[arch].append(args.steps * args.batch / steps(args.steps))
    rates = {arch: statistics.median(values) for arch, values in samples.items()}
    first = rates[args.archs[0]]
    print(f"training step, images/s ({args.batch} x {args.size} px, {args.amp or 'float32'}, {device.type})")
    for arch, rate in rates.items():
        print(f"  {arch:<30} {rate:10.2f}  x{rate / first:.2f}")


if __name__ == "__main__":
    main()
