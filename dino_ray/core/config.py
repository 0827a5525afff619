"""The pretraining config: every flag of the reference's ``main_dino.py``, same names and defaults.

Layers, as in dinov2: dataclass defaults <- experiment YAML <- ``key=value`` overrides from the
command line. The resolved config is validated before any work starts and saved with the run.

Where we add keys the reference lacks (crop sizes, the small-ViT shape, speed switches), they
sit after the reference's own and say so in their comment.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

from dino_ray.core.args import ConfigError, below, coerce, one_of, unknown_keys

DATA_ROOT = "DINO_RAY_DATA"  # the environment variable of the datasets' folder
RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # package data: the shipped configs and sweeps
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
VIT_SHAPE_KEYS = ("embed_dim", "depth", "num_heads")  # a non-standard ViT's width, depth and heads
ARCHS = (*VIT_ARCHS, "resnet50")  # the paper's; ``arch`` takes any torchvision architecture besides
STEMS = ("default", "small", "small_stride2", "conv")
CENTERINGS = ("centering", "sinkhorn_knopp")
OPTIMIZERS = ("adamw", "sgd", "lars")


@dataclass
class ScalingSection:
    """Ray Train's ScalingConfig: the training workers and what each one gets."""
    num_workers: int = 1
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    resources_per_worker: Optional[dict] = None  # e.g. {CPU: 4, GPU: 1}
    placement_strategy: str = "PACK"  # or SPREAD / STRICT_SPREAD (one worker per node) / STRICT_PACK
    # torch's compute threads in each worker; None: Ray's default, the worker's CPUs (1 unless
    # resources_per_worker says more), which leaves a 1-worker run on a laptop with one core busy
    threads_per_worker: Optional[int] = None

    def problems(self) -> list[str]:
        return below(self, ("num_workers", "threads_per_worker"), 1)


@dataclass
class RunSection:
    """Ray Train's RunConfig: where the run's checkpoints live and under which name."""
    name: Optional[str] = None  # default: the output_dir's folder name
    storage_path: Optional[str] = None  # local folder or s3:// / gs:// URI; default: output_dir/ray_results

    def problems(self) -> list[str]:
        return []


@dataclass
class FailureSection:
    """Ray Train's FailureConfig: how many worker failures a run survives, each time restarting from its latest
    checkpoint (-1: forever). The same error again from the same checkpoint stops the run whatever these say."""
    max_failures: int = 3  # a killed or crashed worker (an OOM kill, a lost on-demand node)
    max_preemption_failures: int = -1  # a preempted (spot) node, counted apart: unlimited

    def problems(self) -> list[str]:
        return below(self, ("max_failures", "max_preemption_failures"), -1)


@dataclass
class TrackingSection:
    """MLflow: where runs are recorded."""
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else SQLite under output_dir
    experiment_name: str = "dino-ray"
    parent_run_id: Optional[str] = None  # nest the run under this one (a sweep's parent run)
    log_model: bool = True  # the teacher backbone as an MLflow model at the end (a few seconds)
    # where a new experiment keeps its artifacts (s3://bucket/mlflow); default: mlartifacts/ beside a SQLite
    # store (the embedded one's output_dir/mlartifacts), or the tracking server's own setting
    artifact_location: Optional[str] = None
    # how long the end of a run waits for an unreachable server before leaving its unsent calls on disk
    retry_timeout_s: float = 120.0

    def problems(self) -> list[str]:
        return below(self, ("retry_timeout_s",), 0)


@dataclass
class EvalSection:
    """Evaluation while pretraining: a k-NN monitor and attention maps of every ``knn_every``-th checkpoint, in
    Ray Train's asynchronous validation task when the cluster has CPUs the training leaves free, else on rank 0
    between epochs (``knn_sync``)."""
    knn_every: int = 0  # epochs between monitors; 0: off
    knn_train_data: Optional[str] = None  # labelled images for the k-NN memory bank; default: data_path
    knn_val_data: Optional[str] = None  # held-out labelled images (needed when knn_every > 0)
    knn_train_images: int = 2000
    knn_val_images: int = 500
    knn_k: int = 20
    knn_temperature: float = 0.07
    attention_images: int = 2  # the first images of knn_val_data, 0: no attention figures
    num_cpus: float = 1.0  # Ray resources of one monitor task
    # the monitor on rank 0 inside the epoch's report (sweeps: Tune sees its metric); None: there when the training's
    # threads fill the cluster's CPUs (a laptop), else in its own Ray task beside the training
    knn_sync: Optional[bool] = None

    def problems(self) -> list[str]:
        problems = below(self, ("knn_every", "attention_images"), 0) + below(self, ("knn_train_images",
                                                                                   "knn_val_images", "knn_k"), 1)
        if self.knn_every and not self.knn_val_data:
            problems.append("eval.knn_every is set but eval.knn_val_data (held-out labelled images) is not")
        return problems


@dataclass
class RayDataSection:
    """``data_loader: ray_data``: Ray Data reads, shuffles, decodes and multi-crops in CPU tasks beside the training
    workers. Its tasks need CPUs the workers do not hold (``scaling.resources_per_worker``): checked at start."""
    num_cpus: float = 1.0  # CPUs of one decode + multi-crop task
    batch_size: int = 64  # images per task call (the batched augmentation's batch)
    audit_dir: Optional[str] = None  # write the path of every image each rank trained on, per epoch

    def problems(self) -> list[str]:
        return (["ray_data.num_cpus must be > 0"] if self.num_cpus <= 0 else []) + below(self, ("batch_size",), 1)


SECTIONS = {"scaling": ScalingSection, "run": RunSection, "failure": FailureSection, "tracking": TrackingSection,
            "eval": EvalSection, "ray_data": RayDataSection}
DATA_LOADERS = ("torch", "ray_data")
AUGMENTATIONS = ("reference", "batched")


@dataclass
class DINOConfig:
    # --- model (main_dino.py) ---
    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 65536
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    use_bn_in_head: bool = False
    # --- temperature teacher (main_dino.py) ---
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    # The reference's help text says 30, its default is 0: we keep the default.
    warmup_teacher_temp_epochs: int = 0
    # --- training / optimisation (main_dino.py) ---
    use_fp16: bool = True
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    batch_size_per_gpu: int = 64
    epochs: int = 100
    freeze_last_layer: float = 1  # epochs; a fraction (0.1) freezes part of one (dino-ray: the reference's is an int)
    lr: float = 0.0005
    warmup_epochs: float = 10  # epochs; fractions allowed (dino-ray: the reference's is an int)
    min_lr: float = 1e-6
    optimizer: str = "adamw"
    drop_path_rate: float = 0.1
    # --- multi-crop (main_dino.py) ---
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    # --- misc (main_dino.py) ---
    data_path: str = "/path/to/imagenet/train/"
    output_dir: str = "."
    saveckp_freq: int = 20
    seed: int = 0
    num_workers: int = 10
    # --- dino-ray additions ---
    global_crops_size: int = 224  # the reference hard-codes 224
    local_crops_size: int = 96  # the reference hard-codes 96
    blur_radius: tuple[float, float] = (0.1, 2.0)  # PIL blur radius range; the reference hard-codes (0.1, 2.0)
    color_jitter_prob: float = 0.8  # the reference hard-codes these two
    grayscale_prob: float = 0.2
    embed_dim: Optional[int] = None  # ViT width/depth/heads override, for CPU-sized models
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    head_hidden_dim: int = 2048  # DINOHead sizes; the reference hard-codes these
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    use_bf16: bool = False  # bf16 autocast instead of fp16 + GradScaler (CUDA only)
    fused_attn: bool = True  # timm's SDPA attention; False uses the explicit softmax(QK^T)V
    fused_optimizer: bool = False  # torch's fused AdamW/SGD kernels
    channels_last: bool = True  # convolutional backbones in channels-last memory: same math, ~1.3x faster on CPU
    torch_compile: bool = False  # torch.compile the student and teacher
    sync_bn: bool = True  # BatchNorm statistics over all ranks' images, as the reference (SyncBatchNorm; gloo on CPU)
    profile_allreduce: bool = False  # time the gradient all-reduce apart from compute (synchronous: for measuring)
    # --- continued pretraining (dino-ray) ---
    init_from: Optional[str] = None  # start a new run from these weights: a full checkpoint, a backbone, a run...
    # epochs the backbone stays frozen while a fresh head learns; None: 1 when init_from gives a backbone only
    freeze_backbone_epochs: Optional[float] = None
    max_images: Optional[int] = None  # use only the first N images of data_path
    data_loader: str = "torch"  # torch: DataLoader + DistributedSampler (the reference); ray_data: Ray Data tasks
    augmentation: str = "reference"  # reference: PIL image by image; batched: tensor ops on a batch (same views)
    log_freq: int = 10  # iterations between per-iteration metrics (progress bar, MLflow iter/*)
    # --- short runs and small images (dino-ray; the defaults are the reference's behaviour) ---
    stem: str = "default"  # small / small_stride2: 3x3 ResNet stem without max-pool; conv: ViT conv stem
    width: float = 1.0  # ResNet stage widths x this
    epoch_length: Optional[int] = None  # iterations per epoch (dinov2's OFFICIAL_EPOCH_LENGTH); None: the dataset
    budget_minutes: Optional[float] = None  # size the run (epoch_length) to end its schedule within these minutes
    # the centre-crop size evaluations see (k-NN monitor and jobs, embeddings, exports); None: global_crops_size.
    # Above the crop size pays: random-resized crops show objects larger than a whole image does (FixRes)
    eval_image_size: Optional[int] = None
    momentum_teacher_end: float = 1.0  # the teacher momentum's cosine ends here (the reference: 1)
    centering: str = "centering"  # or sinkhorn_knopp (DINOv2): how the teacher's output is centred
    koleo_loss_weight: float = 0.0  # DINOv2's KoLeo regulariser on the student's global-view features (it uses 0.1)
    # --- Ray and MLflow, in sections named after Ray's own objects ---
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    failure: FailureSection = field(default_factory=FailureSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    ray_data: RayDataSection = field(default_factory=RayDataSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values; sections as nested dicts."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def eval_size(self) -> int:
        """The image size evaluations of this run's backbone see."""
        return self.eval_image_size or self.global_crops_size

    def vit_kwargs(self) -> dict[str, int]:
        """The ViT shape overrides that are set, as keyword arguments for ``build_backbone``."""
        return {k: getattr(self, k) for k in VIT_SHAPE_KEYS if getattr(self, k) is not None}


_HINTS = {k: v for k, v in get_type_hints(DINOConfig).items() if k not in SECTIONS}
_HINTS.update({f"{name}.{k}": v for name, cls in SECTIONS.items() for k, v in get_type_hints(cls).items()})


def _model_problems(cfg: DINOConfig) -> list[str]:
    """The architecture, its small-image options and the head."""
    problems = one_of("stem", cfg.stem, STEMS) + (["width must be > 0"] if cfg.width <= 0 else [])
    if cfg.arch in VIT_ARCHS:
        if cfg.stem not in ("default", "conv") or cfg.width != 1.0:
            problems.append(f"arch '{cfg.arch}' takes stem default or conv and width 1, got {cfg.stem}, {cfg.width}")
        problems += [f"{key} ({getattr(cfg, key)}) is not a multiple of patch_size ({cfg.patch_size})"
                     for key in ("global_crops_size", "local_crops_size", "eval_image_size")
                     if (getattr(cfg, key) or 0) % cfg.patch_size]
    else:
        from dino_ray.core.models.backbones import torchvision_archs

        if cfg.arch not in torchvision_archs():
            problems.append(f"arch '{cfg.arch}' is unknown (choose from {', '.join(VIT_ARCHS)} or a torchvision "
                            f"architecture such as resnet18, resnet50)")
        elif cfg.stem == "conv":
            problems.append(f"stem 'conv' is for ViTs; arch '{cfg.arch}' takes default, small or small_stride2")
        elif cfg.width != 1.0 and not cfg.arch.startswith("resnet"):
            problems.append(f"width {cfg.width} is for ResNet archs, not '{cfg.arch}'")
    return problems + below(cfg, ("drop_path_rate",), 0) + below(cfg, (
        "patch_size", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers"), 1)


def _schedule_problems(cfg: DINOConfig) -> list[str]:
    """The optimiser, the loss and their schedules."""
    problems = one_of("optimizer", cfg.optimizer, OPTIMIZERS) + one_of("centering", cfg.centering, CENTERINGS)
    problems += [f"{key} must be in [0, 1], got {getattr(cfg, key)}" for key in ("momentum_teacher",
                                                                                 "momentum_teacher_end")
                 if not 0 <= getattr(cfg, key) <= 1]
    problems += [f"{key} ({getattr(cfg, key)}) exceeds epochs ({cfg.epochs})"
                 for key in ("warmup_epochs", "warmup_teacher_temp_epochs") if getattr(cfg, key) > cfg.epochs]
    if cfg.budget_minutes is not None and cfg.budget_minutes <= 0:
        problems.append(f"budget_minutes must be > 0 or null, got {cfg.budget_minutes}")
    if cfg.budget_minutes is not None and cfg.data_loader == "ray_data":
        problems.append("budget_minutes sizes the DataLoader's epochs (epoch_length); with data_loader: ray_data an "
                        "epoch is a whole pass over the data: set epochs instead, or data_loader: torch")
    return problems + below(cfg, ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad",
                                  "warmup_teacher_temp", "teacher_temp", "koleo_loss_weight", "warmup_epochs",
                                  "freeze_last_layer", "warmup_teacher_temp_epochs"), 0) + \
        below(cfg, ("batch_size_per_gpu", "epochs", "epoch_length"), 1)


def _data_problems(cfg: DINOConfig) -> list[str]:
    """The input pipeline and the multi-crop views."""
    problems = one_of("data_loader", cfg.data_loader, DATA_LOADERS) + \
        one_of("augmentation", cfg.augmentation, AUGMENTATIONS)
    if cfg.epoch_length is not None and cfg.data_loader != "torch":
        problems.append("epoch_length needs data_loader: torch (Ray Data streams whole epochs)")
    problems += [f"{key} must be in [0, 1], got {getattr(cfg, key)}" for key in ("color_jitter_prob",
                                                                                 "grayscale_prob")
                 if not 0 <= getattr(cfg, key) <= 1]
    if not 0 <= cfg.blur_radius[0] <= cfg.blur_radius[1]:
        problems.append(f"blur_radius must satisfy 0 <= min <= max, got {list(cfg.blur_radius)}")
    for key in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(cfg, key)
        if not 0 < lo <= hi <= 1:
            problems.append(f"{key} must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    if cfg.local_crops_scale[1] > cfg.global_crops_scale[0]:  # the reference's pairs meet: (0.05, 0.4), (0.4, 1)
        problems.append(f"local_crops_scale {list(cfg.local_crops_scale)} is above global_crops_scale "
                        f"{list(cfg.global_crops_scale)}: the largest local crop must not exceed the smallest global "
                        f"one")
    return problems + below(cfg, ("local_crops_number", "num_workers", "saveckp_freq"), 0) + \
        below(cfg, ("global_crops_size", "local_crops_size", "eval_image_size", "max_images"), 1)


def _validate(cfg: DINOConfig) -> None:
    """Every problem of every group and section, in one error."""
    problems = _model_problems(cfg) + _schedule_problems(cfg) + _data_problems(cfg)
    for name in SECTIONS:
        problems += [p if p.startswith(f"{name}.") else f"{name}.{p}" for p in getattr(cfg, name).problems()]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def data_root() -> Path:
    """Where datasets live: ``DINO_RAY_DATA``, by default ``~/.cache/dino-ray``. A config names a dataset inside it
    as ``${DINO_RAY_DATA}/...`` (the shipped recipes do), so one setting moves every recipe's data."""
    return Path(os.environ.get(DATA_ROOT) or Path.home() / ".cache" / "dino-ray").expanduser()


def expand_data_root(values: dict[str, Any]) -> dict[str, Any]:
    """``${DINO_RAY_DATA}`` in the string values replaced by the data root."""
    marker = "${" + DATA_ROOT + "}"
    return {k: v.replace(marker, str(data_root())) if isinstance(v, str) else v for k, v in values.items()}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "global_crops_scale=[0.3,1]"]`` -> ``{"lr": 0.001, ...}`` (values parsed as YAML)."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """``{"scaling": {"num_workers": 2}}`` -> ``{"scaling.num_workers": 2}``; flat keys pass through."""
    flat = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def build_config(values: dict[str, Any], source: str = "config") -> DINOConfig:
    """Make a validated config from a mapping (sections nested or dotted); unknown keys are an error."""
    flat = flatten(values)
    unknown_keys(flat, _HINTS, source)
    coerced = {k: coerce(k, v, _HINTS[k]) for k, v in flat.items()}
    sections = {name: cls(**{k.split(".", 1)[1]: v for k, v in coerced.items() if k.startswith(name + ".")})
                for name, cls in SECTIONS.items()}
    cfg = DINOConfig(**{k: v for k, v in coerced.items() if "." not in k}, **sections)
    _validate(cfg)
    return cfg


def recipes(folder: str = "") -> list[str]:
    """The names of the recipes the package ships in ``folder`` (``dino_ray/recipes/*.yaml``: the paper's runs, the
    CPU recipes; ``sweeps``: the sweeps)."""
    return sorted(path.stem for path in (RECIPES / folder).glob("*.yaml"))


def recipe_path(name_or_path: str | Path, folder: str = "") -> Path:
    """A config file: a path, or the name of a shipped recipe in ``folder`` (``cifar10_cpu``; a sweep's name with
    ``folder="sweeps"``), so that the recipes work from an installed package as from the checkout."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES / folder / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(f"config file '{name_or_path}' does not exist, nor is it a shipped recipe "
                      f"({', '.join(recipes(folder))})")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> DINOConfig:
    """Defaults <- YAML file at ``path`` (or a shipped recipe's name) <- ``key=value`` overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = recipe_path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
        values.update(flatten(loaded))
        source = str(path)
    values.update(flatten(parse_overrides(overrides or [])))
    return build_config(expand_data_root(values), source)


def save_config(cfg: DINOConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["DINOConfig", "ConfigError", "load_config", "build_config", "save_config", "parse_overrides",
           "ARCHS", "OPTIMIZERS"]
