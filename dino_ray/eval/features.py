"""Extract backbone features (the CLS output) for a labelled image dataset."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dino_ray.data.datasets import collate_skipping_bad
from dino_ray.models.backbones import build_backbone
from dino_ray.models.hub import load_checkpoint_weights, safe_load


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(features [N, D] float32, labels [N] int64)`` in dataset order, bad images skipped."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping_bad)
    features, labels = [], []
    for images, targets, _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        if images is None:
            continue
        features.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def backbone_from_weights(pretrained_weights: str, arch: Optional[str] = None, patch_size: Optional[int] = None,
                          checkpoint_key: str = "teacher", **vit_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the backbone a weights file needs and load it; returns ``(backbone, shape)``.

    A dino-ray or reference full checkpoint records its ``args``: arch, patch size and ViT shape come
    from there unless given. A backbone-only file needs ``arch`` and ``patch_size``.
    """
    if not Path(pretrained_weights).is_file():
        raise FileNotFoundError(f"pretrained_weights '{pretrained_weights}' does not exist")
    checkpoint = safe_load(pretrained_weights)
    recorded = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    recorded = vars(recorded) if isinstance(recorded, argparse.Namespace) else dict(recorded)
    shape = {"arch": arch or recorded.get("arch", "vit_small"),
             "patch_size": patch_size or recorded.get("patch_size", 16)}
    for key in ("embed_dim", "depth", "num_heads"):
        if vit_kwargs.get(key) or recorded.get(key):
            shape[key] = vit_kwargs.get(key) or recorded.get(key)
    if shape["arch"].startswith("vit"):
        extra = {k: v for k, v in shape.items() if k in ("embed_dim", "depth", "num_heads")}
        img_size = recorded.get("global_crops_size", 224)
        backbone = build_backbone(shape["arch"], shape["patch_size"], img_size=img_size, **extra)
        shape["image_size"] = img_size
    else:
        backbone = build_backbone(shape["arch"])
        shape["image_size"] = 224
    load_checkpoint_weights(backbone, checkpoint, checkpoint_key, pretrained_weights)
    return backbone, shape
