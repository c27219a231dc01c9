"""Compare runs: `python -m utils.report RESULT_DIR [RESULT_DIR ...] [--csv PATH] [--chart PATH]`.

Reads the run folders sacred's `-F RESULT_DIR` wrote (RESULT_DIR/<id>/ with config.json, run.json,
info.json), prints one row per group of runs whose configurations are equal but for the seed and
the settings that do not change results (IGNORED), with the settings that differ between groups,
the final metrics (mean +- sample std over the seeds, with their count) and, for runs started with the command
line of a paper recipe (utils/reporting/recipes.py), the published R@1.
"""

import argparse
import csv
import json
import statistics
import sys
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
    "baseline",
    "resume",
    "checkpoint",
    "images",
    "out",
    "bad_images",
    "visdom_port",
    "visdom_freq",
}
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


@dataclass
class Group:
    runs: list[Run]
    published: tuple[float, str] | None = None

    def values(self, metric: str) -> list[float]:
        return [run.metrics[metric] for run in self.runs if metric in run.metrics]


JSON_TYPES = {dict: "an object", list: "a list", str: "a string", float: "a number", bool: "true or false"}


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
    name = typed(typed(run, "experiment", (dict,), {}, run_path, fix), "name", (str,), "?", run_path, fix)
    meta = typed(run, "meta", (dict,), {}, run_path, fix)
    named_configs = typed(meta, "named_configs", (list,), [], run_path, fix)
    if not all(type(named_config) is str for named_config in named_configs):
        raise InputError(f"{run_path}: 'named_configs' holds something other than names; {fix}")
    updates = typed(meta, "config_updates", (dict,), {}, run_path, fix)
    info = read_json(info_path, fix) if info_path.exists() else {}
    metrics = dict(typed(info, "metrics", (dict,), {}, info_path, fix))
    for metric in metrics:
        typed(metrics, metric, (int, float), None, f"{info_path}, metrics", fix)
    if "cosine/R@1" not in metrics and isinstance(run.get("result"), float):
        metrics["cosine/R@1"] = run["result"]
    return Run(
        folder,
        status,
        name,
        settings_that_matter(flatten(read_json(folder / "config.json", fix))),
        metrics,
        tuple(named_configs),
        relevant(updates),
    )


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


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs equal in everything but IGNORED settings, in order of their first run."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (run.experiment, *sorted((k, repr(v)) for k, v in run.config.items() if k not in IGNORED))
        groups.setdefault(key, Group([])).runs.append(run)
    for group in groups.values():
        group.published = published_for(group.runs[0])
    return list(groups.values())


def differing_keys(runs: Sequence[Run]) -> list[str]:
    keys = sorted({key for run in runs for key in run.config} - IGNORED)
    return [key for key in keys if len({repr(run.config.get(key, "-")) for run in runs}) > 1]


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f} (n={len(values)})"


def status_of(group: Group) -> str:
    statuses = [run.status for run in group.runs]
    return ", ".join(
        f"{status} x{statuses.count(status)}" if len(statuses) > 1 else status for status in dict.fromkeys(statuses)
    )


def table_rows(groups: Sequence[Group], keys: Sequence[str], metrics: Sequence[str]) -> list[list[str]]:
    header = ["runs", "seeds", "status", *keys, *metrics, "published R@1"]
    rows = [header]
    for group in groups:
        published = f"{group.published[0] / 100:.3f} ({group.published[1]})" if group.published else "-"
        rows.append(
            [
                ",".join(run.folder.name for run in group.runs),
                ",".join(str(run.config.get("seed", "-")) for run in group.runs),
                status_of(group),
                *(str(group.runs[0].config.get(key, "-")) for key in keys),
                *(summary(group.values(metric)) for metric in metrics),
                published,
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_csv(groups: Sequence[Group], keys: Sequence[str], path: Path) -> None:
    """One line per group: its settings, and mean, std and count of every final metric any run has."""
    metrics = sorted({metric for group in groups for run in group.runs for metric in run.metrics})
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "runs",
                "status",
                *keys,
                *(f"{m} {s}" for m in metrics for s in ("mean", "std", "n")),
                "published R@1",
                "published in",
            ]
        )
        for group in groups:
            stats = []
            for metric in metrics:
                values = group.values(metric)
                stats += [
                    statistics.mean(values) if values else "",
                    statistics.stdev(values) if len(values) > 1 else "",
                    len(values),
                ]
            writer.writerow(
                [
                    " ".join(run.folder.name for run in group.runs),
                    status_of(group),
                    *(group.runs[0].config.get(key, "") for key in keys),
                    *stats,
                    group.published[0] / 100 if group.published else "",
                    group.published[1] if group.published else "",
                ]
            )


def draw_chart(groups: Sequence[Group], keys: Sequence[str], path: Path) -> None:
    """Bars of each group's mean cosine R@1 with its std, and the published R@1 beside it where known."""
    labels = [
        "\n".join(
            [*(f"{key}={group.runs[0].config.get(key, '-')}" for key in keys), f"n={len(group.values('cosine/R@1'))}"]
        )
        for group in groups
    ]
    figure = Figure(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.8), dpi=100, layout="constrained")
    ax = figure.subplots()
    positions = range(len(groups))
    means = [statistics.mean(group.values("cosine/R@1")) if group.values("cosine/R@1") else 0 for group in groups]
    errors = [statistics.stdev(v) if len(v := group.values("cosine/R@1")) > 1 else 0 for group in groups]
    ax.bar([p - 0.2 for p in positions], means, 0.4, yerr=errors, capsize=4, label="measured (mean +- std)")
    published = [group.published[0] / 100 if group.published else 0 for group in groups]
    ax.bar([p + 0.2 for p in positions], published, 0.4, label="published", color="#999999")
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set(ylabel="cosine R@1", ylim=(0, 1), title="cosine R@1 by configuration")
    ax.legend()
    figure.savefig(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="also write the table, every metric, as CSV")
    parser.add_argument("--chart", type=Path, metavar="PATH", help="also draw cosine R@1 per group as a PNG")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.result_dirs)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    groups = group_runs(runs)
    keys = differing_keys(runs)
    metrics = [m for m in METRIC_COLUMNS if any(m in run.metrics for run in runs)]
    print(format_table(table_rows(groups, keys, metrics)))
    if args.csv:
        write_csv(groups, keys, args.csv)
    if args.chart:
        draw_chart(groups, keys, args.chart)


if __name__ == "__main__":
    main(sys.argv[1:])
