"""What a full checkpoint costs: size on disk and seconds to write it (atomically, flushed and read back).

    python benchmarks/bench_checkpoint.py                 # ResNet-50, 512-d embedding, Adam, 11,318 classes (SOP)

The checkpoint holds the model, the objective's parameters (here cross-entropy's classifier), Adam's two
moments, the best epoch's weights, the random states and the config: utils/engine/checkpoint.py's
training_checkpoint, as the driver writes it.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a script, the repository root is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from models.backbones import get_backbone  # noqa: E402
from models.metric_model import EmbeddingHead, MetricModel  # noqa: E402
from utils.engine.checkpoint import save_checkpoint, training_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--num-features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11318)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (the disk is measured too)")
    args = parser.parse_args()

    backbone = get_backbone(args.arch, None)
    model = MetricModel(backbone, EmbeddingHead(backbone.out_channels, args.num_features, "avg+max", remap=True))
    objective = CrossEntropyLoss(args.num_features, args.classes)
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()])
    for p in optimizer.param_groups[0]["params"]:  # one step's worth of state: Adam's two moments
        p.grad = torch.zeros_like(p)
    optimizer.step()
    checkpoint = training_checkpoint(
        epoch=1,
        iteration=0,
        iterations=1,
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        best=(0, {"cosine/R@1": 0.0}, model.state_dict()),
        stale_evaluations=0,
        settings={},
        code={},
        rebuild={},
        curves={},
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = Path(directory) / "checkpoint.pt"
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            save_checkpoint(checkpoint, path)
            seconds.append(time.perf_counter() - start)
        size = path.stat().st_size
    parameters = sum(p.numel() for p in [*model.parameters(), *objective.parameters()])
    median = sorted(seconds)[len(seconds) // 2]
    print(
        f"{args.arch}, {args.num_features}-d, {args.classes:,} classes: {parameters / 1e6:.1f} M parameters; "
        f"checkpoint {size / 2**20:.0f} MiB; write + fsync + read back: median {median:.2f} s "
        f"(fastest {min(seconds):.2f} s) in {args.dir}"
    )


if __name__ == "__main__":
    main()
