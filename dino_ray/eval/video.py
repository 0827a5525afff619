"""Frames in and out for the video evaluations: a video file (decoded and encoded by PyAV, FFmpeg's bindings, the
library torchvision used for video) or a folder of image files (sorted by name).

The reference's ``video_generation.py`` goes through OpenCV; PyAV keeps the exact frame rate (a rational) and needs
no system FFmpeg.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from dino_ray.core.data.datasets import image_files

DEFAULT_FPS = 30.0  # the reference's --fps, for frame folders that carry no rate


def video_info(source: str | Path, fps: Optional[float] = None) -> tuple[int, Fraction]:
    """``(number of frames, frame rate)`` of a video file or frame folder; ``fps`` overrides a folder's default."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"video or frame folder '{source}' does not exist")
    if path.is_dir():
        return len(image_files(path)), Fraction(fps or DEFAULT_FPS).limit_denominator(1001)
    with _open(path) as container:
        stream = container.streams.video[0]
        count = stream.frames or sum(1 for _ in container.decode(stream))
        return count, Fraction(fps).limit_denominator(1001) if fps else stream.average_rate or Fraction(DEFAULT_FPS)


def read_frames(source: str | Path) -> Iterator[Image.Image]:
    """The frames of a video file or frame folder as RGB pictures, one at a time."""
    path = Path(source)
    if path.is_dir():
        for file in image_files(path):
            with Image.open(file) as image:
                yield image.convert("RGB")
        return
    with _open(path) as container:
        for frame in container.decode(video=0):
            yield frame.to_image()


def _open(path: Path):  # noqa: ANN202 - av's container type
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise ValueError(f"'{path}' is not a readable video: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise ValueError(f"'{path}' has no video stream")
    return container


def write_video(path: str | Path, frames: Sequence[np.ndarray] | Iterator[np.ndarray], fps: float | Fraction,
                codec: str = "libx264") -> Path:
    """H.264 (yuv420p, so odd sizes lose their last row / column) from ``[H, W, 3]`` uint8 frames."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.pix_fmt = "yuv420p"
        for k, pixels in enumerate(frames):
            pixels = pixels[: pixels.shape[0] // 2 * 2, : pixels.shape[1] // 2 * 2]
            if k == 0:
                stream.height, stream.width = pixels.shape[:2]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        container.mux(stream.encode())
    return path
