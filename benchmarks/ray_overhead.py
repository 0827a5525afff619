"""Ray Train overhead: the CPU config for the same steps as a plain single-process loop and as a 1-worker
TorchTrainer, images/s side by side (start-up excluded: the rate is each epoch's own, from log.txt), saved
as JSON. Target: Ray within 5% of plain.

Usage: ``python benchmarks/ray_overhead.py [--images N] [--epochs N] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from dino_ray.core.config import load_config
from dino_ray.core.train.loop import train_dino
from dino_ray.platform.trainer import pretrain_on_ray

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "cifar10" / "train" / "part-00000.parquet"


def epoch_rates(log_file: Path) -> list[float]:
    return [json.loads(line)["train_images_per_s"] for line in log_file.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2560)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_overhead.json"))
    args = parser.parse_args()
    data = SHARED if SHARED.exists() else ROOT / "data" / "cifar10_sample" / "train.parquet"
    work = Path(tempfile.mkdtemp(prefix="dino_ray_bench_"))
    common = [f"data_path={data}", f"max_images={args.images}", f"epochs={args.epochs}", "eval.knn_every=0"]

    plain_cfg = load_config(ROOT / "experiments" / "cifar10_cpu.yaml", [*common, f"output_dir={work / 'plain'}"])
    start = time.time()
    train_dino(plain_cfg, show_progress=False)
    plain_wall = time.time() - start

    ray.init(num_cpus=2, log_to_driver=False)
    ray_cfg = load_config(ROOT / "experiments" / "cifar10_cpu.yaml", [*common, f"output_dir={work / 'ray'}"])
    start = time.time()
    result = pretrain_on_ray(ray_cfg)
    ray_wall = time.time() - start
    with result.checkpoint.as_directory() as folder:
        ray_rates = epoch_rates(Path(folder) / "log.txt")
    ray.shutdown()

    plain_rates = epoch_rates(work / "plain" / "log.txt")
    # the first epoch pays for worker start and allocator warm-up in both modes: compare the later ones
    plain_rate = sum(plain_rates[1:]) / len(plain_rates[1:])
    ray_rate = sum(ray_rates[1:]) / len(ray_rates[1:])
    record = {"config": "experiments/cifar10_cpu.yaml", "images_per_epoch": args.images, "epochs": args.epochs,
              "plain": {"images_per_s": round(plain_rate, 2), "per_epoch": plain_rates, "wall_s": round(plain_wall, 1)},
              "ray_1_worker": {"images_per_s": round(ray_rate, 2), "per_epoch": ray_rates, "wall_s": round(ray_wall, 1)},
              "ray_over_plain": round(ray_rate / plain_rate, 3)}
    print(f"plain loop        {plain_rate:7.1f} images/s  (wall {plain_wall:.0f} s)")
    print(f"1-worker Ray      {ray_rate:7.1f} images/s  (wall {ray_wall:.0f} s, includes Ray start-up)")
    print(f"Ray / plain       {record['ray_over_plain']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
