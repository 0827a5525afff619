"""A fixed-step search of a recipe's knobs: many short pretrainings side by side, k-NN of each final teacher.

Why beside ``dino-ray sweep``: on 2 CPU cores a 300-step trial takes 5 minutes, so the sweep fits a dozen trials
an hour; this search runs ``dino-ray pretrain --no-ray`` trials in parallel processes on whatever machine it is
given (a lent GPU machine runs a hundred in minutes) with no Ray or MLflow. Trials are compared at equal *steps*:
the accuracy after N steps does not depend on the hardware, and a knob that changes the cost of a step on the
2-core machine (batch, width, crops, stem) gets trials at several step counts, to be read against its measured
CPU step time (``--cost``).

Round 1 runs the spec's baseline over several seeds (the noise) and each trial once. Round 2 combines the round-1
winners (a gain over the baseline's mean larger than twice the seeds' standard deviation, the best value per
knob) cumulatively, best first, each combination at every step count of ``combine.steps`` ([epochs,
epoch_length, seeds] each), with the baseline at the step counts round 1 did not run. Round 1 starts no trial
after ``round1_share`` of the budget.
Every trial's k-NN: weighted, k=20, T=0.07, backbone features of the teacher, the first 10,000 images of the
bank shard against the first 5,000 of the held-out shard (the protocol of the README's 300-step search).

Usage: ``python benchmarks/recipe_search.py SPEC --data FOLDER [--parallel 8] [--budget_s 480] [--set k=v ...]
[--out JSON]``; ``--table RESULTS`` prints a results JSON's table, ``--mlflow URI RESULTS`` records it in MLflow;
where FOLDER holds ``train/`` (the training shards) and ``part-00004.parquet`` (held out);
``--cost`` instead times ``--cost_steps`` steps of each step-count trial on this machine's CPU, one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import knn_top1, load_images  # noqa: E402  (beside this file)

from dino_ray.eval.features import backbone_from_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def trial_list(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Round 1: the baseline over ``seeds`` seeds, then every trial of the spec in its order: ``name: {knob:
    value}``, or ``name: {knobs: {...}, config: ..., epochs: ..., epoch_length: ...}`` for another config or steps."""
    base = {"config": spec["config"], "epochs": spec["epochs"], "epoch_length": spec["epoch_length"],
            "base": spec.get("knobs", {})}
    trials = [{**base, "name": f"baseline/s{seed}", "knobs": {}, "seed": seed} for seed in range(spec["seeds"])]
    for name, trial in spec["trials"].items():
        trial = trial if "knobs" in trial else {"knobs": trial}  # the short form: only knobs
        own = {} if trial.get("config", spec["config"]) == spec["config"] else {"base": {}}
        trials.append({**base, "seed": 0, **own, **trial, "name": name, "knobs": dict(trial.get("knobs") or {})})
    return trials


def combinations(results: list[dict[str, Any]], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Round 2: the winners of round 1 (the baseline's config and steps only) added one by one, best first."""
    base = baseline_scores(results)
    if len(base) < 2:
        return []
    mean, noise = statistics.mean(base), statistics.stdev(base)
    best: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in results:
        same = r["config"] == spec["config"] and (r["epochs"], r["epoch_length"]) == (spec["epochs"],
                                                                                       spec["epoch_length"])
        if same and r["knobs"] and r["knn_top1"] - mean > max(2 * noise, 0.3):
            key = tuple(sorted(r["knobs"]))
            if key not in best or r["knn_top1"] > best[key]["knn_top1"]:
                best[key] = r
    winners = sorted(best.values(), key=lambda r: -r["knn_top1"])[:spec["combine"]["top"]]

    def trial(name: str, knobs: dict[str, Any], epochs: int, epoch_length: int, seed: int) -> dict[str, Any]:
        return {"config": spec["config"], "epochs": epochs, "epoch_length": epoch_length, "seed": seed,
                "base": spec.get("knobs", {}), "knobs": dict(knobs), "name": f"{name}@{epochs * epoch_length}/s{seed}"}

    trials = [trial("baseline", {}, epochs, epoch_length, 0) for epochs, epoch_length, _ in spec["combine"]["steps"]
              if (epochs, epoch_length) != (spec["epochs"], spec["epoch_length"])]
    knobs, names = {}, []
    for winner in winners:
        if set(winner["knobs"]) & set(knobs):
            continue
        knobs, names = {**knobs, **winner["knobs"]}, [*names, winner["name"]]
        trials += [trial("+".join(names), knobs, epochs, epoch_length, seed)
                   for epochs, epoch_length, seeds in spec["combine"]["steps"]
                   for seed in range(1, seeds + 1)]  # round 1 ran seed 0
    return trials


def command(trial: dict[str, Any], data: Path, out: Path, extra: list[str]) -> list[str]:
    knobs = [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
             for k, v in {**trial.get("base", {}), **trial["knobs"]}.items()]
    return [sys.executable, "-m", "dino_ray.cli", "pretrain", "--no-ray", "--config", str(ROOT / trial["config"]),
            f"data_path={data / 'train'}", "max_images=null", f"epochs={trial['epochs']}",
            f"epoch_length={trial['epoch_length']}", "saveckp_freq=0", f"seed={trial['seed']}",
            f"output_dir={out}", *extra, *knobs]


def knn_of(checkpoint: Path, bank: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
           device: torch.device) -> float:
    backbone, _ = backbone_from_weights(str(checkpoint), checkpoint_key="teacher")
    return knn_top1(bank, test, backbone.to(device))


def run_round(trials: list[dict[str, Any]], args: argparse.Namespace, launch_until: float, deadline: float,
              results: list[dict[str, Any]], bank: Any, test: Any, device: torch.device) -> int:
    """Run ``trials`` ``--parallel`` at a time, none started after ``launch_until``; at ``deadline`` the running
    ones are stopped and not counted. Each finished trial is evaluated and written to ``--out`` at once.
    Returns the number of trials that failed."""
    queue, running, failed = list(trials), {}, 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    while (queue and time.time() < launch_until) or running:
        while queue and len(running) < args.parallel and time.time() < launch_until:
            trial = queue.pop(0)
            out = Path(args.work) / trial["name"].replace("/", "_")
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "stdout.log", "w")
            proc = subprocess.Popen(command(trial, Path(args.data), out, args.set), stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[proc] = (trial, out, time.time(), log)
        if time.time() > deadline:
            for proc in running:
                proc.kill()
            print(f"deadline: {len(running)} running and {len(queue)} queued trials dropped", flush=True)
            return failed
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            trial, out, started, log = running.pop(proc)
            log.close()
            if proc.returncode != 0:
                failed += 1
                print(f"{trial['name']}: exit {proc.returncode}\n" + (out / "stdout.log").read_text()[-3000:],
                      flush=True)
                continue
            lines = [json.loads(line) for line in open(out / "log.txt")]
            result = {**trial, "steps": trial["epochs"] * trial["epoch_length"],
                      "knn_top1": knn_of(out / "checkpoint.pth", bank, test, device),
                      "train_loss": lines[-1]["train_loss"], "wall_s": round(time.time() - started, 1)}
            results.append(result)
            print(f"{result['name']}: {result['knn_top1']:.2f} ({result['wall_s']} s)", flush=True)
            Path(args.out).write_text(json.dumps({"spec": args.spec, "results": results}, indent=1))
    if queue:
        print(f"{len(queue)} queued trials not started", flush=True)
    return failed


def cost(trials: list[dict[str, Any]], args: argparse.Namespace) -> None:
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
        subprocess.run(command(timed, Path(args.data), out, ["warmup_epochs=0"]), check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
        last = [json.loads(line) for line in open(out / "log.txt")][-1]
        costs[trial["name"]] = {"knobs": trial["knobs"], "config": trial["config"],
                                "step_seconds": last["train_epoch_seconds"] / args.cost_steps}
        print(f"{trial['name']}: {costs[trial['name']]['step_seconds']:.3f} s/step", flush=True)
        Path(args.out).write_text(json.dumps({"spec": args.spec, "cores": os.cpu_count(), "costs": costs}, indent=1))


def baseline_scores(results: list[dict[str, Any]]) -> list[float]:
    """The k-NN of the baseline's seeds, what every trial is read against."""
    return [r["knn_top1"] for r in results if r["name"].startswith("baseline/")]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per trial in the order run, with its gain over the mean of the baseline's seeds."""
    base = baseline_scores(results)
    mean = statistics.mean(base)
    lines = [f"baseline {mean:.2f} (mean of {len(base)} seeds: {', '.join(f'{b:.2f}' for b in base)})", "",
             "| trial | config | steps | knobs | k-NN top-1 | vs baseline |", "|---|---|---|---|---|---|"]
    for r in results:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items())
        lines.append(f"| {r['name']} | {Path(r['config']).stem} | {r['steps']} | {knobs} | {r['knn_top1']:.2f} | "
                     f"{r['knn_top1'] - mean:+.2f} |")
    return "\n".join(lines)


def record_in_mlflow(results_path: Path, uri: str, experiment: str = "dino-ray") -> str:
    """A search's results JSON as MLflow runs, so its trials compare side by side in the UI as a sweep's do (the
    trials ran where MLflow may be absent, a lent GPU machine): a parent run ``search-<file>`` holding the table,
    one child per trial with its config, steps, seed, base knobs and knobs as params and its k-NN, gain over the
    baseline's mean, loss and wall time as metrics. Returns the parent's run id."""
    from dino_ray.tracking import RunTracker, ui_command

    results = json.loads(results_path.read_text())["results"]
    mean = statistics.mean(baseline_scores(results))
    parent = RunTracker(uri, experiment, f"search-{results_path.stem}", {"results": results_path.name,
                                                                          "trials": len(results)},
                        tags={"dino_ray.search": results_path.stem})
    if parent.run_id is None:
        raise SystemExit(f"MLflow at {uri} did not create the run of {results_path}")
    parent.log_metrics({"baseline_knn_top1": mean, "best_knn_top1": max(r["knn_top1"] for r in results)}, step=0)
    for r in results:
        params = {"config": r["config"], "steps": r["steps"], "seed": r["seed"],
                  **{f"base.{k}": json.dumps(v) for k, v in r.get("base", {}).items()},
                  **{f"knob.{k}": json.dumps(v) for k, v in r["knobs"].items()}}
        child = RunTracker(uri, experiment, r["name"], params, tags={"mlflow.parentRunId": parent.run_id,
                                                                     "dino_ray.search": results_path.stem})
        child.log_metrics({"knn_top1": r["knn_top1"], "vs_baseline": r["knn_top1"] - mean,
                           "train_loss": r["train_loss"], "wall_s": r["wall_s"]}, step=r["steps"])
        if not child.finish():
            raise SystemExit(f"MLflow at {uri} stopped answering: trial {r['name']} of {results_path} not recorded")
    with tempfile.TemporaryDirectory() as scratch:  # finish() sends the table before the folder goes
        table = Path(scratch) / f"{results_path.stem}.md"
        table.write_text(markdown_table(results) + "\n")
        parent.log_artifact(table)
        if not parent.finish():
            raise SystemExit(f"MLflow at {uri} stopped answering: the table of {results_path} not recorded")
    print(f"{len(results)} trials of {results_path} in MLflow run {parent.run_id}; see them with: {ui_command(uri)}")
    return str(parent.run_id)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="a search spec (benchmarks/searches/*.yaml), or with --table a results JSON")
    parser.add_argument("--table", action="store_true", help="print the markdown table of a results JSON and stop")
    parser.add_argument("--mlflow", metavar="URI", help="record a results JSON (SPEC) as MLflow runs at URI and stop")
    parser.add_argument("--data", help="a folder with train/ and part-00004.parquet")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each trial")
    parser.add_argument("--budget_s", type=float, default=3600, help="no trial starts or finishes after this")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "recipe_search"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe_search.json"))
    parser.add_argument("--set", nargs="*", default=[], help="key=value for every trial, e.g. num_workers=2 (loader "
                        "processes: the data order changes, not the recipe)")
    parser.add_argument("--cost", action="store_true", help="time a step of each trial here instead")
    parser.add_argument("--cost_steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.spec).read_text())["results"]))
        return
    if args.mlflow:
        record_in_mlflow(Path(args.spec), args.mlflow)
        return
    if not args.data:
        parser.error("--data is required")
    spec = yaml.safe_load(Path(args.spec).read_text())
    trials = trial_list(spec)
    if args.cost:
        cost(trials, args)
        return
    start = time.time()
    deadline = start + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    bank = load_images(sorted((data / "train").glob("*.parquet"))[0], 10000)
    test = load_images(data / "part-00004.parquet", 5000)
    results: list[dict[str, Any]] = []
    print(f"raw pixels {knn_top1(bank, test, None):.2f} on {data}", flush=True)
    failed = run_round(trials, args, start + spec.get("round1_share", 1.0) * args.budget_s, deadline, results, bank,
                       test, device)
    if failed and not results:
        raise SystemExit(f"all {failed} trials failed")
    run_round(combinations(results, spec), args, deadline, deadline, results, bank, test, device)


if __name__ == "__main__":
    main()
