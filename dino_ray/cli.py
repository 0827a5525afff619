"""``dino-ray``: one subcommand per job, its flags generated from the job's arguments dataclass.

Each flag's name, type, default and help come from the dataclass field (``dino_ray.core.args.arg``), so a
default is stated once; a flag not given is left out and the dataclass default applies. The command line
answers ``--help``, and refuses bad arguments, before torch, Ray or MLflow are imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from types import UnionType
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from dino_ray.core.args import RunFailed, build_args

log = logging.getLogger("dino_ray")

# name: (help, "module:ArgsClass", "module:job function"); the evaluations' modules import torch only when run.
COMMANDS = {
    "quickstart": ("a small DINO pretraining on local Ray, k-NN and attention maps, all in MLflow",
                   "dino_ray.jobs.quickstart:QuickstartArgs", "dino_ray.jobs.quickstart:quickstart_job"),
    "pretrain": ("DINO pretraining (main_dino.py) from a YAML config, on Ray Train",
                 "dino_ray.jobs.pretrain:PretrainArgs", "dino_ray.jobs.pretrain:pretrain_job"),
    "sweep": ("Ray Tune sweep of config keys, ranked by the k-NN monitor",
              "dino_ray.jobs.sweep:SweepArgs", "dino_ray.jobs.sweep:sweep_job"),
    "sync-tracking": ("replay the MLflow calls a run left on disk while its server was away",
                      "dino_ray.jobs.sync_tracking:SyncTrackingArgs", "dino_ray.jobs.sync_tracking:sync_tracking_job"),
    "convert-data": ("image files into Parquet shards",
                     "dino_ray.jobs.convert:ConvertArgs", "dino_ray.jobs.convert:convert_data_job"),
    "export": ("the teacher backbone as safetensors, TorchScript or ONNX, with a JSON of what it needs",
               "dino_ray.jobs.export:ExportArgs", "dino_ray.jobs.export:export_job"),
    "embed": ("embeddings of a folder of images (Parquet), or the nearest images of a query",
              "dino_ray.jobs.embed:EmbedArgs", "dino_ray.jobs.embed:embed_job"),
    "eval-knn": ("weighted k-NN evaluation (eval_knn.py) of frozen features",
                 "dino_ray.jobs.knn:KnnArgs", "dino_ray.jobs.knn:knn_job"),
    "eval-linear": ("linear probe on frozen features (eval_linear.py), on Ray Train",
                    "dino_ray.eval.args:LinearArgs+dino_ray.jobs.linear:LinearLaunch",
                    "dino_ray.jobs.linear:linear_job"),
    "eval-retrieval": ("image retrieval (eval_image_retrieval.py): revisited Oxford / Paris, or any labelled images",
                       "dino_ray.jobs.retrieval:RetrievalArgs", "dino_ray.jobs.retrieval:retrieval_job"),
    "eval-copy-detection": ("copy detection (eval_copy_detection.py): Copydays, or copies made from any images",
                            "dino_ray.jobs.copy_detection:CopyDetectionArgs",
                            "dino_ray.jobs.copy_detection:copy_detection_job"),
    "eval-video-segmentation": ("DAVIS-2017 label propagation (eval_video_segmentation.py)",
                                "dino_ray.jobs.video_segmentation:VideoSegmentationArgs",
                                "dino_ray.jobs.video_segmentation:video_segmentation_job"),
    "visualize-attention": ("last-block CLS attention maps (visualize_attention.py)",
                            "dino_ray.jobs.attention:AttentionArgs", "dino_ray.jobs.attention:attention_job"),
    "attention-video": ("CLS attention of every frame of a video (video_generation.py)",
                        "dino_ray.jobs.attention:AttentionVideoArgs", "dino_ray.jobs.attention:attention_video_job"),
}


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true / false)")


def _plain(hint: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    if get_origin(hint) in (Union, UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return hint


def add_fields(parser: argparse.ArgumentParser, cls: type, taken: set[str]) -> None:
    """One flag (or positional) per field of ``cls`` not in ``taken``: type, default and help from the field."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in taken or get_origin(_plain(hints[field.name])) is dict or _plain(hints[field.name]) is dict:
            continue
        taken.add(field.name)
        hint, meta = _plain(hints[field.name]), field.metadata
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        flag_only = hint is bool and not meta.get("value")  # --dry-run, --no-ray: their name says it
        shown = "" if flag_only or default in (None, "", []) or "default" in meta.get("help", "") \
            else f" (default: {default})"
        options: dict[str, Any] = {"help": meta.get("help", "") + shown, "default": argparse.SUPPRESS}
        if flag_only:
            options["action"] = "store_false" if default else "store_true"
        elif get_origin(hint) is list:
            options.update(type=get_args(hint)[0], nargs="*" if meta.get("positional") else "+")
        else:
            options["type"] = _bool if hint is bool else hint
        if meta.get("positional"):
            options.pop("default") if options.get("nargs") != "*" else None
            options["nargs"] = options.get("nargs", "?")
            parser.add_argument(field.name, **options)
        else:
            parser.add_argument(meta.get("flag", f"--{field.name}"), dest=field.name, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dino-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, classes, job) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        taken: set[str] = set()
        for cls in classes.split("+"):
            add_fields(command, _load(cls), taken)
        command.set_defaults(classes=classes, job=job)
    return parser


def run(args: argparse.Namespace) -> Any:
    """Make each arguments dataclass from the parsed flags (checked as it is made), then call the job."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "classes", "job")}
    made = []
    for cls in map(_load, args.classes.split("+")):
        names = {f.name for f in dataclasses.fields(cls)}
        made.append(build_args(cls, {k: v for k, v in values.items() if k in names}, f"dino-ray {args.command}"))
    return _load(args.job)(*made)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # OSError: missing files, full disks, no server
        log.error("%s", exc)
        return 2
    except RunFailed as exc:
        log.error("the run failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
