"""Where the time of a training step goes, in one run, as ratios: data pipeline, model step, full loop, gather.

    python benchmarks/bench_pipeline.py                          # CPU defaults: resnet18, batch 32, 112 px
    python benchmarks/bench_pipeline.py --arch resnet50 --batch 128 --size 224 --workers 8 --compile   # a GPU
    python benchmarks/bench_pipeline.py --arch vit_s16_dino --size 224    # a ViT-S/16 step, beside --arch resnet50

1. Pipeline, images/s of one worker (one process, one thread, batches of 32 collated): the default PIL pipeline
   of the CE recipe on CUB (decode, resize 256, colour jitter, random resized crop 224, flip, to tensor) against
   dataset.gpu_augment's worker part (crop box and flip drawn, the box's uint8 pixels decoded and packed), on
   synthetic 500x375 JPEGs written here, in its first epoch (every image decoded whole, for its grey level) and
   in the later ones (only the box decoded); decoding alone (PIL, torchvision), the bound of any CPU pipeline; and
   the device part of gpu_augment (resampling every crop, flip, batched colour jitter), in images/s, on the
   benchmark's device.
2. Step on device-resident synthetic batches (forward, cross-entropy, backward, SGD step) in float32, with amp,
   channels_last and torch.compile; step times and images/s relative to float32.
3. Full loop: DataLoader workers feeding the step, default pipeline against gpu_augment, in images/s.
4. Cross-rank gather: gather_with_grad forward and backward over 2 gloo processes (the CPU) of the batch's
   embeddings and of its feature maps (what feature-mode Metrix gathers), and the one-flag all-reduce by which
   the ranks agree that every rank loaded its batch, relative to the float32 step.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from losses.criterion import Criterion  # noqa: E402
from losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from models.backbones import get_backbone  # noqa: E402
from models.metric_model import EmbeddingHead, MetricModel  # noqa: E402
from utils import distributed  # noqa: E402
from utils.data.device_augment import build_split_pipeline, load_for_crop, load_pixels, pack_crops  # noqa: E402
from utils.data.image_dataset import ImageDataset  # noqa: E402
from utils.data.images import load_image  # noqa: E402
from utils.data.transforms import build_transforms  # noqa: E402
from utils.engine.speed import Precision, batch_mover, prepare_model  # noqa: E402

CUB_RECIPE = dict(
    crop_size=224,
    resize=256,
    scale=(0.16, 1.0),
    ratio=(3 / 4, 4 / 3),
    color_jitter=(0.25, 0.25, 0.25, 0),
    rotate=None,
    hflip=True,
)


def write_jpegs(root: Path, count: int) -> Path:
    """count 500x375 JPEGs (CUB's typical size) of smooth colour and noise, and their split file."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        low = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg,{i % 10}\n")
    (root / "train.txt").write_text("".join(lines))
    return root


def rates(works: dict[str, Callable[[], int]], seconds: float, rounds: int = 5) -> dict[str, float]:
    """Items per second of each work() (which returns how many items it did): the works take turns, seconds /
    rounds each per round, after one warm-up call each, and each figure is the median over the rounds, so that
    the load of other processes on a shared machine spreads over all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in works}
    for work in works.values():
        work()
    for _ in range(rounds):
        for name, work in works.items():
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                done += work()
            samples[name].append(done / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def pipelines(root: Path, device: torch.device, seconds: float, device_batch: int = 128) -> dict[str, float]:
    """Images/s of one worker's pipelines (one thread), and of gpu_augment's device part on device_batch crops."""
    default, _ = build_transforms(**CUB_RECIPE)
    worker, jitter = build_split_pipeline(**CUB_RECIPE)
    old = ImageDataset(root, "train.txt", default)
    new = ImageDataset(root, "train.txt", worker, decode=load_for_crop)
    worker.share_grey_levels(new.paths)
    for index in range(len(new)):  # the first epoch: every grey level measured
        new[index]
    # A worker that remembers no grey level decodes every image whole, as in the first epoch.
    first_epoch = ImageDataset(root, "train.txt", build_split_pipeline(**CUB_RECIPE)[0], decode=load_for_crop)
    order = iter(range(10**9))

    def one(dataset: ImageDataset, collate: Callable = default_collate) -> Callable[[], int]:
        """What a DataLoader worker does for a batch of 32: fetch the images, then collate them."""

        def work() -> int:
            collate([dataset[next(order) % len(dataset)] for _ in range(32)])
            return 32

        return work

    torch.set_num_threads(1)  # a DataLoader worker runs one thread
    # What no CPU pipeline can beat: decoding alone, by PIL (the default pipeline) and torchvision (gpu_augment).
    decode_pil, decode_split = (
        ImageDataset(root, "train.txt", None, decode=decode) for decode in (load_image, load_pixels)
    )
    results = rates(
        {
            "default": one(old),
            "gpu_augment, first epoch": one(first_epoch, pack_crops),
            "gpu_augment, later epochs": one(new, pack_crops),
            "decode only, PIL": one(decode_pil, list),
            "decode only, torchvision": one(decode_split, list),
        },
        seconds,
    )
    torch.set_num_threads(os.cpu_count() or 1)
    batch, _ = pack_crops([new[i % len(new)] for i in range(device_batch)])
    results |= rates(
        {"device part (resample, flip, jitter)": lambda: (synchronize(jitter(batch, device)), device_batch)[1]},
        seconds,
    )
    return results


def synchronize(result: object = None) -> object:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result


def fresh_backbone(arch: str) -> nn.Module:
    """The registry's backbone, randomly initialised from one seed: every step variant starts from the same weights."""
    torch.manual_seed(0)
    return get_backbone(arch, None)


def make_step(
    backbone: nn.Module, device: torch.device, amp: str | None, channels_last: bool, compile: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step of the CE recipe (forward, cross-entropy, backward, SGD) on backbone; it returns the loss."""
    layout = getattr(backbone, "layout", None)  # a ViT's tokens (--arch vit_s16_dino): its class token is pooled
    head = EmbeddingHead(
        backbone.out_channels, backbone.out_channels, "avg" if layout is None else "cls", layout=layout
    )
    model = MetricModel(backbone, head).to(device).train()
    prepare_model(model, channels_last, compile)
    criterion = Criterion({"ce": (1.0, CrossEntropyLoss(backbone.out_channels, 100))}).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *criterion.parameters()], lr=1e-3, momentum=0.9)
    precision, move = Precision(amp, device), batch_mover(device, channels_last)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with precision.autocast():
            loss, _ = criterion(model, move(images), labels)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        return loss.detach()

    return step


# name: (amp, channels_last, compile)
Variants = dict[str, tuple[str | None, bool, bool]]


def steps(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    amp = "bf16" if device.type == "cpu" else "fp16"
    variants: Variants = {
        "float32": (None, False, False),
        amp: (amp, False, False),
        "channels_last": (None, True, False),
        f"{amp} + channels_last": (amp, True, False),
    }
    if device.type == "cuda":
        variants["bf16 + channels_last"] = ("bf16", True, False)
    if args.compile:
        variants[f"{amp} + channels_last + compile"] = (amp, True, True)
    return step_rates(
        variants,
        backbone=lambda: fresh_backbone(args.arch),
        batch=args.batch,
        size=args.size,
        device=device,
        seconds=args.seconds,
    )


def step_rates(
    variants: Variants,
    *,
    backbone: Callable[[], nn.Module],
    batch: int,
    size: int,
    device: torch.device,
    seconds: float,
) -> dict[str, float]:
    """Images/s of the step of each variant on one device-resident batch; backbone() builds a fresh backbone."""
    images = torch.rand(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    works = {}
    for name, options in variants.items():
        step = make_step(backbone(), device, *options)
        for _ in range(3):  # warm-up (and compilation)
            step(images, labels)
        works[name] = lambda step=step: (step(images, labels), synchronize(), batch)[2]
    return rates(works, seconds)


def full_loops(
    root: Path,
    *,
    arch: str,
    batch: int,
    size: int,
    workers: int,
    device: torch.device,
    seconds: float,
    amp: str | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Images/s of DataLoader workers alone and feeding the step, default pipeline against gpu_augment."""
    recipe = dict(CUB_RECIPE, crop_size=size, resize=size * 8 // 7)
    default, _ = build_transforms(**recipe)
    worker, jitter = build_split_pipeline(**recipe)
    step = make_step(fresh_backbone(arch), device, amp, channels_last, False)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    works = {}
    for name, transform, augment in (("default", default, None), ("gpu_augment", worker, jitter)):
        dataset = ImageDataset(root, "train.txt", transform, decode=load_image if augment is None else load_for_crop)
        if augment is not None:
            transform.share_grey_levels(dataset.paths)
        loader = DataLoader(
            dataset,
            batch_size=batch,
            sampler=RandomSampler(dataset, num_samples=10**7),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            collate_fn=None if augment is None else pack_crops,
            persistent_workers=workers > 0,
        )
        batches, move = iter(loader), batch_mover(device, channels_last, augment)

        def data(batches=batches, move=move) -> int:
            synchronize(move(next(batches)[0]))
            return batch

        def data_and_step(batches=batches, move=move) -> int:
            step(move(next(batches)[0]), labels)
            synchronize()
            return batch

        works[f"{name}: data only"], works[f"{name}: data + step"] = data, data_and_step
    return rates(works, seconds)


def gather_worker(rank: int, port: int, shapes: dict[str, tuple[int, ...]], repeats: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distributed.setup(cpu=True)
    times = {}
    for name, shape in shapes.items():
        local = torch.randn(shape, requires_grad=True)
        samples = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            distributed.gather_with_grad(local).sum().backward()
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples[2:])
    samples = []
    for _ in range(repeats + 2):  # what agreed_batches adds to every step
        start = time.perf_counter()
        distributed.any_rank(False)
        samples.append(time.perf_counter() - start)
    times["the step's agreement on its batch (any_rank)"] = statistics.median(samples[2:])
    if rank == 0:
        torch.save(times, out)
    distributed.teardown()


def gathers(args: argparse.Namespace, feature_shape: tuple[int, ...], repeats: int = 20) -> dict[str, float]:
    from tests.multiprocess import free_port

    local = args.batch // 2
    shapes = {
        f"embeddings {local}x{feature_shape[0]} per rank": (local, feature_shape[0]),
        f"feature maps {local}x{'x'.join(map(str, feature_shape))} per rank": (local, *feature_shape),
    }
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.pt")
        mp.spawn(gather_worker, args=(free_port(), shapes, repeats, out), nprocs=2)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="training crop of the step and the full loop")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the full loop")
    parser.add_argument("--images", type=int, default=64, help="synthetic JPEGs written")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time of each figure")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a CPU)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--pipeline-only", action="store_true", help="only figure 1, the pipeline's images/s")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {name}, {os.cpu_count()} CPUs, torch {torch.__version__}; {' '.join(sys.argv[1:]) or 'defaults'}")
    with tempfile.TemporaryDirectory() as folder:
        root = write_jpegs(Path(folder), args.images)
        table(
            "1. pipeline, images/s per worker (CUB CE recipe, 500x375 JPEGs)",
            pipelines(root, device, args.seconds),
            "default",
        )
        if args.pipeline_only:
            return
        step_rates = steps(args, device)
        table(
            f"2. step on device-resident batches, images/s ({args.arch}, batch {args.batch}, {args.size} px, "
            f"{device.type})",
            step_rates,
            "float32",
        )
        table(
            f"3. full loop, images/s ({args.workers} workers)",
            full_loops(
                root,
                arch=args.arch,
                batch=args.batch,
                size=args.size,
                workers=args.workers,
                device=device,
                seconds=args.seconds,
            ),
            "default: data + step",
        )
    backbone = get_backbone(args.arch, None)
    side = -(-args.size // 32)  # a ResNet's last feature map
    times = gathers(args, (backbone.out_channels, side, side))
    step_seconds = args.batch / step_rates["float32"]
    print("\n4. gather_with_grad forward + backward, and the batch agreement, 2 gloo processes (CPU)")
    for key, seconds in times.items():
        print(f"  {key:<45} {seconds * 1e3:8.2f} ms  {seconds / step_seconds:6.3f} of a float32 step")


def table(title: str, results: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    for key, value in results.items():
        print(f"  {key:<45} {value:10.1f}  x{value / results[baseline]:.2f}")


if __name__ == "__main__":
    main()
