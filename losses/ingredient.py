"""The `loss` ingredient: which losses train the embedding, and their weights."""

from sacred import Ingredient

from losses.criterion import Criterion
from losses.cross_entropy import CrossEntropyLoss

loss_ingredient = Ingredient("loss")


@loss_ingredient.config
def config():
    ce_weight = 1.0  # weight of the label-smoothed cross-entropy on the classifier's logits


@loss_ingredient.named_config
def cross_entropy():
    ce_weight = 1.0


@loss_ingredient.capture
def get_criterion(num_classes: int, embedding_size: int, label_smoothing: float, ce_weight: float) -> Criterion:
    losses = {}
    if ce_weight:
        losses["cross_entropy"] = (ce_weight, CrossEntropyLoss(label_smoothing))
    return Criterion(losses)
