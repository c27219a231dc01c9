"""Run a function in N gloo processes on the CPU, as torchrun would start them, and collect what each returns."""

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: Path, fn: Callable, args: tuple) -> None:
    # torchrun's environment, so that utils.distributed.setup is what joins the group.
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # two processes on two cores
    from utils import distributed

    distributed.setup(cpu=True)
    try:
        torch.save(fn(*args), out / f"rank{rank}.pt")
    finally:
        distributed.teardown()


def run_ranks(fn: Callable, args: tuple, tmp_path: Path, world: int = 2) -> list[Any]:
    """fn(*args) on every rank (fn must be importable: a module-level function); its results in rank order."""
    mp.spawn(_entry, args=(world, free_port(), tmp_path, fn, args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
