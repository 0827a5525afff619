"""The package works installed, outside its checkout: a wheel built from the repository, installed into its own
folder (reusing this environment's torch, Ray and MLflow), answers --help and plans a shipped recipe by its name
from a folder far from the checkout, with the sample data it carries."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_wheel_runs_outside_the_checkout(tmp_path):
    leftover = not (ROOT / "build").exists()  # setuptools builds in the checkout's build/: leave none behind
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    finally:
        if leftover:
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = (tmp_path / "dist").glob("dino_ray-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "DINO_RAY_DATA": str(tmp_path / "no_data"),
           "DINO_RAY_OFFLINE": "1"}  # no download: the sample inside the package

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    where = run("-c", "import dino_ray.core.data.cifar10 as c; print(c.__file__); print(c.quickstart_data()[0])")
    installed, sample = where.split()
    assert installed.startswith(str(tmp_path / "site")) and sample.startswith(str(tmp_path / "site"))
    assert Path(sample).is_file()  # the offline sample travels with the package
    assert "pretrain" in run("-m", "dino_ray.cli", "--help")
    plan = run("-m", "dino_ray.cli", "pretrain", "--config", "cifar10_cpu", "--dry-run")  # a recipe by its name
    assert "arch: resnet18" in plan and f"{tmp_path / 'no_data'}/cifar10/train/part-00000.parquet" in plan
    assert "sweeps" in run("-c", "from dino_ray.platform.sweep import load_sweep; "
                                 "print(load_sweep('cifar10_cpu').storage_path)")
