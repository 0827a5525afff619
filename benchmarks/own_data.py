"""Your data in, a usable model out, measured through the commands a user runs.

CIFAR-10's training shard 0 (10,000 images) is written as a flat folder of JPEG files (no class folders, one
corrupt JPEG and one text file among them) and pretrained with the CPU recipe by ``dino-ray pretrain`` on a local
Ray instance; the same images as labelled Parquet are pretrained beside it, both under the same ``budget_minutes``.
The k-NN monitor's memory bank is the labelled Parquet in both runs
(``eval.knn_train_data``). Each teacher is scored by the weighted k-NN (k=20, T=0.07) with the same images as the bank and held-out shard 4
as the test set, beside the raw pixels. Then ``dino-ray export`` (safetensors, ONNX checked by onnxruntime) and
``dino-ray embed`` of the flat folder are timed, each as the whole command.

Usage: ``python benchmarks/own_data.py [--minutes 3]``; writes ``benchmarks/results/own_data.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from time_to_accuracy import SHARED, knn_top1, load_images, pretrain

from dino_ray.core.config import recipe_path
from dino_ray.core.models.build import backbone_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dino_ray.cli"]


def write_flat_folder(shard: Path, folder: Path) -> int:
    """The shard's images as JPEG files in one folder, named by row only (no labels), plus a corrupt JPEG and a
    text file that the reader must skip and name."""
    folder.mkdir(parents=True)
    images = pq.read_table(shard, columns=["image"]).column("image").to_pylist()
    for i, data in enumerate(images):
        Image.open(io.BytesIO(data)).convert("RGB").save(folder / f"{i:05}.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    (folder / "notes.txt").write_text("not an image")
    return len(images)


def timed(command: list[str]) -> float:
    """The whole command's wall seconds (it must succeed)."""
    start = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="budget_minutes of each pretraining")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "own_data.json"))
    args = parser.parse_args()
    shard, held_out = SHARED / "part-00000.parquet", SHARED / "part-00004.parquet"
    bank, test = load_images(shard, 10000), load_images(held_out, 10000)
    record = {"budget_minutes": args.minutes, "bank_images": len(bank[1]), "test_images": len(test[1]),
              "raw_pixels": round(knn_top1(bank, test, None), 2), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flat = work / "photos"
        images = write_flat_folder(shard, flat)
        record["images"] = images
        for name, data in (("flat folder of JPEG files", flat), ("labelled Parquet", shard)):
            start = time.time()
            kept = pretrain(recipe_path("cifar10_cpu"),
                            [f"data_path={data}", f"budget_minutes={args.minutes}", "tracking.log_model=false",
                             f"eval.knn_train_data={shard}"],  # the monitor's bank needs labels: the same images'
                            work / name.split()[0], True)
            wall = time.time() - start
            log = [json.loads(line) for line in open(kept[-1].parent / "log.txt")]
            teacher, _ = backbone_from_checkpoint(str(kept[-1]))
            record["runs"][name] = {"command_minutes": round(wall / 60, 2), "train_minutes": round(log[-1][
                "train_minutes"], 2), "steps": sum(line["train_steps"] for line in log),
                "skipped_images": sum(line["train_skipped_images"] for line in log),
                "knn_top1": round(knn_top1(bank, test, teacher), 2)}
            print(name, record["runs"][name], flush=True)
        checkpoint = str(kept[-1])
        record["export_seconds"] = {fmt: round(timed([*CLI, "export", checkpoint, "--format", fmt, "--output",
                                                      str(work / f"teacher.{fmt}")]), 1)
                                    for fmt in ("safetensors", "onnx")}
        seconds = timed([*CLI, "embed", checkpoint, str(flat), str(work / "embeddings.parquet")])
        record["embed"] = {"images": images, "seconds": round(seconds, 1),
                           "seconds_per_1000": round(seconds / images * 1000, 2)}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
