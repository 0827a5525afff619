"""``dino-ray eval-video-segmentation``: DAVIS-2017 label propagation (the reference's
``eval_video_segmentation.py``)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below
from dino_ray.jobs.common import WeightsArgs, eval_tracking_uri, load_backbone, track

log = logging.getLogger(__name__)


@dataclass
class VideoSegmentationArgs(WeightsArgs):
    """``eval_video_segmentation.py``'s flags (same names and defaults)."""
    data_path: str = arg("", "DAVIS-2017 root: JPEGImages/480p/, Annotations/480p/, ImageSets/2017/val.txt")
    videos: Optional[list[str]] = arg(None, "default: those of ImageSets/2017/val.txt")
    size: int = arg(480, "frames' shorter side (the longer rounded down to 64)")
    n_last_frames: int = arg(7, "previous frames propagated from")
    size_mask_neighborhood: int = arg(12, "patches apart a label may travel")
    topk: int = arg(5, "source patches kept per target patch")
    output_dir: str = arg("outputs/davis", "predicted masks <video>/NNNNN.png and davis.json go here")

    def problems(self) -> list[str]:
        problems = super().problems() + ([] if self.data_path else ["data_path is required"])
        return problems + below(self, ("size", "n_last_frames", "size_mask_neighborhood", "topk"), 1)


def video_segmentation_job(args: VideoSegmentationArgs) -> dict[str, Any]:
    """Propagate each video's first annotation; predictions as indexed PNGs in ``output_dir/<video>/``; J and F
    when the videos have further annotations. Writes ``davis.json`` and a figure of the first video; an MLflow
    run nested under the pretraining."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from dino_ray.eval.video_segmentation import (
        davis_frames,
        davis_palette,
        davis_scores,
        davis_videos,
        read_labels,
        segment_video,
    )

    out, data_path = Path(args.output_dir), args.data_path
    weights, backbone, shape = load_backbone(args, out, vit_only=True)
    videos = args.videos or davis_videos(data_path)
    annotations = Path(data_path) / "Annotations" / "480p"
    for video in tqdm(videos, desc="videos", unit="video"):
        first = sorted((annotations / video).glob("*.png"))
        if not first:
            raise FileNotFoundError(f"video '{video}' has no first-frame annotation in '{annotations / video}'")
        labels = read_labels(first[0])
        with Image.open(first[0]) as image:
            palette = np.array(image.getpalette() or davis_palette()).reshape(-1, 3)
        segment_video(backbone, davis_frames(data_path, video), labels, out / video, shape["patch_size"], palette,
                      args.size, args.n_last_frames, args.size_mask_neighborhood, args.topk)
    record: dict[str, Any] = {"weights": args.pretrained_weights, "checkpoint_epoch": weights.epoch,
                              "pretraining_run": weights.run_id, **shape, "data_path": data_path, "videos": videos,
                              "size": args.size, "n_last_frames": args.n_last_frames,
                              "size_mask_neighborhood": args.size_mask_neighborhood, "topk": args.topk}
    metrics: dict[str, float] = {}
    if all(len(list((annotations / v).glob("*.png"))) >= 3 for v in videos):
        record["results"] = davis_scores(out, data_path, videos)
        metrics = {k.replace("&", "_and_"): v for k, v in record["results"].items() if k != "objects"}
        print(f"DAVIS {len(videos)} video(s): J&F {metrics['J_and_F']:.2f}, J {metrics['J']:.2f}, "
              f"F {metrics['F']:.2f}")
    files = [out / "davis.json", propagation_figure(davis_frames(data_path, videos[0]), out / videos[0],
                                                     out / "propagation.png")]
    (out / "davis.json").write_text(json.dumps(record, indent=2))
    track("video_segmentation", record, metrics, {f"davis_{k}": v for k, v in metrics.items() if k in ("J_and_F",)},
          weights, eval_tracking_uri(args.tracking_uri, weights, out), files)
    log.info("predicted masks in %s; scores in %s", out, out / "davis.json")
    return record


def propagation_figure(frames: list[Path], predictions: Path, path: Path, columns: int = 5) -> Path:
    """Evenly spaced frames of a video with the predicted masks over them."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    picks = sorted({round(k * (len(frames) - 1) / max(1, columns - 1)) for k in range(columns)})
    figure, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 2.2), squeeze=False)
    for ax, k in zip(axes[0], picks):
        with Image.open(frames[k]) as frame, Image.open(predictions / f"{frames[k].stem}.png") as mask:
            ax.imshow(frame.convert("RGB"))
            ax.imshow(np.ma.masked_equal(np.array(mask), 0), cmap="tab10", vmin=0, vmax=9, alpha=0.6,
                      interpolation="nearest")
        ax.set_title(f"frame {k}", fontsize=8)
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
