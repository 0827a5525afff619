"""``make quickstart``: a small real DINO pretraining on local Ray, k-NN and attention maps, all in MLflow.

Runs offline in minutes on 2 CPU cores: the ``cifar10_cpu`` recipe on a 1-worker Ray Train
run (a local Ray instance is started), tracked in the embedded MLflow store under the output
folder; then the weighted k-NN (k=20, T=0.07) on a held-out split, for the pretrained teacher, for
the same network at its random initialisation and for the raw pixels, so the gain from pretraining is
visible; then, for a ViT, the teacher's last-block attention maps for a few held-out images. The
evaluations are MLflow runs nested under the pretraining run. Data: ``dino_ray.core.data.cifar10``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg
from dino_ray.jobs.common import track

log = logging.getLogger(__name__)
CONFIG = "cifar10_cpu"  # a shipped recipe's name: the package carries it
BUDGET_MINUTES = 4.4  # of training steps: with Ray's start-up (0.5 to 0.6 min on 2 cores) at most 5 minutes


def random_subset(dataset: Any, count: int, seed: int = 0) -> Any:
    """``count`` images drawn with a fixed seed (converted folders are sorted by class: the first N are not
    a sample), or the whole dataset when it is smaller."""
    import torch
    from torch.utils.data import Subset

    if len(dataset) <= count:
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist())


def run_quickstart(train_data: Optional[str], val_data: Optional[str], output_dir: str,
                   overrides: Optional[list[str]] = None, knn_train_images: int = 5000, knn_val_images: int = 10000,
                   attention_images: int = 4, config: str | Path = CONFIG,
                   budget_minutes: Optional[float] = BUDGET_MINUTES) -> dict:
    """Pretrain on Ray (its schedule sized to ``budget_minutes`` unless None: the recipe's epochs), evaluate, log
    to MLflow, write ``quickstart.json``; returns its content."""
    from torch import nn

    from dino_ray.core.config import load_config
    from dino_ray.core.data.augment import eval_transform
    from dino_ray.core.data.cifar10 import quickstart_data
    from dino_ray.core.data.datasets import build_dataset, require_labels
    from dino_ray.core.models.build import backbone_from_checkpoint, random_init_backbone
    from dino_ray.eval.attention import attention_figures
    from dino_ray.eval.knn import evaluate_knn
    from dino_ray.platform.checkpoints import resolve_checkpoint
    from dino_ray.platform.ray_session import ray_session
    from dino_ray.platform.tracking.store import tracking_uri, ui_command
    from dino_ray.platform.trainer import pretrain_on_ray

    train_data, val_data, data_source = quickstart_data(train_data, val_data)
    log.info("quickstart data: %s (pretrain on %s, k-NN held out: %s)", data_source, train_data, val_data)
    out = Path(output_dir).resolve()
    run_name = time.strftime("quickstart-%Y%m%d-%H%M%S")  # a new run each time; earlier ones stay comparable
    cfg = load_config(config, [f"data_path={train_data}", f"output_dir={out}", "scaling.num_workers=1",
                               f"run.name={run_name}", f"eval.knn_val_data={val_data}",
                               *([f"budget_minutes={budget_minutes}"] if budget_minutes else []), *(overrides or [])])
    with ray_session(include_dashboard=True):
        start = time.time()
        result = pretrain_on_ray(cfg)
        train_minutes = (time.time() - start) / 60
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"pretraining failed: {result.error}")
    final = out / run_name
    result.checkpoint.to_directory(str(final))
    uri = tracking_uri(cfg)
    weights = resolve_checkpoint(str(final / "checkpoint.pth"), uri)  # with its run id and epoch: runs nest under it

    transform = eval_transform(cfg.eval_size(), cfg.eval_size())
    val_set = build_dataset(val_data, transform)
    require_labels(val_set, val_data, "the quickstart's k-NN")
    knn_train = random_subset(build_dataset(train_data, transform), knn_train_images)
    knn_val = random_subset(val_set, knn_val_images)
    random_init = random_init_backbone(cfg)
    pretrained, _ = backbone_from_checkpoint(weights.path)
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

    stats = [json.loads(line) for line in open(final / "log.txt")]
    losses = [line["train_loss"] for line in stats]
    summary = {"train_minutes": round(train_minutes, 2), "budget_minutes": cfg.budget_minutes,
               "epochs": len(stats), "steps": sum(line["train_steps"] for line in stats),
               "step_seconds": stats[-1]["train_step_time"], "lr_last": stats[-1]["train_lr"], "data": data_source,
               "train_data": train_data, "val_data": val_data, "arch": cfg.arch,
               "global_crops_size": cfg.global_crops_size, "eval_image_size": cfg.eval_size(),
               "loss_first_epoch": losses[0],
               "loss_last_epoch": losses[-1], "images_per_s": result.metrics.get("images_per_s"),
               "knn_train_images": len(knn_train), "knn_val_images": len(knn_val), "knn_k20": results,
               "mlflow_run_id": weights.run_id, "tracking_uri": uri, "ui_command": ui_command(uri),
               "checkpoint": str(final / "checkpoint.pth"),
               "attention": str(attention_dir) if drawn else None}  # not stale maps of an earlier ViT run
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    return summary


@dataclass
class QuickstartArgs:
    train_data: Optional[str] = arg(None, "images to pretrain on (default: CIFAR-10 from the data folder, a download, "
                                          "or the repository's sample)")
    val_data: Optional[str] = arg(None, "held-out labelled images for k-NN")
    output_dir: str = arg("outputs/quickstart", "the run, its MLflow store and quickstart.json go here")
    config: str = arg(CONFIG, "the recipe: a shipped one's name (cifar10_cpu_vit: a ViT, with attention maps) or a "
                              "YAML file")
    budget_minutes: float = arg(BUDGET_MINUTES, "minutes of training steps the schedule is sized to (0: the recipe's "
                                                "epochs)")
    overrides: list[str] = arg(help="key=value config overrides", factory=list, positional=True)


def report_lines(summary: dict[str, Any]) -> list[str]:
    """What the quickstart shows at its end, from its summary: the loss, the k-NN against its baselines, where
    everything went (the docs render the same lines from a measured summary)."""
    knn = summary["knn_k20"]
    budget = f" (a budget of {summary['budget_minutes']:g} min of steps)" if summary["budget_minutes"] else ""
    attention = (f"; attention maps: {summary['attention']}" if summary["attention"] else
                 f" ({summary['arch']}: no attention maps; a ViT recipe has them: --config cifar10_cpu_vit)")
    return [f"DINO pretraining: {summary['epochs']} epochs, {summary['steps']} steps in {summary['train_minutes']} min"
            f"{budget}, loss {summary['loss_first_epoch']:.3f} -> {summary['loss_last_epoch']:.3f}, lr at its end "
            f"{summary['lr_last']:.2e}",
            f"data: {summary['data']}",
            f"k-NN top-1 (k=20) on {summary['knn_val_images']} held-out images at {summary['eval_image_size']} px "
            f"(trained on {summary['global_crops_size']} px crops): pretrained teacher "
            f"{knn['pretrained']['top1']:.1f}%, random init {knn['random_init']['top1']:.1f}%, raw pixels "
            f"{knn['raw_pixels']['top1']:.1f}%",
            f"checkpoint: {summary['checkpoint']}{attention}",
            f"MLflow run {summary['mlflow_run_id']} (its evaluations nested under it). Open the UI with:",
            f"  {summary['ui_command']}"]


def quickstart_job(args: QuickstartArgs) -> dict:
    """``run_quickstart``, then what it shows."""
    summary = run_quickstart(args.train_data, args.val_data, args.output_dir, args.overrides, config=args.config,
                             budget_minutes=args.budget_minutes or None)
    print("\n" + "\n".join(report_lines(summary)))
    return summary
