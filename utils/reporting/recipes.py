"""The paper recipes: one entry per published result, with its command line, figure and relation to released code.

The README's "Reproduce the papers" table and docs/recipes.md are generated from RECIPES, `python -m utils.report`
puts the published R@1 beside a run of a recipe, and tests/recipes.json pins each recipe's resolved
configuration. After changing an entry, regenerate the two documents:

    python -m utils.reporting.recipes --write
"""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CE_PAPER = "CE paper"  # Boudiaf et al., ECCV 2020
METRIX_PAPER = "Metrix paper"  # Venkataramanan et al., ICLR 2022
HYP_VIT_PAPER = "Hyp-ViT paper"  # Ermolov et al., CVPR 2022
SOURCES = {
    CE_PAPER: "Boudiaf et al., ECCV 2020, the comparison with the state of the art (ResNet-50, 2048-d)",
    METRIX_PAPER: "Venkataramanan et al., ICLR 2022, the table of each loss with and without Metrix/feature "
    "(ResNet-50, 512-d)",
    HYP_VIT_PAPER: "Ermolov et al., 'Hyperbolic Vision Transformers: Combining Improvements in Metric Learning', CVPR "
    "2022, the results table's Sph-DINO line (ViT-S/16 DINO, 384-d, on the sphere)",
}
RELEASED = {
    CE_PAPER: "github.com/jeromerony/dml_cross_entropy (sacred, `experiment.py with ...`)",
    METRIX_PAPER: "github.com/billpsomas/Metrix_ICLR22 (argparse, `main.py ...`)",
    HYP_VIT_PAPER: "github.com/htdt/hyp_metric (argparse, `train.py ...`)",
}

# What a recipe takes over from its paper's released code, from a line-by-line reading of that code.
FOLLOWS = {
    "C1": "SGD with a warm cosine schedule, batch 128, random batches, frozen BatchNorm statistics, dropout 0.5 "
    "before a zero-initialised classifier, label smoothing 0.1, the 2048-d pooled ResNet-50 features",
    "F1": "the optimisation of `metrix_recipe`: Adam 1e-4, weight decay 1e-4, step decay 0.1 every 10 epochs, one "
    "warm-up epoch of the new layers, frozen BatchNorm, clipping at 10, batch 100, 60 epochs, proxies at 100x the "
    "learning rate",
    "F2": "ResNet-50 from torchvision's `IMAGENET1K_V1` weights, GAP + GMP summed, a 512-d L2-normalised embedding",
    "F3": "the mixing strategy drawn per step; anchor-negative mixing only for anchors without a positive in the "
    "batch (`metrix.anchor_negative=no_positive`)",
    "F4": "one lam ~ Beta(2, 2) per step (`metrix.lam=per_batch`)",
    "F5": "mixed-loss weight 0.4 (0.3 on anchor-negative steps in embed mode), all pairs in feature mode",
    "F6": "random batches on CUB and Cars, balanced batches of 5 images per class on SOP and In-Shop "
    "(`dataset.pair_batches=True` takes the sampler from the data set's specification)",
    "V1": "the optimisation of `vit_recipe`: AdamW at a constant 1e-5 with torch's weight decay 0.01, gradient norms "
    "clipped at 3, batches of 900 images (882 on Cars) of distinct classes, 9 per class on CUB and Cars and 2 on "
    "SOP and In-Shop, the pairwise cross-entropy at temperature 0.1 (`loss.ntxent`)",
    "V2": "ViT-S/16 with the DINO weights, its class token after the final norm projected to 384-d and "
    "L2-normalised; 224 px crops of scale 0.2-1 with flips; test images resized to 224 (256 on CUB) and "
    "centre-cropped to 224",
    "V3": "the released code's epoch is one pass over the classes (one batch on CUB and Cars, 25 on SOP, 8 on "
    "In-Shop): `dataset.num_iterations` makes ours as long, and the run is evaluated before training and after "
    "its last epoch only, as the released command lines evaluate it",
}

# Where a recipe knowingly departs from its paper's released code, and why.
DIFFERENCES = {
    "D1": "Positive-negative mixing: the released code pairs only an anchor's first positive (in batch order) with "
    "its negatives; here a mixture of a positive x_i with a negative x_j is seen by every anchor of class y_i "
    "(except i), so every positive is used and the result does not depend on the order of the batch.",
    "D2": "The released code has the contrastive loss only, and its multi-similarity mixed term is silently zero; "
    "the multi-similarity and proxy-anchor lines follow the paper's description (one weighted form per loss), not "
    "released code.",
    "D3": "In-Shop item ids are numbered densely over the 3,997 training items. The CE paper's code numbers them "
    "over the whole partition file and sizes its classifier by the largest training id (about 8,000 outputs, half "
    "of them items never seen in training), so its label smoothing spreads over about 8,000 classes; the effect "
    "is expected to be small and has not been measured. It matters only for losses with per-class parameters "
    "(the classifier, proxy-anchor's proxies).",
    "D4": "Input mode (`metrix.input`, not in the table: the paper's figures are for feature mode): the released "
    "code's hardest-negative pick (mixup/utils.py, lines 44 and 82) indexes the batch's whole list of negative "
    "pairs with positions found among the anchor's own negatives, so it often mixes in an example of the "
    "anchor's own class; `metrix.selection=hardest_negative` takes each anchor's true hardest negative (the "
    "nearest clean embedding of another class), one mixture per (anchor, positive). `metrix.selection=all "
    "metrix.max_pairs=K` is the alternative without a host read per step.",
    "D5": "Hyp-ViT (train.py, `--hyp_c 0`): the released code trains in apex fp16 (O2), here float32 unless "
    "`amp=bf16`; it freezes the patch embedding, here every ViT parameter trains; it initialises the projection "
    "orthogonally, here as torch's nn.Linear with a zero bias; its loss contrasts an anchor with the other classes' "
    "images in the two views compared and sums over the ordered pairs of views, here each positive pair is "
    "contrasted with every negative of the batch and the terms averaged (the same negatives with 2 images per class; "
    "the sum is 2x the mean there, which moves the clipping threshold); its sampler permutes the classes once per "
    "epoch and draws a class's images with replacement when it has too few, here the classes are drawn afresh for "
    "each batch and a class with too few images is left out (`dataset.sampler=random_id`); its training crops come "
    "from the original image with bicubic interpolation, here from the image resized to 224 (or 256), bilinear.",
}


@dataclass(frozen=True)
class Recipe:
    command: str  # the sacred command line that reproduces the result
    paper: str  # a key of SOURCES
    published_r1: float  # R@1 in %, as published
    released: str  # the same run in the paper's released code
    follows: tuple[str, ...]  # keys of FOLLOWS
    differences: tuple[str, ...] = ()  # keys of DIFFERENCES


def _ce_recipes() -> list[Recipe]:
    """The CE paper's four ResNet-50 runs; its released code takes the very same sacred words."""
    sgd = "epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch"
    runs = {
        "dataset.cub model.resnet50 epochs=30 lr=0.02": 69.2,
        "dataset.cars model.resnet50 epochs=100 lr=0.05 model.norm_layer=batch": 89.3,
        f"dataset.sop model.resnet50 {sgd}": 81.1,
        f"dataset.inshop model.resnet50 {sgd}": 90.6,
    }
    return [
        Recipe(
            command=f"python experiment.py with {words}",
            paper=CE_PAPER,
            published_r1=r1,
            released=f"experiment.py with {words}",
            follows=("C1",),
            differences=("D3",) if "inshop" in words else (),
        )
        for words, r1 in runs.items()
    ]


# Published R@1 of each loss without and with Metrix/feature (ResNet-50, 512-d).
_METRIX_R1 = {
    ("cub", "contrastive"): (64.7, 67.4),
    ("cars", "contrastive"): (81.6, 85.1),
    ("sop", "contrastive"): (74.9, 77.5),
    ("inshop", "contrastive"): (86.4, 89.1),
    ("cub", "multisimilarity"): (67.8, 71.4),
    ("cars", "multisimilarity"): (87.8, 89.6),
    ("sop", "multisimilarity"): (76.9, 81.0),
    ("inshop", "multisimilarity"): (90.1, 92.2),
    ("cub", "proxyanchor"): (69.5, 71.0),
    ("cars", "proxyanchor"): (87.6, 89.1),
    ("sop", "proxyanchor"): (79.1, 81.3),
    ("inshop", "proxyanchor"): (90.0, 91.9),
}
_RELEASED_DATASET = {"cub": "cub", "cars": "cars", "sop": "SOP", "inshop": "Inshop"}


def _metrix_recipes() -> list[Recipe]:
    recipes = []
    for (dataset, loss), figures in _METRIX_R1.items():
        for mixed, r1 in zip((False, True), figures, strict=True):
            differences = (("D1",) if mixed else ()) + (("D2",) if mixed and loss != "contrastive" else ())
            recipes.append(
                Recipe(
                    command=f"python experiment.py with dataset.{dataset} metrix_recipe loss.{loss}"
                    + (" metrix.feature" if mixed else ""),
                    paper=METRIX_PAPER,
                    published_r1=r1,
                    released=f"main.py --dataset {_RELEASED_DATASET[dataset]} --loss {loss} "
                    f"--mode {'feature' if mixed else 'baseline'}",
                    follows=("F1", "F2", *(("F3", "F4", "F5") if mixed else ()), "F6"),
                    differences=differences + (("D3",) if dataset == "inshop" else ()),
                )
            )
    return recipes


# Hyp-ViT's Sph-DINO R@1 per data set, and each data set's words of the released command line and of ours.
_HYP_VIT = {
    "cub": (
        78.7,
        "--ds CUB --num_samples 9 --ep 50 --resize 256",
        "dataset.images_per_class=9 dataset.num_iterations=1 dataset.resize=256 epochs=50 eval_every=50",
    ),
    "cars": (
        86.6,
        "--ds Cars --num_samples 9 --bs 882 --ep 300",
        "dataset.batch_size=882 dataset.images_per_class=9 dataset.num_iterations=1 epochs=300 eval_every=300",
    ),
    "sop": (82.2, "--ds SOP --ep 200", "dataset.num_iterations=25 epochs=200 eval_every=200"),
    "inshop": (90.1, "--ds Inshop --ep 400", "dataset.num_iterations=8 epochs=400 eval_every=400"),
}


def _hyp_vit_recipes() -> list[Recipe]:
    return [
        Recipe(
            command=f"python experiment.py with dataset.{dataset} vit_recipe {ours}",
            paper=HYP_VIT_PAPER,
            published_r1=r1,
            released=f"train.py {released} {HYP_VIT_COMMON}",
            follows=("V1", "V2", "V3"),
            differences=("D5",),
        )
        for dataset, (r1, released, ours) in _HYP_VIT.items()
    ]


# The arguments every Sph-DINO line of the released code shares.
HYP_VIT_COMMON = "--model dino_vits16 --lr 1e-5 --hyp_c 0 --t 0.1 --emb 384"
RECIPES: tuple[Recipe, ...] = (*_ce_recipes(), *_metrix_recipes(), *_hyp_vit_recipes())
# The arguments every Metrix line of the released code shares.
METRIX_COMMON = "--alpha 2.0 --embedding_size 512 --lr 1e-4 --lr_decay_gamma 0.1 --images_per_class 5 --warm 1"


def published(command: str) -> Recipe | None:
    """The recipe whose command line this is, else None."""
    return next((recipe for recipe in RECIPES if recipe.command == command), None)


def readme_table() -> str:
    """The README's table: one line per recipe."""
    lines = ["| paper | released code | this repository | published R@1 | differences |", "|---|---|---|---|---|"]
    for recipe in RECIPES:
        differences = " ".join(recipe.differences) or "none known"
        # The CE paper's released code is a sacred experiment too: its lines are ours word for word.
        released = "the same line" if recipe.command == f"python {recipe.released}" else f"`{recipe.released}`"
        lines.append(
            f"| {recipe.paper} | {released} | `{recipe.command}` | {recipe.published_r1:.1f} | {differences} |"
        )
    return "\n".join(lines) + "\n"


def recipes_page() -> str:
    """docs/recipes.md's generated part: the sources, what the recipes follow, the differences, the table."""
    sources = "\n".join(f"- {paper}: {SOURCES[paper]}; released code: {RELEASED[paper]}." for paper in SOURCES)
    follows = "\n".join(f"- {key}: {text}." for key, text in FOLLOWS.items())
    differences = "\n".join(f"- {key}: {text}" for key, text in DIFFERENCES.items())
    lines = ["| this repository | released code | published R@1 | follows | differences |", "|---|---|---|---|---|"]
    for recipe in RECIPES:
        lines.append(
            f"| `{recipe.command}` | `{recipe.released}` | {recipe.published_r1:.1f} ({recipe.paper}) | "
            f"{' '.join(recipe.follows)} | {' '.join(recipe.differences) or 'none known'} |"
        )
    return (
        f"Published figures:\n\n{sources}\n\nEvery Metrix line of the released code also takes `{METRIX_COMMON}`.\n\n"
        f"What the recipes follow:\n\n{follows}\n\nKnown differences:\n\n{differences}\n\n" + "\n".join(lines) + "\n"
    )


# Generated text sits between these markers in each document.
BEGIN, END = (
    "<!-- generated by `python -m utils.reporting.recipes --write`: do not edit -->\n",
    "<!-- end of generated text -->",
)
DOCUMENTS = {REPO / "README.md": readme_table, REPO / "docs" / "recipes.md": recipes_page}


def generated_part(text: str) -> str:
    """The text between the markers of a document ("" when it has none)."""
    match = re.search(re.escape(BEGIN) + "(.*?)" + re.escape(END), text, flags=re.S)
    return match.group(1) if match else ""


def write_documents() -> None:
    for path, generate in DOCUMENTS.items():
        text = path.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{path} has no line {BEGIN.strip()!r} followed by {END!r}: add them where the table goes")
        start = text.index(BEGIN) + len(BEGIN)
        path.write_text(text[:start] + generate() + text[text.index(END, start) :])
        print(f"wrote the recipes into {path.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the recipe tables into README.md and docs/recipes.md.")
    parser.add_argument("--write", action="store_true", required=True, help="rewrite the generated text")
    parser.parse_args()
    write_documents()


if __name__ == "__main__":
    main()
