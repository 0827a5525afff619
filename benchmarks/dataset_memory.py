"""Host memory of the Parquet image dataset against dataset size: the lazy reader (``ParquetImageDataset``:
labels and row-group layout at start, image bytes a row group at a time through a bounded cache) beside the
eager reading it replaced (every image's bytes in Python lists at start), on 10,000 and 50,000 CIFAR-10
images and on a synthetic file of 1,000,000 rows (CIFAR-10's images repeated, row groups of 100 as
``dino-ray convert-data`` writes them).

Each (reader, size) runs in a fresh process: build the dataset, then decode ``--reads`` images at random
indices (as a shuffled DataLoader would); the figures are that process's peak RSS, the seconds to build,
and the random-read rate. Saved as JSON.

Usage: ``python benchmarks/dataset_memory.py [--reads 2000] [--out FILE]``
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dino_ray.core.data.cifar10 import shards

ROOT = Path(__file__).resolve().parents[1]
SHARED = shards()


def eager_images(path: Path) -> tuple[list[bytes], list[int]]:
    """What the dataset did before: every shard's image bytes and labels read into Python lists."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    images, labels = [], []
    for file in files:
        table = pq.read_table(file, columns=["image", "label"])
        images += table.column("image").to_pylist()
        labels += table.column("label").to_pylist()
    return images, labels


def measure(reader: str, path: Path, reads: int) -> dict[str, float]:
    """Run in a child process: build, read ``reads`` random images, report peak RSS and times."""
    from dino_ray.core.data.datasets import ParquetImageDataset, decode_rgb

    start = time.perf_counter()
    if reader == "lazy":
        dataset = ParquetImageDataset(path)
        size, get = len(dataset), (lambda i: dataset[i])
    else:
        images, labels = eager_images(path)
        size, get = len(images), (lambda i: (decode_rgb(images[i], str(i)), labels[i]))
    built = time.perf_counter() - start
    indices = np.random.default_rng(0).integers(0, size, reads)
    start = time.perf_counter()
    for i in indices:
        assert get(int(i))[0] is not None
    read_s = time.perf_counter() - start
    return {"reader": reader, "images": size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "build_s": round(built, 2), "random_reads_per_s": round(reads / read_s, 1)}


def million_rows(target: Path, rows: int = 1_000_000) -> Path:
    """A synthetic Parquet file of ``rows`` CIFAR-10 images (the 50,000 repeated), written batch by batch."""
    if target.exists() and pq.ParquetFile(target).metadata.num_rows == rows:
        return target
    source = pq.read_table(SHARED, columns=["image", "label"])
    target.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(target, source.schema) as writer:
        for start in range(0, rows, len(source)):
            writer.write_table(source.slice(0, min(len(source), rows - start)), row_group_size=100)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "dataset_memory"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dataset_memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.reads)))
        return
    if not SHARED.exists():
        raise SystemExit(f"needs the CIFAR-10 shards in {SHARED}")
    work = Path(args.work_dir)
    (work / "10k").mkdir(parents=True, exist_ok=True)
    if not (work / "10k" / "part-00000.parquet").exists():
        (work / "10k" / "part-00000.parquet").symlink_to(SHARED / "part-00000.parquet")
    sizes = {"10k": work / "10k", "50k": SHARED, "1M": million_rows(work / "1M" / "rows.parquet")}
    rows = []
    for name, path in sizes.items():
        for reader in ("eager", "lazy"):
            out = subprocess.run([sys.executable, __file__, "--reads", str(args.reads), "--child", reader, str(path)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append({"size": name, **json.loads(out.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    result = {"reads": args.reads, "pyarrow": pa.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| images | reader | peak RSS (MiB) | build (s) | random reads/s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']:,} | {row['reader']} | {row['peak_rss_mb']:.0f} | {row['build_s']} | "
              f"{row['random_reads_per_s']} |")


if __name__ == "__main__":
    main()
