"""Backbones: timm Vision Transformers with the reference's position-embedding interpolation, and every
torchvision classification architecture (as the reference's ``--arch``), with small-image options.

The ViT is timm's ``VisionTransformer`` (its state_dict keys equal the official DINO checkpoints')
with one method replaced: position embeddings for another input size are resampled as the
reference's ``vision_transformer.interpolate_pos_encoding`` does (bicubic by scale factor with a
+0.1 offset, no antialiasing). timm's own resize (by size, antialiased) changes ViT-S/16 outputs at
96 px by up to 6e-2, so official weights would not give the reference's features on local crops.

Options for 32 px images, none of which the reference has (its defaults are unchanged):
- ``stem="small"``: a ResNet's 7x7 stride-2 convolution and max-pool become one 3x3 stride-1 convolution
  (He et al. 2016, Sec. 4.2, the CIFAR ResNets); ``"small_stride2"`` the same convolution with stride 2,
  a quarter of the compute at 32 px.
- ``stem="conv"`` for a ViT: the patchify convolution becomes a stack of 3x3 stride-2 convolutions with
  batch norm and ReLU, then a 1x1 projection (Xiao et al. 2021, "Early convolutions help transformers
  see better"); the patch size is still the token grid's stride.
- ``width``: a ResNet's stage widths times this factor (timm's ResNet, whose parameter names are
  torchvision's), for networks that take many more steps per CPU-minute.
"""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

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


STEMS = ("default", "small", "small_stride2", "conv")


def torchvision_archs() -> list[str]:
    """Every torchvision classification architecture name (the reference's ``--arch`` choices besides ViTs)."""
    return torchvision.models.list_models(module=torchvision.models)


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed whose patchify convolution is a convolutional stem of the same total stride."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        if patch < 2 or patch & (patch - 1):
            raise ValueError(f"stem 'conv' needs a power-of-two patch_size >= 2, got {patch}")
        embed_dim = self.proj.out_channels
        layers: list[nn.Module] = []
        channels = self.proj.in_channels
        for i in range(int(math.log2(patch))):
            width = max(embed_dim // 2 ** (int(math.log2(patch)) - i), 16)
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT (CLS token, no classifier, any input size) with the reference's pos-embed resampling."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, grid_h, grid_w, dim = x.shape  # dynamic_img_size gives NHWC patch tokens
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)), dim=1)
        return self.pos_drop(x + interpolate_pos_encoding(self.pos_embed, grid_h, grid_w))


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0, fused_attn: bool = True,
                   stem: str = "default", width: float = 1.0, **kwargs: Any) -> nn.Module:
    """``vit_tiny`` / ``vit_small`` / ``vit_base`` (any patch size; kwargs go to the ViT) or any torchvision
    classification architecture (``resnet18``, ``resnet50``, ``convnext_tiny`` ...) without its classifier.

    The module's forward returns the CLS (or pooled) feature [B, embed_dim]; ``module.embed_dim`` is its width.
    ``fused_attn`` selects timm's SDPA attention (default) or the explicit softmax(QK^T)V path; ``stem`` and
    ``width`` are the small-image options of the module docstring.
    """
    if stem not in STEMS:
        raise ValueError(f"unknown stem '{stem}' (choose from {', '.join(STEMS)})")
    if arch in VIT_SIZES:
        if stem not in ("default", "conv") or width != 1.0:
            raise ValueError(f"a ViT takes stem 'default' or 'conv' and width 1, got stem '{stem}', width {width}")
        options = dict(VIT_SIZES[arch], img_size=224, mlp_ratio=4, qkv_bias=True)
        options.update(kwargs)
        if stem == "conv":
            options["embed_layer"] = ConvStemPatchEmbed
        model = VisionTransformer(patch_size=patch_size, num_classes=0, dynamic_img_size=True,
                                  drop_path_rate=drop_path_rate, **options)
        for block in model.blocks:
            block.attn.fused_attn = fused_attn
        return model
    if arch not in torchvision_archs():
        raise ValueError(f"unknown arch '{arch}' (choose from {', '.join(VIT_SIZES)} or a torchvision "
                         f"architecture: {', '.join(torchvision_archs())})")
    if kwargs:
        raise ValueError(f"{arch} takes no ViT shape arguments, got {sorted(kwargs)}")
    model = _resnet_of_width(arch, width) if width != 1.0 else torchvision.models.get_model(arch)
    model.embed_dim = _drop_classifier(model, arch)
    if stem in ("small", "small_stride2"):
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ValueError(f"stem '{stem}' is for ResNet-family archs (conv1 + maxpool); '{arch}' has neither")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1 if stem == "small" else 2, padding=1,
                                bias=False)
        model.maxpool = nn.Identity()
    elif stem == "conv":
        raise ValueError("stem 'conv' is for ViTs; ResNets take 'small' or 'small_stride2'")
    return model


def _resnet_of_width(arch: str, width: float) -> nn.Module:
    """timm's ResNet with every stage ``width`` times as wide (its state_dict names are torchvision's)."""
    if not arch.startswith("resnet") or arch not in timm.list_models():
        raise ValueError(f"width {width} is for the ResNets (resnet18 ... resnet152), not '{arch}'")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    channels = tuple(max(8, int(round(c * width))) for c in (64, 128, 256, 512))
    model = timm.create_model(arch, channels=channels)
    # timm keeps a 64-wide stem whatever the stages: narrow it too, so the first stage needs no projection
    stem = channels[0]
    model.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    first = model.layer1[0]
    first.conv1 = nn.Conv2d(stem, first.conv1.out_channels, first.conv1.kernel_size, first.conv1.stride,
                            first.conv1.padding, bias=False)
    if first.downsample is not None:
        out_channels = first.downsample[0].out_channels
        if out_channels == stem:  # a BasicBlock of the stem's width: the identity shortcut, as torchvision's
            first.downsample = None
        else:
            first.downsample[0] = nn.Conv2d(stem, out_channels, 1, bias=False)
    return model


def _drop_classifier(model: nn.Module, arch: str) -> int:
    """Replace the last Linear classifier (``fc`` or the end of ``classifier``/``head``) by Identity; its width."""
    for name in ("fc", "classifier", "head", "heads"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            setattr(model, name, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential):
            linears = [i for i, m in enumerate(layer) if isinstance(m, nn.Linear)]
            if linears:
                in_features = layer[linears[-1]].in_features
                layer[linears[-1]] = nn.Identity()
                return in_features
    raise ValueError(f"arch '{arch}': no Linear classifier found to remove (fc / classifier / head)")


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
