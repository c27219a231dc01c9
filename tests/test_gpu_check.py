"""benchmarks/gpu_check.py cannot rot: its CPU dry run runs every section (each in its own process) and reports
rows without touching docs/gpu.md; a section that fails or runs over its budget loses nothing of the others; a
bad --images or --budget is refused before any section starts."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # every section starts its own Python process; the torchrun one trains twice

# The checks and measurements, as sections of the report.
SECTIONS = ["evaluation", "amp", "metrix", "augment", "torchrun", "checkpoint", "steps", "loop"]


def gpu_check(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)


def sections(report: str) -> dict[str, list[list[str]]]:
    """The rows (check, result, verdict) of each '## name' section of the printed markdown report."""
    found: dict[str, list[list[str]]] = {}
    for block in re.split(r"^## ", report, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ")]
        found[name.split(" (")[0]] = [[cell.strip() for cell in row] for row in rows[1:]]  # the header left out
    return found


def state(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def test_the_dry_run_reports_every_section_and_leaves_docs_alone():
    report = REPO / "docs" / "gpu.md"
    before = state(report)
    done = gpu_check("--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert state(report) == before
    found = sections(done.stdout)
    assert list(found) == SECTIONS
    for name, rows in found.items():
        assert rows, name
        assert all(row[2] in ("", "ok") for row in rows), (name, rows)
    checks = {row[0]: row for rows in found.values() for row in rows}
    # The CPU compared with itself: the comparisons are exact.
    assert checks["1200 x 8: torch metrics against the CPU engine's"][1] == "largest gap 0.0e+00"
    assert checks["torchrun --nproc_per_node=1 experiment.py: an epoch of the digits on cpu"][1].startswith("COMPLETED")
    assert checks["its checkpoint (cpu) resumed on the CPU for one more epoch"][1].startswith("COMPLETED")
    assert any(check.startswith("projected CUB CE recipe") for check in checks)


def test_a_failing_section_loses_nothing_else(tmp_path):
    """A corrupt JPEG among --images fails the loop section in its own process; the checkpoint section, before
    it, still reports, the report names the file, and the exit status says something failed."""
    for i in range(3):
        Image.fromarray(np.full((75, 100, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    done = gpu_check("--dry-run", "--sections", "checkpoint", "loop", "--images", str(tmp_path))
    assert done.returncode == 1, done.stderr[-3000:]
    found = sections(done.stdout)
    assert list(found) == ["checkpoint", "loop"]
    assert found["checkpoint"][0][0].startswith("checkpoint of small_cnn") and found["checkpoint"][0][2] == ""
    assert found["loop"][-1][0] == "section" and found["loop"][-1][2] == "FAIL"
    assert re.search(r"FAILED \(exit 1\): .*broken\.jpg cannot be read", found["loop"][-1][1])


def test_images_without_jpegs_are_refused_before_any_section(tmp_path):
    done = gpu_check("--dry-run", "--images", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"gpu_check: --images {tmp_path}: no .jpg file under it; give a folder of JPEGs or leave it out"
    )
    assert "##" not in done.stdout


def test_a_section_over_its_budget_is_killed_and_the_next_one_runs():
    """A second is less than any section needs (importing torch alone takes longer): killed at its budget, the
    section reports a timeout, and the checkpoint section after it still reports."""
    done = gpu_check("--dry-run", "--sections", "loop", "checkpoint", "--budget", "loop=1")
    assert done.returncode == 1, done.stderr[-3000:]
    found = sections(done.stdout)
    assert found["loop"] == [["section", found["loop"][0][1], "FAIL"]]
    assert found["loop"][0][1].startswith("TIMEOUT: killed after its budget of 1 s")
    assert found["checkpoint"][0][0].startswith("checkpoint of small_cnn")


def test_a_bad_budget_is_refused_before_any_section():
    done = gpu_check("--dry-run", "--budget", "loops=5")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "gpu_check: --budget loops=5: give NAME=SECONDS with NAME one of evaluation, amp, metrix, augment, torchrun, "
        "checkpoint, steps, loop"
    )
    assert "##" not in done.stdout
