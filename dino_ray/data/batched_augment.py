"""DINO's multi-crop views for a whole batch of images at once, on tensors (issue #7).

The same views as ``DataAugmentationDINO`` (the reference's per-image PIL pipeline, Caron et al. 2021,
App. D): RandomResizedCrop (bicubic, antialiased), flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) in a
random order with p=0.8, grayscale p=0.2, Gaussian blur with std U(blur_radius) at p=1.0 / 0.1 / 0.5
for global 1 / global 2 / local, solarize (threshold 128/255) p=0.2 on global 2, ImageNet
normalisation. What differs is how: every random decision of every crop is drawn at once
(``sample_view_params``), and each step runs once over all the crops of a view, with per-crop
factors, instead of once per crop. The colour steps follow torchvision's tensor ops exactly (tested
crop by crop); the blur pads by replicating edges, as PIL does. The one loop per crop left is the
crop-and-resize, whose input sizes differ. Why: the reference's pipeline spends about half its time in
per-crop Python (benchmarks/augment.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dino_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD

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
                       generator: Optional[torch.Generator] = None) -> ViewParams:
    """Every random decision of one view for crops of images of the given sizes, drawn independently per crop."""
    n = heights.numel()

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    brightness, contrast, saturation, hue = JITTER
    factors = torch.stack([
        _uniform((n,), 1 - brightness, 1 + brightness, generator), _uniform((n,), 1 - contrast, 1 + contrast, generator),
        _uniform((n,), 1 - saturation, 1 + saturation, generator), _uniform((n,), -hue, hue, generator),
    ], dim=1).float()
    return ViewParams(
        boxes=sample_boxes(heights, widths, scale, generator),
        flip=coin(0.5), jitter=coin(0.8), factors=factors,
        order=torch.argsort(torch.rand(n, 4, generator=generator), dim=1),
        gray=coin(0.2), blur=coin(blur_p), sigma=_uniform((n,), blur_radius[0], blur_radius[1], generator).float(),
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
    return x.lerp_(_per_crop(mean), _per_crop(1 - factor)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.lerp_(grayscale(x), _per_crop(1 - factor)).clamp_(0, 1)


HUE_CENTRES = torch.tensor([3.0, 5.0, 1.0]).view(1, 3, 1, 1)  # where in the hexcone r, g and b are lowest


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``factor`` turns, keeping each pixel's max (V) and min channel (hence S): torchvision's
    ``adjust_hue`` (same results, tested) without materialising the HSV image, about 3x faster. With the hue h in
    sixths of a turn, a channel is max - delta * clamp(2 - d, 0, 1), d the circular distance from h to that
    channel's centre (r 3, g 5, b 1): the hexcone's trapezoids."""
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    inverse = delta.reciprocal()  # inf on grey pixels, whose hue is set to 0 below
    sector = torch.where(maxc == r, (g - b).mul_(inverse),  # hue in sixths of a turn, in (-1, 6)
                         torch.where(maxc == g, (b - r).mul_(inverse).add_(2), (r - g).mul_(inverse).add_(4)))
    sector.masked_fill_(delta == 0, 0).add_(6 * factor.view(-1, 1, 1))
    distance = (torch.remainder(sector, 6)[:, None] - HUE_CENTRES).abs_()
    distance = torch.minimum(distance, 6 - distance).sub_(2).clamp_(-1, 0)  # -clamp(2 - d, 0, 1)
    return torch.addcmul(maxc[:, None], delta[:, None], distance, out=x)


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
    """A separable Gaussian of std ``sigma[k]`` on crop k, cut at ceil(3 std) each side (replicated edges, as PIL);
    as wide as the largest std needs, each crop's kernel zero beyond its own width. Each pass is a sum of shifted
    copies weighted per crop (1.6x faster on CPU than a grouped ``conv2d`` with the same taps)."""
    n, c, height, width = x.shape
    reach = torch.ceil(3 * sigma).clamp(max=min(height, width) - 1)
    half = int(reach.max())
    taps = torch.arange(-half, half + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2) * (taps.abs()[None, :] <= reach[:, None])
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).T.reshape(-1, n, 1, 1, 1)  # [tap, crop]
    padded = F.pad(x, (half, half, half, half), mode="replicate")
    rows = torch.zeros(n, c, height + 2 * half, width)
    for t, weight in enumerate(kernel):
        rows.addcmul_(padded[..., t:t + width], weight)
    out = torch.zeros_like(x)
    for t, weight in enumerate(kernel):
        out.addcmul_(rows[:, :, t:t + height], weight)
    return out


NORM_SCALE = 1 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # (x - mean) / std = x * scale + shift
NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * NORM_SCALE


def apply_view(crops: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Jitter, grayscale, blur, solarize and normalise uint8 crops (already flipped), in ``jitter_groups`` order;
    returns float32 crops."""
    x = color_jitter(crops.float().mul_(1 / 255), params)
    if params.gray.any():
        x[params.gray] = grayscale(x[params.gray]).expand(-1, 3, -1, -1)
    reach = torch.where(params.blur, torch.ceil(3 * params.sigma), 0)
    for width in reach.unique().tolist():  # one convolution per kernel width: none wider than its crops need
        if width > 0:
            index = torch.nonzero(reach == width)[:, 0]
            x[index] = gaussian_blur(x[index], params.sigma[index])
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
                 blur_radius: Sequence[float] = (0.1, 2.0), generator: Optional[torch.Generator] = None) -> None:
        self.views = [  # (crops per image, size, scale, blur p, solarize p)
            (1, global_crops_size, tuple(global_crops_scale), 1.0, 0.0),
            (1, global_crops_size, tuple(global_crops_scale), 0.1, 0.2),
            (local_crops_number, local_crops_size, tuple(local_crops_scale), 0.5, 0.0),
        ]
        self.local_crops_number = local_crops_number
        self.blur_radius = tuple(blur_radius)
        self.generator = generator

    def __call__(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        heights = torch.tensor([im.shape[-2] for im in images])
        widths = torch.tensor([im.shape[-1] for im in images])
        out: list[torch.Tensor] = []
        for per_image, size, scale, blur_p, solarize_p in self.views:
            if per_image == 0:
                continue
            owner = torch.arange(len(images)).repeat_interleave(per_image)
            params = sample_view_params(heights[owner], widths[owner], scale, blur_p, solarize_p, self.blur_radius,
                                        self.generator)
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
