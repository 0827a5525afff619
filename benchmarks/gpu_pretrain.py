"""The GPU pass: ``dino-ray pretrain`` (1 Ray Train worker) beside the reference's ``main_dino.py`` on the same GPU.

ViT-S/16 at 224 px with the paper's crops (2 x 224 + 8 x 96), on synthetic ImageNet-like images (random JPEGs of
256-500 px, written once as an image folder for the reference and as Parquet for dino-ray); images/s and peak
GPU memory of each, side by side in one JSON: fp16 and bf16, with and without ``torch.compile``; and, with two or
more GPUs, the ResNet-50 recipe on 2 workers with SyncBatchNorm over NCCL. The batch halves until it fits.

The reference is not part of this repository: give its checkout with ``--reference DIR`` (a clone of
facebookresearch/dino); without it only dino-ray runs. ``--smoke`` runs the dino-ray side on the CPU with a tiny
model for a few steps, without Ray (what the test suite checks, so that the script runs unchanged on a GPU
machine).

Usage: ``python benchmarks/gpu_pretrain.py [--reference DIR] [--batch 256] [--steps 30] [--out JSON]``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp16": ["use_fp16=true", "use_bf16=false"], "bf16": ["use_bf16=true"],
            "fp16+compile": ["use_fp16=true", "use_bf16=false", "torch_compile=true"],
            "bf16+compile": ["use_bf16=true", "torch_compile=true"]}
TINY = ["arch=vit_tiny", "patch_size=4", "embed_dim=32", "depth=1", "num_heads=2", "out_dim=64",
        "head_hidden_dim=64", "head_bottleneck_dim=32", "global_crops_size=32", "local_crops_size=16",
        "local_crops_number=2"]


def synthetic_images(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """``count`` random JPEGs of ImageNet's sizes, as an image folder (one class) and as one Parquet file."""
    rng = np.random.default_rng(seed)
    (folder / "images" / "n00000000").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"image": [], "label": [], "path": []}
    for i in range(count):
        height, width = rng.integers(256, 500, size=2)
        low = rng.integers(0, 255, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)  # smooth content
        image = Image.fromarray(low).resize((int(width), int(height)), Image.BILINEAR)
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=90)
        (folder / "images" / "n00000000" / f"{i:06d}.jpg").write_bytes(encoded.getvalue())
        rows["image"].append(encoded.getvalue())
        rows["label"].append(0)
        rows["path"].append(f"n00000000/{i:06d}.jpg")
    pq.write_table(pa.table(rows), folder / "images.parquet")
    return folder / "images", folder / "images.parquet"


def dino_ray(data: Path, out: Path, batch: int, steps: int, options: list[str], smoke: bool) -> dict[str, Any]:
    """``dino-ray pretrain`` (on Ray; in this process for ``smoke``) for one epoch of ``steps`` iterations: its
    images/s and peak GPU memory, as its final line reports them."""
    command = [sys.executable, "-m", "dino_ray.cli", "pretrain", *(["--no-ray"] if smoke else []), "--config",
               "resnet50_sgd" if "arch=resnet50" in options else "vit_small_16_100ep",
               f"data_path={data}", f"output_dir={out}", "epochs=1", f"epoch_length={steps}", "warmup_epochs=0",
               f"batch_size_per_gpu={batch}", "saveckp_freq=0", "log_freq=5", "num_workers=8",
               "tracking.log_model=false", "scaling.num_workers=1", "scaling.resources_per_worker=null",
               *(TINY + ["scaling.use_gpu=false", "num_workers=0"] if smoke else ["scaling.use_gpu=true"]), *options]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        oom = "out of memory" in done.stdout + done.stderr
        return {"error": "out of memory" if oom else (done.stdout + done.stderr)[-2000:], "batch": batch}
    rates = [float(r) for r in re.findall(r'"images_per_s": ([\d.]+)', done.stdout + done.stderr)]
    memory = re.findall(r'"cuda_max_allocated_mb": ([\d.]+)', done.stdout + done.stderr)
    return {"images_per_s": round(rates[-1], 1) if rates else None, "batch": batch,
            "peak_gpu_mb": round(float(memory[-1])) if memory else None}


def reference(checkout: Path, images: Path, out: Path, batch: int, steps: int, precision: str) -> dict[str, Any]:
    """``main_dino.py`` under torchrun, its own MetricLogger's seconds per iteration and max memory."""
    count = batch * steps
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", str(checkout / "main_dino.py"),
               "--arch", "vit_small", "--patch_size", "16", "--data_path", str(images.parent), "--output_dir",
               str(out), "--batch_size_per_gpu", str(batch), "--epochs", "1", "--warmup_epochs", "0",
               "--use_fp16", str(precision == "fp16"), "--num_workers", "8", "--saveckp_freq", "100"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=checkout, timeout=1800)
    text = done.stdout + done.stderr
    times = [float(t) for t in re.findall(r"time: ([\d.]+)", text)]
    memory = re.findall(r"max mem: (\d+)", text)
    if done.returncode != 0 or not times:
        return {"error": text[-2000:], "batch": batch, "images": count}
    return {"images_per_s": round(batch / float(np.median(times[len(times) // 2:])), 1), "batch": batch,
            "peak_gpu_mb": int(memory[-1]) if memory else None}


def fitted(run: Any, batch: int) -> dict[str, Any]:
    """``run(batch)``, halving the batch while it runs out of GPU memory."""
    while True:
        result = run(batch)
        if result.get("error") != "out of memory" or batch <= 8:
            return result
        batch //= 2


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=None, help="a checkout of facebookresearch/dino")
    parser.add_argument("--batch", type=int, default=256, help="per GPU, halved until it fits")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="the dino-ray side on the CPU, tiny, a few steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_pretrain.json"))
    args = parser.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="dino_ray_gpu_"))
    folder, parquet = synthetic_images(work / "data", args.images if not args.smoke else 64)
    variants = {"fp32": []} if args.smoke else VARIANTS
    record: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "gpus": torch.cuda.device_count(), "steps": args.steps, "dino_ray": {}, "reference": {}}
    for name, options in variants.items():
        record["dino_ray"][name] = fitted(lambda b: dino_ray(parquet, work / name, b, args.steps, options,
                                                             args.smoke), args.batch)
        print(f"dino-ray {name}: {record['dino_ray'][name]}", flush=True)
    if args.reference and not args.smoke:
        for name in ("fp16", "fp32"):
            record["reference"][name] = fitted(lambda b: reference(Path(args.reference), folder, work / f"ref_{name}",
                                                                   b, args.steps, name), args.batch)
            print(f"reference {name}: {record['reference'][name]}", flush=True)
        ours, theirs = record["dino_ray"]["fp16"], record["reference"]["fp16"]
        if ours.get("images_per_s") and theirs.get("images_per_s"):
            record["fp16_speedup_over_reference"] = round(ours["images_per_s"] / theirs["images_per_s"], 2)
    if record["gpus"] >= 2 and not args.smoke:
        record["resnet50_syncbn_2_workers"] = fitted(lambda b: dino_ray(
            parquet, work / "resnet", b, args.steps, ["arch=resnet50", "scaling.num_workers=2", "use_fp16=true"],
            False), 64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"saved {args.out}")
    return record


if __name__ == "__main__":
    main()
