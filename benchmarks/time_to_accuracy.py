"""k-NN top-1 on held-out CIFAR-10 images against training minutes on this machine's CPU cores.

Curves, each trained for ``--minutes`` on the CIFAR-10 training shards 0-3 (40,000 images) and evaluated at a
checkpoint every ``--minutes / --points`` minutes by the weighted k-NN (k=20, T=0.07, the first 10,000 training
images as the memory bank, held-out shard 4 as the test set, backbone features):
- ``shipped_ray``: the ``cifar10_cpu`` recipe as a user runs it: ``dino-ray pretrain --config cifar10_cpu
  budget_minutes=M`` on a local Ray, its k-NN monitor on;
- ``shipped``: the same recipe and budget through the plain loop (``dino-ray pretrain --no-ray``);
- ``crops32_ray``: the shipped recipe on Ray with 32 px crops (the whole image's size) instead of 24 px ones;
- ``vit``: the ``cifar10_cpu_vit`` recipe (the ViT CPU recipe, for attention maps), through the plain loop;
- ``reference``: the reference's defaults (ViT-S/16, out_dim 65536, 8 local crops, batch 64, AdamW lr 5e-4)
  with only the crop sizes scaled to 32/16 px, its schedule shapes compressed into the budget (warmup 10 % and
  last layer frozen 1 % of the run, as 10 and 1 of its 100 epochs);
- ``lightly``: lightly's DINO with its CIFAR-10 benchmark settings (benchmarks/lightly_dino.py, run in the
  benchmark's own environment: ``pip install lightly``), same data, same k-NN.
Random init (of the shipped recipe's network) and raw pixels are horizontal lines.

Each DINO recipe runs with ``budget_minutes=--minutes`` and ``epochs=--points``: the run measures its own step
time and sizes its epochs so that its whole schedule ends within the budget, with a checkpoint after each epoch;
the minutes on the x axis are the run's training minutes up to that checkpoint (start-up, the step-time
measurement and evaluation excluded; the whole command's wall time is recorded beside the curve).

Usage: ``python benchmarks/time_to_accuracy.py [--minutes 20] [--points 10] [--recipes shipped,reference,lightly]``
Writes ``benchmarks/results/time_to_accuracy.json`` (``render_docs.py`` draws the curves); ``--merge`` adds the
recipes run to the curves already there (the same data and baselines).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from dino_ray.core.config import load_config, recipe_path
from dino_ray.core.data.augment import normalize_tensor
from dino_ray.core.data.cifar10 import shards
from dino_ray.core.data.datasets import decode_rgb
from dino_ray.core.models.build import backbone_from_checkpoint, random_init_backbone
from dino_ray.core.models.hub import safe_load
from dino_ray.eval.knn import knn_classifier

ROOT = Path(__file__).resolve().parents[1]
SHARED = shards()
RECIPES = {  # name: (recipe, overrides, on Ray)
    "shipped_ray": (recipe_path("cifar10_cpu"), [], True),
    "shipped": (recipe_path("cifar10_cpu"), [], False),
    "crops32_ray": (recipe_path("cifar10_cpu"), ["global_crops_size=32", "eval_image_size=32"], True),
    "vit": (recipe_path("cifar10_cpu_vit"), [], False),
    "reference": (None, ["use_fp16=false", "global_crops_size=32", "local_crops_size=16", "num_workers=1"], False),
}


def load_images(path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` rows of a CIFAR-10 Parquet shard as normalised [N, 3, 32, 32] floats and labels."""
    table = pq.read_table(path, columns=["image", "label"]).slice(0, count)
    images = [np.asarray(decode_rgb(b, f"row {i} of {path}")) for i, b in enumerate(table.column("image").to_pylist())]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return normalize_tensor(pixels), torch.tensor(table.column("label").to_pylist())


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``model``'s features of CPU ``images``, computed on the model's device a batch at a time, returned on CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)])


def knn_top1(bank: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             model: Optional[torch.nn.Module]) -> float:
    """Weighted k-NN (k=20, T=0.07) top-1 of ``model``'s features (raw pixels when ``model`` is None)."""
    f_bank = bank[0].flatten(1) if model is None else features(model, bank[0])
    f_test = test[0].flatten(1) if model is None else features(model, test[0])
    return knn_classifier(f_bank, bank[1], f_test, test[1], k=20, T=0.07)[0]


def pretrain(config: Optional[Path], overrides: list[str], out: Path, on_ray: bool) -> list[Path]:
    """``dino-ray pretrain`` (``--no-ray`` unless ``on_ray``) in a subprocess; returns its kept checkpoints, in order
    (each beside the log.txt of its epochs)."""
    cmd = [sys.executable, "-m", "dino_ray.cli", "pretrain", *([] if on_ray else ["--no-ray"])] + \
        (["--config", str(config)] if config else []) + [*overrides, f"output_dir={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return checkpoints(out, on_ray)


def checkpoints(out: Path, on_ray: bool) -> list[Path]:
    """A run's per-epoch checkpoints: Ray Train's checkpoint folders, or the plain loop's checkpointNNNN.pth."""
    if on_ray:
        return sorted(out.glob("ray_results/*/checkpoint_epoch*/checkpoint.pth"))
    return sorted(out.glob("checkpoint0*.pth"))


def dino_curve(name: str, train_data: Path, minutes: float, points: int, work: Path,
               bank: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               extra: list[str]) -> dict[str, Any]:
    """Train through ``dino-ray pretrain`` with the budget and evaluate every epoch's checkpoint; a run that already
    finished in ``work`` (``--reuse``) is evaluated again without retraining."""
    config, overrides, on_ray = RECIPES[name]
    schedule = ["warmup_epochs=1", "freeze_last_layer=0.1"] if name == "reference" else []  # 10 and 1 of 100
    start = time.time()
    kept = checkpoints(work / name, on_ray)
    if len(kept) != points:
        kept = pretrain(config, [*overrides, f"data_path={train_data}", "max_images=null", *schedule, *extra,
                                 f"budget_minutes={minutes}", f"epochs={points}", "saveckp_freq=1"],
                        work / name, on_ray)
    wall = time.time() - start
    log = [json.loads(line) for line in open(kept[-1].parent / "log.txt")] if on_ray else \
        [json.loads(line) for line in open(work / name / "log.txt")]
    curve, steps = [], 0
    for line, checkpoint in zip(log, kept):
        backbone, _ = backbone_from_checkpoint(str(checkpoint), checkpoint_key="teacher")
        batch = int(safe_load(checkpoint)["args"]["batch_size_per_gpu"])
        steps += line["train_steps"]  # the epochs' lengths differ: the budget re-plans them as it goes
        curve.append({"minutes": round(line["train_minutes"], 2), "knn_top1": knn_top1(bank, test, backbone),
                      "images": steps * batch, "loss": line["train_loss"], "lr": line["train_lr"]})
        print(f"  {name} {curve[-1]}", flush=True)
    return {"step_seconds": log[0]["train_plan_step_seconds"], "epoch_length": int(log[0]["train_plan_epoch_length"]),
            "command_minutes": round(wall / 60, 2), "on_ray": on_ray, "curve": curve}


def random_init_top1(config: Path, bank: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor]) -> float:
    return knn_top1(bank, test, random_init_backbone(load_config(config)))


def markdown_table(results: dict[str, Any]) -> str:
    """The curves side by side, one row per point, with the baselines in the header (the README's table)."""
    names = list(results["curves"])
    lines = [f"raw pixels {results['raw_pixels']:.1f}, random init (shipped network) {results['random_init']:.1f}; "
             f"k-NN top-1 on {results['test_images']} held-out images ({results['bank_images']} in the bank)", "",
             "| point | " + " | ".join(f"{n}: minutes | {n}: k-NN" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for i in range(max(len(results["curves"][n]["curve"]) for n in names)):
        cells = []
        for n in names:
            curve = results["curves"][n]["curve"]
            cells += [f"{curve[i]['minutes']:.1f}", f"{curve[i]['knn_top1']:.1f}"] if i < len(curve) else ["", ""]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--recipes", default="shipped_ray,shipped,vit,reference,lightly")
    parser.add_argument("--test_images", type=int, default=10000)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "time_to_accuracy"))
    parser.add_argument("--reuse", default=None, help="an earlier run's folder: its finished curves are evaluated "
                        "again instead of retrained")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_to_accuracy.json"))
    parser.add_argument("--merge", action="store_true", help="keep the curves already in --out that this run does "
                        "not redo (one recipe at a time into one JSON)")
    parser.add_argument("--table", default=None, help="print the markdown table of a results JSON and stop")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the DINO recipes (a search)")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    if not SHARED.exists():
        raise SystemExit(f"needs the CIFAR-10 shards in {SHARED}")
    work = Path(args.reuse) if args.reuse else Path(args.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    train_data = work / "train"
    train_data.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        if not (train_data / f"part-{i:05d}.parquet").exists():
            (train_data / f"part-{i:05d}.parquet").symlink_to(SHARED / f"part-{i:05d}.parquet")
    bank, test = load_images(SHARED / "part-00000.parquet", 10000), load_images(SHARED / "part-00004.parquet",
                                                                                 args.test_images)
    results: dict[str, Any] = {"minutes": args.minutes, "points": args.points, "cores": os.cpu_count(),
                               "bank_images": len(bank[1]), "test_images": len(test[1]),
                               "raw_pixels": knn_top1(bank, test, None),
                               "random_init": random_init_top1(RECIPES["shipped"][0], bank, test),
                               "overrides": args.overrides, "curves": {}}
    recipes = args.recipes.split(",")
    order = recipes
    if args.merge and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        if (earlier["raw_pixels"], earlier["test_images"]) != (results["raw_pixels"], results["test_images"]):
            raise SystemExit(f"--merge: {args.out} was measured on other data (raw pixels {earlier['raw_pixels']})")
        results["curves"] = {k: v for k, v in earlier["curves"].items() if k not in recipes}
        order = [*earlier["curves"], *recipes]  # a redone curve keeps its place in the table
    print(f"raw pixels {results['raw_pixels']:.2f}, random init {results['random_init']:.2f}", flush=True)
    for name in recipes:
        if name == "lightly":
            from lightly_dino import lightly_curve  # beside this file

            results["curves"][name] = lightly_curve(train_data, args.minutes, args.points, bank, test, knn_top1)
        else:
            results["curves"][name] = dino_curve(name, train_data, args.minutes, args.points, work, bank, test,
                                                 args.overrides)
            if RECIPES[name][0] is not None:
                results["curves"][name]["random_init"] = random_init_top1(RECIPES[name][0], bank, test)
        results["curves"] = {k: results["curves"][k] for k in order if k in results["curves"]}
        Path(args.out).write_text(json.dumps(results, indent=2))  # after every curve: a crash keeps the others
    print(json.dumps({k: v for k, v in results.items() if k != "curves"}))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
