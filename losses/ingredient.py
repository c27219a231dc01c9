"""The `loss` and `metrix` ingredients: which losses train the embedding, their weights, and mixing.

loss = ce_weight * CE + pair_weight * pairwise + metrix.weight * (the same sum on mixed examples)
"""

from sacred import Ingredient

from losses.contrastive import ContrastiveLoss
from losses.criterion import Criterion
from losses.cross_entropy import CrossEntropyLoss
from losses.metrix import MODES, Metrix
from losses.multi_similarity import MultiSimilarityLoss
from losses.proxy_anchor import ProxyAnchorLoss
from utils.errors import InputError

PAIRWISE_LOSSES = ("contrastive", "multisimilarity", "proxyanchor")

loss_ingredient = Ingredient("loss")
metrix_ingredient = Ingredient("metrix")


@loss_ingredient.config
def loss_config():
    ce_weight = 1.0  # label-smoothed cross-entropy on a classifier the loss owns (label_smoothing is top-level)
    pairwise = None  # None | contrastive | multisimilarity | proxyanchor
    pair_weight = 1.0  # weight of the pairwise loss
    margin = 0.5  # contrastive: negative margin on the Euclidean distance of normalised embeddings
    ms_alpha = 2.0  # multi-similarity: positive scale
    ms_beta = 50.0  # multi-similarity: negative scale
    ms_base = 0.5  # multi-similarity: similarity offset
    ms_mining = False  # multi-similarity: MS pair mining
    ms_epsilon = 0.1  # multi-similarity: mining margin
    pa_alpha = 32.0  # proxy-anchor: scale
    pa_delta = 0.1  # proxy-anchor: margin
    proxy_lr_multiplier = 100.0  # proxy-anchor: the proxies' learning rate is lr times this


@loss_ingredient.named_config
def cross_entropy():
    ce_weight = 1.0
    pairwise = None


@loss_ingredient.named_config
def contrastive():
    ce_weight = 0.0
    pairwise = "contrastive"


@loss_ingredient.named_config
def multisimilarity():
    ce_weight = 0.0
    pairwise = "multisimilarity"


@loss_ingredient.named_config
def proxyanchor():
    ce_weight = 0.0
    pairwise = "proxyanchor"


@metrix_ingredient.config
def metrix_config():
    # The defaults are the Metrix paper's released code; the alternatives are our generalisations.
    mode = None  # None (off) | input | feature | embed: where examples are mixed
    alpha = 2.0  # mixing factor lam ~ Beta(alpha, alpha)
    lam = "per_batch"  # per_batch (one lam per step, the paper) | per_pair
    strategy = "random"  # random | positive_negative | anchor_negative (random: one of the two per step)
    anchor_negative = "no_positive"  # mix with negatives: no_positive (anchors without one, the paper) | every_anchor
    weight = 0.4  # weight of the loss on mixed examples (positive-negative steps)
    anchor_negative_weight = 0.3 if mode == "embed" else weight  # on anchor-negative steps (the paper's per mode)
    max_pairs = None  # keep at most this many mixed pairs, hardest negatives first (bounds memory)
    # which pairs: all (every ordered pair, or the max_pairs hardest) | hardest_negative (per anchor and positive, the
    # anchor's hardest negative: the paper's input mode)
    selection = "hardest_negative" if mode == "input" else "all"


for _mode in MODES:
    metrix_ingredient.add_named_config(_mode, {"mode": _mode})


@metrix_ingredient.capture
def get_mixer(
    mode: str | None,
    alpha: float,
    lam: str,
    strategy: str,
    anchor_negative: str,
    weight: float,
    anchor_negative_weight: float,
    max_pairs: int | None,
    selection: str,
) -> Metrix | None:
    if mode is None:
        return None
    try:
        mixer = Metrix(
            mode, alpha, strategy, max_pairs, anchor_negative, lam, weight, anchor_negative_weight, selection
        )
    except ValueError as error:
        raise InputError(f"{error} (metrix.mode=None turns Metrix off)") from None
    if weight <= 0 and anchor_negative_weight <= 0:
        raise InputError(
            f"metrix.mode={mode!r} is on but metrix.weight={weight} and metrix.anchor_negative_weight="
            f"{anchor_negative_weight}: no loss would use the mixed examples; set a positive weight or "
            f"turn Metrix off with metrix.mode=None"
        )
    return mixer


@loss_ingredient.capture
def get_criterion(
    num_classes: int,
    embedding_size: int,
    label_smoothing: float,
    classifier: dict,
    ce_weight: float,
    pairwise: str | None,
    pair_weight: float,
    margin: float,
    ms_alpha: float,
    ms_beta: float,
    ms_base: float,
    ms_mining: bool,
    ms_epsilon: float,
    pa_alpha: float,
    pa_delta: float,
    proxy_lr_multiplier: float,
) -> Criterion:
    """classifier: the cross-entropy classifier's dropout, detach and normalize_weight (model.* options, so
    that an architecture's named config carries its recipe's dropout)."""
    if pairwise is not None and pairwise not in PAIRWISE_LOSSES:
        raise InputError(f"unknown loss.pairwise {pairwise!r}: choose None or one of {', '.join(PAIRWISE_LOSSES)}")
    pairwise_losses = {
        "contrastive": lambda: ContrastiveLoss(margin),
        "multisimilarity": lambda: MultiSimilarityLoss(ms_alpha, ms_beta, ms_base, ms_mining, ms_epsilon),
        "proxyanchor": lambda: ProxyAnchorLoss(num_classes, embedding_size, pa_alpha, pa_delta, proxy_lr_multiplier),
    }
    losses = {}
    if ce_weight > 0:
        ce = CrossEntropyLoss(embedding_size, num_classes, label_smoothing, **classifier)
        losses["cross_entropy"] = (ce_weight, ce)
    if pairwise is not None and pair_weight > 0:
        losses[pairwise] = (pair_weight, pairwise_losses[pairwise]())
    mixer = get_mixer()
    if not losses:
        raise InputError(
            f"no loss to train with (loss.ce_weight={ce_weight}, loss.pairwise={pairwise!r}, "
            f"loss.pair_weight={pair_weight}): pick one, e.g. `with loss.cross_entropy`"
        )
    return Criterion(losses, mixer)
