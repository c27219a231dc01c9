"""One registry of backbones: each maps images in [0, 1] to its last feature map.

Every builder takes `pretrained` and returns a module with an `out_channels` attribute. The
input normalisation a network was trained with lives inside its backbone, so transforms and
Metrix input mixing work on plain [0, 1] pixels for every architecture.
"""

import os
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from models.bn_inception import BNInception, bn_inception
from utils.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Backbone(nn.Sequential):
    """Normalisation followed by the convolutional body; out_channels of the last feature map."""

    def __init__(self, normalize: nn.Module, body: nn.Module, out_channels: int) -> None:
        super().__init__(normalize, body)
        self.out_channels = out_channels


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for arch, from the local torch cache or downloaded into it."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    filename = os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True)
    except (URLError, OSError, RuntimeError) as error:
        raise InputError(
            f"pretrained weights for {arch} are unavailable ({error}): download {weights.url} and put "
            f"{filename} in {checkpoint_dir()}, or train from scratch with model.pretrained=False") from None


def resnet(arch: str) -> Callable[[bool], Backbone]:
    """torchvision ResNet/ResNeXt/Wide-ResNet without its pooling and classifier."""

    def build(pretrained: bool) -> Backbone:
        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            net.load_state_dict(imagenet_state_dict(arch))
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        return Backbone(Normalize(IMAGENET_MEAN, IMAGENET_STD), body, net.fc.in_features)

    return build


def cifar_resnet18(pretrained: bool) -> Backbone:
    """ResNet-18 for 32 px images: a 3x3 stride-1 stem and no max-pooling (trained from scratch)."""
    if pretrained:
        raise InputError("cifar_resnet18 has no pretrained weights: set model.pretrained=False")
    net = torchvision.models.resnet18(weights=None)
    stem = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    body = nn.Sequential(stem, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4)
    return Backbone(Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), body, net.fc.in_features)


BN_INCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"


def bninception(pretrained: bool) -> BNInception:
    """BN-Inception (its Caffe input conversion is inside); weights from the torch cache or downloaded into it."""
    if not pretrained:
        return bn_inception()
    path = checkpoint_dir() / os.path.basename(BN_INCEPTION_URL)
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(BN_INCEPTION_URL, str(path))
        return bn_inception(path)
    except (URLError, OSError, ValueError) as error:
        raise InputError(f"BN-Inception weights are unavailable ({error}): download {BN_INCEPTION_URL} into "
                         f"{checkpoint_dir()}, or train from scratch with model.pretrained=False") from None


def small_cnn(pretrained: bool) -> Backbone:
    """Seven 3x3 conv-BN-ReLU layers for 32 px images: the CPU-friendly digits default."""
    if pretrained:
        raise InputError("small_cnn has no pretrained weights: set model.pretrained=False")
    layers, in_channels = [], 3
    for out_channels, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True)]
        in_channels = out_channels
    return Backbone(Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), nn.Sequential(*layers), in_channels)


TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
BACKBONES: dict[str, Callable[[bool], nn.Module]] = {arch: resnet(arch) for arch in TORCHVISION_ARCHS}
BACKBONES["cifar_resnet18"] = cifar_resnet18
BACKBONES["small_cnn"] = small_cnn
BACKBONES["bninception"] = bninception


def get_backbone(arch: str, pretrained: bool) -> nn.Module:
    if arch not in BACKBONES:
        raise InputError(f"unknown model.arch {arch!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[arch](pretrained)
