"""Sacred runs of either experiment as child processes, each with an id chosen by the caller, and what the -F
folder says about them: the sweep and the tuner start, skip or resume runs through this module only.

A run that was stopped is continued by a new run, `<id>.r2`, `<id>.r3`, ... started with `resume=` (the report
treats the chain as one run); the chain's last link says where the run stands.
"""

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from utils.errors import InputError

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"experiment": "experiment.py", "autoencoder": "autoencoder_experiment.py"}
RESUMED = re.compile(r"\.r(\d+)$")


def script(experiment: str) -> Path:
    return REPO / SCRIPTS[experiment]


def run_command(
    experiment: str, folder: Path, run_id: str, tokens: Sequence[str], launcher: Sequence[str] = (sys.executable,)
) -> list[str]:
    """The command line of one run recorded as folder/run_id; launcher: python, or torchrun and its options."""
    return [*launcher, str(script(experiment)), "-F", str(folder), "-i", run_id, "with", *tokens]


def check_tokens(experiment: str, tokens: Sequence[str], source: str) -> None:
    """Ask the experiment (print_config, no data read) whether it knows every setting and named config in tokens:
    one line naming the bad one otherwise. source says where the tokens came from (e.g. "the grid")."""
    done = subprocess.run(
        [sys.executable, str(script(experiment)), "print_config", "with", *tokens],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise InputError(
            f"{source}: {sacred_error(done.stdout + done.stderr)}; `python {SCRIPTS[experiment]} print_config` "
            "lists every setting, `print_named_configs` the named configs"
        )


def sacred_error(output: str) -> str:
    """The error sacred or the settings table printed, as one line: the unknown setting (sacred names the first one
    it meets), else the error's line."""
    lines = [line.strip() for line in output.strip().splitlines()]
    if any("ConfigAddedError" in line for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Conflicting configuration values"))
        keys = [line.split("=", 1)[0] for line in lines[start + 1 :] if "=" in line]
        return f"unknown setting {', '.join(keys)}"
    start = next((i for i in range(len(lines) - 1, -1, -1) if re.match(r"^[\w.]*(Error|Exception)\b", lines[i])), None)
    shown = " ".join(line for line in (lines[start:] if start is not None else lines[-3:]) if line)
    return re.sub(r"^(utils\.errors\.InputError|sacred\.utils\.)(: )?", "", shown)


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise InputError(f"--seeds {text}: give integers separated by commas, e.g. --seeds 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {text}: a seed is repeated; give each once")
    return seeds


@dataclass(frozen=True)
class Chain:
    """The runs recorded for one id: the id, its resumed links, the last link's status and checkpoint."""

    links: list[str]
    status: str | None  # None: never started
    resumable: Path | None  # the newest link holding a checkpoint


def chain(folder: Path, run_id: str) -> Chain:
    links = sorted(
        (
            path.name
            for path in folder.glob(f"{glob_escape(run_id)}*")
            if path.name == run_id or is_link(path.name, run_id)
        ),
        key=lambda name: int(RESUMED.search(name).group(1)) if name != run_id else 1,
    )
    links = [name for name in links if (folder / name / "run.json").exists()]
    if not links:
        return Chain([], None, None)
    status = json.loads((folder / links[-1] / "run.json").read_text()).get("status")
    saved = [folder / name for name in links if (folder / name / "checkpoint.pt").exists()]
    return Chain(links, status, saved[-1] if saved else None)


def is_link(name: str, run_id: str) -> bool:
    return name.startswith(run_id) and RESUMED.fullmatch(name[len(run_id) :]) is not None


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def next_step(folder: Path, run_id: str) -> tuple[str, list[str]] | None:
    """What is left for run_id: None when it completed, else the id of the run to start and the tokens that
    continue a stopped one ([resume=...]) or nothing for a first start."""
    state = chain(folder, run_id)
    if state.status == "COMPLETED":
        return None
    if not state.links:
        return run_id, []
    if state.resumable is None:  # stopped before its first checkpoint: start again under a new link
        return f"{run_id}.r{len(state.links) + 1}", []
    return f"{run_id}.r{len(state.links) + 1}", [f"resume={state.resumable}"]


def die_with_parent() -> None:
    """In a child, before exec: Linux sends it SIGTERM when its parent dies, so a killed sweep or tuner leaves a
    stopped (resumable) run behind instead of one running on unseen."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(command: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A run in its own session (a Ctrl-C reaches it once, forwarded by its parent, not twice), its output in log
    (the run's own cout.txt has it too) or on this console."""
    output = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    if output is not None:
        output.close()
    return process


class Stop:
    """The first SIGINT, SIGTERM or SIGHUP: forwarded to the running runs (which write their checkpoint and stop),
    and no new run starts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.running: list = []
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, self.forward)

    def forward(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        for process in self.running:
            process.send_signal(signum)


def run_point(
    experiment: str, folder: Path, point_id: str, tokens: list[str], launcher: Sequence[str], env: dict, stop: Stop
):
    """Start or resume one run (None when it completed before); its output goes to folder/<link>.log."""
    step = next_step(folder, point_id)
    if step is None:
        print(f"done     {point_id}")
        return None
    link, resume = step
    print(f"{'resume' if resume else 'start':8} {link}", flush=True)
    # A resumed run takes its settings from its checkpoint: `resume=` alone.
    command = run_command(experiment, folder, link, resume or tokens, launcher)
    process = start(command, log=folder / f"{link}.log", env=env)
    stop.running.append(process)
    return process


def run_locally(
    experiment: str, folder: Path, points: list[tuple[str, list[str]]], jobs: int, gpus: int, launcher
) -> int:
    """Run the points, `jobs` at a time (one GPU each with gpus, else the CPU cores shared); the number of runs
    that did not complete."""
    folder.mkdir(parents=True, exist_ok=True)
    stop, slots, unfinished = Stop(), list(range(jobs)), 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict = {}  # process -> (slot, link)
    queue = list(points)
    while queue or running:
        while queue and slots and stop.received is None:
            point_id, tokens = queue.pop(0)
            slot = slots.pop(0)
            env = {"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else {"OMP_NUM_THREADS": str(threads)}
            process = run_point(experiment, folder, point_id, tokens, launcher, env, stop)
            if process is None:
                slots.append(slot)
            else:
                running[process] = (slot, point_id)
        if stop.received is not None:
            queue.clear()
        for process in [process for process in running if process.poll() is not None]:
            slot, point_id = running.pop(process)
            stop.running.remove(process)
            slots.append(slot)
            if process.returncode != 0:
                unfinished += 1
                print(f"stopped  {point_id} (exit {process.returncode}): see {folder}/{point_id}*.log")
        time.sleep(0.2)
    if stop.received is not None:
        print(f"sweep stopped by {stop.received}; run the same command again to go on")
    return unfinished + len(queue)
