"""A recipe search on the sweep engine: many short pretrainings at equal steps, then the winners combined.

Trials are compared at equal *steps*: the accuracy after N steps does not depend on the hardware, so a search can
run where trials are cheap (a lent GPU machine runs a hundred in minutes) and its winners ship for the 2-core CPU.
A search spec (``benchmarks/searches/*.yaml``) names a config, the base knobs, the steps (``epochs`` x
``epoch_length``), the baseline's seeds and the trials (``name: {knob: value}``, or ``name: {knobs: {...}, config:
..., epochs: ..., epoch_length: ...}``).

Round 1 runs the baseline over ``seeds`` seeds (the noise) and each trial once. Round 2 combines the round-1
winners (a gain over the baseline's mean larger than twice the seeds' standard deviation, the best value per
knob) cumulatively, best first, each combination at every step count of ``combine.steps`` ([epochs,
epoch_length, seeds] each), with the baseline at the step counts round 1 did not run. Each round is one sweep
(``dino_ray.platform.sweep``): its trials are named variants, run by Ray Tune as TorchTrainer pretrainings,
recorded in MLflow under the round's parent run, and scored by the k-NN monitor on the last epoch's teacher
(weighted, k=20, T=0.07, the first 10,000 images of ``train/part-00000.parquet`` against the first 5,000 of
the held-out ``part-00004.parquet``).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import ConfigError
from dino_ray.core.config import flatten, load_config
from dino_ray.platform.sweep import VARIANT, SweepSpec, check_values, run_sweep

log = logging.getLogger(__name__)
BANK_IMAGES, TEST_IMAGES = 10000, 5000


def trial_list(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Round 1: the baseline over ``seeds`` seeds, then every trial of the spec in its order."""
    base = {"config": spec["config"], "epochs": spec["epochs"], "epoch_length": spec["epoch_length"],
            "base": spec.get("knobs", {})}
    trials = [{**base, "name": f"baseline/s{seed}", "knobs": {}, "seed": seed} for seed in range(spec["seeds"])]
    for name, trial in spec["trials"].items():
        trial = trial if "knobs" in trial else {"knobs": trial}  # the short form: only knobs
        own = {} if trial.get("config", spec["config"]) == spec["config"] else {"base": {}}
        trials.append({**base, "seed": 0, **own, **trial, "name": name, "knobs": dict(trial.get("knobs") or {})})
    return trials


def baseline_scores(results: list[dict[str, Any]]) -> list[float]:
    """The k-NN of the baseline's seeds, what every trial is read against."""
    return [r["knn_top1"] for r in results if r["name"].startswith("baseline/")]


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


def trial_overrides(trial: dict[str, Any], data: Path, threads: int) -> list[str]:
    """The ``key=value`` overrides of a trial's config: its data, steps, seed and knobs, the end-of-run k-NN
    monitor of the search's protocol, one worker of ``threads`` CPUs and torch threads."""
    knobs = {**trial.get("base", {}), **trial["knobs"]}
    bank = data / "train" / "part-00000.parquet"
    return [f"data_path={data / 'train'}", "max_images=null", f"epochs={trial['epochs']}",
            f"epoch_length={trial['epoch_length']}", "saveckp_freq=0", f"seed={trial['seed']}",
            f"eval.knn_every={trial['epochs']}", f"eval.knn_train_data={bank}",
            f"eval.knn_val_data={data / 'part-00004.parquet'}", f"eval.knn_train_images={BANK_IMAGES}",
            f"eval.knn_val_images={TEST_IMAGES}", "eval.attention_images=0", "tracking.log_model=false",
            "scaling.num_workers=1", f"scaling.threads_per_worker={threads}",
            f"scaling.resources_per_worker={json.dumps({'CPU': threads})}",
            *(f"{k}={json.dumps(v)}" for k, v in knobs.items())]


def round_sweep(trials: list[dict[str, Any]], name: str, root: Path, data: Path, parallel: int, threads: int,
                budget_s: Optional[float], storage_path: str) -> SweepSpec:
    """A round as a sweep: one named variant per trial (its own config file, steps and knobs), run ``parallel``
    at a time with no early stopping, within ``budget_s``. A trial whose knobs make no valid config is left out,
    named in the log with the reason."""
    variants = {}
    for trial in trials:
        try:
            config = load_config(root / trial["config"], trial_overrides(trial, data, threads))
        except ConfigError as exc:
            log.warning("search round '%s': trial %s refused: %s", name, trial["name"], exc)
            continue
        variants[trial["name"]] = flatten(config.to_dict())
    spec = SweepSpec(name=name, base=next(iter(variants.values())), search_space={VARIANT: {"grid": list(variants)}},
                     variants=variants, metric="knn_top1_k20", mode="max", scheduler={"type": "none"},
                     max_concurrent_trials=parallel, time_budget_s=budget_s, storage_path=storage_path)
    check_values(spec, f"search round '{name}'")
    return spec


def round_results(trials: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that finished, each with its k-NN and steps (unfinished ones are left out)."""
    by_name = {row[VARIANT]: row for row in rows if row["status"] == "TERMINATED"}
    return [{**trial, "steps": trial["epochs"] * trial["epoch_length"],
             "knn_top1": by_name[trial["name"]]["knn_top1_k20"]} for trial in trials if trial["name"] in by_name]


def run_search(spec: dict[str, Any], name: str, root: Path, data: Path, parallel: int = 2, threads: int = 1,
               budget_s: float = 3600.0, storage_path: str = "outputs/searches") -> list[dict[str, Any]]:
    """Both rounds of a search spec within ``budget_s`` (round 1 gets ``round1_share`` of it); returns every
    finished trial's result, round 1 first."""
    deadline = time.monotonic() + budget_s
    first = trial_list(spec)
    rows = run_sweep(round_sweep(first, f"{name}-round1", root, data, parallel, threads,
                                 spec.get("round1_share", 1.0) * budget_s, storage_path))
    results = round_results(first, rows)
    if not results:
        raise RuntimeError(f"search '{name}': no trial of round 1 finished")
    second = combinations(results, spec)
    if second:
        rows = run_sweep(round_sweep(second, f"{name}-round2", root, data, parallel, threads,
                                     max(deadline - time.monotonic(), 1.0), storage_path))
        results += round_results(second, rows)
    return results


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
