"""The Ray tax: the CPU recipe for the same steps through the plain loop (``dino-ray pretrain --no-ray``), through
``dino-ray pretrain`` on a local Ray without the k-NN monitor, with it between epochs on rank 0 (where the recipe
runs it on 2 cores) and with it in Ray's asynchronous validation task, one after the other in one run.

Each path is the command a user types, in a fresh process. From the run's log.txt: images/s of the steps alone
(mean over the epochs), the split of an epoch's time into the steps (model math), the wait for data and the rest,
and images/s over the loop's wall time (``train_minutes``: the epochs with everything between them, checkpoints,
reports and a monitor between epochs included), the first epoch (start-up, allocator) left out. The monitor's
cost is the share of the loop's images/s it takes. Also recorded: where the CPUs went
in the middle of the run (the middle half of its wall time, sampled from /proc every second): the process that
trains with its data-loader processes, the k-NN monitor's tasks, and the rest of Ray (daemons, controller actors).

Usage: ``python benchmarks/ray_tax.py [--epochs 5] [--epoch_length 40] [--out JSON] [--label before]``; results
go under ``--label`` in ``benchmarks/results/ray_tax.json`` (so a before and an after sit side by side).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
MONITOR_TITLES = ("knn_monitor", "run_validation_fn")  # the task's name in its process title
# path: (on Ray, eval.knn_sync: where the monitor runs, None: no monitor)
PATHS = {"plain loop": (False, None), "Ray, no monitor": (True, None),
         "Ray, monitor between epochs": (True, True), "Ray, monitor in a Ray task": (True, False)}
BARE = "Ray, no monitor"


def process_table() -> dict[int, tuple[str, int, float]]:
    """pid -> (command line, parent pid, CPU seconds used so far), for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
            table[int(entry.name)] = (command, int(stat[1]), (int(stat[11]) + int(stat[12])) / TICK)
    return table


def category(pid: int, table: dict[int, tuple[str, int, float]]) -> str:
    """What a process is there for: training (the trainer and its data loaders), the monitor, Ray, other."""
    while pid in table:
        command, parent, _ = table[pid]
        if "RayTrainWorker" in command or "--no-ray" in command:
            return "training"
        if any(name in command for name in MONITOR_TITLES):
            return "k-NN monitor"
        if "ray" in command.split(" ", 1)[0] or "/ray/" in command:
            return "Ray daemons and actors"
        pid = parent
    return "other"


def cpu_use(samples: list[tuple[float, dict]]) -> dict[str, float]:
    """Percent of one core each category used over the middle half of the samples' span. A Ray worker process
    runs the monitor's task and goes back to idle, so a process counts as the monitor's if any sample saw it
    running the monitor; one started inside the window counts all its CPU time, one that ended in it
    what it had used when last seen."""
    start, end = samples[0][0], samples[-1][0]
    window = [s for s in samples if start + (end - start) / 4 <= s[0] <= end - (end - start) / 4]
    (t0, first), t1 = window[0], window[-1][0]
    seen = {pid: (table, entry) for _, table in window for pid, entry in table.items()}  # each pid's last sight
    monitor = {pid for _, table in window for pid in table if category(pid, table) == "k-NN monitor"}
    use: dict[str, float] = {}
    for pid, (table, (_, _, seconds)) in seen.items():
        key = "k-NN monitor" if pid in monitor else category(pid, table)
        before = first[pid][2] if pid in first else 0.0
        use[key] = use.get(key, 0.0) + (seconds - before) / (t1 - t0) * 100
    return {k: round(v, 1) for k, v in sorted(use.items())}


def run(name: str, on_ray: bool, sync: Optional[bool], epochs: int, epoch_length: int, work: Path, config: str
        ) -> dict[str, Any]:
    out = work / name.replace(" ", "_").replace(",", "")
    monitor = [] if sync is None else [f"eval.knn_sync={str(sync).lower()}"]
    command = [sys.executable, "-m", "dino_ray.cli", "pretrain", "--config", config,
               *([] if on_ray else ["--no-ray"]), f"epochs={epochs}", f"epoch_length={epoch_length}",
               f"eval.knn_every={0 if sync is None else 2}", *monitor, f"output_dir={out}", "tracking.log_model=false"]
    samples: list[tuple[float, dict]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.time(), process_table()))
    sampler = threading.Thread(target=sample, daemon=True)
    start = time.time()
    sampler.start()
    try:
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
    finally:
        done.set()
        sampler.join()
    wall = time.time() - start
    log = max(out.glob("ray_results/*/checkpoint_epoch*")) / "log.txt" if on_ray else out / "log.txt"
    epochs_all = [json.loads(line) for line in open(log)]
    epochs_seen = epochs_all[1:]
    loop_seconds = (epochs_all[-1]["train_minutes"] - epochs_all[0]["train_minutes"]) * 60
    images = sum(e["train_steps"] for e in epochs_seen) * load_config(config).batch_size_per_gpu
    per_epoch = []
    for e in epochs_seen:
        steps = e["train_steps"]
        step, data = e["train_step_time"] * steps, e["train_data_time"] * steps
        per_epoch.append({"images_per_s": e["train_images_per_s"], "step_s": step, "data_wait_s": data,
                          "rest_s": e["train_epoch_seconds"] - step - data, "epoch_s": e["train_epoch_seconds"]})
    mean = {k: round(statistics.mean(p[k] for p in per_epoch), 3) for k in per_epoch[0]}
    return {**mean, "loop_images_per_s": round(images / loop_seconds, 3),
            "per_epoch_images_per_s": [round(p["images_per_s"], 1) for p in per_epoch],
            "wall_s": round(wall, 1), "cpu_percent": cpu_use(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--epoch_length", type=int, default=40)
    parser.add_argument("--label", default="now", help="the key these results go under (before / after)")
    parser.add_argument("--config", default="cifar10_cpu", help="the recipe: a shipped one's name or a YAML file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_tax.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dino_ray_tax_"))
    results = {}
    for name, (on_ray, sync) in PATHS.items():
        results[name] = run(name, on_ray, sync, args.epochs, args.epoch_length, work, args.config)
        r = results[name]
        print(f"{name:28s} {r['images_per_s']:7.1f} images/s in the steps, {r['loop_images_per_s']:7.1f} over the "
              f"loop; an epoch {r['epoch_s']:.1f} s = steps {r['step_s']:.1f} + data wait {r['data_wait_s']:.1f} + "
              f"rest {r['rest_s']:.1f}; CPU % {r['cpu_percent']}", flush=True)
    plain = results["plain loop"]
    for r in results.values():
        r["over_plain"] = round(r["images_per_s"] / plain["images_per_s"], 3)
        r["loop_over_plain"] = round(r["loop_images_per_s"] / plain["loop_images_per_s"], 3)
    bare = results[BARE]["loop_images_per_s"]
    costs = {name: round(1 - r["loop_images_per_s"] / bare, 3) for name, r in results.items()
             if PATHS[name][1] is not None}
    record = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    record[args.label] = {"recipe": Path(args.config).stem, "epochs": args.epochs, "epoch_length": args.epoch_length,
                          "knn_every": 2, "cpus": os.cpu_count(), "paths": results, "monitor_cost": costs}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"Ray / plain over the loop {results[BARE]['loop_over_plain']:.3f} (steps alone "
          f"{results[BARE]['over_plain']:.3f}); the monitor costs {costs}; saved {args.out}")


if __name__ == "__main__":
    main()
