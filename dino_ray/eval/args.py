"""The evaluations' shared arguments (which backbone, which labelled splits) and the linear probe's: the reference's
flags, same names and defaults, checked before torch is imported so the command line's errors come at once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dino_ray.core.args import arg, below, check
from dino_ray.core.config import VIT_SHAPE_KEYS


@dataclass
class BackboneArgs:
    """Which backbone an evaluation runs: a weights source and, for a backbone-only file, its shape."""
    pretrained_weights: str = arg("", "a checkpoint file (dino-ray or official, full or backbone-only) or its s3:// "
                                      "/ gs:// URI, an MLflow run (<run id>, runs:/<run id>), a registered model "
                                      "(models:/<name>@<alias>), or dino_vits16 / dino_vitb8 / ...")
    checkpoint_key: str = arg("teacher", '"teacher" or "student" in full checkpoints')
    arch: Optional[str] = arg(None, "default: from the checkpoint's args, else vit_small")
    patch_size: Optional[int] = arg(None, "default: from the checkpoint's args, else 16")
    embed_dim: Optional[int] = arg(None, "a non-standard ViT's width (default: from the checkpoint's args)")
    depth: Optional[int] = arg(None, "a non-standard ViT's depth")
    num_heads: Optional[int] = arg(None, "a non-standard ViT's heads")

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[str]:
        problems = [] if self.pretrained_weights else ["pretrained_weights is required"]
        if self.checkpoint_key not in ("teacher", "student"):
            problems.append(f"checkpoint_key must be teacher or student, got {self.checkpoint_key!r}")
        return problems + below(self, ("patch_size", *VIT_SHAPE_KEYS), 1)

    @property
    def vit_shape(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in VIT_SHAPE_KEYS if getattr(self, k)}


@dataclass
class SplitData:
    """Labelled training and validation images: ``data_path/train`` and ``data_path/val``, or each its own path."""
    data_path: Optional[str] = arg(None, "a folder with train/ and val/")
    train_data_path: Optional[str] = arg(None, "overrides data_path/train (image folder, path list or Parquet)")
    val_data_path: Optional[str] = arg(None, "overrides data_path/val")

    def split(self, name: str) -> str:
        """The ``train`` or ``val`` images: the split's own path, else ``data_path/<name>``."""
        own = getattr(self, f"{name}_data_path")
        return own or (str(Path(self.data_path) / name) if self.data_path else "")


@dataclass
class LinearArgs(SplitData, BackboneArgs):
    """The reference's eval_linear.py flags (same names and defaults), plus image sizes for small images."""
    n_last_blocks: int = arg(4, "CLS tokens of the last n blocks (4 for ViT-S, 1 for ViT-B in the paper)")
    avgpool_patchtokens: bool = arg(False, "also the patch-token mean, interleaved with the last CLS token (True "
                                           "for ViT-B)", value=True)
    epochs: int = arg(100, "training epochs of the linear head")
    lr: float = arg(0.001, "learning rate per 256 images")
    batch_size_per_gpu: int = arg(128, "images per worker and step")
    num_workers: int = arg(10, "data-loading processes")
    val_freq: int = arg(1, "epochs between validations")
    num_labels: int = arg(1000, "classes of the linear head")
    max_train_images: Optional[int] = arg(None, "the first N training images only")
    max_val_images: Optional[int] = arg(None, "the first N validation images only")
    crop_size: int = arg(224, "RandomResizedCrop / CenterCrop size")
    resize_size: int = arg(256, "validation resize before the centre crop")
    output_dir: str = arg("outputs/linear", "linear_head.pth, log.txt and linear.json go here")
    evaluate: bool = arg(False, "only evaluate a saved head (head_weights, default output_dir/linear_head.pth)")
    head_weights: Optional[str] = arg(None, "with evaluate: a saved head (ours or a released *_linearweights.pth)")
    seed: int = arg(0, "the head's initialisation and the data order")

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.split("val"):
            problems.append("val_data_path (or data_path) is required")
        if not self.evaluate and not self.split("train"):
            problems.append("train_data_path (or data_path) is required (unless evaluate)")
        problems += below(self, ("n_last_blocks", "epochs", "batch_size_per_gpu", "val_freq", "num_labels",
                                 "max_train_images", "max_val_images", "crop_size", "resize_size"), 1)
        return problems + below(self, ("lr", "num_workers"), 0)
