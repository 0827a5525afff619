"""DataAugmentationDINO: the reference's multi-crop pipeline (Caron et al. 2021, Sec. 3 and App. D).

Two global crops and ``local_crops_number`` local crops, each: RandomResizedCrop (bicubic), flip
p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur (PIL radius
U(0.1, 2.0)) with p=1.0 / 0.1 / 0.5 for global 1 / global 2 / local, solarize p=0.2 on the second
global crop only, then ImageNet normalisation. Crop sizes, and the blur radius range (set for 224 px
crops; a 32 px image needs less), are configurable for small images.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn from U(radius_min, radius_max), applied with probability p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def normalize() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalize_tensor(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``[..., 3, H, W]`` pixels in [0, 1] (``normalize`` is for PIL images)."""
    return (pixels - _channels(IMAGENET_MEAN, pixels)) / _channels(IMAGENET_STD, pixels)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """The [0, 1] pixels of a normalised ``[..., 3, H, W]`` image, for figures."""
    return (image * _channels(IMAGENET_STD, image) + _channels(IMAGENET_MEAN, image)).clamp(0, 1)


def _channels(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).view(3, 1, 1)


class DataAugmentationDINO:
    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96,
                 blur_radius: Sequence[float] = (0.1, 2.0), color_jitter_prob: float = 0.8,
                 grayscale_prob: float = 0.2) -> None:
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=color_jitter_prob),
            transforms.RandomGrayscale(p=grayscale_prob),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=tuple(global_crops_scale), interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(1.0, *blur_radius),
            normalize(),
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=tuple(global_crops_scale), interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(0.1, *blur_radius),
            transforms.RandomSolarize(threshold=128, p=0.2),
            normalize(),
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=tuple(local_crops_scale), interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(0.5, *blur_radius),
            normalize(),
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def eval_transform(image_size: int, resize_size: int | None = None) -> transforms.Compose:
    """The evaluation view: resize (256/224 of the crop, as the reference), centre crop, normalise."""
    resize_size = resize_size or int(round(image_size * 256 / 224))
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        normalize(),
    ])
