"""The `model` ingredient: backbone architecture and embedding head options.

The experiment hands the model what depends on the data (its default architecture); the named
configs are the registry's names (models/backbones.py).
"""

from sacred import Ingredient

from models.backbones import BACKBONES, get_backbone, resolve_weights
from models.metric_model import NORM_LAYERS, POOLINGS, EmbeddingHead, MetricModel
from utils.settings import SIZE, CrossRule, add_named_config, boolean, choice, number, optional, register, text

model_ingredient = Ingredient("model")


@model_ingredient.config
def config():
    arch = None  # None: the experiment's default for the data set (small_cnn on digits, else resnet18)
    pretrained = None  # None: ImageNet weights when arch has some | True: require them | False: from scratch
    weights = None  # which ImageNet weights (see the README's table); None: arch's default, the original V1
    num_features = None  # embedding size; None keeps the backbone's channels (no remap layer)
    pooling = "avg"  # avg | max | avg+max (GAP + GMP, as in Metrix)
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


register(
    {
        "model.arch": choice((None, *BACKBONES)),
        "model.pretrained": optional(boolean()),
        "model.weights": optional(text()),
        "model.num_features": optional(SIZE),
        "model.pooling": choice(POOLINGS),
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
    ],
)

# One named config per backbone of the registry. The CE paper's ResNet-50 also has a 2048-d embedding and dropout
# 0.5 before the classifier. No named config pins model.weights: the default is the original V1 (the registry's
# first), and a pinned name would refuse model.pretrained=False beside it.
RECIPES = {"resnet50": {"num_features": 2048, "dropout": 0.5}}
for _arch, _spec in BACKBONES.items():
    _recipe = " as in the CE paper: 2048-d, dropout 0.5 before the classifier" if _arch in RECIPES else ""
    _weights = f"from ImageNet weights {_spec.weights[0]}" if _spec.weights else "from scratch"
    add_named_config(
        model_ingredient,
        _arch,
        {"arch": _arch, **RECIPES.get(_arch, {})},
        f"backbone {_arch}, {_weights} ({_spec.input_size} px){_recipe}",
    )
add_named_config(model_ingredient, "resnext50", {"arch": "resnext50_32x4d"}, "backbone resnext50_32x4d (a short name)")

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
    num_features: int | None,
    pooling: str,
    norm_layer: str | None,
    remap: bool,
    normalize: bool,
    freeze_bn: bool,
) -> MetricModel:
    resolved = resolve_model(default_arch)
    return build_model(
        **resolved,
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
    pooling: str,
    norm_layer: str | None,
    remap: bool,
    normalize: bool,
    freeze_bn: bool,
) -> MetricModel:
    backbone = get_backbone(arch, weights)
    head = EmbeddingHead(
        backbone.out_channels, num_features or backbone.out_channels, pooling, norm_layer, remap, normalize
    )
    return MetricModel(backbone, head, set_bn_eval, freeze_bn)


def rebuild_model(rebuild: dict, settings: dict) -> MetricModel:
    """The model a run trained, without its weights, the data or ImageNet weights: rebuild is what the experiment
    stored with the checkpoint (the resolved arch and set_bn_eval), settings the run's config."""
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
