"""A search space as text: one `KEY=KIND:ARGS` per argument or per line of a file.

lr=log:1e-5:1e-2        log-uniform float        loss.margin=uniform:0.1:0.5    uniform float
epochs=int:1:5          integer, both ends       optimizer=choice:adam,sgd      categorical
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import InputError

KINDS = ("log", "uniform", "int", "choice")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str
    values: tuple  # (low, high) or the choices

    def suggest(self, trial: Any) -> Any:
        """The trial's value of this setting."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "log")

    def text(self) -> str:
        return f"{self.key}={self.kind}:{(',' if self.kind == 'choice' else ':').join(map(str, self.values))}"


def is_dimension(argument: str) -> bool:
    _, _, spec = argument.partition("=")
    return spec.split(":", 1)[0] in KINDS and ":" in spec


def parse_dimension(argument: str) -> Dimension:
    key, _, spec = argument.partition("=")
    kind, _, rest = spec.partition(":")
    if kind == "choice":
        choices = tuple(choice for choice in rest.split(",") if choice)
        if not choices:
            raise InputError(f"search space {argument!r}: no choices; give e.g. {key}=choice:a,b")
        return Dimension(key, kind, choices)
    try:
        low, high = (int(x) if kind == "int" else float(x) for x in rest.split(":"))
    except ValueError:
        example = f"{key}=int:1:5" if kind == "int" else f"{key}={kind}:1e-4:1e-2"
        raise InputError(f"search space {argument!r}: give two {kind} bounds, e.g. {example}") from None
    if not low < high:
        raise InputError(f"search space {argument!r}: an empty range ({low} >= {high}); give LOW < HIGH")
    if kind == "log" and low <= 0:
        raise InputError(f"search space {argument!r}: a log range must be positive; give 0 < LOW < HIGH")
    return Dimension(key, kind, (low, high))


def read_arguments(arguments: Sequence[str], space_file: Path | None) -> list[str]:
    """The command line's arguments after those of the file (one per line, # comments)."""
    if space_file is None:
        return list(arguments)
    if not space_file.is_file():
        raise InputError(f"--space {space_file}: no such file; give a file with one KEY=KIND:ARGS per line")
    lines = [line.split("#", 1)[0].strip() for line in space_file.read_text().splitlines()]
    return [line for line in lines if line] + list(arguments)


def split(arguments: Sequence[str]) -> tuple[list[Dimension], list[str]]:
    """The dimensions and the fixed settings (every other argument) of every trial."""
    dimensions = [parse_dimension(argument) for argument in arguments if is_dimension(argument)]
    keys = [dimension.key for dimension in dimensions]
    if repeated := {key for key in keys if keys.count(key) > 1}:
        raise InputError(f"search space: {', '.join(sorted(repeated))} given twice; give each setting once")
    if not dimensions:
        raise InputError("no search space: give at least one KEY=KIND:ARGS, e.g. lr=log:1e-4:1e-2")
    return dimensions, [argument for argument in arguments if not is_dimension(argument)]


def sample_tokens(dimensions: Sequence[Dimension]) -> list[str]:
    """One value of each dimension (its low end or first choice): the settings the experiment is asked to know."""
    return [f"{d.key}={d.values[0]}" for d in dimensions]
