"""The pairwise losses: each registers itself, with its settings, in its own file.

    @register_pairwise("contrastive", margin=Setting(0.5, "negative margin on the distance", NON_NEGATIVE))
    def contrastive(num_classes: int, embedding_size: int, margin: float) -> nn.Module:
        return ContrastiveLoss(margin)

The name is what `loss.pairwise` takes and the loss's named config (`with loss.contrastive`). Each setting is a
key of the `loss` ingredient (loss.margin), with its default, the comment print_config shows and the rule the
settings check applies before anything runs; the factory gets the data's class count, the embedding size and
every setting of its loss. The loss ingredient derives its config, its named configs and the `loss.pairwise`
choices from here; importing the `losses` package imports every loss file, so the registry is full.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from utils.settings import Check, choice, register

# Keys of the loss ingredient's own config scope (losses/ingredient.py), which no loss may take.
SHARED_KEYS = ("ce_weight", "pairwise", "pair_weight")


@dataclass(frozen=True)
class Setting:
    """One key of the loss ingredient: its default, its one-line comment and what values are valid."""

    default: Any
    doc: str
    rule: Check


Factory = Callable[..., nn.Module]  # (num_classes, embedding_size, **settings) -> the loss


@dataclass(frozen=True)
class PairwiseLoss:
    name: str
    settings: dict[str, Setting]
    factory: Factory

    def build(self, num_classes: int, embedding_size: int, config: dict) -> nn.Module:
        """The loss with this loss's settings read from the loss ingredient's config."""
        return self.factory(num_classes, embedding_size, **{key: config[key] for key in self.settings})


PAIRWISE: dict[str, PairwiseLoss] = {}
_subscribers: list[Callable[[PairwiseLoss], None]] = []


def register_pairwise(name: str, **settings: Setting) -> Callable[[Factory], Factory]:
    """Register the decorated factory as the pairwise loss `name`, with its settings (keys of the loss ingredient:
    prefix them with the loss's initials, as ms_alpha, so that no two losses share one)."""

    def add(factory: Factory) -> Factory:
        taken = {key: entry.name for entry in PAIRWISE.values() for key in entry.settings}
        taken |= dict.fromkeys(SHARED_KEYS, "the loss ingredient")
        if name in PAIRWISE:
            raise ValueError(f"a pairwise loss named {name!r} is already registered")
        if clashes := [f"{key} (of {taken[key]})" for key in settings if key in taken]:
            raise ValueError(f"pairwise loss {name!r}: settings already taken: {', '.join(clashes)}")
        entry = PairwiseLoss(name, dict(settings), factory)
        PAIRWISE[name] = entry
        register({f"loss.{key}": setting.rule for key, setting in settings.items()})
        register({"loss.pairwise": choice((None, *PAIRWISE))})
        for subscriber in _subscribers:
            subscriber(entry)
        return factory

    return add


def on_register(subscriber: Callable[[PairwiseLoss], None]) -> None:
    """Call subscriber with every loss registered so far and with each one registered later."""
    _subscribers.append(subscriber)
    for entry in PAIRWISE.values():
        subscriber(entry)


def unused_settings(config: dict) -> list[str]:
    """The flattened keys ("loss.margin") of the pairwise losses a flattened config does not train with: they change
    nothing, and a loss added later adds its keys to every config."""
    pairwise = config.get("loss.pairwise")
    return [f"loss.{key}" for entry in PAIRWISE.values() if entry.name != pairwise for key in entry.settings]
