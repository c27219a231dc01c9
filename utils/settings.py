"""Every setting's valid type and range, checked before any data is read or model built.

    register({"dataset.batch_size": SIZE}, cross_rules=[...])   # in the module that owns the key, beside its default
    ex.config_hook(settings_hook)                                # in each experiment, after ex is made

A rule names a key path ("epochs", "dataset.batch_size"), a test of the value and the human description of what is
valid. The table merges what the modules register when they are imported (an experiment imports its ingredients
before it runs), and this module imports none of them: a module that registers rules imports this one. Keys absent
from a config are skipped, so one table serves both experiments. A violation is one line naming the key, the value
and the valid range.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from utils.errors import InputError

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

# key path -> what is valid, filled by the modules that own the keys (register).
RULES: dict[str, Check] = {}


@dataclass(frozen=True)
class CrossRule:
    """A rule relating several keys, checked once each of them is present and valid on its own."""

    keys: tuple[str, ...]
    test: Callable[..., bool]
    description: str


CROSS_RULES: list[CrossRule] = []


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


def add_named_config(ingredient: Any, name: str, values: dict, doc: str) -> None:
    """ingredient.add_named_config(name, values) with the doc line `print_named_configs` shows: sacred gives dict
    configs none, and a function config's docstring would land in the config as a `__doc__` entry."""
    ingredient.add_named_config(name, values)
    ingredient.named_configs[name].__doc__ = doc
