"""``dino-ray eval-knn``: weighted k-NN of frozen features (the reference's ``eval_knn.py``)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below
from dino_ray.eval.args import SplitData
from dino_ray.jobs.common import WeightsArgs, backbone_spec, eval_tracking_uri, resolve, track

log = logging.getLogger(__name__)


@dataclass
class KnnArgs(SplitData, WeightsArgs):
    """``eval_knn.py``'s flags (same names and defaults), plus Ray's sharding and image sizes for small images."""
    nb_knn: list[int] = arg(help="numbers of neighbours k", factory=lambda: [10, 20, 100, 200])
    temperature: float = arg(0.07, "temperature of the neighbours' weights")
    image_size: Optional[int] = arg(None, "centre-crop size (default: the pretraining's)")
    resize_size: Optional[int] = arg(None, "resize before the crop (default: 256/224 x image_size)")
    max_train_images: Optional[int] = arg(None, "the first N training images only")
    max_val_images: Optional[int] = arg(None, "the first N validation images only")
    batch_size_per_gpu: int = arg(128, "images per forward pass")
    num_workers: int = arg(10, "data-loading processes")
    use_ray: bool = arg(True, "run in this process, without Ray", flag="--no-ray")
    num_shards: Optional[int] = arg(None, "Ray tasks per split (default: one per CPU/GPU)")
    dump_features: Optional[str] = arg(None, "folder to save the features in (Parquet)")
    load_features: Optional[str] = arg(None, "folder to load saved features from")
    output_dir: str = arg("outputs/knn", "where knn.json goes")

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.load_features and not (self.split("train") and self.split("val")):
            problems.append("data_path (or train_data_path and val_data_path, or load_features) is required")
        problems += below(self, ("nb_knn", "image_size", "resize_size", "max_train_images", "max_val_images",
                                 "batch_size_per_gpu", "num_shards"), 1)
        return problems + below(self, ("temperature", "num_workers"), 0)


def knn_job(args: KnnArgs) -> dict[str, Any]:
    """Weighted k-NN of frozen features (features from Ray tasks, or in this process); returns the record
    written to ``output_dir/knn.json``."""
    from dino_ray.core.data.augment import eval_transform
    from dino_ray.core.data.datasets import build_dataset, require_labels
    from dino_ray.core.models.build import backbone_from_checkpoint
    from dino_ray.eval.knn import evaluate_knn, knn_classifiers

    out = Path(args.output_dir)
    weights = resolve(args.pretrained_weights, args.tracking_uri, args.checkpoint, out)
    spec = backbone_spec(args, weights)
    backbone, shape = backbone_from_checkpoint(**spec)
    size = args.image_size or shape["image_size"]
    if not args.load_features:  # before any feature is computed
        for name, most in (("train", args.max_train_images), ("val", args.max_val_images)):
            require_labels(build_dataset(args.split(name), None, most), args.split(name), "k-NN")
    if args.load_features or not args.use_ray:
        transform = eval_transform(size, args.resize_size)
        train_set = val_set = None
        if not args.load_features:
            train_set = build_dataset(args.split("train"), transform, args.max_train_images)
            val_set = build_dataset(args.split("val"), transform, args.max_val_images)
        results = evaluate_knn(backbone, train_set, val_set, args.nb_knn, args.temperature, args.batch_size_per_gpu,
                               args.num_workers, args.dump_features, args.load_features)
    else:
        from dino_ray.platform.ray_features import extract_features_on_ray
        from dino_ray.platform.ray_session import ray_session

        folder = Path(args.dump_features) if args.dump_features else out / "features"
        with ray_session():
            train, val = (extract_features_on_ray(spec, args.split(name), name, folder, size, args.resize_size, most,
                                                  args.num_shards, args.batch_size_per_gpu)
                          for name, most in (("train", args.max_train_images), ("val", args.max_val_images)))
        results = knn_classifiers(*train, *val, args.nb_knn, args.temperature)
    for k, (top1, top5) in results.items():
        print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    record = {"weights": args.pretrained_weights, "checkpoint_epoch": weights.epoch, "pretraining_run": weights.run_id,
              **shape, "temperature": args.temperature,
              "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "knn.json").write_text(json.dumps(record, indent=2))
    track("knn", record, {f"top{n}_k{k}": v[f"top{n}"] for k, v in record["results"].items() for n in (1, 5)},
          {f"knn_top1_k{k}": v["top1"] for k, v in record["results"].items()}, weights,
          eval_tracking_uri(args.tracking_uri, weights, out), [out / "knn.json"])
    log.info("k-NN results written to %s", out / "knn.json")
    return record
