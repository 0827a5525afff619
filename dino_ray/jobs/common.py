"""What every evaluation job shares: which weights it takes, where its MLflow run goes, how it records it.

The arguments of a job are one dataclass (``WeightsArgs`` and the job's own fields, named as the reference's
flags), validated when made (``dino_ray.core.args``). The tracking store is ``tracking_uri``, else
``$MLFLOW_TRACKING_URI``, else the pretraining's own store when the checkpoint records it, else an embedded one
under the job's output folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dino_ray.core.args import arg
from dino_ray.eval.args import BackboneArgs


@dataclass
class WeightsArgs(BackboneArgs):
    """Which weights an evaluation takes (``dino_ray.platform.checkpoints``) and where its MLflow run goes."""
    checkpoint: Optional[str] = arg(None, "with an MLflow run: which logged checkpoint, e.g. checkpoint0040.pth "
                                          "(default: the latest, checkpoint.pth)")
    tracking_uri: Optional[str] = arg(None, "MLflow store (default: $MLFLOW_TRACKING_URI, else the pretraining's "
                                            "store, else sqlite under output_dir)")


def image_size(values: Sequence[int]) -> int | tuple[int, int]:
    """A command line's ``--image_size h w`` or ``--image_size s`` (the shorter side)."""
    return (values[0], values[1]) if len(values) == 2 else values[0]


def eval_tracking_uri(explicit: Optional[str], weights: Any, output_dir: str | Path) -> str:
    """An evaluation's store: as every command's, with the pretraining's own store before its output folder's."""
    from dino_ray.platform.tracking.store import embedded_store, resolve_tracking_uri

    return resolve_tracking_uri(explicit, (weights.tracking_uri if weights is not None else None)
                                or embedded_store(output_dir))


def resolve(source: str, tracking_uri: Optional[str], checkpoint: Optional[str], output_dir: str | Path) -> Any:
    """The ``Weights`` (a local file, its pretraining run and epoch) that a job's ``pretrained_weights`` name."""
    from dino_ray.platform.checkpoints import resolve_checkpoint
    from dino_ray.platform.tracking.store import resolve_tracking_uri

    return resolve_checkpoint(source, resolve_tracking_uri(tracking_uri, None), checkpoint,
                              cache_dir=Path(output_dir) / "weights")


def backbone_spec(args: WeightsArgs, weights: Any) -> dict[str, Any]:
    """Keyword arguments of ``backbone_from_checkpoint`` for these weights: a local file and its shape."""
    return {"pretrained_weights": str(weights.path), "arch": args.arch or weights.arch,
            "patch_size": args.patch_size or weights.patch_size, "checkpoint_key": args.checkpoint_key,
            **args.vit_shape}


def load_backbone(args: WeightsArgs, output_dir: str | Path, vit_only: bool = False) -> tuple[Any, Any, dict]:
    """``(weights, backbone in eval mode, shape)`` from any weights source; ``vit_only``: refuse a ResNet."""
    from dino_ray.core.models.build import backbone_from_checkpoint

    weights = resolve(args.pretrained_weights, args.tracking_uri, args.checkpoint, output_dir)
    backbone, shape = backbone_from_checkpoint(**backbone_spec(args, weights))
    if vit_only and not hasattr(backbone, "blocks"):
        raise ValueError(f"this evaluation needs a ViT; '{args.pretrained_weights}' holds a {shape['arch']}")
    return weights, backbone.eval(), shape


def metric_step(weights: Any) -> int:
    """The pretraining's metric step for this checkpoint: its last trained epoch (epochs count from 0)."""
    return max(0, (weights.epoch or 1) - 1)


def track(name: str, params: dict[str, Any], metrics: dict[str, float], headline: dict[str, float],
          weights: Any, uri: str, files: list[Path], artifact_dirs: Optional[list[Optional[str]]] = None
          ) -> Optional[str]:
    """One nested MLflow run for a finished evaluation, headline numbers on the pretraining run too."""
    from dino_ray.platform.tracking.runs import eval_tracker

    flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
    tracker = eval_tracker(uri, weights.run_id, name, flat, epoch=weights.epoch)
    tracker.log_metrics(metrics, step=metric_step(weights))
    if tracker.parent_run_id and headline:
        tracker.log_metrics(headline, step=metric_step(weights), run_id=tracker.parent_run_id)
    for file, folder in zip(files, artifact_dirs or [None] * len(files)):
        tracker.log_artifact(file, folder)
    tracker.finish()
    return tracker.run_id


def load_rgb(files: Sequence[Path]) -> list:
    """The pictures of ``files`` as RGB PIL images; a file that does not open is an error naming it."""
    from PIL import Image

    pictures = []
    for file in files:
        try:
            with Image.open(file) as image:
                pictures.append(image.convert("RGB"))
        except OSError as exc:
            raise ValueError(f"image '{file}' cannot be read: {exc}") from exc
    return pictures
