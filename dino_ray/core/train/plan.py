"""What a pretraining will cost before it runs: ``dino-ray pretrain --dry-run``.

World size, total batch, the scaled lr (the reference's rule: lr x total batch / 256), iterations per
epoch (the sampler drops the last partial batch) and GPU-hours from a throughput per GPU: measured by
the user, or the paper's figure (Table 8: ViT-S/16 with 2x224 + 10x96 crops, 100 epochs of ImageNet in
24.2 h on 16 V100s, about 92 images/s per GPU).
"""
from __future__ import annotations

from typing import Any

from dino_ray.core.config import DINOConfig

IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_IMAGES_PER_S_PER_GPU = IMAGENET_TRAIN_IMAGES * 100 / (24.2 * 3600) / 16


def plan_run(cfg: DINOConfig, num_images: int, images_per_s_per_gpu: float = PAPER_IMAGES_PER_S_PER_GPU
             ) -> dict[str, Any]:
    world = cfg.scaling.num_workers
    total_batch = cfg.batch_size_per_gpu * world
    if num_images < total_batch:
        raise ValueError(f"{num_images} images are fewer than one total batch ({total_batch})")
    iterations = num_images // total_batch
    gpu_hours = cfg.epochs * iterations * total_batch / images_per_s_per_gpu / 3600
    return {"world_size": world, "batch_size_per_gpu": cfg.batch_size_per_gpu, "total_batch": total_batch,
            "lr": cfg.lr, "scaled_lr": cfg.lr * total_batch / 256.0, "num_images": num_images,
            "iterations_per_epoch": iterations, "total_iterations": iterations * cfg.epochs,
            "images_per_s_per_gpu": round(images_per_s_per_gpu, 1), "gpu_hours": round(gpu_hours, 1),
            "wall_hours": round(gpu_hours / world, 1)}
