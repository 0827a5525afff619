"""A recipe search (``dino_ray.platform.search``): many short pretrainings at equal steps, the winners combined.

The search runs on the sweep engine (Ray Tune trials, each a TorchTrainer pretraining, recorded in MLflow under
each round's parent run); this script runs it on whatever machine it is given and writes the trials' k-NN to a
JSON file for the docs. ``--table`` prints a results JSON's table; ``--cost`` instead times a step of each
distinct trial on this machine's CPU (``dino-ray pretrain --no-ray``, one at a time), so that knobs which change
a step's cost can be read at equal minutes on 2 cores.

Usage: ``python benchmarks/recipe_search.py SPEC --data FOLDER [--parallel 8] [--threads 1] [--budget_s 480]
[--out JSON]``, where FOLDER holds ``train/`` (the training shards) and ``part-00004.parquet`` (held out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from dino_ray.platform.search import markdown_table, run_search, trial_list, trial_overrides

ROOT = Path(__file__).resolve().parents[1]


def cost(trials: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds a step of each distinct (config, knobs) on this machine, one at a time (the second of two epochs:
    the first carries the loader's start)."""
    seen, costs = set(), {}
    for trial in trials:
        key = json.dumps([trial["config"], trial["knobs"]], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out = Path(args.work) / ("cost_" + trial["name"].replace("/", "_"))
        timed = {**trial, "epochs": 2, "epoch_length": args.cost_steps}
        subprocess.run([sys.executable, "-m", "dino_ray.cli", "pretrain", "--no-ray", "--config",
                        str(ROOT / trial["config"]), *trial_overrides(timed, Path(args.data), args.threads),
                        "warmup_epochs=0", "eval.knn_every=0", f"output_dir={out}"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
        last = [json.loads(line) for line in open(out / "log.txt")][-1]
        costs[trial["name"]] = {"knobs": trial["knobs"], "config": trial["config"],
                                "step_seconds": last["train_epoch_seconds"] / args.cost_steps}
        print(f"{trial['name']}: {costs[trial['name']]['step_seconds']:.3f} s/step", flush=True)
        Path(args.out).write_text(json.dumps({"spec": args.spec, "cores": os.cpu_count(), "costs": costs}, indent=1))
    return costs


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="a search spec (benchmarks/searches/*.yaml), or with --table a results JSON")
    parser.add_argument("--table", action="store_true", help="print the markdown table of a results JSON and stop")
    parser.add_argument("--data", help="a folder with train/ and part-00004.parquet")
    parser.add_argument("--parallel", type=int, default=2, help="trials at once")
    parser.add_argument("--threads", type=int, default=1, help="CPUs and torch threads of each trial")
    parser.add_argument("--budget_s", type=float, default=3600, help="no trial runs past this")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "recipe_search"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe_search.json"))
    parser.add_argument("--cost", action="store_true", help="time a step of each trial here instead")
    parser.add_argument("--cost_steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.spec).read_text())["results"]))
        return
    if not args.data:
        parser.error("--data is required")
    spec = yaml.safe_load(Path(args.spec).read_text())
    if args.cost:
        cost(trial_list(spec), args)
        return
    results = run_search(spec, Path(args.spec).stem, ROOT, Path(args.data).resolve(), args.parallel, args.threads,
                         args.budget_s, args.work)
    Path(args.out).write_text(json.dumps({"spec": args.spec, "results": results}, indent=1))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
