"""``make quickstart``: a small real DINO pretraining on local Ray, k-NN and attention maps, all in MLflow.

Runs offline in minutes on 2 CPU cores: ``experiments/cifar10_cpu.yaml`` on a 1-worker Ray Train
run (a local Ray instance is started), tracked in the embedded MLflow store under the output
folder; then the weighted k-NN (k=20, T=0.07) on a held-out split, for the pretrained teacher, for
the same network at its random initialisation and for the raw pixels, so the gain from pretraining is
visible; then, for a ViT, the teacher's last-block attention maps for a few held-out images. The
evaluations are MLflow runs nested under the pretraining run. Data: ``dino_ray.data.cifar10``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from dino_ray.config import load_config
from dino_ray.data.augment import eval_transform
from dino_ray.data.cifar10 import quickstart_data
from dino_ray.data.datasets import build_dataset
from dino_ray.eval.attention import attention_figures
from dino_ray.eval.knn import evaluate_knn
from dino_ray.eval.weights import resolve_weights
from dino_ray.jobs.common import track
from dino_ray.models.hub import load_pretrained_weights
from dino_ray.ray_session import ray_session
from dino_ray.tracking import tracking_uri, ui_command
from dino_ray.train.loop import build_config_backbone
from dino_ray.train.ray_trainer import pretrain_on_ray

log = logging.getLogger("dino_ray.quickstart")
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "cifar10_cpu.yaml"


def random_subset(dataset: Dataset, count: int, seed: int = 0) -> Dataset:
    """``count`` images drawn with a fixed seed (converted folders are sorted by class: the first N are not
    a sample), or the whole dataset when it is smaller."""
    if len(dataset) <= count:
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist())


def run_quickstart(train_data: Optional[str], val_data: Optional[str], output_dir: str,
                   overrides: Optional[list[str]] = None, knn_train_images: int = 5000, knn_val_images: int = 2000,
                   attention_images: int = 4, config: str | Path = CONFIG) -> dict:
    """Pretrain on Ray, evaluate, log to MLflow, write ``quickstart.json``; returns its content."""
    train_data, val_data, data_source = quickstart_data(train_data, val_data)
    log.info("quickstart data: %s (pretrain on %s, k-NN held out: %s)", data_source, train_data, val_data)
    out = Path(output_dir).resolve()
    run_name = time.strftime("quickstart-%Y%m%d-%H%M%S")  # a new run each time; earlier ones stay comparable
    cfg = load_config(config, [f"data_path={train_data}", f"output_dir={out}", "scaling.num_workers=1",
                               f"run.name={run_name}", f"eval.knn_val_data={val_data}", *(overrides or [])])
    with ray_session(include_dashboard=True):
        start = time.time()
        result = pretrain_on_ray(cfg)
        train_minutes = (time.time() - start) / 60
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"pretraining failed: {result.error}")
    final = out / run_name
    result.checkpoint.to_directory(str(final))
    uri = tracking_uri(cfg)
    weights = resolve_weights(str(final / "checkpoint.pth"), uri)  # with its run id and epoch: runs nest under it

    transform = eval_transform(cfg.global_crops_size, cfg.global_crops_size)
    knn_train = random_subset(build_dataset(train_data, transform), knn_train_images)
    knn_val = random_subset(build_dataset(val_data, transform), knn_val_images)
    torch.manual_seed(cfg.seed)
    random_init = build_config_backbone(cfg)  # the exact initial weights of this run
    pretrained = load_pretrained_weights(build_config_backbone(cfg), weights.path, "teacher")
    results = {}
    for name, model in (("random_init", random_init), ("pretrained", pretrained),
                        ("raw_pixels", nn.Flatten())):  # normalised pixels, cosine similarity: the bar to beat
        top1, top5 = evaluate_knn(model, knn_train, knn_val, nb_knn=[20], temperature=0.07, batch_size=256)[20]
        results[name] = {"top1": top1, "top5": top5}
    track("knn", {"nb_knn": 20, "temperature": 0.07, "train_images": len(knn_train), "val_images": len(knn_val),
                  "val_data": val_data},
          {"top1_k20": results["pretrained"]["top1"], "top5_k20": results["pretrained"]["top5"],
           "random_init_top1_k20": results["random_init"]["top1"],
           "raw_pixels_top1_k20": results["raw_pixels"]["top1"]},
          {}, weights, uri, [])  # no headline: the pretraining run's knn_top1_k20 is the monitor's (other subsets)

    attention_dir = out / "attention"
    drawn = cfg.arch.startswith("vit") and attention_images > 0
    if drawn:  # a convolutional backbone has no attention to show
        figures = attention_figures(pretrained, val_data, attention_dir, attention_images, cfg.patch_size,
                                    4 * cfg.global_crops_size)
        track("attention", {"images": attention_images, "threshold": 0.6, "image_size": 4 * cfg.global_crops_size},
              {}, {}, weights, uri, figures, [f"attention/{file.parent.name}" for file in figures])

    losses = [json.loads(line)["train_loss"] for line in open(final / "log.txt")]
    summary = {"train_minutes": round(train_minutes, 2), "epochs": cfg.epochs, "data": data_source,
               "train_data": train_data, "val_data": val_data, "arch": cfg.arch, "loss_first_epoch": losses[0],
               "loss_last_epoch": losses[-1], "images_per_s": result.metrics.get("images_per_s"),
               "knn_train_images": len(knn_train), "knn_val_images": len(knn_val), "knn_k20": results,
               "mlflow_run_id": weights.run_id, "tracking_uri": uri, "checkpoint": str(final / "checkpoint.pth"),
               "attention": str(attention_dir) if drawn else None}  # not stale maps of an earlier ViT run
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train_data", default=None, help="Parquet file/folder or ImageFolder to pretrain on "
                        "(default: CIFAR-10 from ../shared, a download, or the repository's sample)")
    parser.add_argument("--val_data", default=None, help="held-out labelled images for k-NN")
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--config", default=str(CONFIG), help="the recipe (experiments/cifar10_cpu_vit.yaml: a ViT, "
                        "with attention maps)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    summary = run_quickstart(args.train_data, args.val_data, args.output_dir, args.overrides, config=args.config)
    knn = summary["knn_k20"]
    print(f"\nDINO pretraining: {summary['epochs']} epochs in {summary['train_minutes']} min, "
          f"loss {summary['loss_first_epoch']:.3f} -> {summary['loss_last_epoch']:.3f}")
    print(f"data: {summary['data']}")
    print(f"k-NN top-1 (k=20) on {summary['knn_val_images']} held-out images: "
          f"pretrained teacher {knn['pretrained']['top1']:.1f}%, random init {knn['random_init']['top1']:.1f}%, "
          f"raw pixels {knn['raw_pixels']['top1']:.1f}%")
    print(f"checkpoint: {summary['checkpoint']}" + (f"; attention maps: {summary['attention']}" if summary["attention"]
                                                     else f" ({summary['arch']}: no attention maps; a ViT recipe "
                                                          f"has them: --config experiments/cifar10_cpu_vit.yaml)"))
    print(f"MLflow run {summary['mlflow_run_id']} (its evaluations nested under it). Open the UI with:")
    print(f"  {ui_command(summary['tracking_uri'])}")


if __name__ == "__main__":
    main()
