"""Numbers that cannot go stale: the figures of the docs, rendered from ``benchmarks/results/*.json``.

A page (``README.md``, ``docs/**/*.md``) holds marker blocks::

    <!-- render: knn -->
    ...generated: never edit by hand...
    <!-- end: knn -->

``render: NAME`` names a renderer of ``RENDERERS`` and, unless the renderer says otherwise, the JSON it reads
(``benchmarks/results/NAME.json``); ``render: NAME OPTION`` passes an option (``summary``: a shorter view). The
script regenerates what lies between the markers from the JSON: tables, and plots where a figure helps (PNG files
under ``docs/assets/``, linked from the block).

Usage::

    python benchmarks/render_docs.py            # rewrite the blocks and the plots
    python benchmarks/render_docs.py --check    # exit 1 naming every block that differs from its JSON

To render a new benchmark, write one function ``(data, ctx) -> markdown`` and register it with ``@renderer``.
``--check`` reads JSON and Markdown only (no matplotlib, no torch); a figure is drawn from the same numbers as the
table beside it, so a changed number shows in the text the check compares.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- render: (?P<name>[\w.-]+)(?: (?P<option>[\w.-]+))? -->\n(?P<body>.*?)"
                   r"<!-- end: (?P=name) -->", re.S)
OPENING = re.compile(r"<!-- render: ([\w.-]+)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)  # code blocks: a marker shown there is an example


@dataclass
class Renderer:
    function: Callable[[dict, "Context"], str]
    source: str  # the JSON file under benchmarks/results/


RENDERERS: dict[str, Renderer] = {}


def renderer(*names: str, source: Optional[str] = None) -> Callable:
    """Register a function for each block name (its JSON: ``<name>.json`` unless ``source`` names one)."""
    def register(function: Callable[[dict, "Context"], str]) -> Callable[[dict, "Context"], str]:
        for name in names:
            RENDERERS[name] = Renderer(function, source or f"{name}.json")
        return function
    return register


@dataclass
class Context:
    """What a renderer knows besides its JSON: the block's name and option, and where its page is."""
    root: Path
    page: Path  # the Markdown file
    name: str
    option: Optional[str] = None
    draw: bool = False  # write the figures (not in --check)
    figures: list[Path] = field(default_factory=list)

    def figure(self, filename: str, plot: Callable[[Path], None], alt: str) -> str:
        """A PNG under docs/assets/ drawn by ``plot(path)``, as a Markdown image linked from this page."""
        path = self.root / "docs" / "assets" / filename
        self.figures.append(path)
        if self.draw:
            path.parent.mkdir(parents=True, exist_ok=True)
            plot(path)
        relative = os.path.relpath(path, self.page.parent)
        return f"![{alt}]({Path(relative).as_posix()})"


# ---------------------------------------------------------------------------------------------------------------
# helpers

def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def signed(value: Optional[float], digits: int = 2) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def source_line(ctx: Context) -> str:
    source = RENDERERS[ctx.name].source
    return f"<small>Rendered from `benchmarks/results/{source}` by `benchmarks/render_docs.py`.</small>"


def plot_style() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9})
    return plt


def save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same numbers, same file


# ---------------------------------------------------------------------------------------------------------------
# time to accuracy (time_to_accuracy.json, time_to_accuracy_vit.json)

CURVES = {"shipped_ray": "shipped recipe, `dino-ray pretrain` on Ray (`cifar10_cpu`)",
          "shipped": "shipped recipe, plain loop (`--no-ray`)",
          "crops32_ray": "shipped recipe on 32 px crops (`global_crops_size=32`), on Ray",
          "vit": "ViT recipe (`cifar10_cpu_vit`)",
          "reference": "the reference's recipe, crops scaled to 32/16 px", "lightly": "lightly's DINO (the peer)"}
SHORT = {"shipped_ray": "shipped CPU recipe, on Ray", "shipped": "shipped CPU recipe, plain loop",
         "crops32_ray": "the same on 32 px crops, on Ray",
         "vit": "ViT CPU recipe", "reference": "the reference's recipe", "lightly": "lightly's DINO"}


def first_at(curve: list[dict], level: float) -> Optional[dict]:
    return next((point for point in curve if point["knn_top1"] >= level), None)


@renderer("time_to_accuracy", "time_to_accuracy_vit")
def time_to_accuracy(data: dict, ctx: Context) -> str:
    """Summary per curve; unless ``summary``: the figure and every point."""
    raw, short = data["raw_pixels"], ctx.option == "summary"
    rows = []
    for name, curve in data["curves"].items():
        points, passed, goal = curve["curve"], first_at(curve["curve"], raw), first_at(curve["curve"], raw + 10)
        last = points[-1]
        init = curve.get("random_init")
        rows.append([SHORT.get(name, name) if short else CURVES.get(name, name), num(last["minutes"]),
                     f"**{num(last['knn_top1'])}**", signed(last["knn_top1"] - raw, 1),
                     signed(last["knn_top1"] - init, 1) if init else ""] +
                    ([] if short else [num(passed["minutes"]) if passed else "never"]) +
                    [num(goal["minutes"]) if goal else "never"] + ([] if short else [num(curve["step_seconds"], 2)]))
    summary = table(["recipe", "minutes", "k-NN top-1", "vs raw pixels", "vs random init"] +
                    ([] if short else ["above raw pixels at (min)"]) + ["raw pixels + 10 at (min)"] +
                    ([] if short else ["s / step"]), rows)
    header = (f"k-NN top-1 (weighted, k=20) on {data['test_images']:,} held-out CIFAR-10 images "
              f"({data['bank_images']:,} in the bank), against training minutes on {data['cores']} CPU cores; "
              f"raw pixels score {num(raw)}.")
    if short:
        return "\n".join([header, "", summary, "", source_line(ctx)])

    def plot(path: Path) -> None:
        plt = plot_style()
        figure, axes = plt.subplots(figsize=(7, 4.4))
        for name, curve in data["curves"].items():
            axes.plot([0] + [p["minutes"] for p in curve["curve"]],
                      [curve.get("random_init", float("nan"))] + [p["knn_top1"] for p in curve["curve"]],
                      marker="o", markersize=3, label=CURVES.get(name, name).replace("`", ""))
        axes.axhline(raw, color="grey", linestyle="--", linewidth=1, label=f"raw pixels ({num(raw)})")
        axes.set_xlabel(f"training minutes on {data['cores']} CPU cores")
        axes.set_ylabel("k-NN top-1 (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        save(figure, path)
        plt.close(figure)

    names = list(data["curves"])
    longest = max(len(data["curves"][n]["curve"]) for n in names)
    point_rows = []
    for i in range(longest):
        row: list[Any] = [i + 1]
        for name in names:
            points = data["curves"][name]["curve"]
            row += [num(points[i]["minutes"]), num(points[i]["knn_top1"])] if i < len(points) else ["", ""]
        point_rows.append(row)
    header_points = ["checkpoint"] + [h for n in names for h in (f"{n}: minutes", f"{n}: k-NN")]
    return "\n".join([header, "", ctx.figure(f"{ctx.name}.png", plot, "k-NN top-1 against training minutes"), "",
                      summary, "", "Every checkpoint:", "", table(header_points, point_rows), "", source_line(ctx)])


# ---------------------------------------------------------------------------------------------------------------
# the recipe search (recipe_search.json, recipe_search_round2.json, recipe_search_cost.json)

def knob_text(knobs: dict) -> str:
    shown = {k: v for k, v in knobs.items() if not (k == "warmup_teacher_temp" and knobs.get("teacher_temp") == v)}
    return ", ".join(f"`{k}` {v}" for k, v in shown.items()) or "(the base)"


def search_groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Trials comparable with each other: same config, same base, same steps."""
    groups: dict[tuple, list[dict]] = {}
    for trial in results:
        key = (trial["config"], json.dumps(trial.get("base", {}), sort_keys=True), trial["steps"])
        groups.setdefault(key, []).append(trial)
    return groups


@renderer("recipe_search", "recipe_search_round2")
def recipe_search(data: dict, ctx: Context) -> str:
    """Every trial, grouped by (config, base, steps), against the base's seeds where the group has them."""
    parts, bars = [], None
    for (config, base, steps), trials in search_groups(data["results"]).items():
        seeds = [t["knn_top1"] for t in trials if not t["knobs"]]
        mean = statistics.mean(seeds) if seeds else None
        sd = statistics.stdev(seeds) if len(seeds) > 1 else None
        base_knobs = json.loads(base)
        title = f"**`{Path(config).name}`" + (f" with {knob_text(base_knobs)}" if base_knobs else "") + \
            f", {steps:,} steps**"
        if mean is not None:
            title += f": the base scores {num(mean, 2)}" + (f" (mean of {len(seeds)} seeds, sd {num(sd, 2)})"
                                                             if sd is not None else "")
        rows = []
        for trial in sorted(trials, key=lambda t: (-t["knn_top1"], t["name"])):
            gain = trial["knn_top1"] - mean if mean is not None and trial["knobs"] else None
            winner = gain is not None and sd is not None and gain > 2 * sd
            rows.append([f"`{trial['name']}`", knob_text(trial["knobs"]), trial.get("seed", ""),
                         f"**{num(trial['knn_top1'], 2)}**" if winner else num(trial["knn_top1"], 2),
                         signed(gain)])
        parts += [title, "", table(["trial", "knobs", "seed", "k-NN top-1", "vs the base"], rows), ""]
        if ctx.option != "summary" and sd is not None and bars is None:
            bars = (trials, mean, sd, steps)
    figure = ""
    if bars is not None:
        trials, mean, sd, steps = bars
        single = sorted((t for t in trials if t["knobs"]), key=lambda t: t["knn_top1"])

        def plot(path: Path) -> None:
            plt = plot_style()
            fig, axes = plt.subplots(figsize=(7, 0.17 * len(single) + 1.2))
            axes.barh([t["name"] for t in single], [t["knn_top1"] - mean for t in single],
                      color=["tab:green" if t["knn_top1"] - mean > 2 * sd else "tab:grey" for t in single])
            axes.axvspan(-2 * sd, 2 * sd, color="tab:blue", alpha=0.12, label="base's seeds: +- 2 sd")
            axes.set_xlabel(f"k-NN top-1 minus the base's mean ({num(mean, 2)}), {steps} steps")
            axes.tick_params(axis="y", labelsize=7)
            axes.legend(fontsize=8, loc="lower right")
            axes.grid(axis="x", alpha=0.3)
            save(fig, path)
            plt.close(fig)

        figure = ctx.figure(f"{ctx.name}.png", plot, "each trial against the base's seeds") + "\n\n"
    intro = (f"{len(data['results'])} trials of `{data['spec']}`, weighted k-NN (k=20) of the last teacher; "
             "bold: a gain over the base's mean larger than twice its seeds' standard deviation.")
    return "\n".join([intro, "", figure + "\n".join(parts), source_line(ctx)])


@renderer("recipe_search_cost")
def recipe_search_cost(data: dict, ctx: Context) -> str:
    """Seconds a step on the CPU, and how many steps the same minutes buy against the base."""
    costs = data["costs"]
    base = next((c["step_seconds"] for n, c in costs.items() if not c["knobs"]), None)
    rows = [[f"`{name}`", knob_text(c["knobs"]), num(c["step_seconds"], 3),
             f"x{base / c['step_seconds']:.2f}" if base else ""] for name, c in costs.items()]
    return "\n".join([f"One training step on {data['cores']} CPU cores (`dino-ray pretrain --no-ray`), from "
                      f"`{data['spec']}`:", "", table(["variant", "knobs", "s / step", "steps in the same minutes"],
                                                      rows), "", source_line(ctx)])


# ---------------------------------------------------------------------------------------------------------------
# speed

SETUP_NAMES = {"cifar10_cpu": "CPU recipe (`cifar10_cpu`)", "vit_small16_2x224_8x96": "ViT-S/16, paper crops"}


@renderer("train_step")
def train_step(data: dict, ctx: Context) -> str:
    """Images/s of the training step per setup and speed option."""
    rows = []
    for name, setup in data["setups"].items():
        for variant, v in setup["variants"].items():
            rows.append([SETUP_NAMES.get(name, name), setup["batch_size"], setup["crops"], f"`{variant}`",
                         num(v["images_per_s"], 2), num(v["s_per_step"], 3), f"x{v['speedup_vs_baseline']:.2f}"])
    machine = data["machine"]
    where = "CUDA" if machine.get("cuda") else f"{machine['cpu_threads']} CPU threads"
    return "\n".join([f"{data['steps']} timed steps after {data['warmup_steps']} warm-up steps, on {where} "
                      f"(torch {machine['torch']}):", "",
                      table(["setup", "batch", "crops", "variant", "images/s", "s / step", "vs baseline"], rows), "",
                      source_line(ctx)])


def monitor_pause(record: dict) -> Optional[float]:
    """The share of the loop's time the monitor between epochs pauses it, beyond the bare run's own pauses
    (checkpoints, reports): each path's steps against its loop, within its own runs, so the machine's speed drifting
    between runs does not enter it."""
    between, bare = record["paths"].get("Ray, monitor between epochs"), record["paths"].get("Ray, no monitor")
    if not (between and bare and "loop_images_per_s" in between):
        return None
    return bare["loop_images_per_s"] / bare["images_per_s"] - between["loop_images_per_s"] / between["images_per_s"]


def crops_text(record: dict) -> str:
    return f", {record['global_crops_size']} px crops" if "global_crops_size" in record else ""


@renderer("ray_tax")
def ray_tax(data: dict, ctx: Context) -> str:
    """The same steps through the plain loop and ``dino-ray pretrain`` on Ray without and with the monitor, for
    each recorded label (before / after a change), with the epoch's split and where the CPUs went; ``summary``:
    images/s against the plain loop alone; ``idle``: what an idle Ray Train session costs, by session."""
    if ctx.option == "idle":
        label, record = next((k, v) for k, v in reversed(data.items()) if "idle_session" in v)
        rows = [[name, num(r["cpu_percent"]), r["processes"], r["worker_processes"],
                 num(r["worker_main_thread_wakeups_per_s"]),
                 ", ".join(f"{process} {share:.1f}" for process, share in list(r["by_process"].items())[:5])]
                for name, r in record["idle_session"].items()]
        return "\n".join([f"A Ray Train run whose one worker sleeps, on {record['cpus']} CPUs ({label}):", "",
                          table(["session", "CPU % of a core", "processes", "Ray worker processes",
                                 "wake-ups a second (a worker's main thread, median)", "largest (CPU %)"], rows),
                          "", source_line(ctx)])
    if ctx.option == "summary":
        labels = list(data)
        paths = list(dict.fromkeys(name for record in data.values() for name in record["paths"]))
        rows = [[name] + [f"{num(r['images_per_s'])} (x{r['over_plain']:.2f})" if r else ""
                          for r in (data[label]["paths"].get(name) for label in labels)] for name in paths]
        columns = [f"{label}{crops_text(data[label])}" for label in labels]
        latest = data[labels[-1]]
        costs = latest["monitor_cost"] if isinstance(latest["monitor_cost"], dict) else {}
        cost = ", ".join(f"{name.split(', monitor ')[1]} {share:.1%}" for name, share in costs.items())
        paused = monitor_pause(latest)
        pause = [f"Within its own runs, the monitor between epochs pauses the loop {paused:.1%} of its time beyond "
                 "the bare run's checkpoints; the rest of the difference is in the steps, which the monitor does not "
                 "overlap: the machine's speed drifting between runs (each round's figures are in the JSON).",
                 ""] if paused is not None else []
        return "\n".join([f"Images/s of the training steps, `{latest['recipe']}` on {latest['cpus']} CPUs, the same "
                          "steps each way:", "", table(["path", *columns], rows), "",
                          *([f"The k-NN monitor every 2 epochs takes {cost} of the loop's images/s ({labels[-1]}).",
                             ""] if cost else []), *pause, source_line(ctx)])
    blocks = []
    for label, record in data.items():
        rows = []
        for name, r in record["paths"].items():
            cpu = r.get("cpu_percent", {})
            loop = r.get("loop_images_per_s")
            rows.append([name, num(r["images_per_s"]), f"x{r['over_plain']:.2f}",
                         num(loop) if loop else "", f"x{r['loop_over_plain']:.2f}" if loop else "",
                         num(r["step_s"]), num(r["data_wait_s"]), num(r["rest_s"]), num(cpu.get("training")),
                         num(cpu.get("Ray daemons and actors")), num(cpu.get("k-NN monitor"))])
        costs = record["monitor_cost"]
        cost = (f"the monitor costs {costs:.1%} of the training's images/s" if isinstance(costs, float) else
                "the monitor every 2 epochs takes " + ", ".join(f"{name.split(', monitor ')[1]} {share:.1%}"
                                                                for name, share in costs.items())
                + " of the loop's images/s")
        rounds = f", each path {record['rounds']} times, the means" if record.get("rounds", 1) > 1 else ""
        blocks += [f"**{label}** (`{record['recipe']}`{crops_text(record)}, {record['epochs']} epochs of "
                   f"{record['epoch_length']} "
                   f"iterations{rounds}, {record['cpus']} CPUs; {cost}):", "",
                   table(["path", "images/s (steps)", "vs plain", "images/s (loop)", "vs plain", "steps (s / epoch)",
                          "data wait (s)", "rest (s)", "CPU %: training", "Ray", "monitor"], rows), ""]
    return "\n".join(blocks + ["images/s (steps): the training steps alone, mean over the epochs after the first; "
                                "images/s (loop): over the loop's wall time after the first epoch, checkpoints, "
                                "reports and a monitor between epochs included. CPU %: percent of one core over the "
                                "middle half of the run (200 = both cores).", "", source_line(ctx)])


@renderer("augment")
def augment(data: dict, ctx: Context) -> str:
    """Multi-crop augmentation images/s per core: the reference's PIL, torchvision v2, the batched one."""
    labels = {"32px": "32 px (CIFAR-10's own size)", "224px": "224 px (the paper's crops)"}
    rows = []
    for key, s in ((k, v) for k, v in data.items() if isinstance(v, dict) and "batched" in v):
        rows.append([labels.get(key, key), s["views"], num(s["reference_pil"]),
                     f"{num(s['tv2_tensor'])} (x{s['tv2_over_reference']:.2f})",
                     f"{num(s['batched'])} (**x{s['batched_over_reference']:.2f}**)",
                     f"x{s['batched_over_reference_median_turn']:.2f}", len(s["passes"]["batched"])])
    return "\n".join([f"Images/s on {data['threads']} thread, {data['images']} CIFAR-10 images, decode included, "
                      "best pass of each pipeline:", "",
                      table(["setting", "views", "reference (PIL)", "torchvision v2 tensors", "batched (ours)",
                             "batched / reference, median turn", "passes"], rows), "", source_line(ctx)])


INPUTS = {"dataloader_reference": "DataLoader, 1 loader process, `augmentation: reference`",
          "dataloader_batched": "DataLoader, 1 loader process, `augmentation: batched`",
          "ray_data_batched": "`data_loader: ray_data`, batched"}


@renderer("input_pipeline")
def input_pipeline(data: dict, ctx: Context) -> str:
    """End-to-end training images/s with each input."""
    rows = [[INPUTS.get(key, key), f"{num(v['images_per_s'])} (x{v['over_reference']:.2f})",
             num(v["data_wait_s_per_step"], 3), num(v["step_s"], 3)]
            for key, v in data.items() if isinstance(v, dict) and "images_per_s" in v]
    return "\n".join([f"`{data['config']}` through a 1-worker Ray Train run on {data['cpus']} CPU cores, "
                      f"{data['epochs']} epochs of {data['images']:,} images, the last one counted:", "",
                      table(["input", "images/s", "data wait per step (s)", "step (s)"], rows), "", source_line(ctx)])


@renderer("knn")
def knn(data: dict, ctx: Context) -> str:
    """The k-NN vote against the reference's loop."""
    rows = [[r["k"], num(r["reference_s"], 2), num(r["ours_s"], 2), f"x{r['speedup']:.2f}", num(r["top1"], 2),
             "yes" if r["top1"] == r["reference_top1"] else "**no**"] for r in data["rows"]]
    every = data["all_k"]
    rows.append(["all four (one pass, as `eval-knn`)", num(every["reference_s"], 2), num(every["ours_s"], 2),
                 f"**x{every['speedup']:.2f}**", "", ""])
    return "\n".join([f"{data['train']:,} train x {data['test']:,} test features of dimension {data['dim']}, "
                      f"{data['classes']:,} classes, {data['threads']} threads; seconds:", "",
                      table(["k", "reference loop", "ours", "speed-up", "top-1", "same accuracy"], rows), "",
                      source_line(ctx)])


@renderer("dataset_memory")
def dataset_memory(data: dict, ctx: Context) -> str:
    """Peak memory, start-up and random reads of the eager and the lazy Parquet reader."""
    rows = [[f"{r['images']:,}", r["reader"], num(r["peak_rss_mb"], 0), num(r["build_s"], 2),
             num(r["random_reads_per_s"], 1)] for r in data["rows"]]
    return "\n".join([f"Each reader in a fresh process, {data['reads']:,} random reads (pyarrow {data['pyarrow']}):",
                      "", table(["images", "reader", "peak RSS (MiB)", "build (s)", "random reads/s"], rows), "",
                      source_line(ctx)])


# ---------------------------------------------------------------------------------------------------------------
# evaluations of a CPU teacher

MODELS = {"pretrained": "pretrained teacher", "random_init": "same network at random init"}


@renderer("eval_cifar10")
def eval_cifar10(data: dict, ctx: Context) -> str:
    """k-NN at every k and the linear probe, pretrained teacher against random init."""
    ks = list(next(iter(data["models"].values()))["knn"])
    rows = [[MODELS.get(name, name)] + [num(m["knn"][k]["top1"]) for k in ks] + [num(m["linear_top1"]),
                                                                                    num(m["minutes"])]
            for name, m in data["models"].items()]
    return "\n".join([f"Trained on `{Path(data['train']).name}`, evaluated on the held-out "
                      f"`{Path(data['val']).name}` (CIFAR-10), top-1:", "",
                      table(["weights"] + [f"k-NN k={k}" for k in ks] + ["linear probe", "minutes"], rows), "",
                      source_line(ctx)])


@renderer("eval_copy_video")
def eval_copy_video(data: dict, ctx: Context) -> str:
    """Copy detection mAP per edit and label propagation J&F, pretrained teacher against random init."""
    edits = list(next(iter(data["models"].values()))["copy_detection_mAP"])
    scores = ("J&F", "J", "F")
    rows = [[MODELS.get(name, name)] + [num(m["copy_detection_mAP"][e]) for e in edits] +
            [num(m["davis"][s]) for s in scores] for name, m in data["models"].items()]
    rows.append(["first mask copied to every frame"] + [""] * len(edits) +
                [num(data["first_mask_baseline"][s]) for s in scores])
    return "\n".join([f"Copy detection on `{Path(data['copy_images']).name}` (CIFAR-10; mAP per edit) and label "
                      f"propagation on the generated video ({data['video']}):", "",
                      table(["weights"] + [f"copy: {e}" for e in edits] + [f"video {s}" for s in scores], rows), "",
                      source_line(ctx)])


@renderer("quickstart", "quickstart_crops32")
def quickstart(data: dict, ctx: Context) -> str:
    """What ``dino-ray quickstart`` printed at its end, as it printed it, and what the whole command took."""
    from dino_ray.jobs.quickstart import report_lines  # plain string formatting: no torch, no Ray

    summary = data["summary"]
    knn = summary["knn_k20"]
    gain = knn["pretrained"]["top1"] - knn["raw_pixels"]["top1"]
    return "\n".join(["```text", *report_lines(summary), "```", "",
                      f"Measured on {data['cpus']} CPU cores: the whole command (Ray's start-up, the pretraining, "
                      f"the evaluations) took {num(data['command_minutes'], 2)} minutes; the teacher scored raw "
                      f"pixels {signed(gain, 1)}.", "", source_line(ctx)])


@renderer("own_data")
def own_data(data: dict, ctx: Context) -> str:
    """A flat folder of JPEG files against the same images as labelled Parquet, then export and embed times."""
    rows = [[name, num(r["train_minutes"], 2), num(r["command_minutes"], 2), f"{r['steps']:,}", r["skipped_images"],
             f"**{num(r['knn_top1'], 2)}**", signed(r["knn_top1"] - data["raw_pixels"], 2)]
            for name, r in data["runs"].items()]
    embed = data["embed"]
    return "\n".join([f"{data['images']:,} CIFAR-10 images, `dino-ray pretrain --config cifar10_cpu "
                      f"budget_minutes={data['budget_minutes']:g}` on a local Ray; weighted k-NN (k=20) with "
                      f"{data['bank_images']:,} of them as the bank, {data['test_images']:,} held-out test images "
                      f"(raw pixels: {num(data['raw_pixels'], 2)}):", "",
                      table(["data_path", "training (min)", "whole command (min)", "steps", "skipped images",
                             "k-NN top-1", "vs raw pixels"], rows), "",
                      "Then, each as the whole command: `dino-ray export` "
                      + ", ".join(f"{fmt} {num(sec)} s" for fmt, sec in data["export_seconds"].items())
                      + f"; `dino-ray embed` of the flat folder {num(embed['seconds'])} s for {embed['images']:,} "
                      f"images ({num(embed['seconds_per_1000'], 2)} s per 1,000, Ray's start-up included).", "",
                      source_line(ctx)])


# ---------------------------------------------------------------------------------------------------------------
# scaling out and listing (files written by benchmarks/scaling.py and benchmarks/listing.py)

@renderer("scaling")
def scaling(data: dict, ctx: Context) -> str:
    """Ray Train workers 1..N: images/s, the step split into compute, gradient all-reduce and input wait."""
    runs = data["runs"]
    mean_wait = all("input_wait_mean_s" in r["median_step"] for r in runs)  # the epoch's shuffle shows there
    rows = [[r["workers"], num(r["images_per_s"]), num(r["step_s"], 3), num(r["median_step"]["compute_s"], 3),
             num(r["median_step"]["allreduce_s"], 4), num(r["median_step"]["input_wait_s"], 3)] +
            ([num(r["median_step"]["input_wait_mean_s"], 3)] if mean_wait else []) +
            [num(r["allreduce_mb_per_step"], 3), r["peak_rss_mb_per_worker"]] for r in runs]

    def plot(path: Path) -> None:
        plt = plot_style()
        figure, (bars, rate) = plt.subplots(1, 2, figsize=(9, 3.4))
        labels, bottom = [str(r["workers"]) for r in runs], [0.0] * len(runs)
        for key, name in (("compute_s", "compute"), ("allreduce_s", "gradient all-reduce"),
                          ("input_wait_s", "input wait")):
            values = [r["median_step"][key] for r in runs]
            bars.bar(labels, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        bars.set_xlabel("Ray Train workers")
        bars.set_ylabel("seconds per step (median worker)")
        bars.legend(fontsize=8)
        rate.plot([r["workers"] for r in runs], [r["images_per_s"] for r in runs], marker="o")
        rate.set_xscale("log", base=2)
        rate.set_xlabel("Ray Train workers")
        rate.set_ylabel("images/s, all workers")
        rate.grid(alpha=0.3)
        save(figure, path)
        plt.close(figure)

    cluster = data.get("machine", {}).get("cluster", "")
    return "\n".join([f"{cluster}; trainable parameters {num(data['trainable_parameters_mb'], 3)} MiB in fp32 "
                      "(what DDP all-reduces each step):", "",
                      ctx.figure("scaling.png", plot, "step time split and images/s against workers"), "",
                      table(["workers", "images/s", "step (s)", "compute (s)", "all-reduce (s)", "input wait (s)"] +
                            (["input wait, mean (s)"] if mean_wait else []) +
                            ["all-reduce MiB / step", "peak RSS MiB / worker"], rows), "",
                      "Seconds are medians over the workers of each worker's median step." if mean_wait else
                      "Seconds are medians over the workers.", "", source_line(ctx)])


@renderer("listing")
def listing(data: dict, ctx: Context) -> str:
    """Seconds to list a folder of images, dino-ray's lister against torchvision's and pathlib's."""
    rows = [[f"`{name}`", num(r["seconds"], 2), f"{r['files']:,}"] for name, r in data["results"].items()]
    return "\n".join([f"{data['files']:,} files in {data['folders']:,} class folders, each lister in a fresh "
                      "process after a warm-up listing:", "", table(["lister", "seconds", "files found"], rows), "",
                      source_line(ctx)])


# ---------------------------------------------------------------------------------------------------------------

def pages(root: Path) -> list[Path]:
    found = [root / "README.md"] if (root / "README.md").exists() else []
    return found + sorted((root / "docs").rglob("*.md"))


def render_page(root: Path, page: Path, draw: bool) -> tuple[str, list[str]]:
    """The page with every block regenerated, and the problems met (unknown names, missing JSON or figures)."""
    text, problems = page.read_text(), []
    name_of = page.relative_to(root).as_posix()
    fences = [m.span() for m in FENCE.finditer(text)]

    def shown(match: re.Match) -> bool:
        return any(start <= match.start() < end for start, end in fences)

    opened = [m.group(1) for m in OPENING.finditer(text) if not shown(m)]
    closed = [m.group("name") for m in BLOCK.finditer(text) if not shown(m)]
    problems += [f"{name_of}: block '{name}' has no '<!-- end: {name} -->'" for name in opened if name not in closed]

    def replace(match: re.Match) -> str:
        name, option = match.group("name"), match.group("option")
        if shown(match):
            return match.group(0)
        if name not in RENDERERS:
            problems.append(f"{name_of}: block '{name}' names no renderer (known: {', '.join(sorted(RENDERERS))})")
            return match.group(0)
        source = root / "benchmarks" / "results" / RENDERERS[name].source
        if not source.exists():
            problems.append(f"{name_of}: block '{name}' needs {source.relative_to(root)}, which does not exist")
            return match.group(0)
        ctx = Context(root, page, name, option, draw)
        body = RENDERERS[name].function(json.loads(source.read_text()), ctx).strip("\n")
        problems.extend(f"{name_of}: block '{name}' links {path.relative_to(root)}, which does not exist (run "
                        "`python benchmarks/render_docs.py`)" for path in ctx.figures if not path.exists())
        head = f"<!-- render: {name}" + (f" {option}" if option else "") + " -->"
        return f"{head}\n{body}\n<!-- end: {name} -->"

    return BLOCK.sub(replace, text), problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming every stale block")
    parser.add_argument("--root", default=str(ROOT), help="the repository (benchmarks/results, docs, README.md)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    failures = []
    for page in pages(root):
        text = page.read_text()
        rendered, problems = render_page(root, page, draw=not args.check)
        failures += problems
        if rendered == text:
            continue
        if args.check:
            for before, after in zip(BLOCK.finditer(text), BLOCK.finditer(rendered)):
                if before.group(0) != after.group(0):
                    name = after.group("name")
                    failures.append(f"{page.relative_to(root).as_posix()}: block '{name}' differs from "
                                    f"benchmarks/results/{RENDERERS[name].source}")
        else:
            page.write_text(rendered)
            print(f"rewrote {page.relative_to(root).as_posix()}")
    for problem in failures:
        print(problem, file=sys.stderr)
    if args.check and not failures:
        print(f"every block matches benchmarks/results ({len(pages(root))} pages checked)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
