"""The `model` ingredient: backbone architecture and embedding head options.

The experiment hands the model what depends on the data (its default architecture); the named
configs are the registry's names (models/backbones.py).
"""

from pathlib import Path

from sacred import Ingredient

from models.backbones import BACKBONES, arch_exists, backbone_spec, get_backbone, is_vit, resolve_weights
from models.metric_model import NORM_LAYERS, POOLINGS, TOKEN_POOLINGS, EmbeddingHead, MetricModel
from models.vit import TIMM_PREFIX, patch_size
from utils.settings import (
    SIZE,
    Check,
    CrossRule,
    boolean,
    choice,
    integer,
    number,
    optional,
    register,
    text,
)

model_ingredient = Ingredient("model")


@model_ingredient.config
def config():
    arch = None  # None: the experiment's default for the data set (small_cnn on digits, else resnet18); timm:<name>
    pretrained = None  # None: pretrained weights when arch has some | True: require them | False: from scratch
    weights = None  # which pretrained weights (docs/models.md's table); None: arch's default, the original V1
    weights_file = None  # a ViT's weights from this file (safetensors or .pth, raw DINO/DINOv2/CLIP too), offline
    drop_path = 0.0  # a ViT's stochastic-depth rate (timm's drop_path_rate)
    freeze_blocks = 0  # 0: train all | N: freeze the stem/embeddings and the first N stages/blocks | -1: all
    num_features = None  # embedding size; None keeps the backbone's channels (no remap layer)
    pooling = (
        None  # None: avg (CNN), cls (ViT) | avg | max | avg+max (GAP + GMP) | cls | mean | cls+mean (docs/models.md)
    )
    norm_layer = None  # None | batch | layer: normalisation of the pooled features
    remap = False  # a linear layer on the pooled features even when num_features is unchanged
    normalize = False  # L2-normalise the embedding
    set_bn_eval = None  # keep the backbone's BatchNorm statistics frozen; None: when starting from ImageNet weights
    freeze_bn = False  # also freeze the BatchNorm affine parameters
    # The cross-entropy loss owns its classifier; these options are here so that an architecture's
    # named config carries its recipe (model.resnet50: dropout 0.5, as in the CE paper).
    dropout = 0.0  # before the classifier
    detach = False  # cross-entropy trains the classifier only, not the embedding
    normalize_weight = False  # cosine classifier: L2-normalised class weights


def crop_fits_patches(arch: str | None, crop_size: int) -> bool:
    return not is_vit(arch) or crop_size % patch_size(backbone_spec(arch).timm_name) == 0


register(
    {
        "model.arch": Check(
            lambda v: v is None or type(v) is str and arch_exists(v),
            f"one of None, {', '.join(BACKBONES)}, {TIMM_PREFIX}<timm ViT name> (docs/models.md)",
        ),
        "model.pretrained": optional(boolean()),
        "model.weights": optional(text()),
        "model.weights_file": Check(
            lambda v: v is None or type(v) is str and Path(v).is_file(), "None or the path of an existing file"
        ),
        "model.drop_path": number(0, 1, high_open=True),
        "model.freeze_blocks": integer(-1),
        "model.num_features": optional(SIZE),
        "model.pooling": choice((None, *POOLINGS, *TOKEN_POOLINGS)),
        "model.norm_layer": choice(NORM_LAYERS),
        "model.remap": boolean(),
        "model.normalize": boolean(),
        "model.set_bn_eval": optional(boolean()),
        "model.freeze_bn": boolean(),
        "model.dropout": number(0, 1, high_open=True),
        "model.detach": boolean(),
        "model.normalize_weight": boolean(),
    },
    cross_rules=[
        # In training a BatchNorm layer normalises by the batch's statistics, which one example does not have.
        CrossRule(
            ("model.norm_layer", "dataset.batch_size"),
            lambda norm_layer, batch: norm_layer != "batch" or batch >= 2,
            "dataset.batch_size >= 2 with model.norm_layer='batch' (a BatchNorm layer needs two examples)",
        ),
        CrossRule(
            ("model.arch", "model.pooling"),
            lambda arch, pooling: pooling is None or (pooling in TOKEN_POOLINGS) == is_vit(arch),
            f"a CNN's pooling ({', '.join(POOLINGS)}) or a ViT's ({', '.join(TOKEN_POOLINGS)}), as model.arch is one",
        ),
        CrossRule(
            ("model.arch", "model.weights_file", "model.drop_path"),
            lambda arch, weights_file, drop_path: is_vit(arch) or (weights_file is None and drop_path == 0),
            "model.weights_file and model.drop_path only with a ViT model.arch (docs/models.md)",
        ),
        CrossRule(
            ("model.arch", "model.weights_file", "model.pretrained"),
            lambda arch, weights_file, pretrained: weights_file is None or pretrained is not False,
            "no model.weights_file with model.pretrained=False",
        ),
        # Patches tile the crop; the position embedding is interpolated to the crop's grid of patches.
        CrossRule(
            ("model.arch", "dataset.crop_size"),
            crop_fits_patches,
            "dataset.crop_size a multiple of the ViT's patch size (16 or 14 in docs/models.md's table, e.g. 224)",
        ),
    ],
)

# One named config per backbone of the registry; the CE paper's ResNet-50 also has a 2048-d embedding and
# dropout before the classifier.
# The CE paper's ResNet-50: 2048-d, dropout 0.5 before the classifier, torchvision's original weights.
RECIPES = {"resnet50": {"num_features": 2048, "dropout": 0.5, "weights": "IMAGENET1K_V1"}}
for _arch in BACKBONES:
    model_ingredient.add_named_config(_arch, {"arch": _arch, **RECIPES.get(_arch, {})})
model_ingredient.add_named_config("resnext50", {"arch": "resnext50_32x4d"})

CLASSIFIER_OPTIONS = ("dropout", "detach", "normalize_weight")


@model_ingredient.capture
def resolve_model(
    default_arch: str, arch: str | None, pretrained: bool | None, weights: str | None, set_bn_eval: bool | None
) -> dict:
    """The settings left to defaults (None), resolved: the arch, its ImageNet weights (None: from scratch) and
    whether the backbone's BatchNorm statistics stay frozen."""
    arch = arch or default_arch
    weights = resolve_weights(arch, pretrained, weights)
    frozen_statistics = weights is not None if set_bn_eval is None else set_bn_eval
    return {"arch": arch, "weights": weights, "set_bn_eval": frozen_statistics}


@model_ingredient.capture
def get_model(
    default_arch: str,
    weights_file: str | None,
    drop_path: float,
    freeze_blocks: int,
    num_features: int | None,
    pooling: str | None,
    norm_layer: str | None,
    remap: bool,
    normalize: bool,
    freeze_bn: bool,
) -> MetricModel:
    resolved = resolve_model(default_arch)
    return build_model(
        **resolved,
        weights_file=weights_file,
        drop_path=drop_path,
        freeze_blocks=freeze_blocks,
        num_features=num_features,
        pooling=pooling,
        norm_layer=norm_layer,
        remap=remap,
        normalize=normalize,
        freeze_bn=freeze_bn,
    )


def build_model(
    *,
    arch: str,
    weights: str | None,
    set_bn_eval: bool,
    num_features: int | None,
    pooling: str | None,
    norm_layer: str | None,
    remap: bool,
    normalize: bool,
    freeze_bn: bool,
    weights_file: str | None = None,
    drop_path: float = 0.0,
    freeze_blocks: int = 0,
) -> MetricModel:
    backbone = get_backbone(arch, weights, weights_file=weights_file, drop_path=drop_path)
    layout = getattr(backbone, "layout", None)  # a ViT's tokens
    head = EmbeddingHead(
        backbone.out_channels,
        num_features or backbone.out_channels,
        pooling or ("avg" if layout is None else "cls"),
        norm_layer,
        remap,
        normalize,
        layout,
    )
    return MetricModel(backbone, head, set_bn_eval, freeze_bn, freeze_blocks)


def rebuild_model(rebuild: dict, settings: dict) -> MetricModel:
    """The model a run trained, without its weights, the data or ImageNet weights: rebuild is what the experiment
    stored with the checkpoint (the resolved arch and set_bn_eval), settings the run's config. No weights file is
    read and nothing is frozen: the checkpoint holds every weight, and the model only evaluates."""
    options = settings["model"]
    return build_model(
        arch=rebuild["arch"],
        weights=None,
        set_bn_eval=rebuild["set_bn_eval"],
        num_features=options["num_features"],
        pooling=options["pooling"],
        norm_layer=options["norm_layer"],
        remap=options["remap"],
        normalize=options["normalize"],
        freeze_bn=options["freeze_bn"],
    )


@model_ingredient.capture
def classifier_options(_config: dict) -> dict:
    """The cross-entropy classifier's options, for the loss that owns it."""
    return {key: _config[key] for key in CLASSIFIER_OPTIONS}
