"""A generated video for the video evaluations where no real one can be downloaded: a coloured disc moving over a
fixed textured background, with its exact mask per frame, written as a video file and in the DAVIS-2017 layout
(frames, indexed annotations, the video list). The tests and the README's video examples run on it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dino_ray.eval.video import write_video
from dino_ray.eval.video_segmentation import RESOLUTION, davis_palette, write_indexed


def moving_disc(num_frames: int = 12, height: int = 32, width: int = 64, radius: float = 6.0, seed: int = 0
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(frames [H, W, 3] uint8, masks [H, W] uint8 with 1 on the disc)``: the disc crosses the frame from left to
    right on a gentle wave, over a background of random grey-blue blocks that never moves."""
    rng = np.random.default_rng(seed)
    block = max(2, height // 8)
    tiles = rng.integers(40, 160, size=(height // block + 1, width // block + 1, 1))
    background = np.repeat(np.repeat(tiles, block, 0), block, 1)[:height, :width] * np.array([0.8, 0.9, 1.0])
    background = background + rng.normal(0, 8, size=(height, width, 3))
    rows, cols = np.mgrid[:height, :width]
    frames, masks = [], []
    for t in range(num_frames):
        centre_x = radius + (width - 2 * radius) * t / max(1, num_frames - 1)
        centre_y = height / 2 + height / 6 * np.sin(2 * np.pi * t / max(1, num_frames))
        disc = (rows - centre_y) ** 2 + (cols - centre_x) ** 2 <= radius ** 2
        frame = np.where(disc[..., None], np.array([230.0, 40.0, 30.0]), background)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        masks.append(disc.astype(np.uint8))
    return frames, masks


def write_davis_video(root: str | Path, name: str, frames: list[np.ndarray], masks: list[np.ndarray],
                      split: str = "val") -> Path:
    """Frames as ``JPEGImages/480p/<name>/NNNNN.jpg``, masks as indexed ``Annotations/480p/<name>/NNNNN.png``, the
    name added to ``ImageSets/2017/<split>.txt``; returns ``root``."""
    root = Path(root)
    frame_dir, annotation_dir = root / "JPEGImages" / RESOLUTION / name, root / "Annotations" / RESOLUTION / name
    frame_dir.mkdir(parents=True, exist_ok=True)
    palette = davis_palette()
    for t, (frame, mask) in enumerate(zip(frames, masks)):
        Image.fromarray(frame).save(frame_dir / f"{t:05d}.jpg", quality=95)
        write_indexed(annotation_dir / f"{t:05d}.png", mask, palette)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    names = listing.read_text().split() if listing.exists() else []
    listing.write_text("".join(f"{n}\n" for n in dict.fromkeys([*names, name])))
    return root


def write_moving_disc(root: str | Path, num_frames: int = 12, height: int = 32, width: int = 64, fps: float = 10.0,
                      seed: int = 0) -> dict[str, Path]:
    """The moving-disc video as ``root/moving_disc.mp4`` and as video ``moving_disc`` of a DAVIS layout in
    ``root/davis``."""
    frames, masks = moving_disc(num_frames, height, width, seed=seed)
    root = Path(root)
    return {"video": write_video(root / "moving_disc.mp4", frames, fps),
            "davis": write_davis_video(root / "davis", "moving_disc", frames, masks)}
