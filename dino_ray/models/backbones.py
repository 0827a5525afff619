"""Backbones: timm Vision Transformers with the reference's position-embedding interpolation, ResNet-50.

The ViT is timm's ``VisionTransformer`` (its state_dict keys equal the official DINO checkpoints')
with one method replaced: position embeddings for another input size are resampled as the
reference's ``vision_transformer.interpolate_pos_encoding`` does (bicubic by scale factor with a
+0.1 offset, no antialiasing). timm's own resize (by size, antialiased) changes ViT-S/16 outputs at
96 px by up to 6e-2, so official weights would not give the reference's features on local crops.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn
from torchvision.models import resnet50

VIT_SIZES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resample ``pos_embed`` [1, 1 + N, D] (square grid) to a ``grid_h x grid_w`` patch grid, as the reference."""
    n = pos_embed.shape[1] - 1
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    side = math.sqrt(n)
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    # The +0.1 avoids floating-point error in the output size; the scale factor (not the size) sets the
    # sampling positions, which is what makes this differ from a resize to (grid_h, grid_w).
    patch_pos = F.interpolate(patch_pos, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    assert patch_pos.shape[-2:] == (grid_h, grid_w)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT (CLS token, no classifier, any input size) with the reference's pos-embed resampling."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, grid_h, grid_w, dim = x.shape  # dynamic_img_size gives NHWC patch tokens
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)), dim=1)
        return self.pos_drop(x + interpolate_pos_encoding(self.pos_embed, grid_h, grid_w))


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0, fused_attn: bool = True,
                   **kwargs: Any) -> nn.Module:
    """``vit_tiny`` / ``vit_small`` / ``vit_base`` (any patch size; kwargs go to the ViT) or ``resnet50``.

    The module's forward returns the CLS feature [B, embed_dim]; ``module.embed_dim`` is its width.
    ``fused_attn`` selects timm's SDPA attention (default) or the explicit softmax(QK^T)V path.
    """
    if arch in VIT_SIZES:
        options = dict(VIT_SIZES[arch], img_size=224, mlp_ratio=4, qkv_bias=True)
        options.update(kwargs)
        model = VisionTransformer(patch_size=patch_size, num_classes=0, dynamic_img_size=True,
                                  drop_path_rate=drop_path_rate, **options)
        for block in model.blocks:
            block.attn.fused_attn = fused_attn
        return model
    if arch == "resnet50":
        if kwargs:
            raise ValueError(f"resnet50 takes no extra arguments, got {sorted(kwargs)}")
        model = resnet50()
        model.embed_dim = model.fc.weight.shape[1]
        model.fc = nn.Identity()
        return model
    raise ValueError(f"unknown arch '{arch}' (choose from {', '.join([*VIT_SIZES, 'resnet50'])})")


def _tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    x = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(model.patch_drop(x))


def get_intermediate_layers(model: VisionTransformer, images: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
    """The normed token outputs [B, 1 + N, D] of the last ``n`` blocks, as the reference's method."""
    x = _tokens(model, images)
    outputs = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if len(model.blocks) - i <= n:
            outputs.append(model.norm(x))
    return outputs


def get_last_selfattention(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention weights [B, heads, 1 + N, 1 + N] (softmaxed, before dropout)."""
    attn = model.blocks[-1].attn
    captured: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    fused = attn.fused_attn
    attn.fused_attn = False  # SDPA never materialises the weights
    try:
        x = _tokens(model, images)
        for block in model.blocks:
            x = block(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return captured[0]
