"""What a pretraining will cost before it runs: ``dino-ray pretrain --dry-run``.

World size, total batch, the scaled lr (the reference's rule: lr x total batch / 256), iterations per
epoch (the sampler drops the last partial batch) and GPU-hours from a throughput per GPU: measured by
the user, or the paper's figure (Table 8: ViT-S/16 with 2x224 + 10x96 crops, 100 epochs of ImageNet in
24.2 h on 16 V100s, about 92 images/s per GPU). Then a scaling plan at 8, 16 and 64 GPUs: the gradient
all-reduce's bytes are exact (the config's trainable parameters, which is what DDP sends: measured so in
``benchmarks/scaling.py``); the throughput, the links' bandwidth, the overlap and the price are assumptions,
printed as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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


@dataclass(frozen=True)
class ClusterAssumptions:
    """What the scaling plan assumes: A100 nodes of 8 GPUs as the cluster YAMLs' p4d / a2 types (NVSwitch inside a
    node; EFA / GPUDirect-TCPX between nodes), their CPUs and price, and the CPU cost of the input."""
    gpus_per_node: int = 8
    intra_node_gb_s: float = 200.0  # NCCL all-reduce bus bandwidth inside an NVSwitch node (A100: ~230 measured)
    inter_node_gb_s: float = 40.0  # between nodes: 4 x 100 Gb/s EFA, about 80 % of 50 GB/s
    backward_share: float = 2 / 3  # the part of a step's compute the gradient all-reduce can overlap
    usd_per_gpu_hour: float = 4.10  # p4d.24xlarge on demand, us-west-2, per GPU (32.77 USD / 8)
    cpus_per_gpu: int = 12  # p4d.24xlarge: 96 vCPUs for 8 GPUs
    # decode + multi-crop, 224 px, 2 + 8 views, the batched augmentation on one core of the 2-core development
    # machine (benchmarks/augment.py); the reference's PIL pipeline does 35
    images_per_s_per_core: float = 114.0


def gradient_bytes(cfg: DINOConfig) -> int:
    """The bytes DDP all-reduces each step: the student's trainable parameters in fp32 (DDP's buckets hold the
    gradients in the parameters' dtype whatever the autocast). Counted on the meta device: no memory, no time."""
    from dino_ray.core.models.build import build_config_backbone, build_config_head

    with torch.device("meta"):
        backbone = build_config_backbone(cfg)
        head = build_config_head(cfg, backbone.embed_dim, cfg.norm_last_layer)
    return sum(p.numel() * 4 for module in (backbone, head) for p in module.parameters() if p.requires_grad)


def scaling_plan(cfg: DINOConfig, num_images: int, images_per_s_per_gpu: float, gpus: tuple[int, ...] = (8, 16, 64),
                 links: ClusterAssumptions = ClusterAssumptions()) -> list[dict[str, Any]]:
    """For each GPU count: the step's compute (the per-GPU throughput, assumed to hold at any scale), the ring
    all-reduce of the gradients (2 (G-1)/G x bytes over the slowest link: the node's NVSwitch up to one node,
    the network beyond), the part the backward pass does not hide, and what the run then takes and costs."""
    size = gradient_bytes(cfg)
    compute = cfg.batch_size_per_gpu / images_per_s_per_gpu
    rows = []
    for count in gpus:
        bandwidth = links.intra_node_gb_s if count <= links.gpus_per_node else links.inter_node_gb_s
        allreduce = 2 * (count - 1) / count * size / (bandwidth * 1e9)
        exposed = max(0.0, allreduce - links.backward_share * compute)
        step = compute + exposed
        iterations = cfg.epochs * (num_images // (cfg.batch_size_per_gpu * count))
        hours = iterations * step / 3600
        rows.append({"gpus": count, "total_batch": cfg.batch_size_per_gpu * count, "compute_s": compute,
                     "allreduce_s": allreduce, "exposed_allreduce_s": exposed, "step_s": step,
                     "efficiency": compute / step, "hours": hours, "gpu_hours": hours * count,
                     "usd": hours * count * links.usd_per_gpu_hour,
                     "input_cpus_per_gpu": images_per_s_per_gpu / links.images_per_s_per_core})
    return rows
