"""Every setting with a valid type and range, in one table, checked before any data is read or model built.

    ex.config_hook(settings_hook)     # in each experiment, after ex is made

A rule names a key path ("epochs", "dataset.batch_size"), a test of the value and the human description
of what is valid. Keys absent from a config are skipped, so one table serves both experiments. A violation
is one line naming the key, the value and the valid range.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from losses.ingredient import PAIRWISE_LOSSES
from losses.metrix import ANCHOR_NEGATIVE, LAMS, MODES, SELECTIONS, STRATEGIES
from models.backbones import BACKBONES
from models.metric_model import NORM_LAYERS, POOLINGS
from models.vae_ingredient import ARCHS as VAE_ARCHS
from utils.data.ingredient import DATASETS, SAMPLERS
from utils.errors import InputError
from utils.evaluation.knn import BACKENDS
from utils.evaluation.metrics import METRICS

MISSING = object()
SEED_LIMIT = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit


@dataclass(frozen=True)
class Check:
    """A test of a value and the description of what passes it."""

    test: Callable[[Any], bool]
    description: str


def integer(minimum: int = 0, maximum: int | None = None) -> Check:
    upper = f" and <= {maximum:,}" if maximum is not None else ""
    return Check(
        lambda v: type(v) is int and v >= minimum and (maximum is None or v <= maximum),
        f"an integer >= {minimum}{upper}",
    )


def _real(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Check:
    left, right = ("(" if low_open else "["), (")" if high_open or high == math.inf else "]")
    return Check(
        lambda v: _real(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high),
        f"a number in {left}{low:g}, {high:g}{right}".replace("inf", "infinity"),
    )


def boolean() -> Check:
    return Check(lambda v: type(v) is bool, "True or False")


def text() -> Check:
    return Check(lambda v: type(v) is str and v != "", "a non-empty string")


def choice(options: Sequence) -> Check:
    """One of options: strings, and None when it is one of them."""
    return Check(
        lambda v: v is None and None in options or type(v) is str and v in options,
        "one of " + ", ".join(map(str, options)),
    )


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check.test(v), f"None or {check.description}")


def items(check: Check, length: int | None = None) -> Check:
    """A non-empty list (of the given length) of values passing check."""
    size = f"a list of {length}" if length else "a non-empty list"
    return Check(
        lambda v: (
            type(v) in (list, tuple)
            and len(v) > 0
            and (length is None or len(v) == length)
            and all(check.test(item) for item in v)
        ),
        f"{size}, each {check.description}",
    )


def either(*checks: Check) -> Check:
    return Check(lambda v: any(check.test(v) for check in checks), " or ".join(c.description for c in checks))


def ordered_pair(low: float, high: float = math.inf) -> Check:
    """[a, b] with low < a <= b <= high (RandomResizedCrop's scale and ratio)."""
    return Check(
        lambda v: type(v) in (list, tuple) and len(v) == 2 and all(_real(x) for x in v) and low < v[0] <= v[1] <= high,
        f"[a, b] with {low:g} < a <= b <= {high:g}".replace("inf", "infinity"),
    )


POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
SIZE = integer(1)
RECALLS = items(integer(1))
METRIC_LIST = items(choice(METRICS))
# resize: one side (the shorter one, as torchvision resizes) or [height, width].
RESIZE = optional(either(SIZE, items(SIZE, 2)))

# key path -> what is valid. Top level first, then each ingredient.
RULES: dict[str, Check] = {
    "dataset.name": choice(DATASETS),
    "dataset.data_path": text(),
    "dataset.train_file": text(),
    "dataset.test_file": text(),
    "dataset.gallery_file": optional(text()),
    "dataset.batch_size": SIZE,
    "dataset.test_batch_size": SIZE,
    "dataset.sampler": choice(SAMPLERS),
    "dataset.images_per_class": SIZE,
    "dataset.num_iterations": optional(SIZE),
    "dataset.preload": boolean(),
    "dataset.num_workers": integer(0),
    "dataset.pin_memory": boolean(),
    "dataset.persistent_workers": boolean(),
    "dataset.gpu_augment": boolean(),
    "dataset.crop_size": SIZE,
    "dataset.resize": RESIZE,
    "dataset.scale": ordered_pair(0, 1),
    "dataset.ratio": ordered_pair(0),
    "dataset.color_jitter": optional(items(NON_NEGATIVE, 4)),
    "dataset.rotate": optional(number(0, 180)),
    "dataset.hflip": boolean(),
    "evaluation.recalls": RECALLS,
    "evaluation.metrics": METRIC_LIST,
    "evaluation.final_metrics": METRIC_LIST,
    "evaluation.backend": choice(BACKENDS),
    "model.arch": choice((None, *BACKBONES)),
    "model.pretrained": optional(boolean()),
    "model.weights": optional(text()),
    "model.num_features": optional(SIZE),
    "model.pooling": choice(POOLINGS),
    "model.norm_layer": choice(NORM_LAYERS),
    "model.dropout": number(0, 1, high_open=True),
    "model.normalize": boolean(),
    "model.normalize_weight": boolean(),
    "model.remap": boolean(),
    "model.detach": boolean(),
    "model.freeze_bn": boolean(),
    "model.set_bn_eval": optional(boolean()),
    "loss.pairwise": choice((None, *PAIRWISE_LOSSES)),
    "loss.ce_weight": NON_NEGATIVE,
    "loss.pair_weight": NON_NEGATIVE,
    "loss.margin": NON_NEGATIVE,
    "loss.ms_alpha": POSITIVE,
    "loss.ms_beta": POSITIVE,
    "loss.ms_base": number(-1, 1),
    "loss.ms_epsilon": NON_NEGATIVE,
    "loss.ms_mining": boolean(),
    "loss.pa_alpha": POSITIVE,
    "loss.pa_delta": NON_NEGATIVE,
    "loss.proxy_lr_multiplier": POSITIVE,
    "metrix.mode": choice((None, *MODES)),
    "metrix.strategy": choice(STRATEGIES),
    "metrix.lam": choice(LAMS),
    "metrix.anchor_negative": choice(ANCHOR_NEGATIVE),
    "metrix.anchor_negative_weight": NON_NEGATIVE,
    "metrix.alpha": POSITIVE,
    "metrix.weight": NON_NEGATIVE,
    "metrix.max_pairs": optional(SIZE),
    "metrix.selection": choice(SELECTIONS),
    "vae.arch": choice(VAE_ARCHS),
    "vae.latent_dim": SIZE,
    "vae.hidden_dims": optional(items(SIZE)),
    "vae.in_channels": SIZE,
    "vae.kl_weight": NON_NEGATIVE,
}


def _shorter_side(resize: int | Sequence[int]) -> int:
    return resize if isinstance(resize, int) else min(resize)


@dataclass(frozen=True)
class CrossRule:
    """A rule relating several keys, checked once each of them is present and valid on its own."""

    keys: tuple[str, ...]
    test: Callable[..., bool]
    description: str


CROSS_RULES = [
    CrossRule(
        ("dataset.crop_size", "dataset.resize"),
        lambda crop, resize: resize is None or crop <= _shorter_side(resize),
        "dataset.crop_size <= dataset.resize (its shorter side)",
    ),
    CrossRule(
        ("dataset.sampler", "dataset.images_per_class", "dataset.batch_size"),
        lambda sampler, per_class, batch: sampler == "random" or per_class <= batch,
        "dataset.images_per_class <= dataset.batch_size with a class sampler",
    ),
]


def register(rules: Mapping[str, Check], cross_rules: Sequence[CrossRule] = ()) -> None:
    """Add the rules of the keys a module owns (full key paths: "epochs", "dataset.batch_size"), written next to
    their defaults; the module registers them when it is imported, before any command runs."""
    RULES.update(rules)
    CROSS_RULES.extend(cross_rules)


def lookup(config: Mapping, key: str) -> Any:
    """The value at a dotted key path; MISSING when any part is absent."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def violations(
    config: Mapping, rules: Mapping[str, Check] = RULES, cross_rules: Sequence[CrossRule] = CROSS_RULES
) -> list[str]:
    """One line per broken rule: the key, the value and what is valid."""
    lines, broken = [], set()
    for key, check in rules.items():
        value = lookup(config, key)
        if value is not MISSING and not check.test(value):
            broken.add(key)
            # Sacred reads `[recall,nmi]` (unquoted names) as one string.
            hint = f", quote them as in \"{key}=['a','b']\"" if isinstance(value, str) and value.startswith("[") else ""
            lines.append(f"{key}={value!r} is invalid: expected {check.description}{hint}")
    for rule in cross_rules:
        values = [lookup(config, key) for key in rule.keys]
        if MISSING not in values and not broken.intersection(rule.keys) and not rule.test(*values):
            shown = ", ".join(f"{key}={value!r}" for key, value in zip(rule.keys, values, strict=True))
            lines.append(f"{shown} are inconsistent: expected {rule.description}")
    return lines


def check_settings(
    config: Mapping, rules: Mapping[str, Check] = RULES, cross_rules: Sequence[CrossRule] = CROSS_RULES
) -> None:
    """Raise InputError listing every setting outside its valid range, one line each."""
    if lines := violations(config, rules, cross_rules):
        raise InputError("\n".join(lines))


def settings_hook(config: dict, command_name: str, logger: Any) -> dict:
    """A sacred config hook (`ex.config_hook(settings_hook)`): it sees the whole config before sacred seeds its
    random generators (which a negative seed would crash) and before any command runs. Every key of both
    experiments has a rule, so a value of another type (sacred only warns "Changed type of config entry")
    is an error naming the key."""
    check_settings(config)
    return {}
