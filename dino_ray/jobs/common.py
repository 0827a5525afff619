"""What every evaluation job shares: its typed arguments, its weights, its MLflow run.

Arguments: a dataclass a job (``WeightsArgs`` and the job's own fields, named as the reference's
flags), validated when made: ``build_args`` refuses unknown keys (with the closest valid one) and
converts values to the fields' types; each class's ``problems`` names bad values. The tracking store
is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the pretraining's own store when the
checkpoint records it, else an embedded one under the job's output folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, get_type_hints

from dino_ray.config import below, check, coerce, unknown_keys

T = TypeVar("T")


def build_args(cls: type[T], values: dict[str, Any], source: str = "arguments") -> T:
    """``cls`` from a mapping (a YAML file, a command line): unknown keys and unconvertible values are errors
    that name them; the class's own checks run as it is made."""
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown_keys(values, known, source)
    return cls(**{k: coerce(k, v, hints[k]) for k, v in values.items()})


def from_namespace(cls: type[T], namespace: Any, **values: Any) -> T:
    """``cls`` from the command line's parsed flags of the same names (and ``values`` besides), by keyword."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return build_args(cls, {**given, **values}, source=f"dino-ray {getattr(namespace, 'command', '')}".strip())


@dataclass
class WeightsArgs:
    """Which weights an evaluation takes and where its MLflow run goes (``dino_ray.eval.weights``)."""
    pretrained_weights: str = ""  # file, s3:// or gs:// URI, MLflow run id, or hub name (dino_vits16, ...)
    checkpoint: Optional[str] = None  # with a run id: which logged checkpoint (default: the latest)
    checkpoint_key: str = "teacher"
    arch: Optional[str] = None  # default: from the checkpoint's args, else vit_small
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None  # a non-standard ViT's shape
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    tracking_uri: Optional[str] = None

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[str]:
        problems = [] if self.pretrained_weights else ["pretrained_weights is required"]
        if self.checkpoint_key not in ("teacher", "student"):
            problems.append(f"checkpoint_key must be teacher or student, got {self.checkpoint_key!r}")
        return problems + below(self, ("patch_size", "embed_dim", "depth", "num_heads"), 1)

    @property
    def vit_shape(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("embed_dim", "depth", "num_heads") if getattr(self, k)}


def one_of(name: str, value: Any, choices: Sequence[Any]) -> list[str]:
    return [] if value in choices else [f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"]


def image_size(values: Sequence[int]) -> int | tuple[int, int]:
    """A command line's ``--image_size h w`` or ``--image_size s`` (the shorter side)."""
    return (values[0], values[1]) if len(values) == 2 else values[0]


def eval_tracking_uri(explicit: Optional[str], weights: Any, output_dir: str | Path) -> str:
    """An evaluation's store: as every command's, with the pretraining's own store before its output folder's."""
    from dino_ray.tracking import embedded_store, resolve_tracking_uri

    return resolve_tracking_uri(explicit, (weights.tracking_uri if weights is not None else None)
                                or embedded_store(output_dir))


def resolve(source: str, tracking_uri: Optional[str], checkpoint: Optional[str], output_dir: str | Path) -> Any:
    """The ``Weights`` (a local file, its pretraining run and epoch) that a job's ``pretrained_weights`` name."""
    from dino_ray.eval.weights import resolve_weights
    from dino_ray.tracking import resolve_tracking_uri

    return resolve_weights(source, resolve_tracking_uri(tracking_uri, None), checkpoint,
                           cache_dir=Path(output_dir) / "weights")


def backbone_spec(args: WeightsArgs, weights: Any) -> dict[str, Any]:
    """Keyword arguments of ``backbone_from_weights`` for these weights: a local file and its shape."""
    return {"pretrained_weights": str(weights.path), "arch": args.arch or weights.arch,
            "patch_size": args.patch_size or weights.patch_size, "checkpoint_key": args.checkpoint_key,
            **args.vit_shape}


def load_backbone(args: WeightsArgs, output_dir: str | Path, vit_only: bool = False) -> tuple[Any, Any, dict]:
    """``(weights, backbone in eval mode, shape)`` from any weights source; ``vit_only``: refuse a ResNet."""
    from dino_ray.eval.features import backbone_from_weights

    weights = resolve(args.pretrained_weights, args.tracking_uri, args.checkpoint, output_dir)
    backbone, shape = backbone_from_weights(**backbone_spec(args, weights))
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
    from dino_ray.tracking import eval_tracker

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
