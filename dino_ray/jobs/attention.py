"""``dino-ray visualize-attention`` and ``dino-ray attention-video``: the last block's CLS attention of a ViT
on images (the reference's ``visualize_attention.py``) and on every frame of a video (``video_generation.py``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below, one_of
from dino_ray.jobs.common import WeightsArgs, eval_tracking_uri, image_size, load_backbone, track

log = logging.getLogger(__name__)


@dataclass
class AttentionArgs(WeightsArgs):
    """``visualize_attention.py``'s flags (several images at once)."""
    image_path: list[str] = arg(help="one or more image files", factory=list)
    image_size: list[int] = arg(help="resize to (h w), or the shorter side", factory=lambda: [480, 480])
    threshold: Optional[float] = arg(None, "keep this share of the attention mass")
    output_dir: str = arg("outputs/attention", "the PNGs go to output_dir/<image name>/")
    track: bool = arg(True, "only write the PNGs (no MLflow run)", flag="--no-mlflow")

    def problems(self) -> list[str]:
        problems = super().problems() + ([] if self.image_path else ["image_path is required (one or more)"])
        if len(self.image_size) not in (1, 2):
            problems.append(f"image_size takes h w or one size, got {self.image_size}")
        return problems + below(self, ("image_size",), 1) + below(self, ("threshold",), 0)


def attention_job(args: AttentionArgs) -> list[Path]:
    """The last block's CLS attention of every head for each image; PNGs under ``output_dir/<image name>/``."""
    from dino_ray.eval.attention import save_attention

    out = Path(args.output_dir)
    weights, backbone, shape = load_backbone(args, out, vit_only=True)
    written: list[Path] = []
    for image in args.image_path:
        files = save_attention(backbone, image, out / Path(image).stem, shape["patch_size"],
                               image_size(args.image_size), args.threshold)
        written += files
        log.info("attention maps of %s: %s", image, files[-1])
    if args.track:
        track("attention", {"weights": args.pretrained_weights, "threshold": args.threshold,
                            "image_size": image_size(args.image_size), "images": len(args.image_path)}, {}, {},
              weights, eval_tracking_uri(args.tracking_uri, weights, out), written,
              [f"attention/{file.parent.name}" for file in written])
    return written


@dataclass
class AttentionVideoArgs(WeightsArgs):
    """``video_generation.py``'s flags."""
    input_path: str = arg("", "a video file or a folder of frames")
    output_path: str = arg("outputs/attention_video", "the video, and frames/ unless video_only, go here")
    threshold: float = arg(0.6, "keep this share of the attention mass (0 or less: no threshold)")
    heads: str = arg("mean", "mean: the head mean; all: every head in a grid")
    resize: Optional[list[int]] = arg(None, "frames' shorter side, or h w (default: as they are)")
    fps: Optional[float] = arg(None, "output frame rate (default: the video's; 30 for a frame folder)")
    batch_size: int = arg(8, "frames per forward pass")
    video_only: bool = arg(False, "do not keep the rendered frames")
    track: bool = arg(True, "only write the files (no MLflow run)", flag="--no-mlflow")

    def problems(self) -> list[str]:
        problems = super().problems() + ([] if self.input_path else ["input_path is required"])
        if self.resize is not None and len(self.resize) not in (1, 2):
            problems.append(f"resize takes h w or one size, got {self.resize}")
        problems += one_of("heads", self.heads, ("mean", "all"))
        return problems + below(self, ("resize", "batch_size"), 1) + below(self, ("fps",), 0)


def attention_video_job(args: AttentionVideoArgs) -> dict[str, Any]:
    """The attention video of a video file or frame folder (``attention_video``); the video and its first frame
    in an MLflow run nested under the pretraining."""
    from dino_ray.eval.attention_video import attention_video

    out = Path(args.output_path)
    weights, backbone, shape = load_backbone(args, out, vit_only=True)
    resize = image_size(args.resize) if args.resize else None
    threshold = args.threshold if args.threshold > 0 else None
    result = attention_video(backbone, args.input_path, out, shape["patch_size"], resize, threshold, args.heads,
                             args.batch_size, args.fps, args.video_only)
    log.info("attention video of %s (%d frames at %.3g fps): %s", args.input_path, result["num_frames"],
             result["fps"], result["video"])
    if args.track:
        files = [result["video"]] + ([result["frames"] / "attn-00000.png"] if result["frames"] else [])
        track("attention_video", {"weights": args.pretrained_weights, "input_path": str(args.input_path),
                                  "threshold": threshold, "heads": args.heads, "resize": str(resize),
                                  "frames": result["num_frames"], "fps": result["fps"]}, {}, {}, weights,
              eval_tracking_uri(args.tracking_uri, weights, out), files)
    return result
