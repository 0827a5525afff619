"""The linear probe's arguments: the reference's ``eval_linear.py`` flags, checked before torch is imported (the
command line's errors come at once). ``dino_ray.eval.linear`` runs them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dino_ray.config import below, check


@dataclass
class LinearArgs:
    """The reference's eval_linear.py flags (same names and defaults), plus image sizes for small images."""
    pretrained_weights: str = ""
    checkpoint_key: str = "teacher"
    arch: Optional[str] = None
    patch_size: Optional[int] = None
    vit_shape: dict = field(default_factory=dict)  # embed_dim / depth / num_heads for non-standard ViTs
    n_last_blocks: int = 4
    avgpool_patchtokens: bool = False
    epochs: int = 100
    lr: float = 0.001
    batch_size_per_gpu: int = 128
    num_workers: int = 10
    val_freq: int = 1
    num_labels: int = 1000
    train_data_path: str = ""
    val_data_path: str = ""
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    crop_size: int = 224  # RandomResizedCrop / CenterCrop size
    resize_size: int = 256  # validation resize before the centre crop
    output_dir: str = "."
    evaluate: bool = False
    head_weights: Optional[str] = None  # with evaluate: a saved head (ours or a released *_linearweights.pth)
    seed: int = 0

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[str]:
        problems = [f"{name} is required" for name in ("pretrained_weights", "val_data_path")
                    if not getattr(self, name)]
        if not self.evaluate and not self.train_data_path:
            problems.append("train_data_path is required (unless evaluate)")
        problems += below(self, ("patch_size", "n_last_blocks", "epochs", "batch_size_per_gpu", "val_freq",
                                 "num_labels", "max_train_images", "max_val_images", "crop_size", "resize_size"), 1)
        return problems + below(self, ("lr", "num_workers"), 0)
