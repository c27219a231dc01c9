"""Compare runs: `python -m utils.report RESULT_DIR [RESULT_DIR ...] [--csv PATH] [--chart PATH] [--status S,...]`.

Reads the run folders sacred's `-F RESULT_DIR` wrote (RESULT_DIR/<id>/ with config.json, run.json, info.json) and
prints a table per experiment kind: one row per group of runs equal in configuration (but for the seed and the
settings that do not change results, IGNORED) and comparability card, with the settings that differ within the
table, the final metrics (mean +- half-width of the 95% Student-t interval over seeds, with their count), the
gain over the frozen backbone and, for runs started with the command line of a paper recipe
(utils/reporting/recipes.py), the published R@1. A run and the runs that resumed it are one chain, counted once;
runs that did not complete are listed apart.
"""

import argparse
import csv
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from sacred.arg_parser import get_config_updates

from utils.errors import InputError
from utils.reporting.recipes import RECIPES

# Where the data lives, how fast it is read, where temporary files and live curves go, and the seed
# (the grouping key): settings that do not change what a run measures.
IGNORED = {
    "seed",
    "dataset.data_path",
    "dataset.num_workers",
    "dataset.pin_memory",
    "dataset.persistent_workers",
    "dataset.preload",
    "dataset.test_batch_size",
    "evaluation.backend",
    "cpu",
    "cudnn_flag",
    "output_dir",
    "checkpoint_every",
    "dist_timeout",
    "resume",
    "checkpoint",
    "images",
    "out",
    "bad_images",
    "visdom_port",
    "visdom_freq",
}
RESULT_METRIC = "cosine/R@1"  # a metric-learning run's result: what the chart draws and the gain is in
METRIC_COLUMNS = ("cosine/R@1", "l2/R@1", "cosine/MAP@R", "NMI", "test/reconstruction")


@dataclass
class Run:
    folder: Path
    status: str
    experiment: str
    config: dict[str, object]  # flattened: {"dataset.name": "cub", ...}
    metrics: dict[str, float]
    # The sacred command line it was started with (run.json's meta): named configs in order, and the updates
    # (flattened) that are not IGNORED.
    named_configs: tuple[str, ...] = ()
    updates: dict[str, object] = field(default_factory=dict)
    started: str = ""  # run.json's start_time (ISO 8601, sorts in time): orders the links of a chain
    parent: Path | None = None  # the run folder it resumed: info.json's "parent", or resume= of an older run
    card: dict[str, object] = field(default_factory=dict)  # info.json's comparability card; "selection" always
    backbone: dict[str, float] = field(default_factory=dict)  # the frozen backbone's metrics, before training


@dataclass
class Chain:
    """A run and the runs that resumed it (resume=PATH), in the order they ran: one training, counted once."""

    links: list[Run]

    @property
    def result(self) -> Run | None:
        """The last link that completed: the chain's result (None when none completed)."""
        return next((run for run in reversed(self.links) if run.status == "COMPLETED"), None)

    @property
    def last(self) -> Run:
        """The link that stands for the chain: its result, else its last link."""
        return self.result or self.links[-1]

    @property
    def status(self) -> str:
        return self.last.status

    @property
    def name(self) -> str:
        return ">".join(run.folder.name for run in self.links)


@dataclass
class Group:
    """Chains of one configuration and card but for the seed: the samples folded into one row."""

    chains: list[Chain]
    published: tuple[float, str] | None = None

    @property
    def runs(self) -> list[Run]:
        """The samples: each chain's result."""
        return [chain.last for chain in self.chains]

    def values(self, metric: str) -> list[float]:
        return [run.metrics[metric] for run in self.runs if metric in run.metrics]

    def gains(self, metric: str) -> list[float]:
        """Each run's gain over its frozen backbone in metric, for the runs that evaluated it."""
        return [
            run.metrics[metric] - run.backbone[metric]
            for run in self.runs
            if metric in run.metrics.keys() & run.backbone
        ]


JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


def json_type(value: object) -> str:
    if value is None:
        return "null"
    return "a number" if type(value) is int else JSON_TYPES.get(type(value), type(value).__name__)


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in path; anything else (a list, a number, no JSON at all) is one line naming the file."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(content, dict):
        raise InputError(f"{path} holds {json_type(content)}, not a JSON object; {fix}")
    return content


def typed(content: dict, key: str, kinds: tuple[type, ...], default: object, where: Path | str, fix: str) -> Any:
    """content[key] (default when absent) when it has the JSON type sacred writes there, else one line naming the
    file (where) and the key."""
    value = content.get(key, default)
    if type(value) not in kinds:
        expected = " or ".join(dict.fromkeys("a number" if kind is int else JSON_TYPES[kind] for kind in kinds))
        raise InputError(f"{where}: {key!r} is {json_type(value)}, not {expected}; {fix}")
    return value


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        if key.startswith("__"):  # a named config's docstring, not a setting
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | tuple) else value
    return flat


def settings_that_matter(config: dict[str, object]) -> dict[str, object]:
    """A flattened configuration without the settings of the pairwise losses it does not train with: they change
    nothing, and a loss added since a run adds its keys to every later configuration (losses/registry.py)."""
    if "loss.pairwise" not in config:
        return config
    from losses.registry import unused_settings  # imports torch: only for a run with a loss

    unused = set(unused_settings(config))
    return {key: value for key, value in config.items() if key not in unused}


def read_run(folder: Path) -> Run:
    fix = f"the run was cut off while writing it: delete {folder} or restore the file"
    run_path, info_path = folder / "run.json", folder / "info.json"
    run = read_json(run_path, fix)
    if "status" not in run:
        raise InputError(f"{run_path} has no run status; {fix}")
    status = typed(run, "status", (str,), None, run_path, fix)
    experiment = typed(run, "experiment", (dict,), {}, run_path, fix)
    name = typed(experiment, "name", (str,), "?", run_path, fix)
    meta = typed(run, "meta", (dict,), {}, run_path, fix)
    named_configs = typed(meta, "named_configs", (list,), [], run_path, fix)
    if not all(type(named_config) is str for named_config in named_configs):
        raise InputError(f"{run_path}: 'named_configs' holds something other than names; {fix}")
    updates = typed(meta, "config_updates", (dict,), {}, run_path, fix)
    info = read_json(info_path, fix) if info_path.exists() else {}
    metrics = numbers(info, "metrics", info_path, fix)
    if name == "metric_learning" and "cosine/R@1" not in metrics and isinstance(run.get("result"), float):
        metrics["cosine/R@1"] = run["result"]
    config = settings_that_matter(flatten(read_json(folder / "config.json", fix)))
    card = typed(info, "card", (dict,), {}, info_path, fix)
    for key in card:
        typed(card, key, (str, int, float, bool, type(None)), None, f"{info_path}, card", fix)
    return Run(
        folder,
        status,
        name,
        config,
        metrics,
        tuple(named_configs),
        relevant(updates),
        started=str(run.get("start_time", "")),
        parent=parent_folder(info, config, experiment.get("base_dir"), info_path, fix),
        # Runs older than the card chose their best epoch on the test set: the only protocol there was.
        card={"selection": config.get("evaluation.protocol", "test"), **card},
        backbone=numbers(info, "backbone", info_path, fix),
    )


def numbers(info: dict, key: str, info_path: Path, fix: str) -> dict[str, float]:
    """info[key], a dict of metric -> number (empty when absent), or one line naming the file and the metric."""
    values = dict(typed(info, key, (dict,), {}, info_path, fix))
    for metric in values:
        typed(values, metric, (int, float), None, f"{info_path}, {key}", fix)
    return values


def parent_folder(info: dict, config: dict, base_dir: object, info_path: Path, fix: str) -> Path | None:
    """The run folder a resumed run continued: info.json's "parent" (utils/reporting/sacred_run.py), or for a run
    recorded before it, its resume= setting (relative to the folder the experiment ran from)."""
    if "parent" in info:
        parent = typed(info, "parent", (dict,), {}, info_path, fix)
        return Path(typed(parent, "folder", (str,), None, f"{info_path}, parent", fix))
    resume = config.get("resume")
    if not isinstance(resume, str) or not resume:
        return None
    path = Path(resume).expanduser()
    if not path.is_absolute() and isinstance(base_dir, str):
        path = Path(base_dir) / path
    return path.parent if path.suffix == ".pt" or path.is_file() else path


def find_runs(result_dirs: Iterable[str | Path]) -> list[Run]:
    """Every run folder (one holding run.json) in or at the given folders, in id order."""
    runs = []
    for result_dir in map(Path, result_dirs):
        if not result_dir.is_dir():
            raise InputError(f"{result_dir} is not a folder; give the folder passed to `-F`")
        folders = (
            [result_dir]
            if (result_dir / "run.json").exists()
            else sorted(
                (path for path in result_dir.iterdir() if (path / "run.json").exists()),
                key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name),
            )
        )
        if not folders:
            raise InputError(
                f"{result_dir} holds no runs (no {result_dir}/<id>/run.json); "
                "give the folder passed to `-F` when training"
            )
        runs.extend(read_run(folder) for folder in folders)
    return runs


def relevant(updates: dict) -> dict[str, object]:
    """Config updates, flattened, without the IGNORED settings."""
    return {key: value for key, value in flatten(updates).items() if key not in IGNORED}


@cache
def recipe_command(command: str) -> tuple[tuple[str, ...], dict[str, object]]:
    """The named configs and relevant updates of a recipe's `python experiment.py with ...` line."""
    updates, named_configs = get_config_updates(command.split(" with ", 1)[1].split())
    return tuple(named_configs), relevant(updates)


def published_for(run: Run) -> tuple[float, str] | None:
    """The published R@1 (%) and its paper when the run was started with a recipe's command line (give or take
    IGNORED settings: seed, data path, workers, resume, ...), else None."""
    if run.experiment != "metric_learning":
        return None
    for recipe in RECIPES:
        if recipe_command(recipe.command) == (run.named_configs, run.updates):
            return recipe.published_r1, recipe.paper
    return None


def link_chains(runs: Sequence[Run]) -> list[Chain]:
    """The runs joined into chains through the parent each resumed run records, in order of their first run. A
    parent is found by its folder, or, for folders copied elsewhere since, by the -F folder's name and the run id."""
    by_path = {run.folder.resolve(): index for index, run in enumerate(runs)}
    by_name = {(run.folder.parent.name, run.folder.name): index for index, run in enumerate(runs)}
    root = list(range(len(runs)))

    def find(index: int) -> int:
        while root[index] != index:
            index = root[index]
        return index

    for index, run in enumerate(runs):
        if run.parent is None:
            continue
        parent = by_path.get(run.parent.resolve(), by_name.get((run.parent.parent.name, run.parent.name)))
        if parent is not None:
            root[find(index)] = find(parent)
    chains: dict[int, list[Run]] = {}
    for index, run in enumerate(runs):
        chains.setdefault(find(index), []).append(run)
    return [Chain(sorted(links, key=lambda run: run.started)) for links in chains.values()]


# Card fields that do not split a row: the seed is what a row folds over; the epochs run follow from the settings
# (and early stopping, which differs between seeds).
UNSPLIT_CARD = {"seed", "epochs_run"}


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """The completed chains of runs grouped by experiment, configuration (but IGNORED settings) and comparability
    card (but UNSPLIT_CARD), in order of their first run."""
    groups: dict[tuple, Group] = {}
    for chain in link_chains(runs):
        if chain.result is None:
            continue
        run = chain.result
        config = sorted((key, repr(value)) for key, value in run.config.items() if key not in IGNORED)
        card = sorted((key, repr(value)) for key, value in run.card.items() if key not in UNSPLIT_CARD)
        groups.setdefault((run.experiment, *config, "card", *card), Group([])).chains.append(chain)
    for group in groups.values():
        # A chain's first link holds the command line it was started with (a resumed link's is resume= alone).
        group.published = published_for(group.chains[0].links[0])
    return list(groups.values())


def differing_keys(runs: Sequence[Run]) -> list[str]:
    keys = sorted({key for run in runs for key in run.config} - IGNORED)
    return [key for key in keys if len({repr(run.config.get(key, "-")) for run in runs}) > 1]


def card_keys(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """The card fields (but the seed and the selection, shown apart) equal in all runs, and those that differ."""
    keys = sorted({key for run in runs for key in run.card} - {"seed", "selection"})
    differ = {key for key in keys if len({repr(run.card.get(key, "-")) for run in runs}) > 1}
    return [key for key in keys if key not in differ], [key for key in keys if key in differ]


@cache
def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom: where its density, integrated from 0 by
    Simpson's rule, reaches 0.475 (found by bisection; scipy.stats.t.ppf(0.975, df) without scipy)."""
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_scale - (df + 1) / 2 * math.log1p(x * x / df))

    def mass(x: float, steps: int = 2000) -> float:
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return h / 3 * (density(0) + inner + density(x))

    low, high = 0.0, 64.0  # df=1: 12.706
    for _ in range(45):
        middle = (low + high) / 2
        low, high = (middle, high) if mass(middle) < 0.475 else (low, middle)
    return (low + high) / 2


def interval(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% Student-t confidence interval (None for a single value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summary(values: Sequence[float], sign: str = "") -> str:
    if not values:
        return "-"
    mean, half_width = interval(values)
    spread = f" +- {half_width:.4f}" if half_width is not None else ""
    return f"{mean:{sign}.4f}{spread} (n={len(values)})"


def cell(values: Iterable[object]) -> str:
    """Distinct values, in order, comma-separated."""
    return ",".join(dict.fromkeys(str(value) for value in values))


def selection_of(group: Group) -> str:
    selection = cell(run.card["selection"] for run in group.runs)
    return f"{selection}*" if selection == "test" else selection


def repeated_seeds(group: Group) -> dict[object, list[str]]:
    """Seed -> the chains that share it, for seeds more than one chain of the group trained with."""
    chains: dict[object, list[str]] = {}
    for chain in group.chains:
        chains.setdefault(chain.last.config.get("seed", "-"), []).append(chain.name)
    return {seed: names for seed, names in chains.items() if len(names) > 1}


@dataclass
class Table:
    """The rows of one experiment kind: the settings and card fields that differ within it are its columns."""

    experiment: str
    groups: list[Group]
    keys: list[str]  # differing settings
    card_common: list[str]
    card_columns: list[str]
    metrics: list[str]
    gain: bool  # a column of the gain over the frozen backbone in RESULT_METRIC
    published: bool  # a column of the published R@1 (a row is a paper recipe)

    @classmethod
    def of(cls, experiment: str, groups: list[Group]) -> "Table":
        runs = [run for group in groups for run in group.runs]
        common, columns = card_keys(runs)
        return cls(
            experiment,
            groups,
            differing_keys(runs),
            common,
            columns,
            [m for m in METRIC_COLUMNS if any(m in run.metrics for run in runs)],
            gain=any(group.gains(RESULT_METRIC) for group in groups),
            published=any(group.published for group in groups),
        )

    def header(self) -> list[str]:
        card = [f"card.{key}" for key in self.card_columns]
        gain = [f"gain {RESULT_METRIC}"] if self.gain else []
        return ["runs", "seeds", "selection", *self.keys, *card, *self.metrics, *gain] + (
            ["published R@1"] if self.published else []
        )

    def rows(self) -> list[list[str]]:
        rows = [self.header()]
        for group in self.groups:
            seeds = ",".join(str(run.config.get("seed", "-")) for run in group.runs)
            published = f"{group.published[0] / 100:.3f} ({group.published[1]})" if group.published else "-"
            rows.append(
                [
                    ",".join(chain.name for chain in group.chains),
                    f"{seeds} !" if repeated_seeds(group) else seeds,
                    selection_of(group),
                    *(str(group.runs[0].config.get(key, "-")) for key in self.keys),
                    *(cell(run.card.get(key, "-") for run in group.runs) for key in self.card_columns),
                    *(summary(group.values(metric)) for metric in self.metrics),
                    *([summary(group.gains(RESULT_METRIC), "+")] if self.gain else []),
                    *([published] if self.published else []),
                ]
            )
        return rows

    def card_line(self) -> str:
        runs = [run for group in self.groups for run in group.runs]
        if not any(len(run.card) > 1 for run in runs):
            return "card: not recorded (runs from before the comparability card)"
        return "card: " + ", ".join(f"{key}={runs[0].card.get(key, '-')}" for key in self.card_common)

    def notes(self) -> list[str]:
        notes = []
        for group in self.groups:
            for seed, chains in repeated_seeds(group).items():
                notes.append(
                    f"! seed {seed} counted twice: runs {' and '.join(chains)} trained the same configuration with "
                    "the same seed, so they are not independent samples"
                )
        return notes


def tables(runs: Sequence[Run]) -> list[Table]:
    """One table per experiment kind, in order of its first run."""
    kinds: dict[str, list[Run]] = {}
    for run in runs:
        kinds.setdefault(run.experiment, []).append(run)
    found = [Table.of(experiment, group_runs(kind_runs)) for experiment, kind_runs in kinds.items()]
    return [table for table in found if table.groups]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def unfinished_rows(chains: Sequence[Chain]) -> list[list[str]]:
    rows = [["runs", "status", "experiment", "seed", "folder"]]
    for chain in chains:
        run = chain.last
        rows.append([chain.name, run.status, run.experiment, str(run.config.get("seed", "-")), str(run.folder)])
    return rows


def report_text(runs: Sequence[Run], statuses: set[str]) -> str:
    """The printed report: a table per experiment kind (completed chains), then the chains that did not complete,
    then the legend of the marks used."""
    sections, notes = [], []
    shown = tables(runs) if "COMPLETED" in statuses else []
    for table in shown:
        count = sum(len(group.chains) for group in table.groups)
        title = f"{table.experiment}: {count} completed run{'s' * (count > 1)} in {len(table.groups)} row(s)"
        sections.append(f"{title}\n{table.card_line()}\n{format_table(table.rows())}")
        notes += table.notes()
    unfinished = [chain for chain in link_chains(runs) if chain.result is None and chain.status in statuses]
    if unfinished:
        title = f"did not complete (not averaged): {len(unfinished)} run{'s' * (len(unfinished) > 1)}"
        sections.append(f"{title}\n{format_table(unfinished_rows(unfinished))}")
    if not sections:
        return f"no runs with status {', '.join(sorted(statuses))}"
    if any(selection_of(group) == "test*" for table in shown for group in table.groups):
        notes.append(
            "* selected on the test set: the best epoch was chosen on the test data (the papers' protocol), "
            "an optimistic estimate; evaluation.protocol=validation chooses it on a validation split"
        )
    if any(len(chain.links) > 1 for table in shown for group in table.groups for chain in group.chains):
        notes.append("a>b: run b resumed run a, one run whose result is its last completed link")
    if shown:
        notes.append("mean +- half-width of the 95% Student-t interval over seeds (n runs)")
    return "\n\n".join(sections) + ("\n\n" + "\n".join(notes) if notes else "")


def write_csv(shown: Sequence[Table], path: Path) -> None:
    """One line per row of the tables: its settings, card fields and, for every final metric any run has, mean,
    sample std, half-width of the 95% interval and count."""
    groups = [group for table in shown for group in table.groups]
    runs = [run for group in groups for run in group.runs]
    keys = list(dict.fromkeys(key for table in shown for key in table.keys))
    card = list(dict.fromkeys(key for run in runs for key in run.card if key != "seed"))
    metrics = sorted({metric for run in runs for metric in run.metrics})
    gains = [f"gain {RESULT_METRIC}"] if any(table.gain for table in shown) else []
    stats = ("mean", "std", "ci95", "n")
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "runs",
                "experiment",
                "seeds",
                *keys,
                *(f"card.{key}" for key in card),
                *(f"{m} {s}" for m in [*metrics, *gains] for s in stats),
                "published R@1",
                "published in",
            ]
        )
        for table in shown:
            for group in table.groups:
                columns = [group.values(metric) for metric in metrics] + [group.gains(RESULT_METRIC)] * len(gains)
                writer.writerow(
                    [
                        " ".join(chain.name for chain in group.chains),
                        table.experiment,
                        " ".join(str(run.config.get("seed", "")) for run in group.runs),
                        *(group.runs[0].config.get(key, "") for key in keys),
                        *(cell(run.card.get(key, "") for run in group.runs) for key in card),
                        *(stat for values in columns for stat in csv_stats(values)),
                        group.published[0] / 100 if group.published else "",
                        group.published[1] if group.published else "",
                    ]
                )


def csv_stats(values: Sequence[float]) -> list[object]:
    if not values:
        return ["", "", "", 0]
    mean, half_width = interval(values)
    spread = statistics.stdev(values) if len(values) > 1 else ""
    return [mean, spread, "" if half_width is None else half_width, len(values)]


def chart_labels(groups: Sequence[Group], kind: str = "") -> list[str]:
    """A label per group: kind (the experiment, when the chart has several), then the settings and card fields that
    differ among the groups, wrapped to lines of at most LABEL_WIDTH characters; "*" marks a result selected on the
    test set."""
    runs = [group.runs[0] for group in groups]
    keys, (_, card) = differing_keys(runs), card_keys(runs)
    labels = []
    for group, run in zip(groups, runs, strict=True):
        settings = [f"{key}={run.config.get(key, '-')}" for key in keys]
        settings += [f"card.{key}={run.card.get(key, '-')}" for key in card]
        text = kind + (", ".join(settings) or "all runs")
        labels.append(textwrap.fill(text, LABEL_WIDTH) + (" *" if selection_of(group) == "test*" else ""))
    return labels


LABEL_WIDTH = 60


def draw_chart(shown: Sequence[Table], path: Path) -> None:
    """Horizontal bars of each row's mean cosine R@1 with its 95% interval and count, and the published R@1 beside
    it where known; the figure is sized to its labels (chart_labels, per table)."""
    groups, labels = [], []
    for table in shown:
        charted = [group for group in table.groups if group.values(RESULT_METRIC)]
        groups += charted
        labels += chart_labels(charted, f"{table.experiment}: " if len(shown) > 1 else "")
    lines = [label.count("\n") + 1 for label in labels]
    longest = max((len(line) for label in labels for line in label.splitlines()), default=10)
    figure = Figure(
        figsize=(4.5 + 0.07 * longest, 1.6 + 0.2 * sum(max(n, 2) for n in lines)), dpi=100, layout="constrained"
    )
    ax = figure.subplots()
    positions = list(range(len(groups)))[::-1]  # the first row on top, as in the table
    stats = [interval(group.values(RESULT_METRIC)) for group in groups]
    means = [mean for mean, _ in stats]
    errors = [half_width or 0 for _, half_width in stats]
    ax.barh([p + 0.2 for p in positions], means, 0.4, xerr=errors, capsize=3, label="measured (mean, 95% interval)")
    if any(group.published for group in groups):
        published = [group.published[0] / 100 if group.published else 0 for group in groups]
        ax.barh([p - 0.2 for p in positions], published, 0.4, label="published", color="#999999")
    for position, mean, error, group in zip(positions, means, errors, groups, strict=True):
        ax.text(mean + error + 0.01, position + 0.2, f"n={len(group.values(RESULT_METRIC))}", va="center", fontsize=7)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set(xlabel=RESULT_METRIC, xlim=(0, 1), title=f"{RESULT_METRIC} by configuration")
    ax.legend(loc="lower right", fontsize=8)
    if any(label.endswith(" *") for label in labels):
        figure.supxlabel("* best epoch chosen on the test set", fontsize=8)
    figure.savefig(path)


STATUSES = ("COMPLETED", "INTERRUPTED", "FAILED", "RUNNING", "TIMEOUT", "QUEUED")  # sacred's run statuses


def status_filter(text: str) -> set[str]:
    """The statuses of --status S[,S...] (any case), or one line naming the unknown ones."""
    statuses = {status.strip().upper() for status in text.split(",")}
    unknown = sorted(statuses - set(STATUSES))
    if unknown:
        raise InputError(f"--status {text}: unknown status {', '.join(unknown)}; give some of {','.join(STATUSES)}")
    return statuses


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="also write the tables, every metric, as CSV")
    parser.add_argument("--chart", type=Path, metavar="PATH", help="also draw cosine R@1 per row as a PNG")
    parser.add_argument(
        "--status",
        default=",".join(STATUSES),
        metavar="S[,S...]",
        help=f"show only runs of these statuses (of {','.join(STATUSES)}; a chain has its result's, else its last "
        "link's); default: all",
    )
    parser.add_argument(
        "--reality-check",
        action="store_true",
        help="combine the four fold runs (dataset.folds=4) into the Reality Check's concatenated and separated results",
    )
    args = parser.parse_args(argv)
    if args.reality_check:
        # Imported here: the combination needs torch and faiss, the table of runs only their JSON files.
        from utils.evaluation.protocol import format_reality_check, reality_check

        try:
            print(format_reality_check(reality_check(args.result_dirs)))
        except InputError as error:
            raise SystemExit(f"error: {error}") from None
        return
    try:
        statuses = status_filter(args.status)
        runs = find_runs(args.result_dirs)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    print(report_text(runs, statuses))
    shown = tables(runs) if "COMPLETED" in statuses else []
    if args.csv:
        write_csv(shown, args.csv)
    if args.chart:
        draw_chart(shown, args.chart)


if __name__ == "__main__":
    main(sys.argv[1:])
