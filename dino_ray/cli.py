"""``dino-ray`` command line: thin subcommands that parse arguments and call one function each."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("dino_ray")


def _pretrain(args: argparse.Namespace) -> None:
    from dino_ray.config import load_config
    from dino_ray.train.loop import train_dino

    cfg = load_config(args.config, args.overrides)
    if "://" not in cfg.data_path and not Path(cfg.data_path).exists():
        raise FileNotFoundError(f"data_path '{cfg.data_path}' does not exist")
    if args.no_ray:
        stats = train_dino(cfg, resume_from=args.resume_from)
        log.info("done: %s; checkpoints and log.txt in %s", json.dumps(stats), Path(cfg.output_dir).resolve())
        return
    from dino_ray.train.ray_trainer import pretrain_on_ray

    result = pretrain_on_ray(cfg, resume_from=args.resume_from)
    log.info("done: %s; checkpoints in %s", json.dumps(result.metrics), result.path)


def _eval_knn(args: argparse.Namespace) -> None:
    from dino_ray.data.augment import eval_transform
    from dino_ray.data.datasets import build_dataset
    from dino_ray.eval.features import backbone_from_weights
    from dino_ray.eval.knn import evaluate_knn

    backbone, shape = backbone_from_weights(args.pretrained_weights, args.arch, args.patch_size,
                                            args.checkpoint_key, embed_dim=args.embed_dim, depth=args.depth,
                                            num_heads=args.num_heads)
    image_size = args.image_size or shape["image_size"]
    transform = eval_transform(image_size, args.resize_size)
    train_set = val_set = None
    if args.load_features:
        log.info("k-NN: %s on features from %s", shape, args.load_features)
    else:
        train_path = args.train_data_path or Path(args.data_path) / "train"
        val_path = args.val_data_path or Path(args.data_path) / "val"
        train_set = build_dataset(train_path, transform, args.max_train_images)
        val_set = build_dataset(val_path, transform, args.max_val_images)
        log.info("k-NN: %s on %d train / %d val images (%s, %s)", shape, len(train_set), len(val_set), train_path,
                 val_path)
    results = evaluate_knn(backbone, train_set, val_set, args.nb_knn, args.temperature, args.batch_size_per_gpu,
                           args.num_workers, args.dump_features, args.load_features)
    for k, (top1, top5) in results.items():
        print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"weights": str(args.pretrained_weights), **shape, "temperature": args.temperature,
                  "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}}
        (out / "knn.json").write_text(json.dumps(record, indent=2))
        log.info("k-NN results written to %s", out / "knn.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dino-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="DINO pretraining (main_dino.py) from a YAML config, on Ray Train")
    p.add_argument("--config", help="YAML file of main_dino.py flags (experiments/*.yaml)")
    p.add_argument("--resume-from", dest="resume_from", help="checkpoint .pth to resume from (default: the run's "
                   "latest checkpoint when one exists)")
    p.add_argument("--no-ray", dest="no_ray", action="store_true", help="run the loop in this process, without Ray")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-3 epochs=10")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("eval-knn", help="weighted k-NN evaluation (eval_knn.py) of frozen features")
    p.add_argument("--pretrained_weights", required=True, help="a dino-ray/official checkpoint or backbone file")
    p.add_argument("--checkpoint_key", default="teacher", help='"teacher" or "student" in full checkpoints')
    p.add_argument("--arch", default=None, help="default: from the checkpoint's args, else vit_small")
    p.add_argument("--patch_size", type=int, default=None, help="default: from the checkpoint's args, else 16")
    p.add_argument("--embed_dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--num_heads", type=int, default=None)
    p.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch_size_per_gpu", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=10)
    p.add_argument("--data_path", default="/path/to/imagenet/", help="folder with train/ and val/")
    p.add_argument("--train_data_path", default=None, help="overrides data_path/train (ImageFolder or Parquet)")
    p.add_argument("--val_data_path", default=None, help="overrides data_path/val")
    p.add_argument("--max_train_images", type=int, default=None)
    p.add_argument("--max_val_images", type=int, default=None)
    p.add_argument("--image_size", type=int, default=None, help="centre-crop size (default: pretraining's)")
    p.add_argument("--resize_size", type=int, default=None, help="resize before the crop (default: 256/224 x)")
    p.add_argument("--dump_features", default=None, help="folder to save the features in")
    p.add_argument("--load_features", default=None, help="folder to load saved features from")
    p.add_argument("--output_dir", default=None, help="where knn.json goes")
    p.set_defaults(func=_eval_knn)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
