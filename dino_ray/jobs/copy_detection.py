"""``dino-ray eval-copy-detection``: copy detection (the reference's ``eval_copy_detection.py``): Copydays, or
copies made here from any image set."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below, one_of
from dino_ray.jobs.common import WeightsArgs, eval_tracking_uri, load_backbone, load_rgb, track

log = logging.getLogger(__name__)


@dataclass
class CopyDetectionArgs(WeightsArgs):
    """``eval_copy_detection.py``'s flags, plus the generic mode's."""
    data_path: str = arg("", "with dataset copydays: the folder holding original/, strong/, jpegqual/<q>/, "
                             "crops/<p>/; without: images to copy (image folder, path list or Parquet)")
    dataset: Optional[str] = arg(None, "copydays, or the generic mode (default)")
    whitening_path: Optional[str] = arg(None, "images the PCA whitening is learned on (generic mode default: the "
                                              "images after the originals)")
    distractors_path: Optional[str] = arg(None, "images added to the database")
    imsize: int = arg(320, "images are resized to imsize x imsize")
    num_originals: Optional[int] = arg(None, "generic mode: originals (default: half the images)")
    max_images: Optional[int] = arg(None, "generic mode: the first N images only")
    edits: Optional[list[str]] = arg(None, "generic mode: the edits to make copies with, of crop, jpeg, colour, "
                                           "blur, rotation, strong (default: all)")
    seed: int = arg(0, "generic mode: the copies' random edits")
    batch_size_per_gpu: int = arg(128, "images per forward pass")
    output_dir: str = arg("outputs/copy_detection", "where copy_detection.json goes")

    def problems(self) -> list[str]:
        problems = super().problems() + ([] if self.data_path else ["data_path is required"])
        problems += one_of("dataset", self.dataset, (None, "copydays"))
        return problems + below(self, ("imsize", "num_originals", "max_images", "batch_size_per_gpu"), 1)


def copy_detection_job(args: CopyDetectionArgs) -> dict[str, Any]:
    """``dataset="copydays"``: the Copydays blocks under ``data_path`` against its originals (+ distractors);
    generic: the first ``num_originals`` images of ``data_path`` are the originals, the rest learn the whitening
    unless ``whitening_path`` is given, and each original is copied once per edit. mAP per block in
    ``copy_detection.json``; an MLflow run nested under the pretraining."""
    import torch
    from torchvision import transforms
    from tqdm.auto import tqdm

    from dino_ray.core.data.augment import normalize
    from dino_ray.eval.copy_detection import (
        EDITS,
        copy_descriptor,
        copy_scores,
        learn_whitening,
        make_copies,
        read_copydays,
    )

    unknown = [edit for edit in args.edits or () if edit not in EDITS]
    if unknown:
        raise ValueError(f"edit(s) {unknown} unknown (choose from {', '.join(EDITS)})")
    out = Path(args.output_dir)
    weights, backbone, shape = load_backbone(args, out, vit_only=True)
    bicubic = transforms.InterpolationMode.BICUBIC
    prepare = transforms.Compose([transforms.Resize((args.imsize, args.imsize), interpolation=bicubic), normalize()])

    def describe(pictures: list, desc: str) -> torch.Tensor:
        batches = [pictures[k:k + args.batch_size_per_gpu] for k in range(0, len(pictures), args.batch_size_per_gpu)]
        return torch.cat([copy_descriptor(backbone, torch.stack([prepare(p) for p in batch]), shape["patch_size"])
                          for batch in tqdm(batches, desc=desc, leave=False)])

    record: dict[str, Any] = {"weights": args.pretrained_weights, "checkpoint_epoch": weights.epoch,
                              "pretraining_run": weights.run_id, **shape, "imsize": args.imsize}
    files = [out / "copy_detection.json"]
    whitening_pictures = pictures_of(args.whitening_path) if args.whitening_path else []
    if args.dataset == "copydays":
        data = read_copydays(args.data_path)
        database = describe(load_rgb(data["originals"]), "originals")
        queries = {name: (describe(load_rgb(paths), name), positives)
                   for name, (paths, positives) in data["blocks"].items()}
        headline = "strong" if "strong" in queries else "original"
    else:
        pictures = pictures_of(args.data_path, args.max_images)
        count = args.num_originals or len(pictures) // 2
        if count < 2 or (not args.whitening_path and len(pictures) - count < 2):
            raise ValueError(f"'{args.data_path}' gives {len(pictures)} images: too few for {count} originals and a "
                             f"whitening set (give more images, --num_originals or --whitening_path)")
        originals, whitening_pictures = pictures[:count], whitening_pictures or pictures[count:]
        copies = make_copies(originals, args.edits or EDITS, args.seed)
        database = describe(originals, "originals")
        queries = {edit: (describe(made, edit), [[k] for k in range(count)]) for edit, made in copies.items()}
        headline = "strong" if "strong" in queries else next(iter(queries))
        record.update({"data_path": args.data_path, "originals": count, "edits": list(copies), "seed": args.seed})
        out.mkdir(parents=True, exist_ok=True)
        files.append(copies_figure(originals[:4], {e: c[:4] for e, c in copies.items()}, out / "copies.png"))
    if args.distractors_path:
        database = torch.cat([database, describe(pictures_of(args.distractors_path), "distractors")])
    whitening = learn_whitening(describe(whitening_pictures, "whitening")) if whitening_pictures else None
    record.update({"database": len(database), "whitening_images": len(whitening_pictures),
                   "results": copy_scores({k: (q, p) for k, (q, p) in queries.items()}, database, whitening)})
    metrics = {f"mAP_{name.replace('/', '_')}": v for name, v in record["results"].items()}
    print("copy detection mAP: " + ", ".join(f"{name} {v:.2f}" for name, v in record["results"].items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "copy_detection.json").write_text(json.dumps(record, indent=2))
    track("copy_detection", record, metrics, {f"copy_mAP_{headline}": record["results"][headline]}, weights,
          eval_tracking_uri(args.tracking_uri, weights, out), files)
    log.info("copy detection results written to %s", out / "copy_detection.json")
    return record


def copies_figure(originals: list, copies: dict[str, list], path: Path, size: int = 96) -> Path:
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


def pictures_of(path: str | Path, max_images: Optional[int] = None) -> list:
    """The RGB pictures of a plain image folder, an ImageFolder tree or Parquet rows (those that decode)."""
    from dino_ray.core.data.datasets import build_dataset, image_files, is_parquet

    if Path(path).is_dir() and not is_parquet(path) and any(p.is_file() for p in Path(path).iterdir()):
        return load_rgb(image_files(path)[:max_images])
    return [item[0] for item in build_dataset(path, None, max_images) if item is not None]
