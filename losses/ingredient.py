"""The `loss` and `metrix` ingredients: which losses train the embedding, their weights, and mixing.

loss = ce_weight * CE + pair_weight * pairwise + metrix.weight * (the same sum on mixed examples)

The pairwise losses, their settings (loss.margin, loss.ms_alpha, ...) and their named configs come from the
registry (losses/registry.py), where each loss file registers itself. Every key's rule sits beside its default.
"""

from sacred import Ingredient
from sacred.config.config_dict import ConfigDict
from sacred.config.config_summary import ConfigSummary

from losses.criterion import Criterion
from losses.cross_entropy import CrossEntropyLoss
from losses.metrix import ANCHOR_NEGATIVE, LAMS, MODES, SELECTIONS, STRATEGIES, Metrix
from losses.registry import PAIRWISE, PairwiseLoss, on_register
from utils.errors import InputError
from utils.settings import NON_NEGATIVE, SIZE, CrossRule, add_named_config, choice, number, optional, register

loss_ingredient = Ingredient("loss")
metrix_ingredient = Ingredient("metrix")


@loss_ingredient.config
def loss_config():
    ce_weight = 1.0  # label-smoothed cross-entropy on a classifier the loss owns (label_smoothing is top-level)
    pairwise = None  # None | the name of a pairwise loss (losses/registry.py; each has a named config loss.<name>)
    pair_weight = 1.0  # weight of the pairwise loss


def _pairwise_on(pairwise: str | None, pair_weight: float) -> bool:
    return pairwise is not None and pair_weight > 0


# loss.pairwise's rule lists the registered losses: losses/registry.py keeps it up to date. A pairwise loss compares
# the batch's examples with each other: without a second one, or without a positive, it has nothing (or only
# negatives) to train on.
register(
    {"loss.ce_weight": NON_NEGATIVE, "loss.pair_weight": NON_NEGATIVE},
    cross_rules=[
        CrossRule(
            ("loss.pairwise", "loss.pair_weight", "dataset.batch_size"),
            lambda pairwise, weight, batch: not _pairwise_on(pairwise, weight) or batch >= 2,
            "dataset.batch_size >= 2 with a pairwise loss",
        ),
        CrossRule(
            ("loss.pairwise", "loss.pair_weight", "dataset.sampler", "dataset.images_per_class"),
            lambda pairwise, weight, sampler, per_class: (
                not _pairwise_on(pairwise, weight) or sampler == "random" or per_class >= 2
            ),
            "dataset.images_per_class >= 2 with a pairwise loss and a class sampler (positives in every batch)",
        ),
    ],
)


add_named_config(
    loss_ingredient,
    "cross_entropy",
    {"ce_weight": 1.0, "pairwise": None},
    "label-smoothed cross-entropy alone (the default)",
)


class DocumentedConfig(ConfigDict):
    """A dict configuration with a comment per key, which print_config shows (sacred's ConfigDict has none)."""

    def __init__(self, values: dict, docs: dict[str, str]) -> None:
        super().__init__(values)
        self.docs = docs

    def __call__(
        self, fixed: dict | None = None, preset: dict | None = None, fallback: dict | None = None
    ) -> ConfigSummary:
        summary = super().__call__(fixed, preset, fallback)
        summary.docs.update(self.docs)
        return summary


def add_pairwise_loss(entry: PairwiseLoss) -> None:
    """A registered loss's settings join the loss config, and `with loss.<name>` trains with it alone."""
    values = {key: setting.default for key, setting in entry.settings.items()}
    docs = {key: f"{entry.name}: {setting.doc}" for key, setting in entry.settings.items()}
    loss_ingredient.configurations.append(DocumentedConfig(values, docs))
    add_named_config(
        loss_ingredient,
        entry.name,
        {"ce_weight": 0.0, "pairwise": entry.name},
        f"the {entry.name} pairwise loss alone, without cross-entropy",
    )


on_register(add_pairwise_loss)


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
    # all: every ordered pair, or the max_pairs hardest; hardest_negative: per anchor and positive, the anchor's
    # hardest negative.
    selection = "hardest_negative" if mode == "input" else "all"  # all | hardest_negative (the paper's input mode)


register(
    {
        "metrix.mode": choice((None, *MODES)),
        "metrix.strategy": choice(STRATEGIES),
        "metrix.lam": choice(LAMS),
        "metrix.anchor_negative": choice(ANCHOR_NEGATIVE),
        "metrix.anchor_negative_weight": NON_NEGATIVE,
        # torch's Beta sampler works in float32 (up to about 3.4e38) and puts draws at 0.5 that belong near 0 or 1
        # when alpha is small (25% of them at 0.001, a few in a thousand at 0.01-0.05).
        "metrix.alpha": number(0.1, 1e38),
        "metrix.weight": NON_NEGATIVE,
        "metrix.max_pairs": optional(SIZE),
        "metrix.selection": choice(SELECTIONS),
    },
    cross_rules=[
        CrossRule(
            ("metrix.mode", "dataset.batch_size"),
            lambda mode, batch: mode is None or batch >= 2,
            "dataset.batch_size >= 2 with Metrix (it mixes pairs of the batch's examples)",
        )
    ],
)

MODE_DOCS = {
    "input": "Metrix mixing of input images (pixels)",
    "feature": "Metrix mixing of feature maps, before pooling (the paper's default and best)",
    "embed": "Metrix mixing of embeddings",
}
for _mode in MODES:
    add_named_config(metrix_ingredient, _mode, {"mode": _mode}, MODE_DOCS[_mode])


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
    _config: dict,
) -> Criterion:
    """classifier: the cross-entropy classifier's dropout, detach and normalize_weight (model.* options, so
    that an architecture's named config carries its recipe's dropout). _config: the loss ingredient's config,
    where the pairwise loss reads its settings."""
    if pairwise is not None and pairwise not in PAIRWISE:
        raise InputError(f"unknown loss.pairwise {pairwise!r}: choose None or one of {', '.join(PAIRWISE)}")
    losses = {}
    if ce_weight > 0:
        ce = CrossEntropyLoss(embedding_size, num_classes, label_smoothing, **classifier)
        losses["cross_entropy"] = (ce_weight, ce)
    if pairwise is not None and pair_weight > 0:
        losses[pairwise] = (pair_weight, PAIRWISE[pairwise].build(num_classes, embedding_size, _config))
    mixer = get_mixer()
    if not losses:
        raise InputError(
            f"no loss to train with (loss.ce_weight={ce_weight}, loss.pairwise={pairwise!r}, "
            f"loss.pair_weight={pair_weight}): pick one, e.g. with loss.ce_weight=1.0 (cross-entropy)"
        )
    return Criterion(losses, mixer)
