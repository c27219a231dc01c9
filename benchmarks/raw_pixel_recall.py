"""The floor an embedding must beat: retrieval metrics of raw pixels on a data set's test split.

    python benchmarks/raw_pixel_recall.py                   # the digits default, a second
    python benchmarks/raw_pixel_recall.py --data-path data/CUB_200_2011 --crop-size 64 --resize 72

Each test image goes through the experiments' test transform (resize, centre crop, ImageNet
normalisation) and is flattened into one vector; the vectors are evaluated like embeddings.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.image_dataset import ImageDataset  # noqa: E402
from utils.data.transforms import build_transforms  # noqa: E402
from utils.engine.training import format_metrics  # noqa: E402
from utils.evaluation.metrics import evaluate_embeddings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="data/digits")
    parser.add_argument("--test-file", default="test.txt")
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--recalls", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()

    # Only the test transform is used; the augmentation arguments are the dataset ingredient's defaults.
    _, test_transform = build_transforms(args.crop_size, args.resize, (0.5, 1.0), (3 / 4, 4 / 3), None, None, False)
    test = ImageDataset(args.data_path, args.test_file, test_transform)
    pixels = torch.stack([test[i][0].flatten() for i in range(len(test))])
    metrics = evaluate_embeddings(
        pixels, test.targets, ks=args.recalls, metrics=("recall", "map_at_r", "r_precision", "nmi")
    )
    print(f"{len(test)} test images of {args.data_path}, {pixels.shape[1]} pixel values each")
    print(format_metrics("Raw pixels", metrics))


if __name__ == "__main__":
    main()
