"""The evaluation jobs behind ``dino-ray eval-knn | eval-linear | visualize-attention``.

Each resolves its weights (file, MLflow run id, hub name: ``dino_ray.eval.weights``), does its work
on Ray where that helps (k-NN feature extraction in Ray tasks, the linear probe as a Ray Train job
with checkpoints and resume) and records an MLflow run nested under the pretraining run the weights
came from, with its headline numbers also on that pretraining run at the checkpoint's epoch. The
tracking store is ``--tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the pretraining's own
store when the checkpoint records it, else an embedded one under ``--output_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from dino_ray.eval.linear import LinearArgs, run_linear
from dino_ray.eval.weights import Weights, resolve_weights
from dino_ray.train.checkpoint import RUN_ID_FILE

log = logging.getLogger(__name__)


def eval_tracking_uri(explicit: Optional[str], weights: Optional[Weights], output_dir: str | Path) -> str:
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if weights is not None and weights.tracking_uri:
        return weights.tracking_uri
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def resolve(source: str, tracking_uri: Optional[str], checkpoint: Optional[str], output_dir: str | Path) -> Weights:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return resolve_weights(source, uri, checkpoint, cache_dir=Path(output_dir) / "weights")


def _step(weights: Weights) -> int:
    """The pretraining's metric step for this checkpoint: its last trained epoch (epochs count from 0)."""
    return max(0, (weights.epoch or 1) - 1)


def knn_job(weights_source: str, train_data: str, val_data: str, output_dir: str, nb_knn: list[int],
            temperature: float = 0.07, checkpoint_key: str = "teacher", arch: Optional[str] = None,
            patch_size: Optional[int] = None, vit_shape: Optional[dict] = None, image_size: Optional[int] = None,
            resize_size: Optional[int] = None, max_train_images: Optional[int] = None,
            max_val_images: Optional[int] = None, batch_size: int = 128, num_workers: int = 0, use_ray: bool = True,
            num_shards: Optional[int] = None, dump_features: Optional[str] = None, load_features: Optional[str] = None,
            tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Weighted k-NN of frozen features (features from Ray tasks, or in this process); returns the record."""
    from dino_ray.data.augment import eval_transform
    from dino_ray.data.datasets import build_dataset
    from dino_ray.eval.features import backbone_from_weights
    from dino_ray.eval.knn import evaluate_knn, knn_classifiers

    out = Path(output_dir)
    weights = resolve(weights_source, tracking_uri, checkpoint, out)
    spec = {"pretrained_weights": str(weights.path), "arch": arch or weights.arch,
            "patch_size": patch_size or weights.patch_size, "checkpoint_key": checkpoint_key, **(vit_shape or {})}
    backbone, shape = backbone_from_weights(**spec)
    size = image_size or shape["image_size"]
    if load_features or not use_ray:
        transform = eval_transform(size, resize_size)
        train_set = val_set = None
        if not load_features:
            train_set = build_dataset(train_data, transform, max_train_images)
            val_set = build_dataset(val_data, transform, max_val_images)
        results = evaluate_knn(backbone, train_set, val_set, nb_knn, temperature, batch_size, num_workers,
                               dump_features, load_features)
    else:
        import ray

        from dino_ray.eval.ray_features import extract_features_on_ray

        started = not ray.is_initialized()
        if started:
            ray.init()
        try:
            folder = Path(dump_features) if dump_features else out / "features"
            train = extract_features_on_ray(spec, train_data, "train", folder, size, resize_size, max_train_images,
                                            num_shards, batch_size)
            val = extract_features_on_ray(spec, val_data, "val", folder, size, resize_size, max_val_images,
                                          num_shards, batch_size)
        finally:
            if started:
                ray.shutdown()
        results = knn_classifiers(*train, *val, nb_knn, temperature)
    for k, (top1, top5) in results.items():
        print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    record = {"weights": weights_source, "checkpoint_epoch": weights.epoch, "pretraining_run": weights.run_id,
              **{k: v for k, v in shape.items()}, "temperature": temperature,
              "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "knn.json").write_text(json.dumps(record, indent=2))
    _track("knn", record, {f"top{n}_k{k}": v[f"top{n}"] for k, v in record["results"].items() for n in (1, 5)},
           {f"knn_top1_k{k}": v["top1"] for k, v in record["results"].items()}, weights,
           eval_tracking_uri(tracking_uri, weights, out), [out / "knn.json"])
    log.info("k-NN results written to %s", out / "knn.json")
    return record


def retrieval_job(weights_source: str, data_path: str, output_dir: str, dataset: Optional[str] = None,
                  multiscale: bool = False, imsize: int = 224, ks: Sequence[int] = (1, 5, 10),
                  checkpoint_key: str = "teacher", arch: Optional[str] = None, patch_size: Optional[int] = None,
                  vit_shape: Optional[dict] = None, image_size: Optional[int] = None, max_images: Optional[int] = None,
                  batch_size: int = 128, tracking_uri: Optional[str] = None,
                  checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Image retrieval (``eval_image_retrieval.py``): with ``dataset`` (roxford5k / rparis6k) the revisited
    protocol over ``data_path/<dataset>``, medium and hard mAP; without, the generic mode over the labelled images
    of ``data_path``, mAP and recall@k. Writes ``retrieval.json``; an MLflow run nested under the pretraining."""
    from PIL import Image

    from dino_ray.data.augment import eval_transform, normalize
    from dino_ray.data.datasets import build_dataset
    from dino_ray.eval.features import backbone_from_weights, extract_features
    from dino_ray.eval.retrieval import (generic_scores, global_descriptor, protocol_ground_truth, ranking,
                                         read_revisited, revisited_scores)

    out = Path(output_dir)
    weights = resolve(weights_source, tracking_uri, checkpoint, out)
    backbone, shape = backbone_from_weights(str(weights.path), arch or weights.arch, patch_size or weights.patch_size,
                                            checkpoint_key, **(vit_shape or {}))
    backbone.eval()
    record: dict[str, Any] = {"weights": weights_source, "checkpoint_epoch": weights.epoch,
                              "pretraining_run": weights.run_id, **shape}
    if dataset:
        data = read_revisited(data_path, dataset)
        to_tensor = normalize()

        def describe(path: Path, box: Optional[tuple] = None) -> torch.Tensor:
            image = Image.open(path).convert("RGB")
            image = image.crop(box) if box else image
            image.thumbnail((imsize, imsize), Image.LANCZOS)  # the longer side to imsize, as the reference
            return global_descriptor(backbone, to_tensor(image), multiscale,
                                     shape["patch_size"] if shape["arch"].startswith("vit") else 1)

        database = torch.stack([describe(p) for p in tqdm(data["images"], desc="database", leave=False)])
        queries = torch.stack([describe(p, b) for p, b in tqdm(list(zip(data["queries"], data["boxes"])),
                                                               desc="queries", leave=False)])
        ranks = ranking(database, queries)
        record.update({"dataset": dataset, "multiscale": multiscale, "imsize": imsize, "database": len(database)})
        record["results"] = {protocol: revisited_scores(ranks, protocol_ground_truth(data["gnd"], protocol), ks)
                             for protocol in ("medium", "hard")}
        metrics = {f"{p}_mAP": r["mAP"] for p, r in record["results"].items()}
        metrics.update({f"{p}_mP_at_{k}": v for p, r in record["results"].items() for k, v in r["mP@k"].items()})
        print(f"{dataset}: mAP M: {metrics['medium_mAP']:.2f}, H: {metrics['hard_mAP']:.2f}")
    else:
        size = image_size or shape["image_size"]
        features, labels = extract_features(backbone, build_dataset(data_path, eval_transform(size), max_images),
                                            batch_size)
        record.update({"data_path": data_path, "image_size": size, "images": len(labels)})
        record["results"] = {"generic": generic_scores(features, labels, ks)}
        result = record["results"]["generic"]
        metrics = {"mAP": result["mAP"], **{f"recall_at_{k}": v for k, v in result["recall@k"].items()}}
        print(f"retrieval over {len(labels)} images: mAP {result['mAP']:.2f}, "
              + ", ".join(f"recall@{k} {v:.2f}" for k, v in result["recall@k"].items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(record, indent=2))
    _track("retrieval", record, metrics, {f"retrieval_{k}": v for k, v in metrics.items() if "mAP" in k}, weights,
           eval_tracking_uri(tracking_uri, weights, out), [out / "retrieval.json"])
    log.info("retrieval results written to %s", out / "retrieval.json")
    return record


def _track(name: str, params: dict[str, Any], metrics: dict[str, float], headline: dict[str, float],
           weights: Weights, uri: str, files: list[Path]) -> Optional[str]:
    """One nested MLflow run for a finished evaluation, headline numbers on the pretraining run too."""
    from dino_ray.tracking import eval_tracker

    flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
    tracker = eval_tracker(uri, weights.run_id, name, flat, epoch=weights.epoch)
    tracker.log_metrics(metrics, step=_step(weights))
    if weights.run_id:
        tracker.log_metrics(headline, step=_step(weights), run_id=weights.run_id)
    for file in files:
        tracker.log_artifact(file)
    tracker.finish()
    return tracker.run_id


def attention_job(weights_source: str, image_paths: list[str], output_dir: str, checkpoint_key: str = "teacher",
                  arch: Optional[str] = None, patch_size: Optional[int] = None, vit_shape: Optional[dict] = None,
                  image_size: int | tuple[int, int] = 480, threshold: Optional[float] = None,
                  tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None,
                  track: bool = True) -> list[Path]:
    """The last block's CLS attention of every head for each image; PNGs under ``output_dir/<image name>/``."""
    from dino_ray.eval.attention import save_attention
    from dino_ray.eval.features import backbone_from_weights

    out = Path(output_dir)
    weights = resolve(weights_source, tracking_uri, checkpoint, out)
    backbone, shape = backbone_from_weights(str(weights.path), arch or weights.arch, patch_size or weights.patch_size,
                                            checkpoint_key, **(vit_shape or {}))
    if not hasattr(backbone, "blocks"):
        raise ValueError(f"attention maps need a ViT; '{weights_source}' holds a {shape['arch']}")
    written: list[Path] = []
    figures = []
    for image in image_paths:
        files = save_attention(backbone, image, out / Path(image).stem, shape["patch_size"], image_size, threshold)
        written += files
        figures.append(files[-1])
        log.info("attention maps of %s: %s", image, files[-1])
    if track:
        from dino_ray.tracking import eval_tracker

        tracker = eval_tracker(eval_tracking_uri(tracking_uri, weights, out), weights.run_id, "attention",
                               {"weights": weights_source, "threshold": threshold, "image_size": image_size,
                                "images": len(image_paths)}, epoch=weights.epoch)
        for file in written:
            tracker.log_artifact(file, f"attention/{file.parent.name}")
        tracker.finish()
    return written


def _linear_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: ``run_linear`` with checkpoints through ``ray.train.report``; rank 0 tracks."""
    import ray.train

    from dino_ray.logs import log_to_stderr
    from dino_ray.train.ray_trainer import worker_scratch

    log_to_stderr()
    with worker_scratch(f"dino_ray_linear{ray.train.get_context().get_world_rank()}_") as local:
        _linear_in(local, config)


def _linear_in(local: Path, config: dict[str, Any]) -> None:
    import ray.train

    from dino_ray.train.ray_trainer import finishing, reported_files, restore_files

    files = ("checkpoint.pth", "log.txt", RUN_ID_FILE)
    args = LinearArgs(**config["args"])
    rank = ray.train.get_context().get_world_rank()
    restore_files(local, files)
    tracker = None
    weights = Weights(Path(args.pretrained_weights), config["pretraining_run"], config["checkpoint_epoch"])
    if rank == 0:
        from dino_ray.tracking import RunTracker, eval_tracker

        run_file = local / RUN_ID_FILE
        if run_file.exists():
            tracker = RunTracker(config["tracking_uri"], "", "", run_id=run_file.read_text().strip())  # continue it
        else:
            params = {k: v for k, v in asdict(args).items() if not isinstance(v, dict)}
            tracker = eval_tracker(config["tracking_uri"], weights.run_id, "linear", params, epoch=weights.epoch)
            if tracker.run_id:
                run_file.write_text(tracker.run_id)

    def report(epoch: int, stats: dict[str, float], checkpoint_path: Path) -> None:
        if rank != 0:
            ray.train.report(stats)
            return
        tracker.log_metrics(stats, step=epoch)
        with reported_files(local, files) as checkpoint:
            ray.train.report(stats, checkpoint=checkpoint, checkpoint_dir_name=f"linear_epoch{epoch:04d}")

    with finishing(tracker):
        stats = run_linear(args, on_epoch_end=report, show_progress=False, work_dir=local)
        if tracker is not None:
            tracker.log_artifact(local / "checkpoint.pth", "linear_head")
            tracker.log_artifact(local / "log.txt")
            if weights.run_id:
                tracker.log_metrics({"linear_top1": stats["best_acc1"]}, step=_step(weights), run_id=weights.run_id)


def linear_job(args: LinearArgs, use_ray: bool = True, ray_workers: int = 1, tracking_uri: Optional[str] = None,
               checkpoint: Optional[str] = None, max_failures: int = 0) -> dict[str, float]:
    """Train the linear probe as a Ray Train job (resuming a stopped one with the same output_dir), or in
    this process; ``args.evaluate`` only validates a saved head. Writes ``output_dir/linear.json``."""
    out = Path(args.output_dir).resolve()
    weights = resolve(args.pretrained_weights, tracking_uri, checkpoint, out)
    local = {k: str(Path(v).resolve()) if v and Path(v).exists() else v
             for k, v in (("train_data_path", args.train_data_path), ("val_data_path", args.val_data_path),
                          ("head_weights", args.head_weights))}
    args = LinearArgs(**{**asdict(args), **local, "pretrained_weights": str(weights.path.resolve()),
                         "arch": args.arch or weights.arch, "patch_size": args.patch_size or weights.patch_size,
                         "output_dir": str(out)})
    uri = eval_tracking_uri(tracking_uri, weights, out)
    if args.evaluate and not args.head_weights:
        args.head_weights = str(out / "linear_head.pth")  # what a finished eval-linear here left
    if args.evaluate or not use_ray:
        stats = run_linear(args)
        if not args.evaluate:
            shutil.copy(out / "checkpoint.pth", out / "linear_head.pth")
        _track("linear-evaluate" if args.evaluate else "linear", asdict(args),
               {k: v for k, v in stats.items() if isinstance(v, float)},
               {"linear_top1": stats["best_acc1"]}, weights, uri, [])
    else:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        started = not ray.is_initialized()
        if started:
            ray.init()
        try:
            trainer = TorchTrainer(
                _linear_per_worker,
                train_loop_config={"args": asdict(args), "tracking_uri": uri, "pretraining_run": weights.run_id,
                                   "checkpoint_epoch": weights.epoch},
                scaling_config=ScalingConfig(num_workers=ray_workers,
                                             use_gpu=ray.cluster_resources().get("GPU", 0) > 0),
                run_config=RunConfig(name="linear", storage_path=str(out / "ray_results"),
                                     failure_config=FailureConfig(max_failures=max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=1)))
            result = trainer.fit()
        finally:
            if started:
                ray.shutdown()
        with result.checkpoint.as_directory() as folder:
            shutil.copy(Path(folder) / "checkpoint.pth", out / "linear_head.pth")
            shutil.copy(Path(folder) / "log.txt", out / "log.txt")
        stats = dict(result.metrics)
    record = {"weights": str(weights.path), "pretraining_run": weights.run_id, "checkpoint_epoch": weights.epoch,
              **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear.json").write_text(json.dumps(record, indent=2))
    log.info("linear evaluation: best top-1 %.2f; head and linear.json in %s", stats["best_acc1"], out)
    return stats
