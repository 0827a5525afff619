"""The import contract: one way down. The core (recipe, models, loss, optim, data, loop, checkpoints) imports
neither Ray, MLflow, the evaluations nor the platform; the evaluations' functions import neither Ray nor MLflow;
the platform (Ray, MLflow) imports no job; the command line answers ``--help``, and a job's arguments are
checked, before torch, Ray or MLflow are imported. Each check runs in a fresh
interpreter, so what one module drags in is not hidden by an earlier import."""
import json
import subprocess
import sys

import pytest

CORE = ["dino_ray", "dino_ray.config", "dino_ray.loss", "dino_ray.optim", "dino_ray.models.backbones",
        "dino_ray.models.head", "dino_ray.models.hub", "dino_ray.models.multicrop", "dino_ray.data.augment",
        "dino_ray.data.batched_augment", "dino_ray.data.views", "dino_ray.data.datasets", "dino_ray.data.convert",
        "dino_ray.data.cifar10", "dino_ray.storage", "dino_ray.train.loop", "dino_ray.train.checkpoint"]
EVALUATIONS = ["dino_ray.eval." + name for name in ("knn", "linear", "linear_args", "features", "attention",
                                                   "attention_video", "retrieval", "copy_detection",
                                                   "video_segmentation", "video", "synthetic", "weights")]
JOBS = ["dino_ray.jobs." + name for name in ("common", "knn", "linear", "attention", "retrieval", "copy_detection",
                                             "video_segmentation")]
PLATFORM = ["ray", "mlflow", "dino_ray.ray_session", "dino_ray.ray_train", "dino_ray.tracking", "dino_ray.sweep",
            "dino_ray.train.ray_trainer", "dino_ray.data.ray_data", "dino_ray.eval.monitor",
            "dino_ray.eval.ray_features"]


def imported_after(code: str) -> set[str]:
    """Every module name loaded by running ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def reached(modules: set[str], roots: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


@pytest.mark.parametrize("layer, modules, forbidden", [
    ("core", CORE, PLATFORM + ["dino_ray.eval"]),
    ("evaluations", EVALUATIONS, PLATFORM),
    ("platform", [m for m in PLATFORM if m.startswith("dino_ray")], ["dino_ray.jobs", "dino_ray.cli",
                                                                     "dino_ray.quickstart"]),
])
def test_no_upward_import(layer, modules, forbidden):
    loaded = imported_after("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded
    assert reached(loaded, forbidden) == [], f"the {layer} imports what sits above it"


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
