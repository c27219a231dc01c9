"""Run a grid of settings and seeds as sacred runs of either experiment in one -F folder, here or on SLURM.

    python -m utils.sweep -F sweep_dir --seeds 1,2,3 -- loss.contrastive,loss.multisimilarity epochs=2
    python -m utils.sweep -F sweep_dir --jobs 2 -- lr=1e-3,3e-4 epochs=2           # two runs at a time
    python -m utils.sweep -F sweep_dir --slurm sweep.sbatch --nproc 8 -- ...        # one array task per run
    python -m utils.report sweep_dir                                                # the table, seeds folded

Each argument after `--` is an axis: alternatives separated by commas (`lr=1e-3,3e-4`, or named configs
`loss.contrastive,loss.multisimilarity`); one without a comma is a setting of every run. The runs are the product
of the axes and the seeds, each named after its settings (its id in the folder). Starting the same sweep again
skips the completed runs, resumes the stopped ones (`resume=`, a new link of their chain) and starts the missing
ones: an interrupted sweep, or a requeued array task, goes on where it stopped.
"""

import argparse
import itertools
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.errors import InputError
from utils.sweep.runs import REPO, SCRIPTS, check_tokens, run_locally, seed_list

SLURM_SIGNAL = "TERM@120"  # two minutes before the time limit or a preemption: the runs write their checkpoint


def axes(arguments: Sequence[str]) -> list[list[str]]:
    """Each argument's alternatives: `key=a,b` -> [key=a, key=b]; `name1,name2` -> [name1, name2]."""
    result = []
    for argument in arguments:
        key, equals, values = argument.rpartition("=") if "=" in argument else ("", "", argument)
        alternatives = [f"{key}{equals}{value}" for value in values.split(",")]
        if any(not value for value in values.split(",")) or not argument:
            raise InputError(f"grid axis {argument!r} has an empty alternative: give `key=a,b` or `name1,name2`")
        result.append(alternatives)
    return result


def grid(arguments: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, list[str]]]:
    """Every (run id, settings) of the product of the axes and the seeds, in a fixed order."""
    seed_axis = [[f"seed={seed}" for seed in seeds]] if seeds else []
    points = [list(point) for point in itertools.product(*axes(arguments), *seed_axis)]
    return [(run_id(point), point) for point in points]


def run_id(tokens: Sequence[str]) -> str:
    """A folder name that says the run's settings (those that vary and those that do not)."""
    return re.sub(r"[^A-Za-z0-9._=@+-]", "_", ",".join(tokens)) or "default"


def slurm_script(args: argparse.Namespace, folder: Path, points: list) -> str:
    """A job array with one task per run: each task runs this sweep's point $SLURM_ARRAY_TASK_ID (skipped when it
    completed, resumed when stopped), so a requeued task goes on from its checkpoint."""
    names = "\n".join(f"#   {index}: {point_id}" for index, (point_id, _) in enumerate(points))
    extra = "".join(f"#SBATCH {option}\n" for option in shlex.split(args.sbatch))
    task = ["-F", str(folder), "--experiment", args.experiment, "--nproc", str(args.nproc)]
    task += ["--seeds", args.seeds] if args.seeds else []
    return (
        "#!/bin/bash\n"
        f"#SBATCH --job-name=sweep\n#SBATCH --array=0-{len(points) - 1}\n"
        f"#SBATCH --signal={SLURM_SIGNAL}\n#SBATCH --requeue\n"
        f"#SBATCH --output={folder}/slurm-%A_%a.out\n{extra}"
        f"# Tasks (their run ids in {folder}):\n{names}\n"
        f"cd {shlex.quote(str(REPO))}\n"
        f"srun {shlex.quote(sys.executable)} -m utils.sweep {shlex.join(task)} "
        f'--task "$SLURM_ARRAY_TASK_ID" -- {shlex.join(args.axes)}\n'
    )


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-F", dest="folder", type=Path, required=True, help="the -F folder of every run")
    parser.add_argument("--experiment", choices=sorted(SCRIPTS), default="experiment")
    parser.add_argument("--seeds", type=str, default="", help="seeds, e.g. 1,2,3 (default: the experiment's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time here (default 1)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs here: one run on each (sets --jobs)")
    parser.add_argument("--nproc", type=int, default=0, help="processes per run under torchrun (default: python)")
    parser.add_argument("--slurm", type=Path, help="write a SLURM job-array script here instead of running")
    parser.add_argument(
        "--sbatch", default="", help='more #SBATCH options for --slurm, e.g. --sbatch="--time=4:00:00 --gpus=1"'
    )
    parser.add_argument("--task", type=int, help="run only this point (a SLURM array task)")
    parser.add_argument("axes", nargs="*", help="after --: key=a,b | name1,name2 | key=value")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.jobs < 1 or args.gpus < 0 or args.nproc < 0:
            raise InputError("--jobs must be >= 1, --gpus and --nproc >= 0")
        points = grid(args.axes, seed_list(args.seeds) if args.seeds else [])
        if args.task is not None and not 0 <= args.task < len(points):
            raise InputError(f"--task {args.task}: the grid has {len(points)} runs, 0 to {len(points) - 1}")
        if args.task is None:  # an array task's grid was checked when its script was written
            check_tokens(args.experiment, [token for _, tokens in points for token in tokens], "the grid")
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    folder = args.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if args.slurm:
        args.slurm.write_text(slurm_script(args, folder, points))
        print(f"{len(points)} runs: submit with `sbatch {args.slurm}`, then `python -m utils.report {folder}`")
        return 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    launcher = launcher if args.nproc else [sys.executable]
    selected = [points[args.task]] if args.task is not None else points
    unfinished = run_locally(args.experiment, folder, selected, max(args.jobs, args.gpus), args.gpus, launcher)
    print(f"{len(selected) - unfinished} of {len(selected)} runs completed; the table: python -m utils.report {folder}")
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
