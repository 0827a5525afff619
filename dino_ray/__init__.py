"""dino-ray: DINO self-supervised pretraining (Caron et al., 2021) with the reference's names.

The pure-PyTorch core below imports neither Ray nor MLflow.
"""
from dino_ray.config import DINOConfig, load_config
from dino_ray.data.augment import DataAugmentationDINO
from dino_ray.eval.knn import knn_classifier
from dino_ray.loss import DINOLoss
from dino_ray.models.backbones import build_backbone, get_intermediate_layers, get_last_selfattention
from dino_ray.models.head import DINOHead
from dino_ray.models.hub import (dino_resnet50, dino_vitb8, dino_vitb16, dino_vits8, dino_vits16,
                                 load_pretrained_weights)
from dino_ray.models.multicrop import MultiCropWrapper
from dino_ray.optim import LARS, cancel_gradients_last_layer, clip_gradients, cosine_scheduler, get_params_groups
from dino_ray.train.loop import train_dino

__all__ = [
    "DINOConfig", "load_config", "DataAugmentationDINO", "knn_classifier", "DINOLoss", "build_backbone",
    "get_intermediate_layers", "get_last_selfattention", "DINOHead", "dino_resnet50", "dino_vitb8", "dino_vitb16",
    "dino_vits8", "dino_vits16", "load_pretrained_weights", "MultiCropWrapper", "LARS",
    "cancel_gradients_last_layer", "clip_gradients", "cosine_scheduler", "get_params_groups", "train_dino",
]
__version__ = "0.1.0"
