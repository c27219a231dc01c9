"""The `model` ingredient: backbone architecture, embedding head and classifier options."""

from sacred import Ingredient

from models.backbones import get_backbone
from models.metric_model import Classifier, EmbeddingHead, MetricModel
from utils.data.ingredient import data_ingredient

# The dataset sub-ingredient lets the default architecture follow the data set.
model_ingredient = Ingredient("model", ingredients=[data_ingredient])


@model_ingredient.config
def config(dataset):
    # The embedded digits default trains a small network from scratch on the CPU; real data sets
    # start from an ImageNet-pretrained ResNet-18, as in the CE paper's code.
    arch = "small_cnn" if dataset["name"] == "digits" else "resnet18"
    pretrained = arch not in ("small_cnn", "cifar_resnet18")  # torchvision ImageNet weights, from the torch cache
    num_features = None  # embedding size; None keeps the backbone's channels (no remap layer)
    pooling = "avg"  # avg | max | avg+max (GAP + GMP, as in Metrix)
    dropout = 0.0  # before the classifier
    norm_layer = None  # None | batch | layer: normalisation of the pooled features
    remap = False  # a linear layer on the pooled features even when num_features is unchanged
    detach = False  # cross-entropy trains the classifier only, not the embedding
    normalize = False  # L2-normalise the embedding
    set_bn_eval = pretrained  # keep the backbone's BatchNorm statistics frozen during training
    freeze_bn = False  # also freeze the BatchNorm affine parameters
    normalize_weight = False  # cosine classifier: L2-normalised class weights


@model_ingredient.named_config
def resnet50():
    arch = "resnet50"
    num_features = 2048
    dropout = 0.5


for _arch in ("resnet18", "resnet34", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
              "wide_resnet50_2", "wide_resnet101_2", "cifar_resnet18", "small_cnn", "bninception"):
    model_ingredient.add_named_config(_arch, {"arch": _arch})
model_ingredient.add_named_config("resnext50", {"arch": "resnext50_32x4d"})


@model_ingredient.capture
def get_model(num_classes: int, arch: str, pretrained: bool, num_features: int | None, pooling: str, dropout: float,
              norm_layer: str | None, remap: bool, detach: bool, normalize: bool, set_bn_eval: bool, freeze_bn: bool,
              normalize_weight: bool) -> MetricModel:
    backbone = get_backbone(arch, pretrained)
    num_features = num_features or backbone.out_channels
    head = EmbeddingHead(backbone.out_channels, num_features, pooling, norm_layer, remap, normalize)
    classifier = Classifier(num_features, num_classes, dropout, detach, normalize_weight)
    return MetricModel(backbone, head, classifier, set_bn_eval, freeze_bn)
