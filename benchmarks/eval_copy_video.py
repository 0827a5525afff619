"""README numbers for copy detection and video object segmentation: the quickstart's CPU teacher against the same
network at its random initialisation, side by side. Copy detection: the generic mode on held-out CIFAR-10 shard 4
(1,000 originals copied by each edit, whitening learned on 1,000 others); segmentation: DAVIS-style label
propagation on the generated moving-disc video, with the trivial baseline (the first mask copied to every frame).

Usage: ``python benchmarks/eval_copy_video.py [--checkpoint FILE] [--out FILE]`` (default checkpoint: the newest
``outputs/quickstart/quickstart-*/checkpoint.pth``, made by ``make quickstart``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from eval_cifar10 import ROOT, cifar_shard, quickstart_checkpoint, random_init_checkpoint

from dino_ray.eval.synthetic import write_moving_disc
from dino_ray.eval.video_segmentation import RESOLUTION, davis_scores, davis_videos
from dino_ray.jobs.copy_detection import CopyDetectionArgs, copy_detection_job
from dino_ray.jobs.video_segmentation import VideoSegmentationArgs, video_segmentation_job


def first_mask_baseline(davis: Path, folder: Path) -> dict:
    """J and F of predicting every frame as the first annotation."""
    for video in davis_videos(davis):
        annotations = sorted((davis / "Annotations" / RESOLUTION / video).glob("*.png"))
        (folder / video).mkdir(parents=True, exist_ok=True)
        for path in annotations:
            shutil.copy(annotations[0], folder / video / path.name)
    return davis_scores(folder, davis, davis_videos(davis))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--copy_images", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_copy_video.json"))
    args = parser.parse_args()
    checkpoint = quickstart_checkpoint(args.checkpoint)
    images = cifar_shard(4, "val")
    work = Path(tempfile.mkdtemp(prefix="dino_ray_copy_video_"))
    davis = write_moving_disc(work / "made", num_frames=24, height=64, width=128)["davis"]
    results = {"checkpoint": str(checkpoint), "copy_images": images, "video": "moving disc, 24 frames 64 x 128",
               "first_mask_baseline": {k: v for k, v in first_mask_baseline(davis, work / "first").items()
                                       if k != "objects"}, "models": {}}
    for name, weights in (("pretrained", checkpoint), ("random_init", random_init_checkpoint(checkpoint, work))):
        start = time.time()
        store = f"sqlite:///{work}/mlflow.db"
        copies = copy_detection_job(CopyDetectionArgs(pretrained_weights=str(weights), data_path=images,
                                                      output_dir=str(work / name / "copy"), imsize=32,
                                                      max_images=args.copy_images, tracking_uri=store))
        davis_record = video_segmentation_job(VideoSegmentationArgs(pretrained_weights=str(weights),
                                                                    data_path=str(davis),
                                                                    output_dir=str(work / name / "davis"), size=64,
                                                                    tracking_uri=store))
        results["models"][name] = {"copy_detection_mAP": copies["results"],
                                   "davis": {k: v for k, v in davis_record["results"].items() if k != "objects"},
                                   "seconds": round(time.time() - start, 1)}
        print(name, json.dumps(results["models"][name]))
    print("first mask copied:", json.dumps(results["first_mask_baseline"]))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
