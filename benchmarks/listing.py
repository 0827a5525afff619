"""How long listing a folder of images takes at start-up: ``list_images`` (os.scandir, no stat per file) against
torchvision's ImageFolder and ``Path.rglob``, on a generated tree of small files (100,000 by default, in class
folders of 1,000, plus a flat copy's worth of names), each timed in a fresh process after a warm-up listing
(the page cache holds the directory entries, as on a second start; a cold network filesystem is slower for all).

In a distributed run only rank 0 lists (``dino_ray.core.train.loop.shared_listing``) and sends the list to the
other ranks, so the figure is paid once per run, not once per rank.

Usage: ``python benchmarks/listing.py [--files 100000] [--out JSON]``; writes ``benchmarks/results/listing.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMERS = {
    "dino_ray.list_images": "from dino_ray.core.data.datasets import list_images; n = len(list_images(root).files)",
    "torchvision.ImageFolder": "from torchvision.datasets import ImageFolder; n = len(ImageFolder(root).samples)",
    "pathlib.rglob": "from pathlib import Path; n = sum(1 for p in Path(root).rglob('*') if p.is_file())",
}


def generate(root: Path, files: int, per_folder: int = 1000) -> None:
    """``files`` tiny files named .jpg (the same 600 bytes: listing never reads them) in class folders."""
    data = b"\xff\xd8\xff" + bytes(597)
    for i in range(files):
        folder = root / f"class{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(data)


def timed(code: str, root: Path) -> dict[str, float]:
    """Seconds of one listing in a fresh interpreter (imports excluded), and how many files it found."""
    script = (f"import time, sys\nroot = {str(root)!r}\n" + code.split("; n =")[0] + "\n"
              f"start = time.perf_counter()\nn = {code.split('; n = ')[1]}\n"
              "print(time.perf_counter() - start, n)")
    seconds, count = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.split()
    return {"seconds": round(float(seconds), 3), "files": int(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "listing.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dino_ray_listing_"))
    try:
        start = time.perf_counter()
        generate(root, args.files)
        print(f"generated {args.files:,} files in {time.perf_counter() - start:.0f} s", flush=True)
        timed(TIMERS["dino_ray.list_images"], root)  # warm the page cache once
        results = {name: timed(code, root) for name, code in TIMERS.items()}
        for name, result in results.items():
            print(f"{name:26s} {result['seconds']:7.2f} s for {result['files']:,} files", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    record = {"files": args.files, "folders": args.files // 1000, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
