"""DINO's multi-crop views for a whole batch of images at once, on tensors.

The same views as ``DataAugmentationDINO`` (the reference's per-image PIL pipeline, Caron et al. 2021,
App. D): RandomResizedCrop (bicubic, antialiased), flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) in a
random order with p=0.8, grayscale p=0.2, Gaussian blur with std U(blur_radius) at p=1.0 / 0.1 / 0.5
for global 1 / global 2 / local, solarize (threshold 128/255) p=0.2 on global 2, ImageNet
normalisation. What differs is how: every random decision of every crop is drawn at once
(``sample_view_params``), and each step runs once over all the crops of a view, with per-crop
factors, instead of once per crop. The colour steps follow torchvision's tensor ops exactly (tested
crop by crop); the blur pads by replicating edges, as PIL does. Loops per crop are left where a crop's own
kernel is the fast one: the crop-and-resize (input sizes differ; torch's antialiased uint8 bicubic) and
OpenCV's hue rotation and Gaussian blur, which beat any batched torch formulation we wrote several times
over. Why batched: the reference's pipeline spends about half its time in per-crop Python
(benchmarks/augment.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import cv2
import torch
import torch.nn.functional as F

from dino_ray.core.data.augment import IMAGENET_MEAN, IMAGENET_STD

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range, as the reference uses
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class ViewParams:
    """The random decisions for n crops of one view: boxes are (top, left, height, width) in the source image;
    ``factors`` are (brightness, contrast, saturation, hue); ``order`` is the jitter's permutation of them."""
    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def select(self, index: torch.Tensor) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(shape: Sequence[int], low: float, high: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)


def sample_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float],
                 generator: Optional[torch.Generator] = None, attempts: int = 10) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for many crops at once: up to 10 tries of an area in
    ``scale`` and a log-uniform ratio in 3/4..4/3, the first that fits, else the clamped centre crop."""
    n = heights.numel()
    h_img, w_img = heights.double()[:, None], widths.double()[:, None]
    area = h_img * w_img * _uniform((n, attempts), scale[0], scale[1], generator)
    aspect = torch.exp(_uniform((n, attempts), math.log(RATIO[0]), math.log(RATIO[1]), generator))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.double().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    found = fits.any(dim=1)
    top = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (heights.double() - h + 1))
    left = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (widths.double() - w + 1))
    # the fallback: the whole image, clamped to the ratio range, centred
    in_ratio = widths.double() / heights.double()
    fw = torch.where(in_ratio > RATIO[1], torch.round(heights.double() * RATIO[1]), widths.double())
    fh = torch.where(in_ratio < RATIO[0], torch.round(widths.double() / RATIO[0]), heights.double())
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.where(found, top, torch.div(heights.double() - fh, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(widths.double() - fw, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).long()


def sample_view_params(heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float], blur_p: float,
                       solarize_p: float, blur_radius: Sequence[float],
                       generator: Optional[torch.Generator] = None, jitter_p: float = 0.8,
                       gray_p: float = 0.2) -> ViewParams:
    """Every random decision of one view for crops of images of the given sizes, drawn independently per crop."""
    n = heights.numel()

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    brightness, contrast, saturation, hue = JITTER
    factors = torch.stack([
        _uniform((n,), 1 - brightness, 1 + brightness, generator),
        _uniform((n,), 1 - contrast, 1 + contrast, generator),
        _uniform((n,), 1 - saturation, 1 + saturation, generator), _uniform((n,), -hue, hue, generator),
    ], dim=1).float()
    return ViewParams(
        boxes=sample_boxes(heights, widths, scale, generator),
        flip=coin(0.5), jitter=coin(jitter_p), factors=factors,
        order=torch.argsort(torch.rand(n, 4, generator=generator), dim=1),
        gray=coin(gray_p), blur=coin(blur_p), sigma=_uniform((n,), blur_radius[0], blur_radius[1], generator).float(),
        solarize=coin(solarize_p),
    )


def crop_resize(images: Sequence[torch.Tensor], owner: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                size: int) -> torch.Tensor:
    """Crop ``boxes[k]`` out of ``images[owner[k]]`` (uint8, CHW), resize it to ``size`` (bicubic, antialiased, on
    uint8 as torchvision does) and mirror it where ``flip[k]`` (exactly the reference's flip after the resize: the
    kernel is symmetric); returns uint8 ``[n, 3, size, size]``."""
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8)
    for k, (index, (top, left, h, w), mirror) in enumerate(zip(owner.tolist(), boxes.tolist(), flip.tolist())):
        crop = images[index][None, :, top:top + h, left:left + w]
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        out[k] = crop.flip(-1) if mirror else crop
    return out


def _per_crop(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma), one channel kept."""
    red, green, blue = GRAY_WEIGHTS  # a chain of in-place adds: 5x faster than einsum's reduction here
    return (x[:, 0] * red).add_(x[:, 1], alpha=green).add_(x[:, 2], alpha=blue).unsqueeze(1)


# The four colour steps work in place on ``x`` (the jitter hands them slices of its batch) and return it.
def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_crop(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A blend with the crop's mean gray level (the mean of the luma is the luma of the channel means)."""
    mean = x.mean(dim=(-2, -1)) @ torch.tensor(GRAY_WEIGHTS, dtype=x.dtype)
    return x.mul_(_per_crop(factor)).add_(_per_crop((1 - factor) * mean)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.lerp_(grayscale(x), _per_crop(1 - factor)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of crop k by ``factor[k]`` turns with OpenCV's float HSV conversion (hue in degrees):
    torchvision's ``adjust_hue`` (same results, tested), 4-9x faster than in torch ops. OpenCV wants the
    channels interleaved, hence the merge and the split back into the crop's planes."""
    for crop, turns in zip(x, factor.tolist()):
        planes = list(crop.numpy())
        hsv = cv2.cvtColor(cv2.merge(planes), cv2.COLOR_RGB2HSV)
        hsv[..., 0] += 360 * (turns % 1)  # OpenCV wraps hues up to 720 degrees, not below 0
        cv2.split(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=hsv), planes)
    return x


ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_groups(params: ViewParams) -> torch.Tensor:
    """A processing order of the crops in which those with the same jitter permutation are contiguous (the
    crops without jitter last), so that every jitter step runs on slices instead of gathered copies."""
    code = (params.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    return torch.argsort(torch.where(params.jitter, code, 256), stable=True)


def color_jitter(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """ColorJitter on crops in ``jitter_groups`` order: each crop that draws it gets its own factors, in its own
    order of the four steps (torchvision's ``ColorJitter`` crop by crop, tested)."""
    keys = torch.cat([params.jitter[:, None].long(), params.order], dim=1)
    runs, counts = torch.unique_consecutive(keys, dim=0, return_counts=True)
    start = 0
    for (jittered, *steps), count in zip(runs.tolist(), counts.tolist()):
        end = start + count
        if jittered:
            for step in steps:
                ADJUST[step](x[start:end], params.factors[start:end, step])
        start = end
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """In place, a separable Gaussian of std ``sigma[k]`` on crop k (none where it is 0), cut at ceil(3 std) each
    side, edges replicated as PIL does; OpenCV's, one plane at a time (5-20x faster than sums of shifted copies in
    torch)."""
    longest = min(x.shape[-2:]) - 1
    for crop, std in zip(x, sigma.tolist()):
        if std == 0:
            continue
        width = 2 * min(math.ceil(3 * std), longest) + 1
        for plane in crop.numpy():
            cv2.GaussianBlur(plane, (width, width), std, dst=plane, sigmaY=std, borderType=cv2.BORDER_REPLICATE)
    return x


NORM_SCALE = 1 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # (x - mean) / std = x * scale + shift
NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * NORM_SCALE


def apply_view(crops: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Jitter, grayscale, blur, solarize and normalise uint8 crops (already flipped), in ``jitter_groups`` order;
    returns float32 crops."""
    x = color_jitter(crops.float().mul_(1 / 255), params)
    if params.gray.any():
        x[params.gray] = grayscale(x[params.gray]).expand(-1, 3, -1, -1)
    gaussian_blur(x, torch.where(params.blur, params.sigma, 0))
    if params.solarize.any():
        light = x[params.solarize]
        x[params.solarize] = torch.where(light >= 128 / 255, 1 - light, light)
    return x.mul_(NORM_SCALE).add_(NORM_SHIFT)


# Crops per step (2 at 224 px, 14 at 96): a few MB of float32 that stay in cache and in malloc's reused heap
CHUNK_PIXELS = 2 ** 17


class BatchedDataAugmentationDINO:
    """``DataAugmentationDINO``'s views for a list of uint8 CHW images (any sizes): returns the 2 global and
    ``local_crops_number`` local crops as ``[batch, 3, size, size]`` tensors, in the collated order the
    training loop takes. Draws from torch's global generator unless one is given (DataLoader workers
    seed it per worker)."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96,
                 blur_radius: Sequence[float] = (0.1, 2.0), generator: Optional[torch.Generator] = None,
                 color_jitter_prob: float = 0.8, grayscale_prob: float = 0.2) -> None:
        self.views = [  # (crops per image, size, scale, blur p, solarize p)
            (1, global_crops_size, tuple(global_crops_scale), 1.0, 0.0),
            (1, global_crops_size, tuple(global_crops_scale), 0.1, 0.2),
            (local_crops_number, local_crops_size, tuple(local_crops_scale), 0.5, 0.0),
        ]
        self.local_crops_number = local_crops_number
        self.blur_radius = tuple(blur_radius)
        self.generator = generator
        self.color_jitter_prob, self.grayscale_prob = color_jitter_prob, grayscale_prob

    def __call__(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        cv2.setNumThreads(torch.get_num_threads())  # a loader process's share of cores, as torch's ops get
        heights = torch.tensor([im.shape[-2] for im in images])
        widths = torch.tensor([im.shape[-1] for im in images])
        out: list[torch.Tensor] = []
        for per_image, size, scale, blur_p, solarize_p in self.views:
            if per_image == 0:
                continue
            owner = torch.arange(len(images)).repeat_interleave(per_image)
            params = sample_view_params(heights[owner], widths[owner], scale, blur_p, solarize_p, self.blur_radius,
                                        self.generator, self.color_jitter_prob, self.grayscale_prob)
            order = jitter_groups(params)
            params, owner = params.select(order), owner[order]
            crops = torch.empty(len(owner), 3, size, size)
            chunk = max(1, CHUNK_PIXELS // (size * size))
            for start in range(0, len(owner), chunk):  # the whole chain a few crops at a time, in cache
                part = slice(start, start + chunk)
                views = crop_resize(images, owner[part], params.boxes[part], params.flip[part], size)
                crops[order[part]] = apply_view(views, params.select(part))
            out.extend(crops.view(len(images), per_image, 3, size, size).unbind(dim=1))
        return out
