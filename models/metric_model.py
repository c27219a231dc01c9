"""The metric-learning model: backbone -> feature map (a CNN's) or tokens (a ViT's) -> head -> embedding.

The stages are separate modules so that Metrix can mix images (before the backbone), feature maps or tokens
(before the head) or embeddings (before the losses) with the same model. Anything trained on top of
the embedding (a classifier, proxies) belongs to the loss.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.mixing import interpolate, mixed_pool
from models.vit import TokenLayout
from utils.errors import InputError

POOLINGS = ("avg", "max", "avg+max")  # of a CNN's feature map
# Of a ViT's tokens: the class token, the mean of the patch tokens (registers excluded), or both summed.
TOKEN_POOLINGS = ("cls", "mean", "cls+mean")
BATCH_NORMS = nn.modules.batchnorm._BatchNorm  # BatchNorm2d, and utils.engine.sync_batchnorm's (sync_bn)
NORM_LAYERS = (None, "batch", "layer")


def check_pooling(pooling: str, layout: TokenLayout | None) -> None:
    """A CNN's pooling for a feature map, a ViT's for tokens (the class token only where the ViT has one)."""
    if layout is None and pooling not in POOLINGS:
        raise InputError(f"model.pooling {pooling!r} does not pool a CNN's feature map: choose {', '.join(POOLINGS)}")
    if layout is not None and pooling not in TOKEN_POOLINGS:
        raise InputError(f"model.pooling {pooling!r} does not pool a ViT's tokens: choose {', '.join(TOKEN_POOLINGS)}")
    if layout is not None and "cls" in pooling and not layout.class_token:
        raise InputError(f"model.pooling {pooling!r} needs a class token, which this ViT has not: choose 'mean'")


class EmbeddingHead(nn.Module):
    """Feature map or tokens -> embedding: pooling, optional normalisation layer, linear remap, L2 norm.

    layout: None for a CNN's (N, C, H, W) feature map, a ViT's token layout for its (N, T, C) tokens."""

    def __init__(
        self,
        in_channels: int,
        num_features: int,
        pooling: str = "avg",
        norm_layer: str | None = None,
        remap: bool = False,
        normalize: bool = False,
        layout: TokenLayout | None = None,
    ) -> None:
        super().__init__()
        check_pooling(pooling, layout)
        self.layout = layout
        if norm_layer not in NORM_LAYERS:
            raise InputError(f"unknown model.norm_layer {norm_layer!r}: choose None, 'batch' or 'layer'")
        self.pooling = pooling
        self.normalize = normalize
        self.num_features = num_features
        self.norm = nn.Identity()
        if norm_layer == "batch":
            self.norm = nn.BatchNorm1d(in_channels, affine=False)
        elif norm_layer == "layer":
            self.norm = nn.LayerNorm(in_channels, elementwise_affine=False)
        self.remap = nn.Identity()
        if remap or num_features != in_channels:
            self.remap = nn.Linear(in_channels, num_features)
            nn.init.zeros_(self.remap.bias)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.embed(self.pool(feature_map))

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) or (N, T, C) tokens -> (N, C): the pooling, avg + max (cls + mean) summed for avg+max
        (cls+mean)."""
        if self.layout is not None:
            return self.pool_tokens(feature_map)
        pooled = []
        if "avg" in self.pooling:
            pooled.append(feature_map.mean(dim=(2, 3)))
        if "max" in self.pooling:
            pooled.append(feature_map.amax(dim=(2, 3)))
        return sum(pooled)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = []
        if "cls" in self.pooling:
            pooled.append(tokens[:, 0])
        if "mean" in self.pooling:
            pooled.append(tokens[:, self.layout.prefix_tokens :].mean(dim=1))
        return sum(pooled[1:], pooled[0])

    def pool_mixtures(
        self, feature_map: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """(M, C): pool(lam * feature_map[first] + (1 - lam) * feature_map[second]) without the M mixed maps
        (models.mixing.mixed_pool; its docstring says how the gradient treats ties of the max).

        A ViT's tokens are mixed token by token (class with class, register with register, patch with the patch at
        the same position); its poolings are linear, so the pooling of a mixture is the mixture of the poolings."""
        if self.layout is not None:
            return interpolate(self.pool_tokens(feature_map), first, second, lam)
        return mixed_pool(feature_map, first, second, lam, self.pooling)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled features -> (N, num_features) embeddings."""
        features = self.remap(self.norm(pooled))
        return F.normalize(features, dim=1) if self.normalize else features


def freeze(backbone: nn.Module, blocks: int) -> None:
    """Freeze the backbone's first blocks, its stem or embeddings included (-1: all of it)."""
    if blocks == 0:
        return
    depths = backbone.parameter_depths()
    deepest = max(depths.values())
    if not -1 <= blocks <= deepest:
        raise InputError(f"model.freeze_blocks={blocks} out of range for this backbone: choose -1 (all) to {deepest}")
    for name, parameter in backbone.named_parameters():
        if blocks == -1 or depths[name] <= blocks:
            parameter.requires_grad_(False)


def frozen_modules(backbone: nn.Module) -> list[nn.Module]:
    """The modules with parameters, none of them trainable. Found anew on each call: sync_bn replaces modules."""
    return [
        module
        for module in backbone.modules()
        if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())
    ]


class MetricModel(nn.Module):
    """images -> embeddings."""

    def __init__(
        self,
        backbone: nn.Module,
        head: EmbeddingHead,
        set_bn_eval: bool = False,
        freeze_bn: bool = False,
        freeze_blocks: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # set_bn_eval keeps the backbone's BatchNorm statistics; freeze_bn also its affine parameters.
        self.set_bn_eval = set_bn_eval or freeze_bn
        if freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, BATCH_NORMS):
                    module.requires_grad_(False)
        freeze(backbone, freeze_blocks)
        self.freeze_blocks = freeze_blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C): the backbone's features pooled as the head pools them, before its norm layer and remap."""
        return self.head.pool(self.backbone(images))

    def train(self, mode: bool = True) -> "MetricModel":
        super().train(mode)
        if mode and self.set_bn_eval:
            for module in self.backbone.modules():
                if isinstance(module, BATCH_NORMS):
                    module.eval()
        if mode and self.freeze_blocks:
            # Frozen blocks are a fixed feature extractor: no BatchNorm statistics updates, no drop-path.
            for module in frozen_modules(self.backbone):
                module.eval()
        return self
