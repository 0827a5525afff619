"""CIFAR-10 numbers for the README: k-NN and linear probe of a pretrained CPU-config teacher against the same
network at its random initialisation (the run's seed), trained on shard 0 and evaluated on held-out shard 4.
Saved as JSON; the pretrained checkpoint's eval runs land in its own MLflow store, nested under its run.

Usage: ``python benchmarks/eval_cifar10.py [--checkpoint FILE] [--epochs N] [--out FILE]`` (default checkpoint:
the newest ``outputs/quickstart/quickstart-*/checkpoint.pth``, made by ``make quickstart``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dino_ray.core.config import build_config
from dino_ray.core.data.cifar10 import SAMPLE, shards
from dino_ray.core.models.build import random_init_backbone
from dino_ray.core.models.hub import safe_load
from dino_ray.eval.linear import LinearArgs, run_linear
from dino_ray.jobs.knn import KnnArgs, knn_job

ROOT = Path(__file__).resolve().parents[1]
SHARED = shards()


def quickstart_checkpoint(given: str | None) -> Path:
    """``given``, else the newest checkpoint ``make quickstart`` left."""
    found = sorted((ROOT / "outputs" / "quickstart").glob("quickstart-*/checkpoint.pth"))
    if not given and not found:
        raise SystemExit("no outputs/quickstart/quickstart-*/checkpoint.pth: run `make quickstart` or give "
                         "--checkpoint")
    return Path(given) if given else found[-1]


def cifar_shard(index: int, sample: str) -> str:
    """A shard of the shared CIFAR-10 Parquet, else the repository's sample file of that role."""
    shard = SHARED / f"part-{index:05d}.parquet"
    return str(shard) if shard.exists() else str(SAMPLE / f"{sample}.parquet")


def random_init_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """The pretraining's network as it was before its first step (same config, same seed)."""
    cfg = build_config(safe_load(checkpoint)["args"])
    backbone = random_init_backbone(cfg)
    path = folder / "random_init.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "args": cfg.to_dict(),
                "epoch": 0}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max_train_images", type=int, default=10000)
    parser.add_argument("--max_val_images", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_cifar10.json"))
    args = parser.parse_args()
    checkpoint = quickstart_checkpoint(args.checkpoint)
    train, val = cifar_shard(0, "train"), cifar_shard(4, "val")
    work = Path(tempfile.mkdtemp(prefix="dino_ray_eval_"))
    results = {"checkpoint": str(checkpoint), "train": train, "val": val, "models": {}}
    for name, weights in (("pretrained", checkpoint), ("random_init", random_init_checkpoint(checkpoint, work))):
        start = time.time()
        knn = knn_job(KnnArgs(pretrained_weights=str(weights), train_data_path=train, val_data_path=val,
                              output_dir=str(work / name / "knn"), max_train_images=args.max_train_images,
                              max_val_images=args.max_val_images, use_ray=False, num_workers=1))
        linear = run_linear(LinearArgs(pretrained_weights=str(weights), n_last_blocks=4, epochs=args.epochs,
                                       lr=args.lr, batch_size_per_gpu=128, num_workers=1, num_labels=10,
                                       train_data_path=train, val_data_path=val,
                                       max_train_images=args.max_train_images, max_val_images=args.max_val_images,
                                       crop_size=32, resize_size=32, output_dir=str(work / name / "linear")),
                            show_progress=False)
        results["models"][name] = {"knn": knn["results"], "linear_top1": linear["best_acc1"],
                                   "linear_last_top1": linear["val_acc1"],
                                   "minutes": round((time.time() - start) / 60, 2)}
        print(f"{name}: k-NN top-1 (k=20) {knn['results']['20']['top1']:.2f}, linear top-1 {linear['best_acc1']:.2f}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
