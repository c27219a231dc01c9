"""Cost of Metrix in a training step: time relative to the same step without mixing, and peak memory.

    python benchmarks/bench_metrix.py                       # the defaults below, a few minutes on 2 CPU cores
    python benchmarks/bench_metrix.py --batch 64 --repeats 3 --loss multisimilarity --memory-batches 32 64

A step is forward, loss, backward and an Adam step of small_cnn (the repo's CPU model; --arch another backbone) on
random 32 px images, for two label layouts. Every setup trains its own copy of the same initial model; the setups
take turns, one step each, so that load from other processes spreads evenly over them, and each time is the median
over the repeats after the warm-up steps (the first steps of a process run much slower). Peak memory is measured in
a fresh subprocess per configuration, the median of --memory-repeats of them: on the CPU the peak resident set size
(VmHWM, reset before the first step) above what the process held then, on CUDA torch.cuda.max_memory_allocated. On
the CPU that peak includes what the allocator keeps after a free, which varies from process to process; --memory
live fixes glibc's mmap threshold so that it is the peak of the live tensors.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script, the repository root is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses.contrastive import ContrastiveLoss  # noqa: E402
from losses.criterion import Criterion  # noqa: E402
from losses.metrix import Metrix  # noqa: E402
from losses.multi_similarity import MultiSimilarityLoss  # noqa: E402
from models.backbones import get_backbone  # noqa: E402
from models.metric_model import EmbeddingHead, MetricModel  # noqa: E402

# wall: elapsed time; cpu: CPU time of this process (all its threads), less disturbed by other processes' load on
# shared cores (CPU only: a GPU's work is not in it).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
LAYOUTS = {"random": "random labels over 100 classes", "balanced": "B/5 classes x 5 images"}


@dataclass(frozen=True)
class Setup:
    name: str
    mode: str | None = None  # None: no mixing (the baseline)
    max_pairs: int | None = None


def timing_setups(cap: int, input_all_pairs: bool) -> list[Setup]:
    # Input mode with all B (B - 1) pairs runs the backbone on ~B times the batch: opt-in only.
    setups = [
        Setup("baseline"),
        Setup("embed", "embed"),
        Setup("feature", "feature"),
        Setup(f"feature, cap {cap}", "feature", cap),
        Setup(f"input, cap {cap}", "input", cap),
    ]
    return setups + [Setup("input", "input")] if input_all_pairs else setups


def memory_setups(cap: int) -> list[Setup]:
    return [
        Setup("baseline"),
        Setup("embed", "embed"),
        Setup("feature", "feature"),
        Setup(f"feature, cap {cap}", "feature", cap),
        Setup(f"input, cap {cap}", "input", cap),
    ]


def make_labels(layout: str, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if layout == "random":
        return torch.randint(0, 100, (batch,), generator=generator)
    return torch.arange(batch).div(5, rounding_mode="floor")


def usable_pairs(labels: torch.Tensor) -> tuple[int, int]:
    """How many ordered pairs some anchor sees: (positive-negative, anchor-negative with Metrix's default
    anchor_negative="no_positive")."""
    different = labels[:, None] != labels[None, :]
    has_positive = (~different).sum(dim=1) > 1
    return int((different & has_positive[:, None]).sum()), int((different & ~has_positive[:, None]).sum())


def build(
    setup: Setup, loss_name: str, device: torch.device, arch: str = "small_cnn"
) -> tuple[MetricModel, Criterion, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights for every setup
    backbone = get_backbone(arch, None)
    model = MetricModel(backbone, EmbeddingHead(backbone.out_channels, 128, pooling="avg+max"))
    loss = ContrastiveLoss() if loss_name == "contrastive" else MultiSimilarityLoss()
    mixer = Metrix(setup.mode, max_pairs=setup.max_pairs) if setup.mode else None
    criterion = Criterion({loss_name: (1.0, loss)}, mixer)
    model.to(device).train()
    return model, criterion, torch.optim.Adam(model.parameters(), lr=1e-4)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model: MetricModel,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    loss, _ = criterion(model, images, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_layout(layout: str, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds per timed step of every setup, the setups taking turns."""
    labels = make_labels(layout, args.batch).to(device)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    setups = timing_setups(args.cap, args.input_all_pairs)
    runs = {setup.name: build(setup, args.loss, device, args.arch) for setup in setups}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.warmup + args.repeats):
        for name, (model, criterion, optimizer) in runs.items():
            torch.manual_seed(repeat)  # the same strategy draws for every setup
            synchronize(device)
            start = CLOCKS[args.clock]()
            train_step(model, criterion, optimizer, images, labels)
            synchronize(device)
            if repeat >= args.warmup:
                times[name].append(CLOCKS[args.clock]() - start)
    return times


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith(field + ":"))
    return int(kib) / 2**10


def reset_peak_rss() -> None:
    """Start VmHWM afresh at the current RSS: importing torch peaks higher than a small step."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def probe_memory(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Run in the subprocess: peak memory of a few steps of one setup, in MiB."""
    setup = next(s for s in memory_setups(args.cap) if s.name == args.memory_probe)
    labels = make_labels("balanced", args.batch).to(device)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    model, criterion, optimizer = build(setup, args.loss, device, args.arch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    before = status_mb("VmRSS")
    for _ in range(2):  # the second step also holds Adam's state
        train_step(model, criterion, optimizer, images, labels)
    synchronize(device)
    if device.type == "cuda":
        return {"peak": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak": status_mb("VmHWM") - before}


# --memory live on the CPU: glibc then serves every allocation from 64 KiB up with its own mmap and unmaps it
# when freed (by default the threshold grows as large blocks are freed, and freed memory stays in the heap), so
# the peak RSS is the peak of the tensors alive at once, the same in every process.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}


def measure_memory(args: argparse.Namespace, batch: int) -> dict[str, float]:
    """Peak memory of every memory setup at this batch size, each in a fresh Python process: the median of
    --memory-repeats processes (on the CPU the peak RSS of one process varies by 10-20 MiB)."""
    env = os.environ | LIVE_MEMORY_ENV if args.memory == "live" else None
    peaks: dict[str, list[float]] = {setup.name: [] for setup in memory_setups(args.cap)}
    for _ in range(args.memory_repeats):
        for name in peaks:  # the setups take turns, as in the timing
            command = [
                sys.executable,
                __file__,
                "--memory-probe",
                name,
                "--batch",
                str(batch),
                "--cap",
                str(args.cap),
                "--image-size",
                str(args.image_size),
                "--loss",
                args.loss,
                "--device",
                args.device,
                "--arch",
                args.arch,
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            peaks[name].append(json.loads(output.strip().splitlines()[-1])["peak"])
    return {name: statistics.median(values) for name, values in peaks.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other processes sharing the cores slow the steps down."""
    return " ".join(f"{load:.1f}" for load in os.getloadavg())


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def timing_table(args: argparse.Namespace, device: torch.device) -> str:
    names = [setup.name for setup in timing_setups(args.cap, args.input_all_pairs)]
    header = ["labels", "usable pairs PN / AN", "baseline s/step", *[f"{name} (x)" for name in names[1:]]]
    rows = []
    for layout, description in LAYOUTS.items():
        times = time_layout(layout, args, device)
        median = {name: statistics.median(values) for name, values in times.items()}
        fastest = {name: min(values) for name, values in times.items()}
        positive_negative, anchor_negative = usable_pairs(make_labels(layout, args.batch))
        rows.append(
            [
                description,
                f"{positive_negative} / {anchor_negative}",
                f"{median['baseline']:.3f} ({fastest['baseline']:.3f})",
                *[
                    f"{median[name] / median['baseline']:.2f} ({fastest[name] / fastest['baseline']:.2f})"
                    for name in names[1:]
                ],
            ]
        )
    return markdown(header, rows)


def memory_table(args: argparse.Namespace) -> str:
    names = [setup.name for setup in memory_setups(args.cap)]
    rows = []
    for batch in args.memory_batches:
        peaks = measure_memory(args, batch)
        rows.append([str(batch), str(batch * (batch - 1)), *[f"{peaks[name]:.0f}" for name in names]])
    return markdown(["batch", "all pairs", *[f"{name} (MiB)" for name in names]], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings; argv (default: sys.argv's) lets another benchmark take them with its own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_cnn", help="backbone of the step (models/backbones.py)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cap", type=int, default=200, help="max_pairs of the capped setups")
    parser.add_argument("--loss", choices=("contrastive", "multisimilarity"), default="contrastive")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setup")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per setup (the median is reported)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="what a step's time is")
    parser.add_argument("--input-all-pairs", action="store_true", help="also time input mode without a cap")
    parser.add_argument(
        "--memory-batches",
        type=int,
        nargs="*",
        default=[50, 100, 150],
        help="batch sizes of the memory table (none: skip it)",
    )
    parser.add_argument(
        "--memory",
        choices=("rss", "live"),
        default="rss",
        help="CPU only: rss, the peak RSS as the allocator leaves it (the issue's measure); live, "
        "the peak of the tensors alive at once (glibc's mmap threshold fixed at 64 KiB)",
    )
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="fresh processes per memory figure (the median is reported)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one memory measurement
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.memory_probe:
        print(json.dumps(probe_memory(args, device)))
        return
    started = time.perf_counter()
    print(f"# Metrix step cost: {machine(device)}, torch {torch.__version__}; load average {load_average()}")
    print(
        f"{args.arch} at {args.image_size} px, batch {args.batch}, {args.loss} loss, Metrix's defaults (the "
        f"released code's: random strategy, one lam per step, mix weight 0.4), Adam; median of {args.repeats} "
        f"steps after {args.warmup} warm-up\n"
    )
    # Other processes' load inflates wall times: the fastest step is the least disturbed one.
    print(
        f"Step time ({args.clock} clock) relative to the baseline (no mixing) in the same run, median (and fastest) "
        f"step:\n"
    )
    print(timing_table(args, device), flush=True)
    if args.memory_batches:
        kind = "peak RSS above the idle process"
        if args.memory == "live":
            kind += ", glibc's mmap threshold fixed at 64 KiB: the tensors alive at once"
        if device.type == "cuda":
            kind = "max_memory_allocated"
        print(
            f"\nPeak memory of two steps ({kind}), B/5 classes x 5 images, median of {args.memory_repeats} processes:\n"
        )
        print(memory_table(args))
    print(f"\n({time.perf_counter() - started:.0f} s in all; load average at the end {load_average()})")


if __name__ == "__main__":
    main()
