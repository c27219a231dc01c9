"""The metric-learning model: backbone -> feature map -> head -> embedding.

The stages are separate modules so that Metrix can mix images (before the backbone), feature maps
(before the head) or embeddings (before the losses) with the same model. Anything trained on top of
the embedding (a classifier, proxies) belongs to the loss.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.mixing import mixed_pool
from utils.errors import InputError

POOLINGS = ("avg", "max", "avg+max")
BATCH_NORMS = nn.modules.batchnorm._BatchNorm  # BatchNorm2d, and utils.engine.sync_batchnorm's (sync_bn)
NORM_LAYERS = (None, "batch", "layer")


class EmbeddingHead(nn.Module):
    """Feature map -> embedding: pooling, optional normalisation layer, linear remap, L2 norm."""

    def __init__(
        self,
        in_channels: int,
        num_features: int,
        pooling: str = "avg",
        norm_layer: str | None = None,
        remap: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"unknown model.pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
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
        """(N, C, H, W) -> (N, C): the pooling, avg + max summed for avg+max."""
        pooled = []
        if "avg" in self.pooling:
            pooled.append(feature_map.mean(dim=(2, 3)))
        if "max" in self.pooling:
            pooled.append(feature_map.amax(dim=(2, 3)))
        return sum(pooled)

    def pool_mixtures(
        self, feature_map: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """(M, C): pool(lam * feature_map[first] + (1 - lam) * feature_map[second]) without the M mixed maps
        (models.mixing.mixed_pool; its docstring says how the gradient treats ties of the max)."""
        return mixed_pool(feature_map, first, second, lam, self.pooling)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled features -> (N, num_features) embeddings."""
        features = self.remap(self.norm(pooled))
        return F.normalize(features, dim=1) if self.normalize else features


class MetricModel(nn.Module):
    """images -> embeddings."""

    def __init__(
        self, backbone: nn.Module, head: EmbeddingHead, set_bn_eval: bool = False, freeze_bn: bool = False
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> "MetricModel":
        super().train(mode)
        if mode and self.set_bn_eval:
            for module in self.backbone.modules():
                if isinstance(module, BATCH_NORMS):
                    module.eval()
        return self
