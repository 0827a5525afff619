"""End-to-end pretraining images/s on this machine: the DataLoader vs Ray Data, the reference vs the batched augmentation.

Each variant trains the CIFAR-10 CPU recipe (the `cifar10_cpu` recipe) through Ray Train, one worker, for
``--epochs`` epochs of ``--images`` images, without the k-NN monitor, and reports the last epoch's training
images/s (the first one includes start-up) and its mean wait for data per step:
- ``dataloader_reference``: the DataLoader with one loader process, PIL image by image (the reference's input)
- ``dataloader_batched``: the same loader, ``augmentation: batched``
- ``ray_data_batched``: ``data_loader: ray_data``, decode and batched multi-crop in Ray Data tasks of 1 CPU
On a 2-core machine the loader process (or the data tasks) and the training threads share the cores, so a
cheaper augmentation shows up as training speed.

Usage: ``python benchmarks/input_pipeline.py [--images N] [--epochs E]``; saves benchmarks/results/input_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import ray

from dino_ray.core.config import load_config
from dino_ray.platform.trainer import pretrain_on_ray

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dataloader_reference": ["augmentation=reference"],
    "dataloader_batched": ["augmentation=batched"],
    "ray_data_batched": ["augmentation=batched", "data_loader=ray_data", "ray_data.num_cpus=1",
                         "scaling.resources_per_worker={CPU: 1}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2560)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "input_pipeline.json"))
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's data paths are relative to the repository
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    results: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                     "images": args.images, "epochs": args.epochs, "config": "cifar10_cpu"}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in VARIANTS.items():
            cfg = load_config("cifar10_cpu", overrides + [
                f"max_images={args.images}", f"epochs={args.epochs}", "warmup_epochs=0", "eval.knn_every=0",
                "tracking.log_model=false", f"output_dir={scratch}/{name}"])
            start = time.perf_counter()
            result = pretrain_on_ray(cfg)
            if result.error is not None:
                raise RuntimeError(f"{name} failed: {result.error}")
            metrics = result.metrics
            results[name] = {"images_per_s": round(metrics["images_per_s"], 1),
                             "data_wait_s_per_step": round(metrics["data_time"], 3),
                             "step_s": round(metrics["step_time"], 3), "wall_s": round(time.perf_counter() - start, 1)}
            print(f"{name}: {results[name]}", flush=True)
    base = results["dataloader_reference"]["images_per_s"]
    for name in VARIANTS:
        results[name]["over_reference"] = round(results[name]["images_per_s"] / base, 2)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
