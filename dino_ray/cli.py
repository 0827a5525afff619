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

    cfg = load_config(args.config, args.overrides)  # its errors before torch is imported
    from dino_ray.storage import fetch, is_uri
    from dino_ray.train.loop import train_dino

    if args.dry_run:
        _dry_run(cfg, args)
        return
    if not is_uri(cfg.data_path) and not Path(cfg.data_path).exists():
        raise FileNotFoundError(f"data_path '{cfg.data_path}' does not exist")
    if args.resume_from and is_uri(args.resume_from):  # a checkpoint on cloud storage: read it back first
        args.resume_from = str(fetch(args.resume_from, Path(cfg.output_dir) / "resume"))
    if args.no_ray:
        stats = train_dino(cfg, resume_from=args.resume_from)
        log.info("done: %s; checkpoints and log.txt in %s", json.dumps(stats), Path(cfg.output_dir).resolve())
        return
    from dino_ray.train.ray_trainer import pretrain_on_ray

    result = pretrain_on_ray(cfg, resume_from=args.resume_from)
    log.info("done: %s; checkpoints in %s", json.dumps(result.metrics), result.path)


def _sweep(args: argparse.Namespace) -> None:
    from dino_ray.sweep import format_table, load_sweep, resume_sweep, run_sweep

    if args.resume:
        spec, rows = resume_sweep(args.resume, args.storage_path or "outputs/sweeps")
    else:
        if not args.spec:
            raise ValueError("give a sweep file (experiments/sweeps/*.yaml) or --resume NAME")
        spec = load_sweep(args.spec, args.overrides)
        spec.storage_path = args.storage_path or spec.storage_path
        rows = run_sweep(spec)
    print(format_table(spec, rows))
    if all(row["status"] == "ERROR" for row in rows):
        raise ValueError(f"every trial of sweep '{spec.name}' failed: see the errors above and "
                         f"{spec.storage_path}/{spec.name}/tune")
    best = rows[0]
    print(f"best: {best['trial']} ({spec.metric} {best[spec.metric]:.2f}); checkpoint: {best['checkpoint']}")


def _sync_tracking(args: argparse.Namespace) -> None:
    from dino_ray.tracking import sync_tracking

    print(json.dumps(sync_tracking(args.folder, args.tracking_uri, args.wait_s)))


def _convert_data(args: argparse.Namespace) -> None:
    from dino_ray.data.convert import convert_images

    summary = convert_images(args.source, args.target, args.rows_per_shard, use_ray=not args.no_ray)
    print(json.dumps(summary))


def _dry_run(cfg, args: argparse.Namespace) -> None:
    """Print the resolved config and what the run will cost; touch no cluster and no data beyond counting it."""
    import yaml

    from dino_ray.data.datasets import build_dataset
    from dino_ray.storage import is_uri
    from dino_ray.train.plan import IMAGENET_TRAIN_IMAGES, PAPER_IMAGES_PER_S_PER_GPU, plan_run

    num_images, counted = args.num_images, "given"
    if num_images is None and not is_uri(cfg.data_path) and Path(cfg.data_path).exists():
        num_images, counted = len(build_dataset(cfg.data_path, max_images=cfg.max_images)), f"in {cfg.data_path}"
    if num_images is None:
        num_images, counted = IMAGENET_TRAIN_IMAGES, "ImageNet-1k train (data_path not readable here)"
    rate = args.images_per_s or PAPER_IMAGES_PER_S_PER_GPU
    plan = plan_run(cfg, num_images, rate)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"world size {plan['world_size']} x batch {plan['batch_size_per_gpu']} = total batch {plan['total_batch']}; "
          f"lr {plan['lr']} -> {plan['scaled_lr']:.6g} (x total batch / 256)")
    print(f"{plan['num_images']:,} images ({counted}): {plan['iterations_per_epoch']:,} iterations per epoch, "
          f"{plan['total_iterations']:,} over {cfg.epochs} epochs")
    source = "given" if args.images_per_s else "the paper's ViT-S/16 figure, Table 8"
    print(f"at {plan['images_per_s_per_gpu']} images/s per GPU ({source}): {plan['gpu_hours']:,} GPU-hours, "
          f"{plan['wall_hours']:,} hours on {plan['world_size']} GPUs")


def _vit_shape(args: argparse.Namespace) -> dict[str, int]:
    return {k: getattr(args, k) for k in ("embed_dim", "depth", "num_heads") if getattr(args, k)}


def _eval_knn(args: argparse.Namespace) -> None:
    from dino_ray.jobs.common import from_namespace
    from dino_ray.jobs.knn import KnnArgs, knn_job

    knn_job(from_namespace(KnnArgs, args))


def _eval_linear(args: argparse.Namespace) -> None:
    from dino_ray.eval.linear_args import LinearArgs
    from dino_ray.jobs.common import from_namespace
    from dino_ray.jobs.linear import LinearLaunch, linear_job

    data = {name: getattr(args, f"{name}_data_path") or str(Path(args.data_path) / name) for name in ("train", "val")}
    linear_job(from_namespace(LinearArgs, args, vit_shape=_vit_shape(args), train_data_path=data["train"],
                              val_data_path=data["val"]), from_namespace(LinearLaunch, args))


def _visualize_attention(args: argparse.Namespace) -> None:
    from dino_ray.jobs.attention import AttentionArgs, attention_job
    from dino_ray.jobs.common import from_namespace

    attention_job(from_namespace(AttentionArgs, args))


def _eval_retrieval(args: argparse.Namespace) -> None:
    from dino_ray.jobs.common import from_namespace
    from dino_ray.jobs.retrieval import RetrievalArgs, retrieval_job

    retrieval_job(from_namespace(RetrievalArgs, args))


def _eval_copy_detection(args: argparse.Namespace) -> None:
    from dino_ray.jobs.common import from_namespace
    from dino_ray.jobs.copy_detection import CopyDetectionArgs, copy_detection_job

    copy_detection_job(from_namespace(CopyDetectionArgs, args))


def _eval_video_segmentation(args: argparse.Namespace) -> None:
    from dino_ray.jobs.common import from_namespace
    from dino_ray.jobs.video_segmentation import VideoSegmentationArgs, video_segmentation_job

    video_segmentation_job(from_namespace(VideoSegmentationArgs, args))


def _attention_video(args: argparse.Namespace) -> None:
    from dino_ray.jobs.attention import AttentionVideoArgs, attention_video_job
    from dino_ray.jobs.common import from_namespace

    attention_video_job(from_namespace(AttentionVideoArgs, args))


def _weights_flags(p: argparse.ArgumentParser) -> None:
    """How every eval names its weights (see dino_ray.eval.weights)."""
    p.add_argument("--pretrained_weights", required=True, help="a checkpoint file (dino-ray or official, full or "
                   "backbone-only) or its s3:// / gs:// URI, a pretraining's MLflow run id (or runs:/<id>), or "
                   "dino_vits16 / dino_vitb8 / ...")
    p.add_argument("--checkpoint", default=None, help="with a run id: which logged checkpoint, e.g. "
                   "checkpoint0040.pth (default: the latest, checkpoint.pth)")
    p.add_argument("--checkpoint_key", default="teacher", help='"teacher" or "student" in full checkpoints')
    p.add_argument("--arch", default=None, help="default: from the checkpoint's args, else vit_small")
    p.add_argument("--patch_size", type=int, default=None, help="default: from the checkpoint's args, else 16")
    p.add_argument("--embed_dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--num_heads", type=int, default=None)
    p.add_argument("--tracking_uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else the "
                   "pretraining's store, else sqlite under --output_dir)")


def _data_flags(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--data_path", default="/path/to/imagenet/", help="folder with train/ and val/")
    p.add_argument("--train_data_path", default=None, help="overrides data_path/train (ImageFolder or Parquet)")
    p.add_argument("--val_data_path", default=None, help="overrides data_path/val")
    p.add_argument("--max_train_images", type=int, default=None)
    p.add_argument("--max_val_images", type=int, default=None)
    p.add_argument("--batch_size_per_gpu", type=int, default=batch_size)
    p.add_argument("--num_workers", type=int, default=10, help="data-loading processes")
    p.add_argument("--no-ray", dest="use_ray", action="store_false", help="run in this process, without Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dino-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="DINO pretraining (main_dino.py) from a YAML config, on Ray Train")
    p.add_argument("--config", help="YAML file of main_dino.py flags (experiments/*.yaml)")
    p.add_argument("--resume-from", dest="resume_from", help="checkpoint .pth to resume from: a file, an "
                   "s3:// or gs:// URI, or an MLflow run id (default: the run's latest checkpoint when one exists)")
    p.add_argument("--no-ray", dest="no_ray", action="store_true", help="run the loop in this process, without Ray")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the resolved config, world size, "
                   "total batch, scaled lr, iterations per epoch and estimated GPU-hours; run nothing")
    p.add_argument("--num_images", type=int, default=None, help="with --dry-run: dataset size (default: count "
                   "data_path, else ImageNet-1k's 1,281,167)")
    p.add_argument("--images_per_s", type=float, default=None, help="with --dry-run: measured images/s per GPU "
                   "(default: the paper's ViT-S/16 figure, about 92)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-3 epochs=10")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("sweep", help="Ray Tune sweep of config keys, ranked by the k-NN monitor")
    p.add_argument("spec", nargs="?", help="sweep file, e.g. experiments/sweeps/cifar10_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. epochs=2")
    p.add_argument("--resume", default=None, metavar="NAME", help="continue the interrupted sweep NAME")
    p.add_argument("--storage_path", default=None, help="where sweeps live (default: the file's, else outputs/sweeps)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("sync-tracking", help="replay the MLflow calls a run left on disk while its server was away")
    p.add_argument("folder", help="the folder holding mlflow_queue.json (a run's output_dir/mlflow_queue, or a "
                   "checkpoint folder)")
    p.add_argument("--tracking_uri", default=None, help="default: the server the run was using")
    p.add_argument("--wait_s", type=float, default=60.0, help="how long to wait for an unreachable server")
    p.set_defaults(func=_sync_tracking)

    p = sub.add_parser("convert-data", help="an ImageFolder tree or a list of image files into Parquet shards")
    p.add_argument("source", help="ImageFolder root (<root>/<class>/<files>) or a text file of image paths")
    p.add_argument("target", help="folder for part-NNNNN.parquet, _plan.json and _skipped.csv (resumable)")
    p.add_argument("--rows_per_shard", type=int, default=1000)
    p.add_argument("--no-ray", dest="no_ray", action="store_true", help="convert in this process, without Ray")
    p.set_defaults(func=_convert_data)

    p = sub.add_parser("eval-knn", help="weighted k-NN evaluation (eval_knn.py) of frozen features")
    _weights_flags(p)
    _data_flags(p, 128)
    p.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--image_size", type=int, default=None, help="centre-crop size (default: pretraining's)")
    p.add_argument("--resize_size", type=int, default=None, help="resize before the crop (default: 256/224 x)")
    p.add_argument("--num_shards", type=int, default=None, help="Ray tasks per split (default: one per CPU/GPU)")
    p.add_argument("--dump_features", default=None, help="folder to save the features in (Parquet)")
    p.add_argument("--load_features", default=None, help="folder to load saved features from")
    p.add_argument("--output_dir", default="outputs/knn", help="where knn.json goes")
    p.set_defaults(func=_eval_knn)

    p = sub.add_parser("eval-retrieval", help="image retrieval (eval_image_retrieval.py): revisited Oxford / "
                       "Paris, or any labelled image set")
    _weights_flags(p)
    p.add_argument("--data_path", required=True, help="with --dataset: the folder holding <dataset>/jpg/*.jpg and "
                   "<dataset>/gnd_<dataset>.pkl; without: labelled images (ImageFolder or Parquet)")
    p.add_argument("--dataset", choices=["roxford5k", "rparis6k"], default=None, help="the revisited protocol "
                   "(medium and hard mAP); default: the generic mode (mAP and recall@k, relevant = same label)")
    p.add_argument("--multiscale", action="store_true", help="descriptors averaged over 1, 1/sqrt(2), 1/2 scales")
    p.add_argument("--imsize", type=int, default=224, help="with --dataset: the longer side of every image")
    p.add_argument("--image_size", type=int, default=None, help="generic mode: centre-crop size (default: "
                   "pretraining's)")
    p.add_argument("--max_images", type=int, default=None, help="generic mode: the first N images only")
    p.add_argument("--recall_at", type=int, nargs="+", default=[1, 5, 10], help="k of recall@k and mP@k")
    p.add_argument("--batch_size_per_gpu", type=int, default=128)
    p.add_argument("--output_dir", default="outputs/retrieval", help="where retrieval.json goes")
    p.set_defaults(func=_eval_retrieval)

    p = sub.add_parser("eval-copy-detection", help="copy detection (eval_copy_detection.py): Copydays, or copies "
                       "made here from any image set")
    _weights_flags(p)
    p.add_argument("--data_path", required=True, help="with --dataset copydays: the folder holding original/, "
                   "strong/, jpegqual/<q>/, crops/<p>/; without: images to copy (ImageFolder, Parquet or a folder)")
    p.add_argument("--dataset", choices=["copydays"], default=None, help="default: the generic mode")
    p.add_argument("--whitening_path", default=None, help="images the PCA whitening is learned on (generic mode "
                   "default: the images after the originals)")
    p.add_argument("--distractors_path", default=None, help="images added to the database")
    p.add_argument("--imsize", type=int, default=320, help="images are resized to imsize x imsize")
    p.add_argument("--num_originals", type=int, default=None, help="generic mode: originals (default: half)")
    p.add_argument("--max_images", type=int, default=None, help="generic mode: the first N images only")
    p.add_argument("--edits", nargs="+", default=None, help="generic mode: the edits to make copies with, of crop, "
                   "jpeg, colour, blur, rotation, strong (default: all)")
    p.add_argument("--seed", type=int, default=0, help="generic mode: the copies' random edits")
    p.add_argument("--batch_size_per_gpu", type=int, default=128)
    p.add_argument("--output_dir", default="outputs/copy_detection", help="where copy_detection.json goes")
    p.set_defaults(func=_eval_copy_detection)

    p = sub.add_parser("eval-video-segmentation", help="DAVIS-2017 label propagation (eval_video_segmentation.py)")
    _weights_flags(p)
    p.add_argument("--data_path", required=True, help="DAVIS-2017 root: JPEGImages/480p/, Annotations/480p/, "
                   "ImageSets/2017/val.txt")
    p.add_argument("--videos", nargs="+", default=None, help="default: those of ImageSets/2017/val.txt")
    p.add_argument("--size", type=int, default=480, help="frames' shorter side (the longer rounded down to 64)")
    p.add_argument("--n_last_frames", type=int, default=7, help="previous frames propagated from")
    p.add_argument("--size_mask_neighborhood", type=int, default=12, help="patches apart a label may travel")
    p.add_argument("--topk", type=int, default=5, help="source patches kept per target patch")
    p.add_argument("--output_dir", default="outputs/davis", help="predicted masks <video>/NNNNN.png, davis.json")
    p.set_defaults(func=_eval_video_segmentation)

    p = sub.add_parser("attention-video", help="CLS attention of every frame of a video (video_generation.py)")
    _weights_flags(p)
    p.add_argument("--input_path", required=True, help="a video file or a folder of frames")
    p.add_argument("--output_path", default="outputs/attention_video", help="the video and frames/ go here")
    p.add_argument("--threshold", type=float, default=0.6, help="keep this share of the attention mass (0 or "
                   "less: no threshold)")
    p.add_argument("--heads", choices=["mean", "all"], default="mean", help="the head mean, or every head in a grid")
    p.add_argument("--resize", type=int, nargs="+", default=None, help="frames' shorter side, or h w (default: "
                   "as they are)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the video's; 30 for a "
                   "frame folder)")
    p.add_argument("--batch_size", type=int, default=8, help="frames per forward pass")
    p.add_argument("--video_only", action="store_true", help="do not keep the rendered frames")
    p.add_argument("--no-mlflow", dest="track", action="store_false", help="only write the files")
    p.set_defaults(func=_attention_video)

    p = sub.add_parser("eval-linear", help="linear probe on frozen features (eval_linear.py), on Ray Train")
    _weights_flags(p)
    _data_flags(p, 128)
    p.add_argument("--n_last_blocks", type=int, default=4, help="CLS tokens of the last n blocks (4 for ViT-S, "
                   "1 for ViT-B in the paper)")
    p.add_argument("--avgpool_patchtokens", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="also the patch-token mean, interleaved with the last CLS token (True for ViT-B)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.001, help="per 256 images")
    p.add_argument("--val_freq", type=int, default=1)
    p.add_argument("--num_labels", type=int, default=1000)
    p.add_argument("--crop_size", type=int, default=224)
    p.add_argument("--resize_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="only evaluate a saved head (--head_weights, default "
                   "output_dir/linear_head.pth)")
    p.add_argument("--head_weights", default=None)
    p.add_argument("--ray_workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--max_failures", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/linear")
    p.set_defaults(func=_eval_linear)

    p = sub.add_parser("visualize-attention", help="last-block CLS attention maps (visualize_attention.py)")
    _weights_flags(p)
    p.add_argument("--image_path", nargs="+", required=True, help="one or more image files")
    p.add_argument("--image_size", type=int, nargs="+", default=[480, 480], help="resize to (h w) or shorter side")
    p.add_argument("--threshold", type=float, default=None, help="keep this fraction of the attention mass")
    p.add_argument("--output_dir", default="outputs/attention")
    p.add_argument("--no-mlflow", dest="track", action="store_false", help="only write the PNGs")
    p.set_defaults(func=_visualize_attention)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # OSError: missing files, full disks, no server
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
