"""The objective the training loop calls: weighted losses on clean and mixed candidates.

Under torchrun the losses see the global batch: every rank gathers the embeddings and labels of all ranks
(utils.distributed.gather_with_grad), so that a DDP step has the single-process gradient of the global batch.
The losses run in float32 (or float64) whatever the autocast around the model.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from losses.candidates import Candidates, loss_precision
from utils import distributed

# (model, images, feature_map, embeddings, labels) -> mixed candidates; see losses.metrix.
Mixer = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor], Candidates]


class Criterion(nn.Module):
    """loss = sum_i w_i L_i(clean) + mixed.weight * sum_i w_i L_i(mixed).

    Every loss takes (anchors, anchor_labels, candidates): the clean batch is one set of
    candidates, Metrix's mixtures another, so clean and mixed losses share one code path.
    The model is a backbone (images -> feature map) and a head (feature map -> embedding).
    """

    def __init__(self, losses: dict[str, tuple[float, nn.Module]], mixer: Mixer | None = None) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in losses.items()}
        self.losses = nn.ModuleDict({name: loss for name, (_, loss) in losses.items()})
        self.mixer = mixer

    def parameter_groups(self) -> list[dict]:
        """The losses' own parameters (a classifier, proxies), one group per loss with its lr_multiplier (1 unless
        the loss has one); the training driver splits them for weight decay."""
        return [
            {"params": list(loss.parameters()), "lr_multiplier": getattr(loss, "lr_multiplier", 1.0)}
            for loss in self.losses.values()
        ]

    def weighted_sum(
        self, anchors: Tensor, labels: Tensor, candidates: Candidates, prefix: str = ""
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # Exponentials of scaled similarities (alpha = 32, beta = 50) lose too much in 16-bit floats.
        with torch.autocast(anchors.device.type, enabled=False):
            values = {prefix + name: loss(anchors, labels, candidates) for name, loss in self.losses.items()}
        total = sum(self.weights[name] * values[prefix + name] for name in self.losses)
        return total, values

    def forward(self, model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feature_map = model.backbone(images)
        embeddings = distributed.gather_with_grad(loss_precision(model.head(feature_map)))
        labels = distributed.gather(labels)
        loss, logs = self.weighted_sum(embeddings, labels, Candidates.clean(embeddings, labels))
        for loss_module in self.losses.values():
            if hasattr(loss_module, "accuracy"):  # a loss with a classifier
                logs["accuracy"] = loss_module.accuracy(embeddings, labels)
        if self.mixer is not None:
            mixed = self.mixer(model, images, feature_map, embeddings, labels)
            mixed_loss, mixed_logs = self.weighted_sum(embeddings, labels, mixed, prefix="mixed_")
            loss = loss + mixed.weight * mixed_loss
            logs.update(mixed_logs)
        logs["loss"] = loss
        return loss, {key: value.detach() for key, value in logs.items()}
