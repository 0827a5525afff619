"""``make quickstart``: a small real DINO pretraining on CIFAR-10, then k-NN of its teacher vs random init.

Runs offline in minutes on 2 CPU cores: ``experiments/cifar10_cpu.yaml`` on the given Parquet
images, then the weighted k-NN (k=20, T=0.07) on a held-out split, for the pretrained teacher and
for the same network at its random initialisation, so the gain from pretraining is visible.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from dino_ray.config import load_config
from dino_ray.data.augment import eval_transform
from dino_ray.data.datasets import build_dataset
from dino_ray.eval.knn import evaluate_knn
from dino_ray.models.hub import load_pretrained_weights
from dino_ray.train.loop import build_student_teacher, train_dino

log = logging.getLogger("dino_ray.quickstart")
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "cifar10_cpu.yaml"


def run_quickstart(train_data: str, val_data: str, output_dir: str, overrides: Optional[list[str]] = None,
                   knn_train_images: int = 5000, knn_val_images: int = 2000) -> dict:
    """Pretrain, evaluate, write ``quickstart.json``; returns its content."""
    cfg = load_config(CONFIG, [f"data_path={train_data}", f"output_dir={output_dir}", *(overrides or [])])
    start = time.time()
    stats = train_dino(cfg)
    train_minutes = (time.time() - start) / 60

    transform = eval_transform(cfg.global_crops_size, cfg.global_crops_size)
    knn_train = build_dataset(train_data, transform, knn_train_images)
    knn_val = build_dataset(val_data, transform, knn_val_images)
    torch.manual_seed(cfg.seed)
    _, random_init = build_student_teacher(cfg)  # the exact initial weights of this run
    _, pretrained = build_student_teacher(cfg)
    load_pretrained_weights(pretrained.backbone, Path(output_dir) / "checkpoint.pth", "teacher")
    results = {}
    for name, model in (("random_init", random_init.backbone), ("pretrained", pretrained.backbone)):
        top1, top5 = evaluate_knn(model, knn_train, knn_val, nb_knn=[20], temperature=0.07, batch_size=256)[20]
        results[name] = {"top1": top1, "top5": top5}
    losses = [json.loads(line)["train_loss"] for line in open(Path(output_dir) / "log.txt")]
    summary = {"train_minutes": round(train_minutes, 2), "epochs": cfg.epochs, "loss_first_epoch": losses[0],
               "loss_last_epoch": losses[-1], "images_per_s": stats.get("images_per_s"),
               "knn_train_images": len(knn_train), "knn_val_images": len(knn_val), "knn_k20": results}
    (Path(output_dir) / "quickstart.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train_data", required=True, help="Parquet file/folder or ImageFolder to pretrain on")
    parser.add_argument("--val_data", required=True, help="held-out labelled images for k-NN")
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    summary = run_quickstart(args.train_data, args.val_data, args.output_dir, args.overrides)
    knn = summary["knn_k20"]
    print(f"\nDINO pretraining: {summary['epochs']} epochs in {summary['train_minutes']} min, "
          f"loss {summary['loss_first_epoch']:.3f} -> {summary['loss_last_epoch']:.3f}")
    print(f"k-NN top-1 (k=20) on {summary['knn_val_images']} held-out images: "
          f"pretrained teacher {knn['pretrained']['top1']:.1f}% vs random init {knn['random_init']['top1']:.1f}%")
    print(f"checkpoints, log.txt and quickstart.json in {Path(args.output_dir).resolve()}")


if __name__ == "__main__":
    main()
