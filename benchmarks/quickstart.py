"""The quickstart as a user runs it: ``dino-ray quickstart`` (what ``make quickstart`` calls) in a fresh process,
its whole wall time measured beside what it reports (the pretraining's minutes, the k-NN of the teacher against
random init and raw pixels on held-out images).

Usage: ``python benchmarks/quickstart.py [--output_dir outputs/quickstart] [-- quickstart flags]``; writes
``benchmarks/results/quickstart.json`` (its summary, the command, its wall minutes), which the README renders.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "quickstart"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart.json"))
    parser.add_argument("flags", nargs="*", help="more `dino-ray quickstart` flags")
    args = parser.parse_args()
    command = [str(Path(sys.executable).parent / "dino-ray"), "quickstart", "--output_dir", args.output_dir,
               *args.flags]
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.time() - start
    summary = json.loads((Path(args.output_dir) / "quickstart.json").read_text())
    record = {"command": "dino-ray quickstart " + " ".join(command[2:]), "command_minutes": round(wall / 60, 2),
              "cpus": os.cpu_count(), "machine": platform.machine(), "summary": summary}
    Path(args.out).write_text(json.dumps(record, indent=2))
    knn = summary["knn_k20"]
    print(f"whole command {wall / 60:.2f} min, pretraining {summary['train_minutes']} min; k-NN teacher "
          f"{knn['pretrained']['top1']:.2f}, raw pixels {knn['raw_pixels']['top1']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
