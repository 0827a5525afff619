"""benchmarks/gpu_pretrain.py runs unchanged on a GPU machine: its dino-ray side, on the CPU with a tiny model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real Ray Train run

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_measures_a_dino_ray_run_in_its_cpu_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_pretrain.py"), "--smoke", "--steps", "6",
                           "--batch", "8", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    run = record["dino_ray"]["fp32"]
    assert record["device"] == "cpu" and run["batch"] == 8 and run["images_per_s"] > 0, run
