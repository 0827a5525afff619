"""``dino-ray pretrain``: a DINO pretraining from a YAML config on Ray Train (or in this process), or its plan."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg

log = logging.getLogger(__name__)


@dataclass
class PretrainArgs:
    """How a pretraining is launched; what it trains is the config (``--config`` and ``key=value`` overrides)."""
    config: Optional[str] = arg(None, "a shipped recipe's name (cifar10_cpu, vit_small_16_100ep, ...) or a YAML file "
                                      "of main_dino.py flags")
    overrides: list[str] = arg(help="key=value overrides, e.g. lr=1e-3 epochs=10", factory=list, positional=True)
    resume_from: Optional[str] = arg(None, "checkpoint to resume from: a file, an s3:// or gs:// URI, an MLflow run "
                                           "(<run id>, runs:/...) or a registered model (models:/<name>@<alias>); "
                                           "default: the run's latest checkpoint when one exists",
                                     flag="--resume-from")
    use_ray: bool = arg(True, "run the loop in this process, without Ray", flag="--no-ray")
    dry_run: bool = arg(False, "print the resolved config, world size, total batch, scaled lr, iterations per epoch "
                               "and estimated GPU-hours; run nothing", flag="--dry-run")
    num_images: Optional[int] = arg(None, "with --dry-run: dataset size (default: count data_path, else "
                                          "ImageNet-1k's 1,281,167)")
    images_per_s: Optional[float] = arg(None, "with --dry-run: measured images/s per GPU (default: the paper's "
                                              "ViT-S/16 figure, about 92)")


def pretrain_job(args: PretrainArgs) -> dict[str, Any]:
    """Load and check the config (before torch is imported), then plan, train here, or train on Ray."""
    from dino_ray.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg, args.num_images, args.images_per_s)
    from dino_ray.core.storage import is_uri

    if not is_uri(cfg.data_path) and not Path(cfg.data_path).exists():
        raise FileNotFoundError(f"data_path '{cfg.data_path}' does not exist")
    if not args.use_ray:
        from dino_ray.core.train.loop import train_dino
        from dino_ray.platform.checkpoints import resolve_checkpoint
        from dino_ray.platform.tracking.store import tracking_uri

        def local(source: Optional[str], folder: str) -> Optional[Path]:
            return resolve_checkpoint(source, tracking_uri(cfg), cache_dir=Path(cfg.output_dir) / folder).path \
                if source else None

        stats = train_dino(cfg, resume_from=local(args.resume_from, "resume"), init_from=local(cfg.init_from, "init"))
        log.info("done: %s; checkpoints and log.txt in %s", json.dumps(stats), Path(cfg.output_dir).resolve())
        return stats
    from dino_ray.platform.trainer import pretrain_on_ray

    result = pretrain_on_ray(cfg, resume_from=args.resume_from)
    log.info("done: %s; checkpoints in %s", json.dumps(result.metrics), result.path)
    return dict(result.metrics or {})


def dry_run(cfg: Any, num_images: Optional[int] = None, images_per_s: Optional[float] = None) -> dict[str, Any]:
    """Print the resolved config and what the run will cost; touch no cluster and no data beyond counting it."""
    import yaml

    from dino_ray.core.data.datasets import build_dataset
    from dino_ray.core.storage import is_uri
    from dino_ray.core.train.plan import (
        IMAGENET_TRAIN_IMAGES,
        PAPER_IMAGES_PER_S_PER_GPU,
        ClusterAssumptions,
        gradient_bytes,
        plan_run,
        scaling_plan,
    )

    counted = "given"
    if num_images is None and not is_uri(cfg.data_path) and Path(cfg.data_path).exists():
        num_images, counted = len(build_dataset(cfg.data_path, max_images=cfg.max_images)), f"in {cfg.data_path}"
    if num_images is None:
        num_images, counted = IMAGENET_TRAIN_IMAGES, "ImageNet-1k train (data_path not readable here)"
    plan = plan_run(cfg, num_images, images_per_s or PAPER_IMAGES_PER_S_PER_GPU)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"world size {plan['world_size']} x batch {plan['batch_size_per_gpu']} = total batch {plan['total_batch']}; "
          f"lr {plan['lr']} -> {plan['scaled_lr']:.6g} (x total batch / 256)")
    print(f"{plan['num_images']:,} images ({counted}): {plan['iterations_per_epoch']:,} iterations per epoch, "
          f"{plan['total_iterations']:,} over {cfg.epochs} epochs")
    source = "given" if images_per_s else "the paper's ViT-S/16 figure, Table 8"
    print(f"at {plan['images_per_s_per_gpu']} images/s per GPU ({source}): {plan['gpu_hours']:,} GPU-hours, "
          f"{plan['wall_hours']:,} hours on {plan['world_size']} GPUs")
    links = ClusterAssumptions()
    rows = scaling_plan(cfg, num_images, images_per_s or PAPER_IMAGES_PER_S_PER_GPU, links=links)
    print(f"\nscaling plan (measured: the gradient all-reduce, {gradient_bytes(cfg) / 2**20:,.1f} MiB a step = this "
          f"config's trainable fp32 parameters, which is what DDP sends; assumed: {plan['images_per_s_per_gpu']} "
          f"images/s per GPU at any scale, {links.intra_node_gb_s:g} GB/s inside a node of {links.gpus_per_node} "
          f"GPUs, "
          f"{links.inter_node_gb_s:g} GB/s between nodes, the all-reduce hidden behind the backward pass "
          f"({links.backward_share:.0%} of a step) where it fits, {links.usd_per_gpu_hour:g} USD per GPU-hour)")
    print(f"{'GPUs':>5} {'batch':>6} {'step s':>8} {'all-reduce s':>13} {'exposed':>8} {'efficiency':>10} "
          f"{'hours':>8} {'GPU-hours':>10} {'USD':>10}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['total_batch']:>6} {r['step_s']:>8.3f} {r['allreduce_s']:>13.4f} "
              f"{r['exposed_allreduce_s']:>8.4f} {r['efficiency']:>10.0%} {r['hours']:>8,.1f} "
              f"{r['gpu_hours']:>10,.0f} {r['usd']:>10,.0f}")
    print(f"where it stops scaling: {bottleneck(rows, links)}")
    return {**plan, "scaling": rows}


def bottleneck(rows: list[dict[str, Any]], links: Any) -> str:
    """What limits a scaling plan first: the exposed all-reduce, the CPUs feeding each GPU, or the total batch."""
    slow = [r for r in rows if r["efficiency"] < 0.9]
    if slow:
        return f"{slow[0]['gpus']} GPUs, where the exposed all-reduce is {1 - slow[0]['efficiency']:.0%} of the step"
    cpus, last = rows[0]["input_cpus_per_gpu"], rows[-1]
    feeds = "enough" if cpus <= links.cpus_per_gpu else "too few: the GPUs would wait for data"
    return (f"not in communication up to {last['gpus']} GPUs (the all-reduce hides behind the backward pass); the "
            f"input needs {cpus:.1f} CPU cores per GPU ({links.cpus_per_gpu} there: {feeds}); the total batch "
            f"({last['total_batch']} at {last['gpus']} GPUs) grows past the paper's 1024, which changes the recipe "
            f"(lr x batch / 256)")
