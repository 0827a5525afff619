"""Attention videos, as the reference's ``video_generation.py``: the last block's CLS attention of every frame,
rendered over the frame and written back as a video at the input's frame rate.

The reference saves the head-mean attention as a bare heat map (its thresholded mask is computed and unused) and
runs one frame at a time. Here frames go through the model in batches, the heat map (the head mean, or every head
in a grid) is laid over the frame, and ``threshold`` keeps the smallest set of patches holding that share of the
attention mass (the reference's ``th_attn``; 0.6 as its default): the rest of the frame is dimmed.
"""
from __future__ import annotations

import math
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dino_ray.eval.attention import batch_attention_maps, mass_mask, model_input, to_rgb
from dino_ray.eval.video import read_frames, video_info, write_video

HEADS = ("mean", "all")


def overlay(rgb: np.ndarray, heat: np.ndarray, mask: Optional[np.ndarray] = None, alpha: float = 0.6) -> np.ndarray:
    """``rgb`` [H, W, 3] in [0, 1] under the inferno colours of ``heat`` [H, W] (scaled from its minimum to its
    maximum, as the reference's ``plt.imsave``); outside ``mask`` the frame is only dimmed. Returns uint8."""
    low = float(heat.min())
    colours = matplotlib.colormaps["inferno"]((heat - low) / max(float(heat.max()) - low, 1e-12))[..., :3]
    blended = (1 - alpha) * rgb + alpha * colours
    if mask is not None:
        blended = np.where(mask[..., None], blended, 0.3 * rgb)
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


def tile(images: list[np.ndarray]) -> np.ndarray:
    """Same-sized images in a near-square grid (row by row), black where the grid has no image."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        grid[k // columns * h:(k // columns + 1) * h, k % columns * w:(k % columns + 1) * w] = image
    return grid


def render_batch(model: nn.Module, images: torch.Tensor, patch_size: int, threshold: Optional[float],
                 heads: str) -> list[np.ndarray]:
    """The rendered frames of a batch of normalised images [B, 3, H, W]."""
    maps, masks = batch_attention_maps(model, images, patch_size, None if heads == "mean" else threshold)
    if heads == "mean":
        maps = maps.mean(dim=1, keepdim=True)
        if threshold is not None:
            masks = mass_mask(maps.flatten(-2), threshold).reshape(maps.shape)
    rendered = []
    for b in range(len(images)):
        rgb = to_rgb(images[b])
        views = [overlay(rgb, maps[b, j].numpy(), None if masks is None else masks[b, j].numpy())
                 for j in range(maps.shape[1])]
        rendered.append(views[0] if heads == "mean" else tile(views))
    return rendered


def _batches(iterator: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(iterator, size)):
        yield batch


def attention_video(model: nn.Module, source: str | Path, output_dir: str | Path, patch_size: int,
                    resize: Optional[int | tuple[int, int]] = None, threshold: Optional[float] = 0.6,
                    heads: str = "mean", batch_size: int = 8, fps: Optional[float] = None,
                    video_only: bool = False) -> dict:
    """Render ``source`` (a video file or a folder of frames) to ``output_dir/<name>-attention.mp4`` and, unless
    ``video_only``, ``output_dir/frames/attn-NNNNN.png``. ``resize``: the frames' shorter side or (h, w) before the
    model (default: as they are); ``fps``: the output rate (default: the video's, 30 for a frame folder)."""
    if heads not in HEADS:
        raise ValueError(f"heads '{heads}' is unknown (choose from {', '.join(HEADS)})")
    if not hasattr(model, "blocks"):
        raise ValueError("attention videos need a ViT backbone")
    count, rate = video_info(source, fps)
    out = Path(output_dir)
    frames_dir = out / "frames"
    if not video_only:
        frames_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    progress = tqdm(total=count, desc="attention frames", unit="frame")

    def rendered() -> Iterator[np.ndarray]:
        written = 0
        for batch in _batches(read_frames(source), batch_size):
            images = torch.stack([model_input(frame, resize, patch_size) for frame in batch])
            for frame in render_batch(model, images, patch_size, threshold, heads):
                if not video_only:
                    Image.fromarray(frame).save(frames_dir / f"attn-{written:05d}.png")
                written += 1
                progress.update()
                yield frame

    video = write_video(out / f"{Path(source).stem}-attention.mp4", rendered(), rate)
    progress.close()
    return {"video": video, "frames": None if video_only else frames_dir, "num_frames": count,
            "fps": float(Fraction(rate))}
