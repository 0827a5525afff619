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

import numpy as np
import torch
from PIL import Image
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


def load_backbone(weights_source: str, output_dir: str | Path, checkpoint_key: str = "teacher",
                  arch: Optional[str] = None, patch_size: Optional[int] = None, vit_shape: Optional[dict] = None,
                  tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None, vit_only: bool = False
                  ) -> tuple[Weights, torch.nn.Module, dict[str, Any]]:
    """``(weights, backbone in eval mode, shape)`` from any weights source; ``vit_only``: refuse a ResNet."""
    from dino_ray.eval.features import backbone_from_weights

    weights = resolve(weights_source, tracking_uri, checkpoint, Path(output_dir))
    backbone, shape = backbone_from_weights(str(weights.path), arch or weights.arch, patch_size or weights.patch_size,
                                            checkpoint_key, **(vit_shape or {}))
    if vit_only and not hasattr(backbone, "blocks"):
        raise ValueError(f"this evaluation needs a ViT; '{weights_source}' holds a {shape['arch']}")
    return weights, backbone.eval(), shape


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
    from dino_ray.data.augment import eval_transform, normalize
    from dino_ray.data.datasets import build_dataset
    from dino_ray.eval.features import extract_features
    from dino_ray.eval.retrieval import (generic_scores, global_descriptor, protocol_ground_truth, ranking,
                                         read_revisited, revisited_scores)

    out = Path(output_dir)
    weights, backbone, shape = load_backbone(weights_source, out, checkpoint_key, arch, patch_size, vit_shape,
                                             tracking_uri, checkpoint)
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
        shown = range(min(FIGURE_QUERIES, len(data["queries"])))
        figure = _ranking_figure(
            [picture.crop(box) for picture, box in zip(_load_rgb([data["queries"][q] for q in shown]),
                                                       data["boxes"])],  # PIL: crop(None) is the whole picture
            [_load_rgb([data["images"][i] for i in ranks[:FIGURE_RESULTS, q]]) for q in shown],
            [[_verdict(i, data["gnd"][q]) for i in ranks[:FIGURE_RESULTS, q]] for q in shown], out / "retrieval.png")
    else:
        size = image_size or shape["image_size"]
        dataset = build_dataset(data_path, eval_transform(size), max_images)
        features, labels = extract_features(backbone, dataset, batch_size)
        record.update({"data_path": data_path, "image_size": size, "images": len(labels)})
        record["results"] = {"generic": generic_scores(features, labels, ks)}
        result = record["results"]["generic"]
        metrics = {"mAP": result["mAP"], **{f"recall_at_{k}": v for k, v in result["recall@k"].items()}}
        print(f"retrieval over {len(labels)} images: mAP {result['mAP']:.2f}, "
              + ", ".join(f"recall@{k} {v:.2f}" for k, v in result["recall@k"].items()))
        normed = torch.nn.functional.normalize(features, dim=1)
        shown = range(min(FIGURE_QUERIES, len(labels)))
        similarity = normed[list(shown)] @ normed.T
        similarity[torch.arange(len(shown)), torch.arange(len(shown))] = -float("inf")  # not itself
        top = similarity.topk(min(FIGURE_RESULTS, len(labels) - 1), dim=1).indices
        figure = None
        if len(labels) == len(dataset):  # feature row = dataset index: decode only the pictures shown
            dataset.transform = None
            figure = _ranking_figure([dataset[q][0] for q in shown], [[dataset[i][0] for i in row] for row in
                                                                      top.tolist()],
                                     [[bool(labels[i] == labels[q]) for i in top[q].tolist()] for q in shown],
                                     out / "retrieval.png")
        else:
            log.info("%d image(s) did not decode: no retrieval.png (its rows would not match the dataset's)",
                     len(dataset) - len(labels))
    (out / "retrieval.json").write_text(json.dumps(record, indent=2))
    _track("retrieval", record, metrics, {f"retrieval_{k}": v for k, v in metrics.items() if "mAP" in k}, weights,
           eval_tracking_uri(tracking_uri, weights, out), [out / "retrieval.json", *([figure] if figure else [])])
    log.info("retrieval results written to %s", out / "retrieval.json")
    return record


FIGURE_QUERIES, FIGURE_RESULTS = 5, 5


def _verdict(index: int, truth: dict[str, Any]) -> Optional[bool]:
    """A revisited-protocol result: True (easy or hard), None (junk), False (wrong)."""
    if index in set(truth.get("easy", [])) | set(truth.get("hard", [])):
        return True
    return None if index in set(truth.get("junk", [])) else False


def _ranking_figure(queries: list, results: list[list], verdicts: list[list[Optional[bool]]], path: Path,
                    size: int = 96) -> Path:
    """A row per query: the query, then its first results framed green (relevant), red (not) or grey (junk)."""
    import matplotlib.pyplot as plt

    columns = 1 + max(len(row) for row in results)
    figure, axes = plt.subplots(len(queries), columns, figsize=(1.3 * columns, 1.4 * len(queries)), squeeze=False)
    for q, query in enumerate(queries):
        row = [(query, "query", "black")] + [(picture, f"#{k + 1}", {True: "green", False: "red", None: "grey"}[v])
                                             for k, (picture, v) in enumerate(zip(results[q], verdicts[q]))]
        for ax in axes[q]:
            ax.axis("off")
        for ax, (picture, title, colour) in zip(axes[q], row):
            ax.imshow(picture.resize((size, size)))
            ax.set_title(title, fontsize=7)
            ax.add_patch(plt.Rectangle((0, 0), size - 1, size - 1, fill=False, edgecolor=colour, linewidth=3))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _load_rgb(files: Sequence[Path]) -> list:
    pictures = []
    for file in files:
        try:
            with Image.open(file) as image:
                pictures.append(image.convert("RGB"))
        except OSError as exc:
            raise ValueError(f"image '{file}' cannot be read: {exc}") from exc
    return pictures


def _pictures(path: str | Path, max_images: Optional[int] = None) -> list:
    """The RGB pictures of a plain image folder, an ImageFolder tree or Parquet rows (those that decode)."""
    from dino_ray.data.datasets import build_dataset, image_files, is_parquet

    if Path(path).is_dir() and not is_parquet(path) and any(p.is_file() for p in Path(path).iterdir()):
        return _load_rgb(image_files(path)[:max_images])
    return [item[0] for item in build_dataset(path, None, max_images) if item is not None]


def copy_detection_job(weights_source: str, data_path: str, output_dir: str, dataset: Optional[str] = None,
                       whitening_path: Optional[str] = None, distractors_path: Optional[str] = None,
                       imsize: int = 320, num_originals: Optional[int] = None, max_images: Optional[int] = None,
                       edits: Sequence[str] = (), seed: int = 0, batch_size: int = 64, checkpoint_key: str = "teacher",
                       arch: Optional[str] = None, patch_size: Optional[int] = None, vit_shape: Optional[dict] = None,
                       tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Copy detection (``eval_copy_detection.py``). ``dataset="copydays"``: the Copydays blocks under ``data_path``
    against its originals (+ distractors); generic: the first ``num_originals`` images of ``data_path`` (default:
    half) are the originals, the rest learn the whitening unless ``whitening_path`` is given, and each original is
    copied once per edit. mAP per block in ``copy_detection.json``; an MLflow run nested under the pretraining."""
    from torchvision import transforms

    from dino_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from dino_ray.eval.copy_detection import EDITS, copy_descriptor, copy_scores, learn_whitening, make_copies, \
        read_copydays

    unknown = [edit for edit in edits if edit not in EDITS]
    if unknown:
        raise ValueError(f"edit(s) {unknown} unknown (choose from {', '.join(EDITS)})")
    out = Path(output_dir)
    weights, backbone, shape = load_backbone(weights_source, out, checkpoint_key, arch, patch_size, vit_shape,
                                             tracking_uri, checkpoint, vit_only=True)
    bicubic = transforms.InterpolationMode.BICUBIC
    prepare = transforms.Compose([transforms.Resize((imsize, imsize), interpolation=bicubic),
                                  transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def describe(pictures: list, desc: str) -> torch.Tensor:
        batches = [pictures[k:k + batch_size] for k in range(0, len(pictures), batch_size)]
        return torch.cat([copy_descriptor(backbone, torch.stack([prepare(p) for p in batch]), shape["patch_size"])
                          for batch in tqdm(batches, desc=desc, leave=False)])

    record: dict[str, Any] = {"weights": weights_source, "checkpoint_epoch": weights.epoch,
                              "pretraining_run": weights.run_id, **shape, "imsize": imsize}
    files = [out / "copy_detection.json"]
    whitening_pictures = _pictures(whitening_path) if whitening_path else []
    if dataset == "copydays":
        data = read_copydays(data_path)
        database = describe(_load_rgb(data["originals"]), "originals")
        queries = {name: (describe(_load_rgb(paths), name), positives)
                   for name, (paths, positives) in data["blocks"].items()}
        headline = "strong" if "strong" in queries else "original"
    elif dataset is None:
        pictures = _pictures(data_path, max_images)
        count = num_originals or len(pictures) // 2
        if count < 2 or (not whitening_path and len(pictures) - count < 2):
            raise ValueError(f"'{data_path}' gives {len(pictures)} images: too few for {count} originals and a "
                             f"whitening set (give more images, --num_originals or --whitening_path)")
        originals, whitening_pictures = pictures[:count], whitening_pictures or pictures[count:]
        copies = make_copies(originals, edits or EDITS, seed)
        database = describe(originals, "originals")
        queries = {edit: (describe(made, edit), [[k] for k in range(count)]) for edit, made in copies.items()}
        headline = "strong" if "strong" in queries else next(iter(queries))
        record.update({"data_path": data_path, "originals": count, "edits": list(copies), "seed": seed})
        out.mkdir(parents=True, exist_ok=True)
        files.append(_copies_figure(originals[:4], {e: c[:4] for e, c in copies.items()}, out / "copies.png"))
    else:
        raise ValueError(f"dataset '{dataset}' is unknown (copydays, or none for the generic mode)")
    if distractors_path:
        database = torch.cat([database, describe(_pictures(distractors_path), "distractors")])
    whitening = learn_whitening(describe(whitening_pictures, "whitening")) if whitening_pictures else None
    record.update({"database": len(database), "whitening_images": len(whitening_pictures),
                   "results": copy_scores({k: (q, p) for k, (q, p) in queries.items()}, database, whitening)})
    metrics = {f"mAP_{name.replace('/', '_')}": v for name, v in record["results"].items()}
    print("copy detection mAP: " + ", ".join(f"{name} {v:.2f}" for name, v in record["results"].items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "copy_detection.json").write_text(json.dumps(record, indent=2))
    _track("copy_detection", record, metrics, {f"copy_mAP_{headline}": record["results"][headline]}, weights,
           eval_tracking_uri(tracking_uri, weights, out), files)
    log.info("copy detection results written to %s", out / "copy_detection.json")
    return record


def _copies_figure(originals: list, copies: dict[str, list], path: Path, size: int = 96) -> Path:
    """A grid a person can check the edits on: a row per original, then its copy by each edit."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(originals), 1 + len(copies), figsize=(1.3 * (1 + len(copies)),
                                                                          1.4 * len(originals)), squeeze=False)
    for k, original in enumerate(originals):
        for j, (title, picture) in enumerate([("original", original), *((e, c[k]) for e, c in copies.items())]):
            axes[k, j].imshow(picture.resize((size, size)))
            axes[k, j].axis("off")
            if k == 0:
                axes[k, j].set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _track(name: str, params: dict[str, Any], metrics: dict[str, float], headline: dict[str, float],
           weights: Weights, uri: str, files: list[Path]) -> Optional[str]:
    """One nested MLflow run for a finished evaluation, headline numbers on the pretraining run too."""
    from dino_ray.tracking import eval_tracker

    flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
    tracker = eval_tracker(uri, weights.run_id, name, flat, epoch=weights.epoch)
    tracker.log_metrics(metrics, step=_step(weights))
    if tracker.parent_run_id:
        tracker.log_metrics(headline, step=_step(weights), run_id=tracker.parent_run_id)
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

    out = Path(output_dir)
    weights, backbone, shape = load_backbone(weights_source, out, checkpoint_key, arch, patch_size, vit_shape,
                                             tracking_uri, checkpoint, vit_only=True)
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


def attention_video_job(weights_source: str, input_path: str, output_path: str, resize: Optional[int | tuple] = None,
                        threshold: Optional[float] = 0.6, heads: str = "mean", batch_size: int = 8,
                        fps: Optional[float] = None, video_only: bool = False, checkpoint_key: str = "teacher",
                        arch: Optional[str] = None, patch_size: Optional[int] = None, vit_shape: Optional[dict] = None,
                        tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None,
                        track: bool = True) -> dict[str, Any]:
    """``video_generation.py``: the attention video of a video file or frame folder (``attention_video``); the
    video and its first frame in an MLflow run nested under the pretraining."""
    from dino_ray.eval.attention_video import attention_video

    out = Path(output_path)
    weights, backbone, shape = load_backbone(weights_source, out, checkpoint_key, arch, patch_size, vit_shape,
                                             tracking_uri, checkpoint, vit_only=True)
    result = attention_video(backbone, input_path, out, shape["patch_size"], resize, threshold, heads, batch_size,
                             fps, video_only)
    log.info("attention video of %s (%d frames at %.3g fps): %s", input_path, result["num_frames"], result["fps"],
             result["video"])
    if track:
        files = [result["video"]] + ([result["frames"] / "attn-00000.png"] if result["frames"] else [])
        _track("attention_video", {"weights": weights_source, "input_path": str(input_path), "threshold": threshold,
                                   "heads": heads, "resize": str(resize), "frames": result["num_frames"],
                                   "fps": result["fps"]}, {}, {}, weights,
               eval_tracking_uri(tracking_uri, weights, out), files)
    return result


def video_segmentation_job(weights_source: str, data_path: str, output_dir: str, videos: Optional[list[str]] = None,
                           size: int = 480, n_last_frames: int = 7, size_mask_neighborhood: int = 12, topk: int = 5,
                           checkpoint_key: str = "teacher", arch: Optional[str] = None,
                           patch_size: Optional[int] = None, vit_shape: Optional[dict] = None,
                           tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None) -> dict[str, Any]:
    """``eval_video_segmentation.py``: DAVIS-2017 label propagation from each video's first annotation; predictions
    as indexed PNGs in ``output_dir/<video>/``; J and F when the videos have further annotations. Writes
    ``davis.json`` and a figure of the first video; an MLflow run nested under the pretraining."""
    from dino_ray.eval.video_segmentation import (davis_frames, davis_palette, davis_scores, davis_videos,
                                                  read_labels, segment_video)

    out = Path(output_dir)
    weights, backbone, shape = load_backbone(weights_source, out, checkpoint_key, arch, patch_size, vit_shape,
                                             tracking_uri, checkpoint, vit_only=True)
    videos = videos or davis_videos(data_path)
    annotations = Path(data_path) / "Annotations" / "480p"
    for video in tqdm(videos, desc="videos", unit="video"):
        first = sorted((annotations / video).glob("*.png"))
        if not first:
            raise FileNotFoundError(f"video '{video}' has no first-frame annotation in '{annotations / video}'")
        labels = read_labels(first[0])
        with Image.open(first[0]) as image:
            palette = np.array(image.getpalette() or davis_palette()).reshape(-1, 3)
        segment_video(backbone, davis_frames(data_path, video), labels, out / video, shape["patch_size"], palette,
                      size, n_last_frames, size_mask_neighborhood, topk)
    record: dict[str, Any] = {"weights": weights_source, "checkpoint_epoch": weights.epoch,
                              "pretraining_run": weights.run_id, **shape, "data_path": data_path, "videos": videos,
                              "size": size, "n_last_frames": n_last_frames,
                              "size_mask_neighborhood": size_mask_neighborhood, "topk": topk}
    metrics: dict[str, float] = {}
    if all(len(list((annotations / v).glob("*.png"))) >= 3 for v in videos):
        record["results"] = davis_scores(out, data_path, videos)
        metrics = {k.replace("&", "_and_"): v for k, v in record["results"].items() if k != "objects"}
        print(f"DAVIS {len(videos)} video(s): J&F {metrics['J_and_F']:.2f}, J {metrics['J']:.2f}, "
              f"F {metrics['F']:.2f}")
    files = [out / "davis.json", _propagation_figure(davis_frames(data_path, videos[0]), out / videos[0],
                                                     out / "propagation.png")]
    (out / "davis.json").write_text(json.dumps(record, indent=2))
    _track("video_segmentation", record, metrics, {f"davis_{k}": v for k, v in metrics.items() if k in ("J_and_F",)},
           weights, eval_tracking_uri(tracking_uri, weights, out), files)
    log.info("predicted masks in %s; scores in %s", out, out / "davis.json")
    return record


def _propagation_figure(frames: list[Path], predictions: Path, path: Path, columns: int = 5) -> Path:
    """Evenly spaced frames of a video with the predicted masks over them."""
    import matplotlib.pyplot as plt

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
            tracker.parent_run_id = weights.run_id
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
            if tracker.parent_run_id:
                tracker.log_metrics({"linear_top1": stats["best_acc1"]}, step=_step(weights),
                                    run_id=tracker.parent_run_id)


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
