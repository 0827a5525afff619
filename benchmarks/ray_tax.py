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

Then what Ray itself costs when nothing computes: a Ray Train run whose one worker sleeps, in a fresh local instance
with Ray's defaults and with dino-ray's (``ray_session``), each process's CPU over 20 s and how often the main
thread of each Ray worker process wakes up.

Every path runs ``--rounds`` times, the paths taking turns (in reverse order every other round), and its figures
are the means: this machine's speed drifts by several percent from one run to the next.

Usage: ``python benchmarks/ray_tax.py [--epochs 5] [--epoch_length 40] [--rounds 2] [--out JSON] [--label before]``;
results go under ``--label`` in ``benchmarks/results/ray_tax.json`` (so a before and an after sit side by side).
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
SESSIONS = ("Ray's defaults", "dino-ray's local session")
PROBE_SECONDS = 20


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


def mean_of_rounds(found: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's figures over its rounds: means, each round's images/s kept beside them."""
    mean = {key: round(statistics.mean(r[key] for r in found), 3) for key, value in found[0].items()
            if isinstance(value, (int, float))}
    cpu = {key: round(statistics.mean(r["cpu_percent"].get(key, 0.0) for r in found), 1)
           for key in dict.fromkeys(k for r in found for k in r["cpu_percent"])}
    return {**mean, "cpu_percent": cpu, "per_epoch_images_per_s": [r["per_epoch_images_per_s"] for r in found],
            "rounds_images_per_s": [r["images_per_s"] for r in found],
            "rounds_loop_images_per_s": [r["loop_images_per_s"] for r in found]}


def descendants(root: int, table: dict[int, tuple[str, int, float]]) -> set[int]:
    family, grown = {root}, True
    while grown:
        more = {pid for pid, (_, parent, _) in table.items() if parent in family} - family
        family |= more
        grown = bool(more)
    return family


def process_name(command: str) -> str:
    """``ray::TrainController.run``, ``raylet``, ``log_monitor.py``: what a person recognises."""
    words = command.split()
    if not words:
        return "?"
    if words[0].startswith(("ray::", "ray-dashboard-")):
        return words[0].split("(")[0]
    program = Path(words[0]).name
    script = next((w for w in words[1:] if w.endswith(".py")), None) if program.startswith("python") else None
    return Path(script).name if script else program


def wakeups(pid: int) -> int:
    """Voluntary context switches of a process's main thread so far: each one a wake-up from a wait."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def idle_probe(session: str) -> dict[str, Any]:
    """In this process: a fresh local Ray (``session``: Ray's defaults or ``ray_session``), a Ray Train run whose
    one worker sleeps; CPU of every process of the instance over ``PROBE_SECONDS`` once it has settled."""
    import contextlib

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dino_ray.platform.ray_session import ray_session

    measured: dict[str, Any] = {}

    def measure() -> None:
        time.sleep(15)
        before, start = process_table(), time.time()
        workers = {pid: wakeups(pid) for pid in descendants(os.getpid(), before)
                   if before[pid][0].startswith("ray::")}
        time.sleep(PROBE_SECONDS)
        after, seconds = process_table(), time.time() - start
        use: dict[str, float] = {}
        for pid in descendants(os.getpid(), after) & set(before):
            name = process_name(after[pid][0])
            use[name] = use.get(name, 0.0) + (after[pid][2] - before[pid][2]) / seconds * 100
        rates = [(wakeups(pid) - count) / seconds for pid, count in workers.items() if pid in after]
        measured.update({"cpu_percent": round(sum(use.values()), 1), "processes": len(use),
                         "worker_processes": len(rates),
                         "worker_main_thread_wakeups_per_s": round(statistics.median(rates), 1),
                         "by_process": {k: round(v, 2) for k, v in sorted(use.items(), key=lambda kv: -kv[1])}})

    with contextlib.ExitStack() as stack:
        if session == SESSIONS[0]:
            ray.init(address="local", logging_level="ERROR")
            stack.callback(ray.shutdown)
        else:
            stack.enter_context(ray_session())
        probe = threading.Thread(target=measure)
        probe.start()
        TorchTrainer(lambda config: time.sleep(15 + PROBE_SECONDS + 5), scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="dino_ray_probe_"), name="idle")).fit()
        probe.join()
    return measured


def idle_sessions() -> dict[str, Any]:
    """``idle_probe`` of each session, each in a fresh process."""
    found = {}
    for session in SESSIONS:
        done = subprocess.run([sys.executable, __file__, "--probe", session], check=True, capture_output=True,
                              text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        found[session] = json.loads(done.stdout.strip().splitlines()[-1])
        r = found[session]
        print(f"idle Ray Train session, {session:26s}: {r['cpu_percent']:5.1f} % of a core, {r['processes']} "
              f"processes ({r['worker_processes']} Ray workers, their main threads waking "
              f"{r['worker_main_thread_wakeups_per_s']:.0f} times a second)", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--epoch_length", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="times each path runs, the paths taking turns")
    parser.add_argument("--label", default="now", help="the key these results go under (before / after)")
    parser.add_argument("--config", default="cifar10_cpu", help="the recipe: a shipped one's name or a YAML file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_tax.json"))
    parser.add_argument("--probe", choices=SESSIONS, help=argparse.SUPPRESS)  # one idle session, in its own process
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(idle_probe(args.probe)))
        return
    work = Path(tempfile.mkdtemp(prefix="dino_ray_tax_"))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
    for turn in range(args.rounds):  # the order reversed every other round: a machine that drifts favours no path
        for name in (list(PATHS) if turn % 2 == 0 else list(reversed(PATHS))):
            on_ray, sync = PATHS[name]
            r = run(name, on_ray, sync, args.epochs, args.epoch_length, work / f"round{turn}", args.config)
            runs[name].append(r)
            print(f"round {turn} {name:28s} {r['images_per_s']:7.1f} images/s in the steps, "
                  f"{r['loop_images_per_s']:7.1f} over the loop; an epoch {r['epoch_s']:.1f} s = steps "
                  f"{r['step_s']:.1f} + data wait {r['data_wait_s']:.1f} + rest {r['rest_s']:.1f}; "
                  f"CPU % {r['cpu_percent']}", flush=True)
    results = {name: mean_of_rounds(found) for name, found in runs.items()}
    plain = results["plain loop"]
    for r in results.values():
        r["over_plain"] = round(r["images_per_s"] / plain["images_per_s"], 3)
        r["loop_over_plain"] = round(r["loop_images_per_s"] / plain["loop_images_per_s"], 3)
    bare = results[BARE]["loop_images_per_s"]
    costs = {name: round(1 - r["loop_images_per_s"] / bare, 3) for name, r in results.items()
             if PATHS[name][1] is not None}
    record = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    record[args.label] = {"recipe": Path(args.config).stem,
                          "global_crops_size": load_config(args.config).global_crops_size,
                          "epochs": args.epochs, "epoch_length": args.epoch_length,
                          "rounds": args.rounds, "knn_every": 2, "cpus": os.cpu_count(), "paths": results,
                          "monitor_cost": costs, "idle_session": idle_sessions()}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"Ray / plain over the loop {results[BARE]['loop_over_plain']:.3f} (steps alone "
          f"{results[BARE]['over_plain']:.3f}); the monitor costs {costs}; saved {args.out}")


if __name__ == "__main__":
    main()
