"""``dino-ray embed``: a folder of images (any ``data_path``) into embeddings, and the nearest images of a query.

The teacher backbone's features (the CLS output, as the k-NN evaluation's) of every image that decodes, one row
each in a Parquet file: ``path``, ``label`` (-1 without labels) and ``feature``, with the weights, image size and
feature size in its metadata. The images are split into shards embedded by Ray tasks (a GPU each when the cluster
has them) under ``<output>.parts/``; a shard is written whole or not at all, so a stopped run continues where
it stopped. ``--query IMAGE`` instead prints the images of an embeddings file closest to one image (cosine
similarity), embedded the same way.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below
from dino_ray.jobs.common import WeightsArgs, backbone_spec, resolve

log = logging.getLogger(__name__)
METADATA = b"dino_ray.embeddings"


@dataclass
class EmbedArgs(WeightsArgs):
    pretrained_weights: str = arg("", "the weights: a checkpoint file or URI, an MLflow run (<run id>, runs:/...), "
                                      "a registered model (models:/<name>@<alias>) or a hub name", positional=True)
    data_path: Optional[str] = arg(None, "the images: a folder (any depth, labelled by class subfolders or not), a "
                                         "path list or Parquet; with --query: the embeddings file", positional=True)
    output: Optional[str] = arg(None, "the embeddings file (Parquet) to write", positional=True)
    query: Optional[str] = arg(None, "an image: print its nearest images in the embeddings file")
    top_k: int = arg(5, "nearest images printed for a query")
    image_size: Optional[int] = arg(None, "centre-crop size (default: the pretraining's)")
    resize_size: Optional[int] = arg(None, "resize before the crop (default: 256/224 x image_size)")
    max_images: Optional[int] = arg(None, "the first N images only")
    batch_size_per_gpu: int = arg(128, "images per forward pass")
    num_shards: Optional[int] = arg(None, "Ray tasks (default: one per CPU/GPU of the cluster)")

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.query and not (self.data_path and self.output):
            problems.append("give the images and the embeddings file to write (WEIGHTS DATA OUTPUT), or --query "
                            "IMAGE and an embeddings file (WEIGHTS EMBEDDINGS --query IMAGE)")
        if self.query and not (self.output or self.data_path):
            problems.append("--query needs the embeddings file to search (WEIGHTS EMBEDDINGS --query IMAGE)")
        return problems + below(self, ("top_k", "image_size", "resize_size", "max_images", "batch_size_per_gpu",
                                       "num_shards"), 1)


def embed_job(args: EmbedArgs) -> Any:
    return nearest(args) if args.query else embed(args)


def embed(args: EmbedArgs) -> dict[str, Any]:
    """Embed every image of ``data_path`` into ``output``; returns the file's description."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dino_ray.core.models.build import backbone_from_checkpoint
    from dino_ray.eval.features import feature_parts
    from dino_ray.platform.ray_features import save_features_on_ray
    from dino_ray.platform.ray_session import ray_session

    output = Path(args.output).resolve()
    weights = resolve(args.pretrained_weights, args.tracking_uri, args.checkpoint, output.parent)
    spec = backbone_spec(args, weights)
    _, shape = backbone_from_checkpoint(**spec)
    size = args.image_size or shape["image_size"]
    parts = Path(f"{output}.parts")
    plan = {"weights": args.pretrained_weights, "data_path": args.data_path, "image_size": size,
            "resize_size": args.resize_size, "max_images": args.max_images, "num_shards": args.num_shards}
    if (parts / "_plan.json").exists() and json.loads((parts / "_plan.json").read_text()) != plan:
        raise ValueError(f"'{parts}' holds the shards of another embedding ({parts / '_plan.json'}): remove it to "
                         f"start again, or write to another output")
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "_plan.json").write_text(json.dumps(plan))  # before any shard: a continued run checks it
    with ray_session():
        shards = save_features_on_ray(spec, args.data_path, "embeddings", parts, size, args.resize_size,
                                      args.max_images, args.num_shards, args.batch_size_per_gpu, resume=True)
    tables = [pq.read_table(part) for part in feature_parts(parts, "embeddings")[:shards]]
    table = pa.concat_tables(tables)
    about = {"weights": args.pretrained_weights, "run_id": weights.run_id, "checkpoint_epoch": weights.epoch,
             "data_path": args.data_path, "image_size": size, "resize_size": args.resize_size, **shape,
             "images": table.num_rows}
    pq.write_table(table.replace_schema_metadata({METADATA: json.dumps(about).encode()}), output)
    log.info("%d embeddings (%s) of %s written to %s", table.num_rows, shape["arch"], args.data_path, output)
    return about


def nearest(args: EmbedArgs) -> list[dict[str, Any]]:
    """The ``top_k`` images of the embeddings file closest to ``query``, printed and returned."""
    import pyarrow.parquet as pq
    import torch.nn.functional as F
    from PIL import Image

    from dino_ray.core.data.augment import eval_transform
    from dino_ray.core.models.build import backbone_from_checkpoint
    from dino_ray.eval.features import table_features

    embeddings = args.output or args.data_path
    table = pq.read_table(embeddings)
    about = json.loads((table.schema.metadata or {}).get(METADATA, b"{}"))
    weights = resolve(args.pretrained_weights, args.tracking_uri, args.checkpoint, Path(embeddings).parent)
    backbone, shape = backbone_from_checkpoint(**backbone_spec(args, weights))
    size = args.image_size or about.get("image_size") or shape["image_size"]
    with Image.open(args.query) as image:
        pixels = eval_transform(size, args.resize_size or about.get("resize_size"))(image.convert("RGB"))
    query = F.normalize(backbone.eval()(pixels[None]).detach(), dim=1)
    bank = F.normalize(table_features(table), dim=1)
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"'{embeddings}' holds {bank.shape[1]}-dimensional embeddings and these weights give "
                         f"{query.shape[1]}: embed with the same weights")
    scores, order = (bank @ query[0]).topk(min(args.top_k, len(bank)))
    paths, labels = table.column("path").to_pylist(), table.column("label").to_pylist()
    found = [{"rank": i + 1, "similarity": round(float(s), 4), "path": paths[j], "label": labels[j]}
             for i, (s, j) in enumerate(zip(scores.tolist(), order.tolist()))]
    print(f"nearest images to {args.query} in {embeddings}:")
    for row in found:
        print(f"{row['rank']:3d}  {row['similarity']:.4f}  {row['path']}" + (f"  (label {row['label']})"
                                                                           if row["label"] >= 0 else ""))
    return found
