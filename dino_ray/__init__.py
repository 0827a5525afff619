"""dino-ray: DINO self-supervised pretraining (Caron et al., 2021) with the reference's names.

The pure-PyTorch core below imports neither Ray nor MLflow. Names are imported on first use (PEP 562), so
``import dino_ray`` and ``dino-ray --help`` do not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "dino_ray.core.config": ["DINOConfig", "load_config"],
    "dino_ray.core.data.augment": ["DataAugmentationDINO"],
    "dino_ray.eval.knn": ["knn_classifier"],
    "dino_ray.core.loss": ["DINOLoss"],
    "dino_ray.core.models.backbones": ["build_backbone", "get_intermediate_layers", "get_last_selfattention"],
    "dino_ray.core.models.head": ["DINOHead"],
    "dino_ray.core.models.hub": ["dino_resnet50", "dino_vitb8", "dino_vitb16", "dino_vits8", "dino_vits16",
                            "load_pretrained_weights"],
    "dino_ray.core.models.multicrop": ["MultiCropWrapper"],
    "dino_ray.core.optim": ["LARS", "cancel_gradients_last_layer", "clip_gradients", "cosine_scheduler",
                       "get_params_groups"],
    "dino_ray.core.train.loop": ["train_dino"],
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = list(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dino_ray' has no attribute '{name}'")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
