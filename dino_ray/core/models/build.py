"""Networks from a config, and from a checkpoint through the config it records: one builder for every caller.

``build_config_backbone`` is the only place a backbone is made from settings: the training loop, the random-init
baseline of the evaluations and every backbone rebuilt from a checkpoint go through it, so a network evaluated
later is the network that was trained. A checkpoint's shape comes from its recorded ``args`` (dino-ray's config
dict or the reference's ``argparse.Namespace``); a backbone-only file records none, and its shape is given
(``arch``, ``patch_size``, a ViT's width, depth and heads) or read off its position embeddings (the image size).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dino_ray.core.config import VIT_SHAPE_KEYS, DINOConfig, build_config
from dino_ray.core.models.backbones import build_backbone
from dino_ray.core.models.head import DINOHead
from dino_ray.core.models.hub import extract_state_dict, load_checkpoint_weights, safe_load
from dino_ray.core.models.multicrop import MultiCropWrapper
from dino_ray.core.train.checkpoint import recorded_args

# What a checkpoint's recorded args say about the networks (the rest, data and schedules, does not shape them).
MODEL_KEYS = ("arch", "patch_size", *VIT_SHAPE_KEYS, "stem", "width", "global_crops_size", "eval_image_size",
              "out_dim", "use_bn_in_head", "norm_last_layer", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")
EXPORT_METADATA = "dino_ray"  # the safetensors metadata key of a ``dino-ray export``'s JSON description
ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}  # the first released checkpoints' names


def build_config_backbone(cfg: DINOConfig, drop_path_rate: float = 0.0) -> nn.Module:
    """The backbone ``cfg`` describes (forward: the CLS or pooled feature)."""
    if cfg.arch.startswith("vit"):
        return build_backbone(cfg.arch, cfg.patch_size, drop_path_rate, cfg.fused_attn, stem=cfg.stem,
                              img_size=cfg.global_crops_size, **cfg.vit_kwargs())
    return build_backbone(cfg.arch, stem=cfg.stem, width=cfg.width)


def build_config_head(cfg: DINOConfig, in_dim: int, norm_last_layer: bool) -> DINOHead:
    return DINOHead(in_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, norm_last_layer=norm_last_layer,
                    nlayers=cfg.head_nlayers, hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)


def build_student_teacher(cfg: DINOConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path, configurable last layer) and teacher (no drop path, normed last layer), equal weights;
    the teacher takes no gradients (the reference, ``main_dino.py``)."""
    def make(drop_path_rate: float, norm_last_layer: bool) -> MultiCropWrapper:
        backbone = build_config_backbone(cfg, drop_path_rate)
        return MultiCropWrapper(backbone, build_config_head(cfg, backbone.embed_dim, norm_last_layer))

    student = make(cfg.drop_path_rate, cfg.norm_last_layer)
    teacher = make(0.0, True)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def random_init_backbone(cfg: DINOConfig) -> nn.Module:
    """The exact initial weights of a run of ``cfg`` (its student backbone is the first thing the run draws after
    seeding with ``cfg.seed``): the random-init baseline every evaluation compares against."""
    torch.manual_seed(cfg.seed)
    return build_config_backbone(cfg)


def checkpoint_config(checkpoint: Any, checkpoint_key: Optional[str] = "teacher", **given: Any) -> DINOConfig:
    """The network settings of a loaded checkpoint as a config: ``given`` values (None: not given) first, then its
    recorded args, then the image size its position embeddings were trained at, then the defaults."""
    recorded = {k: v for k, v in recorded_args(checkpoint).items() if k in MODEL_KEYS}
    values = {**recorded, **{k: v for k, v in given.items() if v is not None}}
    values["arch"] = ARCH_ALIASES.get(values.get("arch", "vit_small"), values.get("arch", "vit_small"))
    if "global_crops_size" not in values:
        values["global_crops_size"] = _trained_size(checkpoint, checkpoint_key, values.get("patch_size", 16)) \
            if values["arch"].startswith("vit") else 224
    if not values["arch"].startswith("vit"):
        values = {k: v for k, v in values.items() if k not in (*VIT_SHAPE_KEYS, "patch_size")}
    return build_config(values, source="the checkpoint's recorded args")


def _trained_size(checkpoint: Any, checkpoint_key: Optional[str], patch_size: int) -> int:
    """A backbone-only ViT file records no args: its position embeddings tell the size it was trained at."""
    state = extract_state_dict(checkpoint, checkpoint_key)
    pos = state.get("pos_embed", state.get("backbone.pos_embed"))
    return int(round(math.sqrt(pos.shape[1] - 1))) * patch_size if pos is not None else 224


def exported_shape(path: str | Path) -> dict[str, Any]:
    """The network settings a ``dino-ray export`` safetensors file carries in its metadata ({} for other files)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as exported:
        spec = json.loads((exported.metadata() or {}).get(EXPORT_METADATA, "{}"))
    shape = {k: v for k, v in spec.items() if k in MODEL_KEYS}
    return {**shape, "eval_image_size": spec["image_size"]} if "image_size" in spec else shape


def backbone_shape(cfg: DINOConfig) -> dict[str, Any]:
    """What an evaluation records of a backbone: architecture, patch size, ViT shape, stem, width, the image size
    its evaluations see."""
    return {"arch": cfg.arch, "patch_size": cfg.patch_size, **cfg.vit_kwargs(), "stem": cfg.stem, "width": cfg.width,
            "image_size": cfg.eval_size()}


def backbone_from_checkpoint(pretrained_weights: str | Path, checkpoint_key: str = "teacher",
                             **given: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone a weights file holds, built by ``build_config_backbone`` and loaded strictly; returns
    ``(backbone, shape)``. ``given``: ``arch``, ``patch_size``, ``embed_dim``... for a backbone-only file."""
    if not Path(pretrained_weights).is_file():
        raise FileNotFoundError(f"pretrained_weights '{pretrained_weights}' does not exist")
    checkpoint = safe_load(pretrained_weights)
    cfg = checkpoint_config(checkpoint, checkpoint_key, **{**exported_shape(pretrained_weights),
                                                            **{k: v for k, v in given.items() if v is not None}})
    backbone = build_config_backbone(cfg)
    load_checkpoint_weights(backbone, checkpoint, checkpoint_key, str(pretrained_weights))
    return backbone, backbone_shape(cfg)
