"""benchmarks/bench_backbones.py runs the engine's training step of each arch and prints one line per arch."""

import re
import subprocess
import sys

from tests.conftest import REPO


def test_backbones_side_by_side_on_the_cpu(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_backbones.py"), "--archs", "small_cnn", "timm:test_vit"]
    command += ["--size", "32", "--batch", "4", "--steps", "1", "--rounds", "1", "--warmup", "0", "--cpu"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = dict(re.findall(r"^  (\S+) +([0-9.]+  x[0-9.]+)$", done.stdout, flags=re.M))
    assert list(lines) == ["small_cnn", "timm:test_vit"]
    assert lines["small_cnn"].endswith("x1.00") and float(lines["timm:test_vit"].split()[0]) > 0
