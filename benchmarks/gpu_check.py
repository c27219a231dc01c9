"""Check and measure every GPU path of the repository in one run of at most 8 minutes; write docs/gpu.md.

    python benchmarks/gpu_check.py                    # on a GPU machine: docs/gpu.md, rewritten after each section
    python benchmarks/gpu_check.py --dry-run          # every section at tiny sizes on the CPU; prints, writes nothing
    python benchmarks/gpu_check.py --sections amp metrix --images data/CUB_200_2011/images

Each section runs in its own Python process under its own time budget (a hang is killed with everything it
started, a CUDA error ends only its process), and streams its rows as it makes them, so that a failure loses
nothing else. A row is a check (verdict ok or FAIL) or a measurement (no verdict). The exit status is 1 when any
check or section failed. The measuring code is the benchmarks' own (bench_pipeline.py, bench_metrix.py,
bench_evaluation.py, bench_checkpoint.py); on the CPU dry run every comparison of the GPU against the CPU compares
the CPU with itself, which keeps the code of every section running in the test suite.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository root
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_checkpoint  # noqa: E402
import bench_evaluation  # noqa: E402
import bench_metrix  # noqa: E402
import bench_pipeline  # noqa: E402
import faiss  # noqa: E402

from models.backbones import get_backbone  # noqa: E402
from models.mixing import mixed_pool  # noqa: E402
from utils.data.specs import DATASETS  # noqa: E402
from utils.evaluation.knn import faiss_has_gpu, resolve_backend  # noqa: E402
from utils.evaluation.metrics import evaluate_embeddings  # noqa: E402
from utils.reporting.recipes import CE_PAPER, RECIPES  # noqa: E402

REPORT = ROOT / "docs" / "gpu.md"
ROW = "ROW "  # how a section's process marks a row on its stdout
GOAL_MINUTES = 10  # the CUB cross-entropy recipe on one GPU
# The full loop's step: the recipe as it is, and with the speed options (amp, channels_last).
LOOP_OPTIONS = {"float32": (None, False), "bf16 + channels_last": ("bf16", True)}


@dataclass(frozen=True)
class Sizes:
    """What every section measures on: the GPU run's sizes, or the dry run's tiny ones."""

    seconds: float  # measuring time of each speed figure
    eval_n: int
    eval_classes: int
    eval_dims: tuple[int, ...]  # the first is also compared with the CPU engine
    amp_arch: str
    amp_batch: int
    amp_size: int
    amp_steps: int
    metrix_arch: str
    metrix_batch: int
    metrix_size: int
    metrix_steps: tuple[int, int]  # warm-up and timed steps of each setup
    step_arch: str
    step_batch: int
    step_size: int
    vit: bool
    compile: bool
    checkpoint_arch: str
    checkpoint_classes: int
    jpegs: int
    workers: int
    loop_options: tuple[str, ...]  # keys of LOOP_OPTIONS
    loop_seconds: float  # measuring time of each full-loop figure (4 figures for each of loop_options)
    digits: tuple[str, ...]  # experiment.py's updates for the torchrun run


GPU = Sizes(
    seconds=3.0,
    eval_n=60502,
    eval_classes=11316,
    eval_dims=(128, 2048),
    amp_arch="resnet18",
    amp_batch=64,
    amp_size=112,
    amp_steps=20,
    metrix_arch="resnet50",
    metrix_batch=100,
    metrix_size=224,
    metrix_steps=(2, 5),
    step_arch="resnet50",
    step_batch=128,
    step_size=224,
    vit=True,
    compile=True,
    checkpoint_arch="resnet50",
    checkpoint_classes=11318,
    jpegs=512,
    workers=16,
    loop_options=("float32", "bf16 + channels_last"),
    loop_seconds=5.0,
    # The small splits: the run checks the path, the time goes to the figures.
    digits=("epochs=1", "dataset.train_file=train_small.txt", "dataset.test_file=test_small.txt"),
)
DRY = Sizes(
    seconds=0.2,
    eval_n=1200,
    eval_classes=300,
    eval_dims=(8,),
    amp_arch="small_cnn",
    amp_batch=4,
    amp_size=16,
    amp_steps=2,
    metrix_arch="small_cnn",
    metrix_batch=10,
    metrix_size=16,
    metrix_steps=(0, 1),
    step_arch="small_cnn",
    step_batch=4,
    step_size=16,
    vit=False,
    compile=False,
    checkpoint_arch="small_cnn",
    checkpoint_classes=10,
    jpegs=8,
    workers=1,
    loop_options=("float32",),
    loop_seconds=0.2,
    digits=(
        "epochs=1",
        "cpu=True",
        "dataset.train_file=train_small.txt",
        "dataset.test_file=test_small.txt",
        "dataset.batch_size=16",
        "dataset.resize=40",
        "dataset.crop_size=32",
        "dataset.num_workers=0",
        "evaluation.recalls=[1,2]",
    ),
)


def emit(check: str, result: str, verdict: str = "") -> None:
    """One row of the running section, printed at once: a later hang or crash keeps it."""
    print(ROW + json.dumps([check, result, verdict]), flush=True)


def verdict(passed: bool) -> str:
    return "ok" if passed else "FAIL"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The sections: each takes the sizes, the device and the command line's settings and emits its rows.


def evaluation(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """faiss-gpu and the torch engine on the device give the CPU engine's numbers; their SOP-size times."""
    emit("evaluation.backend=auto on this device", resolve_backend("auto", device.type == "cuda"))
    backends = ["torch", "faiss-gpu"] if device.type == "cuda" else ["torch"]
    if device.type == "cuda" and not faiss_has_gpu():
        emit("faiss-gpu", "faiss has no GPU support: pip install -r requirements-gpu.txt (README)", "FAIL")
        backends.remove("faiss-gpu")
    for dim in sizes.eval_dims:
        embeddings, labels = bench_evaluation.synthetic_embeddings(sizes.eval_n, dim, sizes.eval_classes)
        shape = f"{sizes.eval_n} x {dim}"
        reference, reference_name = None, ""
        if dim == sizes.eval_dims[0]:  # the CPU engine only here: minutes at 2048 dimensions
            reference, seconds = evaluate(embeddings, labels, "faiss", torch.device("cpu"))
            reference_name = "the CPU engine's"
            emit(f"{shape}: CPU faiss, {os.cpu_count()} CPUs", f"{seconds:.2f} s, R@1 {reference['R@1']:.4f}")
        on_device = torch.from_numpy(embeddings).to(device)
        for backend in backends:
            try:
                results, seconds = evaluate(on_device, labels, backend, device)
            except RuntimeError as error:  # faiss's GPU kernels may not serve this GPU: the torch engine still can
                emit(f"{shape}: {backend} on {device.type}", f"failed: {last_line(str(error))}", "FAIL")
                continue
            emit(f"{shape}: {backend} on {device.type}", f"{seconds:.2f} s, R@1 {results['R@1']:.4f}")
            if reference is None:
                reference, reference_name = results, f"{backend}'s"
                continue
            gap = max(abs(results[key] - reference[key]) for key in reference)
            # One query of 60,502 moves a metric by 1.7e-5: distances rounded differently may reorder a near tie.
            emit(f"{shape}: {backend} metrics against {reference_name}", f"largest gap {gap:.1e}", verdict(gap < 1e-4))


def evaluate(
    embeddings: np.ndarray | torch.Tensor, labels: np.ndarray, backend: str, device: torch.device
) -> tuple[dict[str, float], float]:
    """SOP's Recall@K, MAP@R and R-Precision (cosine) through the engine's public entry, and its seconds."""
    start = time.perf_counter()
    results = evaluate_embeddings(embeddings, labels, ks=DATASETS["sop"].recalls, distances=["cosine"], backend=backend)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {key.removeprefix("cosine/"): value for key, value in results.items() if key.startswith("cosine/")}, seconds


def amp(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """fp16 (with the scaler) and bf16 steps stay finite and track float32's loss step by step."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand(sizes.amp_batch, 3, sizes.amp_size, sizes.amp_size, generator=generator).to(device),
            torch.randint(0, 100, (sizes.amp_batch,), generator=generator).to(device),
        )
        for _ in range(sizes.amp_steps)
    ]
    losses = {}
    for precision in (None, "bf16", "fp16"):
        if precision == "fp16" and device.type == "cpu":
            emit("fp16 with the gradient scaler", "skipped: fp16 needs a GPU (amp=fp16 is refused on the CPU)")
            continue
        step = bench_pipeline.make_step(bench_pipeline.fresh_backbone(sizes.amp_arch), device, precision, False, False)
        losses[precision] = torch.stack([step(images, labels).float() for images, labels in batches]).cpu()
    reference = losses.pop(None)
    emit(f"float32: {sizes.amp_steps} steps of {sizes.amp_arch}", f"loss {reference[0]:.4f} -> {reference[-1]:.4f}")
    for precision, curve in losses.items():
        finite = bool(curve.isfinite().all())
        gap = float(((curve - reference).abs() / reference.abs()).max())
        emit(
            f"{precision}: {sizes.amp_steps} steps finite, loss within 5% of float32's at every step",
            f"loss {curve[0]:.4f} -> {curve[-1]:.4f}, largest relative gap {gap:.2%}",
            verdict(finite and gap < 0.05),
        )


def metrix(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """Feature mixing on the device gives the CPU's values and gradients; Metrix's cost against the plain step."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(16, 64, 7, 7, generator=generator)
    first, second = torch.randint(0, 16, (2, 200), generator=generator)
    lam = torch.rand(200, generator=generator)
    weights = torch.randn(200, 64, generator=generator)
    outputs = {}
    for where in (torch.device("cpu"), device):
        for pairs, mixing in (("grid", lam[0]), ("per pair", lam)):  # one lam per step, or one per pair
            leaf = maps.to(where).requires_grad_()
            pooled = mixed_pool(leaf, first.to(where), second.to(where), mixing.to(where), "avg+max")
            (pooled * weights.to(where)).sum().backward()
            outputs[where.type, pairs] = pooled.detach().cpu(), leaf.grad.cpu()
    for pairs in ("grid", "per pair"):
        (value, grad), (cpu_value, cpu_grad) = outputs[device.type, pairs], outputs["cpu", pairs]
        value_gap, grad_gap = float((value - cpu_value).abs().max()), float((grad - cpu_grad).abs().max())
        emit(
            f"feature mixing (avg+max, lam {pairs}) on {device.type} against the CPU",
            f"largest value gap {value_gap:.1e}, gradient gap {grad_gap:.1e}",
            verdict(value_gap < 1e-4 and grad_gap < 1e-4),
        )
    settings = bench_metrix.parse_args(
        ["--arch", sizes.metrix_arch, "--batch", str(sizes.metrix_batch), "--image-size", str(sizes.metrix_size)]
        + ["--warmup", str(sizes.metrix_steps[0]), "--repeats", str(sizes.metrix_steps[1]), "--device", device.type]
    )
    times = bench_metrix.time_layout("balanced", settings, device)
    median = {name: float(np.median(values)) for name, values in times.items()}
    emit(
        f"plain step ({sizes.metrix_arch}, {sizes.metrix_size} px, batch {sizes.metrix_batch}, B/5 classes x 5)",
        f"{median['baseline'] * 1e3:.1f} ms",
    )
    for name in list(median)[1:]:
        emit(f"Metrix {name}: step time / plain step", f"x{median[name] / median['baseline']:.2f}")


def augment(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """The device part of gpu_augment on this device draws the CPU default pipeline's crops and colours."""
    from tests.test_device_augment import SAMPLES, SETTINGS, colours, default_pipeline, geometry, p_values, photo, ramps
    from utils.data.device_augment import build_split_pipeline, pack_crops

    def split_on_device(image, color_jitter, seed: int) -> torch.Tensor:
        worker, device_part = build_split_pipeline(color_jitter=color_jitter, **SETTINGS)
        torch.manual_seed(seed)
        batch, _ = pack_crops([(worker(image), 0) for _ in range(SAMPLES)])
        return device_part(batch, device).cpu()

    same = (default_pipeline(ramps(), None, seed=0) - split_on_device(ramps(), None, seed=0)).abs()
    largest = float(same.mean(dim=(1, 2, 3)).max())
    emit(
        "the same seed crops the same boxes (mean pixel gap below 0.01)",
        f"largest {largest:.4f}",
        verdict(largest < 0.01),
    )
    p = p_values(geometry, default_pipeline(ramps(), None), split_on_device(ramps(), None, seed=1))
    emit(
        "crop position, size and flip: KS p > 0.001",
        f"smallest p {min(p.values()):.3f}",
        verdict(min(p.values()) > 1e-3),
    )
    for name, jitter in (("CUB", (0.25, 0.25, 0.25, 0)), ("Cars", (0.3, 0.3, 0.3, 0.1))):
        p = p_values(colours, default_pipeline(photo(), jitter), split_on_device(photo(), jitter, seed=1))
        emit(
            f"colour means and spreads under {name}'s jitter: KS p > 0.001",
            f"smallest p {min(p.values()):.3f}",
            verdict(min(p.values()) > 1e-3),
        )


def torchrun(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """The digits under torchrun, then its checkpoint resumed on the CPU; on a GPU, NCCL in a world of one rank."""
    from utils.data.digits import prepare_digits, write_small_splits

    with tempfile.TemporaryDirectory() as folder:
        data, runs = Path(folder) / "digits", Path(folder) / "runs"
        prepare_digits(data)
        write_small_splits(data, per_class=10)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        command += ["experiment.py", "-F", str(runs), "with", f"dataset.data_path={data}", *sizes.digits]
        done, seconds = timed_run(command)
        status = run_status(runs / "1")
        emit(
            f"torchrun --nproc_per_node=1 experiment.py: an epoch of the digits on {device.type}",
            f"{status} in {seconds:.0f} s" + ("" if done.returncode == 0 else f": {last_line(done.stderr)}"),
            verdict(status == "COMPLETED"),
        )
        if status == "COMPLETED":
            resume_on_the_cpu(runs, device)
    if device.type == "cuda":
        nccl_all_reduce(device)


def resume_on_the_cpu(runs: Path, device: torch.device) -> None:
    command = [sys.executable, "experiment.py", "-F", str(runs), "with", f"resume={runs / '1'}", "cpu=True"]
    done, seconds = timed_run([*command, "epochs=2"])
    resumed = newest_run(runs)  # a resumed run is a new sacred run
    status = run_status(resumed) if resumed.name != "1" else "no new run"
    emit(
        f"its checkpoint ({device.type}) resumed on the CPU for one more epoch",
        f"{status} in {seconds:.0f} s" + ("" if done.returncode == 0 else f": {last_line(done.stderr)}"),
        verdict(done.returncode == 0 and status == "COMPLETED"),
    )


def nccl_all_reduce(device: torch.device) -> None:
    """A world of one rank starts no process group in utils/distributed.setup: NCCL itself, checked apart."""
    import torch.distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", device_id=device)
    tensor = torch.arange(4.0, device=device)
    dist.all_reduce(tensor)
    emit("NCCL process group of one rank: all_reduce", str(tensor.tolist()), verdict(tensor.tolist() == [0, 1, 2, 3]))
    dist.destroy_process_group()


def free_port() -> int:
    from tests.multiprocess import free_port as port

    return port()


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def timed_run(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = run(command)
    return done, time.perf_counter() - start


def run_status(run_dir: Path) -> str:
    path = run_dir / "run.json"
    return json.loads(path.read_text())["status"] if path.exists() else "no run.json"


def newest_run(runs: Path) -> Path:
    numbered = [path for path in runs.iterdir() if path.name.isdigit()]
    return max(numbered, key=lambda path: int(path.name))


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def checkpoint(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """Write time of the full checkpoint of a ResNet-50 SOP run, from the device."""
    cost = bench_checkpoint.checkpoint_cost(
        arch=sizes.checkpoint_arch,
        num_features=512,
        classes=sizes.checkpoint_classes,
        repeats=3,
        directory=tempfile.gettempdir(),
        device=device,
    )
    emit(
        f"checkpoint of {sizes.checkpoint_arch}, 512-d, {sizes.checkpoint_classes:,} classes, Adam, from {device.type}",
        f"{cost['bytes'] / 2**20:.0f} MiB, write + fsync + read back {cost['median_s']:.2f} s (median of 3)",
    )


def steps(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """Images/s of the training step: float32, bf16, fp16, channels_last; then, last, compiled (slow to compile)."""
    low = "fp16" if device.type == "cuda" else "bf16"
    variants: bench_pipeline.Variants = {
        "float32": (None, False, False),
        "bf16": ("bf16", False, False),
        "channels_last": (None, True, False),
        "bf16 + channels_last": ("bf16", True, False),
    }
    if device.type == "cuda":
        variants |= {"fp16": ("fp16", False, False), "fp16 + channels_last": ("fp16", True, False)}
    resnet = f"{sizes.step_arch}, batch {sizes.step_batch}, {sizes.step_size} px"
    vit = f"ViT-S/16, batch {sizes.step_batch}, 224 px"
    plain = {"float32": (None, False, False), "bf16": ("bf16", False, False)}
    baselines = {resnet: report_rates(resnet, step_rates(variants, resnet_backbone(sizes), sizes, device))}
    if sizes.vit:
        baselines[vit] = report_rates(vit, step_rates(plain, vit_small, sizes, device))
    if sizes.compile:  # each model apart, so that a compilation over the budget loses only itself
        compiled = {f"{low} + channels_last + compile": (low, True, True)}
        report_rates(resnet, step_rates(compiled, resnet_backbone(sizes), sizes, device), baselines[resnet])
        if sizes.vit:
            compiled = {"bf16 + compile": ("bf16", False, True)}
            report_rates(vit, step_rates(compiled, vit_small, sizes, device), baselines[vit])


def resnet_backbone(sizes: Sizes) -> Callable[[], nn.Module]:
    return lambda: bench_pipeline.fresh_backbone(sizes.step_arch)


def step_rates(
    variants: bench_pipeline.Variants, backbone: Callable[[], nn.Module], sizes: Sizes, device: torch.device
) -> dict[str, float]:
    return bench_pipeline.step_rates(
        variants,
        backbone=backbone,
        batch=sizes.step_batch,
        size=sizes.step_size,
        device=device,
        seconds=sizes.seconds,
    )


def report_rates(shape: str, rates: dict[str, float], float32: float | None = None) -> float:
    """Rows of images/s, with ratios to float32's rate (measured here, or given); that rate."""
    float32 = float32 or rates["float32"]
    for name, rate in rates.items():
        emit(f"step images/s, {shape}: {name}", f"{rate:.0f} (x{rate / float32:.2f})")
    return float32


def vit_small() -> nn.Module:
    """ViT-S/16 (DINO's architecture) from the backbone registry, with random weights."""
    torch.manual_seed(0)
    return get_backbone("vit_s16_dino", None)


def loop(sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    """The data pipeline against the step, and the full loop on CUB-sized JPEGs: the CUB CE recipe's wall time."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(args.images) if args.images else bench_pipeline.write_jpegs(Path(folder), sizes.jpegs)
        if args.images:
            root = split_file(root, Path(folder))
        for name, rate in bench_pipeline.pipelines(root, device, sizes.seconds, sizes.step_batch).items():
            emit(f"one worker, CUB CE pipeline: {name}", f"{rate:.0f} images/s")
        loops = {}
        for options in sizes.loop_options:
            amp, channels_last = LOOP_OPTIONS[options]
            rates = bench_pipeline.full_loops(
                root,
                arch=sizes.step_arch,
                batch=sizes.step_batch,
                size=sizes.step_size,
                workers=sizes.workers,
                device=device,
                seconds=sizes.loop_seconds,
                amp=amp,
                channels_last=channels_last,
            )
            for name, rate in rates.items():
                emit(f"full loop, workers: {sizes.workers}, step in {options}: {name}", f"{rate:.0f} images/s")
            loops[options] = rates
    forward = forward_rate(sizes, device)
    emit(f"embedding (forward only, float32, {sizes.step_arch})", f"{forward:.0f} images/s")
    for options, rates in loops.items():
        for pipeline in ("default", "gpu_augment"):
            minutes = projected_minutes(rates[f"{pipeline}: data + step"], min(forward, rates["default: data only"]))
            emit(
                f"projected CUB CE recipe ({sizes.step_arch}), {options}, {pipeline}, workers: {sizes.workers}",
                f"{minutes:.1f} min (goal: under {GOAL_MINUTES})",
                verdict(minutes < GOAL_MINUTES) if device.type == "cuda" else "",
            )


def split_file(images: Path, folder: Path) -> Path:
    """A train.txt over every JPEG under images (one class: the loop measures speed), in folder, linked to them."""
    paths = sorted(images.rglob("*.jpg"))
    (folder / "images").symlink_to(images.resolve())
    lines = [f"images/{path.relative_to(images)},0\n" for path in paths]
    (folder / "train.txt").write_text("".join(lines))
    return folder


def forward_rate(sizes: Sizes, device: torch.device) -> float:
    model = bench_pipeline.fresh_backbone(sizes.step_arch).to(device).eval()
    images = torch.rand(256 if device.type == "cuda" else 8, 3, sizes.step_size, sizes.step_size, device=device)

    @torch.inference_mode()
    def work() -> int:
        model(images)
        synchronize(device)
        return images.shape[0]

    return bench_pipeline.rates({"forward": work}, sizes.seconds)["forward"]


def projected_minutes(train_rate: float, embed_rate: float) -> float:
    """The CE paper's CUB line: its epochs over the training split, and an evaluation of the test split before
    training, after every epoch and once more at the end (eval_every=1)."""
    recipe = next(r for r in RECIPES if r.paper == CE_PAPER and " dataset.cub " in r.command)
    epochs = int(re.search(r"epochs=(\d+)", recipe.command).group(1))
    (train_images, _), (test_images, _) = DATASETS["cub"].expected.values()
    return (epochs * train_images / train_rate + (epochs + 2) * test_images / embed_rate) / 60


# name: (time budget in seconds on the GPU, the section); they add up to 8 minutes with the processes' start-up.
SECTIONS: dict[str, tuple[int, Callable[[Sizes, torch.device, argparse.Namespace], None]]] = {
    "evaluation": (45, evaluation),
    "amp": (25, amp),
    "metrix": (35, metrix),
    "augment": (25, augment),
    "torchrun": (65, torchrun),
    "checkpoint": (20, checkpoint),
    "steps": (150, steps),
    "loop": (110, loop),
}
DRY_BUDGET = 300  # seconds per section: a watchdog only, on a CPU other jobs may load


def environment(dry_run: bool) -> str:
    device = "CPU dry run" if dry_run else gpu_name()
    versions = (
        f"driver {nvidia_driver()}, CUDA {torch.version.cuda}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, faiss {faiss.__version__} ({'with' if faiss_has_gpu() else 'without'} GPU)"
    )
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    return f"{when}, {device}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {versions}"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def nvidia_driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    done = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def time_budget(name: str, args: argparse.Namespace) -> int:
    return args.budget.get(name) or (DRY_BUDGET if args.dry_run else SECTIONS[name][0])


def budgets(words: list[str]) -> dict[str, int]:
    """--budget's NAME=SECONDS words as a dict, or one line that says what is wrong."""
    found = {}
    for word in words:
        name, _, seconds = word.partition("=")
        if name not in SECTIONS or not seconds.isdigit() or int(seconds) == 0:
            sys.exit(f"gpu_check: --budget {word}: give NAME=SECONDS with NAME one of {', '.join(SECTIONS)}")
        found[name] = int(seconds)
    return found


def run_section(name: str, args: argparse.Namespace) -> tuple[list[list[str]], float]:
    """The section in its own process group, killed whole at its budget; its rows, and a FAIL row when it did
    not end cleanly."""
    budget = time_budget(name, args)
    command = [sys.executable, __file__, "--section", name, *(["--dry-run"] if args.dry_run else [])]
    command += ["--images", args.images] if args.images else []
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=budget)
        ending = None if process.returncode == 0 else f"FAILED (exit {process.returncode}): {last_line(err)}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # with its DataLoader workers and torchrun's children
        out, err = process.communicate()
        ending = f"TIMEOUT: killed after its budget of {budget} s; {last_line(err)}"
    rows = [json.loads(line[len(ROW) :]) for line in out.splitlines() if line.startswith(ROW)]
    if ending:
        rows.append(["section", ending, "FAIL"])
    return rows, time.perf_counter() - start


def markdown(header: str, sections: dict[str, tuple[list[list[str]], float]], args: argparse.Namespace) -> str:
    command = " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]])
    lines = ["# GPU check", "", f"Written by `{command}` (docs/speed.md): {header}."]
    for name, (rows, seconds) in sections.items():
        lines += [
            "",
            f"## {name} ({seconds:.0f} s of its {time_budget(name, args)} s)",
            "",
            "| check | result | verdict |",
            "|---|---|---|",
        ]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; print, leave docs/gpu.md")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--images", help="a folder of JPEGs (e.g. CUB's images) for the loop instead of synthetic")
    parser.add_argument(
        "--budget", nargs="+", default=[], metavar="NAME=SECONDS", help="another time budget for these sections"
    )
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # internal: run one section
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.budget = budgets(args.budget)
    if args.section:
        device = torch.device("cpu" if args.dry_run else "cuda")
        SECTIONS[args.section][1](DRY if args.dry_run else GPU, device, args)
        return
    if args.images and not any(Path(args.images).rglob("*.jpg")):
        sys.exit(f"gpu_check: --images {args.images}: no .jpg file under it; give a folder of JPEGs or leave it out")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no GPU visible to torch; on a CPU run `python benchmarks/gpu_check.py --dry-run`")
    header = environment(args.dry_run)
    done: dict[str, tuple[list[list[str]], float]] = {}
    for name in args.sections:
        done[name] = run_section(name, args)
        print(f"{name}: {len(done[name][0])} rows in {done[name][1]:.0f} s", file=sys.stderr, flush=True)
        if not args.dry_run:
            REPORT.write_text(markdown(header, done, args))
    print(markdown(header, done, args))
    failed = any(row[2] == "FAIL" for rows, _ in done.values() for row in rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
