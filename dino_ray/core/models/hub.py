"""Official DINO weights: safe loading of any checkpoint layout, and the hub-style constructors.

``load_pretrained_weights`` reads a released backbone-only file, a full training checkpoint of the
reference (``student`` / ``teacher`` with ``module.`` and ``backbone.`` prefixes) or a dino-ray
checkpoint (the same layout). It loads with ``torch.load(weights_only=True)``; the only extra types
allowed are the ones official full checkpoints hold (``argparse.Namespace``, numpy scalars), so a
crafted file cannot run code. Prefixes are stripped only at the start of a key, and the load is
strict: a file for another architecture fails naming the missing and unexpected keys, where the
reference's substring replace + ``strict=False`` would load partially in silence.
"""
from __future__ import annotations

import argparse
import math
import urllib.error
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from dino_ray.core.models.backbones import build_backbone, interpolate_pos_encoding

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dino/"
OFFICIAL_WEIGHTS = {
    "dino_vits16": ("vit_small", 16, "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "dino_vits8": ("vit_small", 8, "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "dino_vitb16": ("vit_base", 16, "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "dino_vitb8": ("vit_base", 8, "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_resnet50": ("resnet50", 0, "dino_resnet50_pretrain/dino_resnet50_pretrain.pth"),
}

# What official full checkpoints pickle besides tensors: the argparse Namespace of flags, numpy floats.
# Official files were written with numpy 1 ("numpy.core..."), numpy 2 writes "numpy._core...": allow both names.
_scalar = np._core.multiarray.scalar
_SAFE_GLOBALS: list[Any] = [argparse.Namespace, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.int64)),
                            (_scalar, "numpy.core.multiarray.scalar"), (_scalar, "numpy._core.multiarray.scalar")]


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` allowing only the extra types official checkpoints contain; a
    ``.safetensors`` file (``dino-ray export``) by safetensors, which holds tensors only."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"weights file '{path}' does not exist")
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a corrupt file
            raise ValueError(f"cannot load safetensors file '{path}': {exc}") from exc
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"cannot load checkpoint '{path}': the file is corrupt, truncated or holds "
                         f"objects outside the allow-list ({type(exc).__name__}: {exc})") from exc


def strip_prefix(state_dict: dict[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Keys without ``prefix`` when every key has it (DistributedDataParallel's ``module.``); else unchanged."""
    if not all(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def extract_state_dict(checkpoint: Any, checkpoint_key: Optional[str] = "teacher") -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: ``checkpoint[checkpoint_key]`` when present, else the file itself."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    if checkpoint_key and checkpoint_key in checkpoint:
        checkpoint = checkpoint[checkpoint_key]
    elif any(k in checkpoint for k in ("student", "teacher")):
        raise ValueError(f"checkpoint_key '{checkpoint_key}' not in checkpoint (keys: {sorted(checkpoint)})")
    return strip_prefix(dict(checkpoint))


def load_pretrained_weights(model: nn.Module, path_or_url: str | Path, checkpoint_key: Optional[str] = "teacher",
                            model_dir: Optional[str | Path] = None) -> nn.Module:
    """Load weights into ``model`` strictly; a backbone takes the ``backbone.`` part of a full checkpoint."""
    source = str(path_or_url)
    if source.startswith(("http://", "https://")):
        checkpoint = download_weights(source, model_dir)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"weights file '{source}' does not exist")
        checkpoint = safe_load(source)
    return load_checkpoint_weights(model, checkpoint, checkpoint_key, source)


def load_checkpoint_weights(model: nn.Module, checkpoint: Any, checkpoint_key: Optional[str] = "teacher",
                            source: str = "checkpoint") -> nn.Module:
    """``load_pretrained_weights`` for a checkpoint already in memory (``source`` names it in errors)."""
    state_dict = extract_state_dict(checkpoint, checkpoint_key)
    own_keys = set(model.state_dict())
    if not any(k.startswith("backbone.") for k in own_keys) and any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    for name in ("fc", "head"):  # a ResNet's or a timm ViT's classifier, which the backbone does not have
        if isinstance(getattr(model, name, None), nn.Identity):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{name}.")}
    state_dict = _fit_position_embeddings(model, state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        missing = sorted(own_keys - set(state_dict))
        unexpected = sorted(set(state_dict) - own_keys)
        raise ValueError(f"weights in '{source}' do not fit this model: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; "
                         f"{str(exc).splitlines()[-1].strip()}") from exc
    return model


def _fit_position_embeddings(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A ViT's position embeddings trained at another image size, resampled to the model's patch grid (the
    reference's interpolation): a 224 px checkpoint starts a 32 px run, as the reference's evaluations load it."""
    own = getattr(model, "pos_embed", None)
    given = state_dict.get("pos_embed")
    if own is None or given is None or given.shape == own.shape or given.shape[-1] != own.shape[-1]:
        return state_dict
    side = int(round(math.sqrt(own.shape[1] - 1)))
    return {**state_dict, "pos_embed": interpolate_pos_encoding(given, side, side)}


def download_weights(url: str, model_dir: Optional[str | Path] = None) -> Any:
    """Fetch (or reuse from the torch hub cache) an official weights file; offline, fail with what to do."""
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(model_dir) if model_dir else None,
                                                  map_location="cpu", weights_only=True, progress=False)
    except (urllib.error.URLError, OSError) as exc:
        cache = Path(model_dir) if model_dir else Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(f"cannot download '{url}' ({exc}). Offline? Put the file at "
                           f"'{cache / Path(url).name}' or pass weights='/path/to/file.pth'.") from exc


def _hub_constructor(name: str) -> Callable[..., nn.Module]:
    arch, patch_size, url_path = OFFICIAL_WEIGHTS[name]

    def constructor(pretrained: bool = True, weights: Optional[str | Path] = None,
                    model_dir: Optional[str | Path] = None, **kwargs: Any) -> nn.Module:
        model = build_backbone(arch, patch_size, **kwargs) if patch_size else build_backbone(arch, **kwargs)
        if weights is not None:
            load_pretrained_weights(model, weights)
        elif pretrained:
            load_pretrained_weights(model, OFFICIAL_URL + url_path, model_dir=model_dir)
        return model

    constructor.__name__ = name
    constructor.__doc__ = (f"{arch} (patch {patch_size}) with DINO's released weights, from ``weights`` (a local "
                           f"file) or the official URL (cached in the torch hub folder, or ``model_dir``).")
    return constructor


dino_vits16 = _hub_constructor("dino_vits16")
dino_vits8 = _hub_constructor("dino_vits8")
dino_vitb16 = _hub_constructor("dino_vitb16")
dino_vitb8 = _hub_constructor("dino_vitb8")
dino_resnet50 = _hub_constructor("dino_resnet50")
