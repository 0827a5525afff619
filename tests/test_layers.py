"""The layers: cli > jobs > platform > eval > core, one way down, and neither Ray nor MLflow below the platform.

The contracts live in pyproject.toml (``[tool.importlinter]``) and are checked statically by import-linter, which
reads every import statement, those inside functions included. The command line answers ``--help``, and a job's
arguments are checked, before torch, Ray or MLflow are imported: checked at run time, each in a fresh interpreter.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_after(code: str) -> set[str]:
    """Every module name loaded by running ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def reached(modules: set[str], roots: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


def test_import_contracts_hold():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_the_command_line_answers_help_and_config_errors_before_the_heavy_imports():
    loaded = imported_after("from dino_ray.cli import build_parser, main\nbuild_parser().format_help()\n"
                            "assert main(['pretrain', 'teacher_tmp=0.1']) == 2")  # a typo'd key: exit 2 at once
    assert reached(loaded, ["torch", "ray", "mlflow", "torchvision", "timm"]) == []


def test_a_jobs_arguments_are_checked_before_the_heavy_imports():
    loaded = imported_after("from dino_ray.jobs.knn import KnnArgs\nfrom dino_ray.jobs.attention import AttentionArgs\n"
                            "from dino_ray.jobs.linear import LinearArgs, LinearLaunch\n"
                            "KnnArgs(pretrained_weights='run', data_path='images')\n"
                            "AttentionArgs(pretrained_weights='run', image_path=['cat.png'])\n"
                            "LinearArgs(pretrained_weights='run', train_data_path='t', val_data_path='v')\n"
                            "LinearLaunch(ray_workers=2)")
    assert reached(loaded, ["torch", "ray", "mlflow", "torchvision", "timm"]) == []
