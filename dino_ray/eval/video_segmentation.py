"""Video object segmentation by label propagation with frozen patch features (the reference's
``eval_video_segmentation.py``, after Jabri et al. 2020), and the DAVIS-2017 scores J (region IoU) and F (boundary
F-measure) of Pont-Tuset et al. 2017, as the ``davis2017-evaluation`` code computes them.

Each frame's label map is a weighted vote of the labels of the first frame (its ground truth) and of the
``n_last_frames`` previous predictions: every target patch keeps its ``topk`` most similar source patches (cosine
similarity of the last block's normed patch tokens, ``exp(sim / 0.1)``) within ``size_mask_neighborhood`` patches,
and their weights are normalised per target. The vote map is upsampled (bilinear) by the patch size, each label
scaled to [0, 1], the arg-max taken and resized (nearest) to the frame's original size.

The DAVIS layout (what the reference reads and the predictions are written in)::

    ROOT/JPEGImages/480p/<video>/00000.jpg ...
    ROOT/Annotations/480p/<video>/00000.png ...   indexed PNGs: 0 background, 1..n the objects (255 void)
    ROOT/ImageSets/2017/val.txt                    one video name per line
    OUTPUT/<video>/00000.png ...                   predictions, indexed PNGs with the annotations' palette
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dino_ray.core.data.augment import normalize_tensor
from dino_ray.core.models.backbones import get_intermediate_layers

RESOLUTION = "480p"
ROUND_TO = 64  # the reference rounds the longer side of every frame down to a multiple of 64
VOID = 255


def davis_palette() -> np.ndarray:
    """The 256 colours of DAVIS annotations (the PASCAL VOC colour map: label bits spread over R, G, B)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        value = label
        for shift in range(7, -1, -1):
            for channel in range(3):
                palette[label, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
    return palette


def write_indexed(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """A label map as an indexed PNG (the DAVIS format: pixel values are the labels, the palette colours them)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_labels(path: str | Path) -> np.ndarray:
    """An annotation or prediction PNG's labels [H, W] (the palette indices)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"'{path}' is not an indexed (palette) or grey PNG of labels (mode {image.mode})")
        return np.array(image)


def davis_videos(root: str | Path, split: str = "val") -> list[str]:
    """The video names of ``ROOT/ImageSets/2017/<split>.txt``."""
    listing = Path(root) / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"video list '{listing}' does not exist (expected the DAVIS-2017 layout under {root})")
    return [line.strip() for line in listing.read_text().splitlines() if line.strip()]


def davis_frames(root: str | Path, video: str) -> list[Path]:
    frames = sorted((Path(root) / "JPEGImages" / RESOLUTION / video).glob("*.jpg"))
    if not frames:
        raise FileNotFoundError(f"no frames in '{Path(root) / 'JPEGImages' / RESOLUTION / video}'")
    return frames


def scaled_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The reference's frame size: the shorter side to ``size``, the longer scaled along, rounded down to 64."""
    if height > width:
        th, tw = int(size * height / width) // ROUND_TO * ROUND_TO, size
    else:
        th, tw = size, int(size * width / height) // ROUND_TO * ROUND_TO
    if th == 0 or tw == 0:
        raise ValueError(f"a {width}x{height} frame at size {size} rounds to {tw}x{th}: give a larger size")
    return th, tw


def read_frame(path: str | Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A normalised frame [3, th, tw] at the reference's size (bilinear, as its OpenCV resize), and its (h, w)."""
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    height, width = pixels.shape[1:]
    resized = F.interpolate(pixels[None], size=scaled_size(height, width, size), mode="bilinear",
                            align_corners=False)[0]
    return normalize_tensor(resized), (height, width)


def small_one_hot(labels: np.ndarray, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """The first annotation at the patch grid (nearest, as the reference): one channel per label [C, h, w]."""
    small = np.array(Image.fromarray(labels.astype(np.uint8)).resize((grid[1], grid[0]), Image.NEAREST))
    small = torch.from_numpy(small.astype(np.int64)).clamp(max=num_labels - 1)
    return F.one_hot(small, num_labels).permute(2, 0, 1).float()


@torch.no_grad()
def patch_features(model: nn.Module, frame: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The last block's normed patch tokens of one frame [h * w, D] (the CLS token dropped), and the grid (h, w)."""
    tokens = get_intermediate_layers(model, frame[None], n=1)[0][0, 1:]
    return tokens, (frame.shape[1] // patch_size, frame.shape[2] // patch_size)


def neighbourhood(h: int, w: int, size: int) -> torch.Tensor:
    """``[h * w, h * w]``: 1 where two patches are at most ``size`` rows and ``size`` columns apart."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    near = ((rows[:, None] - rows[None]).abs() <= size) & ((cols[:, None] - cols[None]).abs() <= size)
    return near.float()


def propagate(target: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor, topk: int,
              near: Optional[torch.Tensor] = None, temperature: float = 0.1) -> torch.Tensor:
    """Labels of a target frame from its patch features ``target`` [N, D], the context frames' ``sources``
    [T, N, D] and their labels [T, C, h, w]: returns [C, h, w] (the reference's ``label_propagation``)."""
    context, count = sources.shape[:2]
    affinity = torch.exp(F.normalize(target, dim=1) @ F.normalize(sources, dim=2).transpose(1, 2) / temperature)
    if near is not None:
        affinity = affinity * near  # [T, N target, N source]
    affinity = affinity.transpose(1, 2).reshape(context * count, -1)  # every context patch x every target patch
    threshold = torch.topk(affinity, k=min(topk, affinity.shape[0]), dim=0).values.min(dim=0).values
    affinity = torch.where(affinity < threshold, torch.zeros_like(affinity), affinity)
    affinity = affinity / affinity.sum(dim=0, keepdim=True)
    channels, h, w = source_labels.shape[1:]
    votes = source_labels.reshape(context, channels, -1).transpose(1, 2).reshape(-1, channels).T @ affinity
    return votes.reshape(channels, h, w)


def norm_mask(votes: torch.Tensor) -> torch.Tensor:
    """Each label's map scaled to [0, 1] (those that are not all zero), as the reference before its arg-max."""
    low = votes.flatten(1).min(dim=1).values[:, None, None]
    high = votes.flatten(1).max(dim=1).values[:, None, None]
    scaled = (votes - low) / (high - low).clamp_min(1e-12)
    return torch.where(high > 0, scaled, votes)


def segment_video(model: nn.Module, frames: Sequence[Path], first_labels: np.ndarray, output: str | Path,
                  patch_size: int, palette: np.ndarray, size: int = 480, n_last_frames: int = 7,
                  size_mask_neighborhood: int = 12, topk: int = 5) -> list[Path]:
    """Propagate ``first_labels`` (frame 0's annotation) through ``frames``; writes ``output/<frame>.png`` (frame 0:
    the annotation itself) and returns the written files."""
    model.eval()
    output = Path(output)
    num_labels = int(first_labels[first_labels != VOID].max()) + 1
    first, _ = read_frame(frames[0], size)
    first_features, grid = patch_features(model, first, patch_size)
    first_votes = small_one_hot(np.where(first_labels == VOID, 0, first_labels), grid, num_labels)
    written = [output / f"{frames[0].stem}.png"]
    write_indexed(written[0], first_labels, palette)
    near = neighbourhood(*grid, size_mask_neighborhood) if size_mask_neighborhood > 0 else None
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames)
    for path in tqdm(frames[1:], desc=output.name, unit="frame", leave=False):
        frame, (height, width) = read_frame(path, size)
        features, _ = patch_features(model, frame, patch_size)
        sources = torch.stack([first_features, *(f for f, _ in queue)])
        labels = torch.stack([first_votes, *(v for _, v in queue)])
        votes = propagate(features, sources, labels, topk, near)
        queue.append((features, votes))
        upsampled = norm_mask(F.interpolate(votes[None], scale_factor=patch_size, mode="bilinear",
                                            align_corners=False)[0])
        predicted = upsampled.argmax(dim=0).numpy().astype(np.uint8)
        predicted = np.array(Image.fromarray(predicted).resize((width, height), Image.NEAREST))
        written.append(output / f"{path.stem}.png")
        write_indexed(written[-1], predicted, palette)
    return written


def region_j(predicted: np.ndarray, truth: np.ndarray, void: Optional[np.ndarray] = None) -> float:
    """J: intersection over union of two object masks, void pixels left out; 1 when both are empty."""
    keep = ~void if void is not None else np.ones_like(truth, dtype=bool)
    union = ((predicted | truth) & keep).sum()
    return 1.0 if union == 0 else float(((predicted & truth) & keep).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundaries of a mask: where a pixel differs from its right, lower or lower-right neighbour."""
    right, below, diagonal = (np.zeros_like(mask) for _ in range(3))
    right[:, :-1], below[:-1, :], diagonal[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ diagonal)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None] ** 2) <= radius ** 2).float()
    spread = F.conv2d(torch.from_numpy(mask).float()[None, None], disk[None, None], padding=radius)
    return spread[0, 0].numpy() > 0


def boundary_f(predicted: np.ndarray, truth: np.ndarray, void: Optional[np.ndarray] = None,
               bound_th: float = 0.008) -> float:
    """F: the F-measure of boundary pixels matched within a disk of ``bound_th`` pixels, or, below 1, that share of
    the image diagonal."""
    keep = ~void if void is not None else np.ones_like(truth, dtype=bool)
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*truth.shape)))
    found, wanted = boundary_map(predicted & keep), boundary_map(truth & keep)
    n_found, n_wanted = found.sum(), wanted.sum()
    if n_found == 0 or n_wanted == 0:
        precision = 1.0 if n_found == 0 else 0.0
        recall = 1.0 if n_wanted == 0 else 0.0
    else:
        precision = float((found & _dilate(wanted, radius)).sum() / n_found)
        recall = float((wanted & _dilate(found, radius)).sum() / n_wanted)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_scores(predictions: str | Path, root: str | Path, videos: Sequence[str]) -> dict[str, Any]:
    """J and F of every object of every video over its frames but the first and the last (the DAVIS semi-supervised
    protocol), then their means and recalls (share of frames above 0.5) over all objects; in %."""
    per_object: dict[str, dict[str, float]] = {}
    for video in videos:
        truth_files = sorted((Path(root) / "Annotations" / RESOLUTION / video).glob("*.png"))
        if len(truth_files) < 3:
            raise ValueError(f"video '{video}' has {len(truth_files)} annotations: J and F need at least 3 frames")
        objects = [int(k) for k in np.unique(read_labels(truth_files[0])) if k not in (0, VOID)]
        scores = {k: ([], []) for k in objects}
        for truth_file in truth_files[1:-1]:
            predicted_file = Path(predictions) / video / truth_file.name
            if not predicted_file.is_file():
                raise FileNotFoundError(f"prediction '{predicted_file}' is missing (every annotated frame needs one)")
            truth, predicted = read_labels(truth_file), read_labels(predicted_file)
            if predicted.shape != truth.shape:
                raise ValueError(f"'{predicted_file}' is {predicted.shape[::-1]}, its annotation {truth.shape[::-1]}")
            void = truth == VOID
            for k in objects:
                scores[k][0].append(region_j(predicted == k, truth == k, void))
                scores[k][1].append(boundary_f(predicted == k, truth == k, void))
        for k, (j, f) in scores.items():
            per_object[f"{video}_{k}"] = {"J": float(np.mean(j)), "F": float(np.mean(f)),
                                          "J_recall": float(np.mean(np.array(j) > 0.5)),
                                          "F_recall": float(np.mean(np.array(f) > 0.5))}
    if not per_object:
        raise ValueError(f"no annotated object in the first frames of {list(videos)}")
    means = {key: 100 * float(np.mean([o[key] for o in per_object.values()]))
             for key in ("J", "F", "J_recall", "F_recall")}
    return {"J&F": (means["J"] + means["F"]) / 2, "J": means["J"], "F": means["F"],
            "J_recall": means["J_recall"], "F_recall": means["F_recall"],
            "objects": {name: {k: 100 * v for k, v in o.items()} for name, o in per_object.items()}}
