"""Ray Tune sweeps of DINO's knobs, ranked by the k-NN monitor, with an MLflow parent run and one child per trial.

A sweep file names a base pretraining config, overrides, and a search space over any config key::

    base: ../cifar10_cpu.yaml          # relative to the sweep file
    overrides: {epochs: 3}
    search_space:
      teacher_temp: {grid: [0.04, 0.07]}
      lr: {loguniform: [1.0e-4, 1.0e-2]}
    num_samples: 1                     # samples of the non-grid dimensions (x every grid point)
    metric: knn_top1_k20               # reported by the k-NN monitor (eval.knn_every must be 1)
    mode: max
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    max_concurrent_trials: 1
    trial_cpus: 0.1                    # the trial's driver; its TorchTrainer asks for its own workers

Each trial is a Tune function trainable that builds and fits a full TorchTrainer pretraining (Ray
Train V2's supported pattern: ``TuneReportCallback`` forwards rank 0's reports to Tune). The monitor
runs inside the report (``eval.knn_sync``) so the scheduler ranks trials by k-NN, not by the loss,
which does not rank representations. A trial restarted by a resumed sweep resumes its own Ray
Train run and MLflow run from its latest checkpoint: no duplicate runs, no finished trial redone.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402

from dino_ray.config import ConfigError, build_config, flatten, load_config  # noqa: E402
from dino_ray.ray_session import ray_session  # noqa: E402
from dino_ray.tracking import RunTracker, tracking_uri, ui_command  # noqa: E402
from dino_ray.train.ray_trainer import absolute_data_paths, build_trainer  # noqa: E402

log = logging.getLogger(__name__)
DOMAINS = ("grid", "choice", "uniform", "loguniform")
PARENT_RUN_FILE = "mlflow_parent_run_id.txt"
SPEC_FILE = "sweep.json"


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # the resolved base pretraining config (flat, dotted sections)
    search_space: dict[str, dict[str, list]]
    num_samples: int = 1
    metric: str = "knn_top1_k20"
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    max_concurrent_trials: int = 1
    trial_cpus: float = 0.1
    storage_path: str = "outputs/sweeps"


def load_sweep(path: str | Path, overrides: Optional[list[str]] = None) -> SweepSpec:
    """Read and check a sweep file; ``key=value`` overrides apply to the base config (``epochs=2``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file '{path}' does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "base", "overrides", "search_space", "num_samples", "metric", "mode", "scheduler",
                          "max_concurrent_trials", "trial_cpus", "storage_path"}
    if unknown:
        raise ConfigError(f"sweep file '{path}': unknown key(s) {sorted(unknown)}")
    if "base" not in raw or "search_space" not in raw:
        raise ConfigError(f"sweep file '{path}' needs 'base' (a pretraining config) and 'search_space'")
    base_overrides = [f"{k}={json.dumps(v)}" for k, v in flatten(raw.get("overrides") or {}).items()]
    cfg = load_config(path.parent / raw["base"], [*base_overrides, *(overrides or [])])
    space = raw["search_space"]
    for key, domain in space.items():
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise ConfigError(f"sweep file '{path}': search_space.{key} must be one of {{grid|choice|uniform|"
                              f"loguniform: [...]}}, got {domain!r}")
        kind, values = next(iter(domain.items()))
        samples = values if kind in ("grid", "choice") else values[:1]
        for value in samples:  # every value must make a valid config: fail now, not in trial 7
            try:
                build_config({**flatten(cfg.to_dict()), key: value})
            except ConfigError as exc:
                raise ConfigError(f"sweep file '{path}', search_space.{key} = {value!r}: {exc}") from exc
    cfg = absolute_data_paths(cfg)  # trials run in Tune's trial folders: paths as this process sees them
    spec = SweepSpec(name=raw.get("name", path.stem), base=flatten(cfg.to_dict()), search_space=space,
                     **{k: raw[k] for k in ("num_samples", "metric", "mode", "scheduler", "max_concurrent_trials",
                                            "trial_cpus", "storage_path") if k in raw})
    if spec.metric.startswith("knn") and cfg.eval.knn_every != 1:
        raise ConfigError(f"sweep '{path}': metric '{spec.metric}' comes from the k-NN monitor, which must run "
                          f"every epoch (eval.knn_every: 1, got {cfg.eval.knn_every}) so each report carries it")
    return spec


def param_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    def domain(kind: str, values: list) -> Any:
        if kind == "grid":
            return tune.grid_search(values)
        if kind == "choice":
            return tune.choice(values)
        if kind == "uniform":
            return tune.uniform(*values)
        return tune.loguniform(*values)
    return {key: domain(*next(iter(d.items()))) for key, d in space.items()}


def scheduler_of(spec: SweepSpec) -> Any:
    options = dict(spec.scheduler)
    kind = options.pop("type", "asha")
    if kind == "none":
        return FIFOScheduler()
    if kind != "asha":
        raise ConfigError(f"sweep '{spec.name}': scheduler type '{kind}' is not one of asha, none")
    # time is the reported epoch (0-based), not Tune's iteration count, which restarts when a trial resumes
    return ASHAScheduler(time_attr="epoch", max_t=options.pop("max_t", spec.base["epochs"]), **options)


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str, parent_run_id: Optional[str],
              uri: str) -> None:
    """One trial: a full TorchTrainer pretraining with the trial's values, reporting to Tune every epoch."""
    name = tune.get_context().get_trial_name()
    values = {**base, **config, "output_dir": f"{sweep_dir}/{name}", "run.name": name,
              "run.storage_path": f"{sweep_dir}/trials", "tracking.tracking_uri": uri,
              "tracking.parent_run_id": parent_run_id, "eval.knn_sync": True}
    cfg = absolute_data_paths(build_config(values, source=f"trial {name}"))
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def _parent_run(spec: SweepSpec, sweep_dir: Path, uri: str, experiment: str) -> Optional[str]:
    """The sweep's MLflow run, created once and reused by a resumed sweep."""
    run_file = sweep_dir / PARENT_RUN_FILE
    if run_file.exists():
        return run_file.read_text().strip()
    params = {f"search.{k}": json.dumps(v) for k, v in spec.search_space.items()}
    params.update({"num_samples": spec.num_samples, "metric": spec.metric, "mode": spec.mode,
                   "scheduler": json.dumps(spec.scheduler), "max_concurrent_trials": spec.max_concurrent_trials})
    tracker = RunTracker(uri, experiment, f"sweep-{spec.name}", params, tags={"dino_ray.sweep": spec.name})
    if tracker.run_id:
        run_file.write_text(tracker.run_id)
    return tracker.run_id


def resume_sweep(name: str, storage_path: str = "outputs/sweeps") -> tuple[SweepSpec, list[dict[str, Any]]]:
    """Continue an interrupted sweep from its folder: finished trials are kept, unfinished ones resume."""
    stored = Path(storage_path) / name / SPEC_FILE
    if not stored.exists():
        raise FileNotFoundError(f"no sweep '{name}' to resume: '{stored}' does not exist")
    spec = SweepSpec(**json.loads(stored.read_text()))  # the trials keep the values they were started with
    return spec, run_sweep(spec, resume=True)


def run_sweep(spec: SweepSpec, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns one row per trial (values, metric, epochs, status, checkpoint)."""
    sweep_dir = (Path(spec.storage_path) / spec.name).resolve()
    base_cfg = build_config({**spec.base, "output_dir": str(sweep_dir)})
    uri = tracking_uri(base_cfg)
    experiment = base_cfg.tracking.experiment_name
    if not resume and (sweep_dir / SPEC_FILE).exists():
        raise FileExistsError(f"sweep '{spec.name}' already exists in {sweep_dir}: continue it with "
                              f"`dino-ray sweep --resume {spec.name}`, or choose another name")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SPEC_FILE).write_text(json.dumps(spec.__dict__, indent=2))
    parent = _parent_run(spec, sweep_dir, uri, experiment)
    with ray_session():
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base={**spec.base, "tracking.experiment_name": experiment},
                                 sweep_dir=str(sweep_dir), parent_run_id=parent, uri=uri),
            {"cpu": spec.trial_cpus})
        tune_dir = sweep_dir / "tune"
        if resume and tune.Tuner.can_restore(str(tune_dir / spec.name)):
            tuner = tune.Tuner.restore(str(tune_dir / spec.name), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space(spec.search_space),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler_of(spec),
                                            num_samples=spec.num_samples,
                                            max_concurrent_trials=spec.max_concurrent_trials),
                run_config=tune.RunConfig(name=spec.name, storage_path=str(tune_dir)))
        rows = summarize(spec, tuner.fit(), sweep_dir)
    record_sweep(spec, rows, sweep_dir, uri, parent)
    return rows


def summarize(spec: SweepSpec, results: Any, sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        checkpoint = (result.metrics or {}).get("checkpoint_path", "")
        name = Path(checkpoint).parent.name if checkpoint else Path(result.path).name  # trials/<name>/checkpoint_*
        history = result.metrics_dataframe
        value = (history[spec.metric].dropna().iloc[-1] if history is not None and spec.metric in history
                 and history[spec.metric].notna().any() else math.nan)
        epochs = result.config.get("epochs", spec.base["epochs"])  # the trial's own, when epochs is swept
        status = "ERROR" if result.error else ("STOPPED" if (result.metrics or {}).get("epoch", -1) + 1 < epochs
                                                else "TERMINATED")
        rows.append({"trial": name, **{k: result.config.get(k) for k in spec.search_space},
                     spec.metric: float(value), "epochs_run": (result.metrics or {}).get("epoch", -1) + 1,
                     "status": status, "checkpoint": checkpoint})
    rows.sort(key=lambda r: -math.inf if math.isnan(r[spec.metric]) else
              (r[spec.metric] if spec.mode == "max" else -r[spec.metric]), reverse=True)
    return rows


def record_sweep(spec: SweepSpec, rows: list[dict[str, Any]], sweep_dir: Path, uri: str,
                 parent: Optional[str]) -> None:
    """results.csv and metric-vs-knob plots in the sweep folder and on the parent run; the best trial."""
    table = sweep_dir / "results.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure, axes = plt.subplots(1, len(spec.search_space), figsize=(4 * len(spec.search_space), 3.2), squeeze=False)
    for ax, knob in zip(axes[0], spec.search_space):
        xs = [r[knob] for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        positions = xs if numeric else [str(x) for x in xs]
        ax.scatter(positions, [r[spec.metric] for r in rows], c=["tab:red" if r["status"] != "TERMINATED" else
                                                                  "tab:blue" for r in rows])
        if numeric and "loguniform" in spec.search_space[knob]:
            ax.set_xscale("log")
        ax.set_xlabel(knob)
        ax.set_ylabel(spec.metric)
    figure.suptitle(f"sweep {spec.name} (red: stopped early or failed)", fontsize=9)
    figure.tight_layout()
    plot = sweep_dir / "metric_vs_knobs.png"
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    best = rows[0]
    if parent:
        tracker = RunTracker(uri, "", "", run_id=parent)
        if not math.isnan(best[spec.metric]):
            tracker.log_metrics({f"best_{spec.metric}": best[spec.metric]}, step=0)
        tracker.set_tags({"best_trial": best["trial"], "best_checkpoint": best["checkpoint"]})
        tracker.log_artifact(table)
        tracker.log_artifact(plot)
        tracker.finish()
        _close_stopped_children(tracker, parent)
        log.info("sweep %s: MLflow parent run %s; see it with: %s", spec.name, parent, ui_command(uri))


def _close_stopped_children(tracker: RunTracker, parent: str) -> None:
    """Trials the scheduler stopped were killed mid-run: mark their MLflow runs KILLED, not RUNNING forever."""
    experiment = tracker.client.get_run(parent).info.experiment_id
    for run in tracker.client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        if run.info.status == "RUNNING":
            tracker.client.set_terminated(run.info.run_id, "KILLED")


def format_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    columns = ["trial", *spec.search_space, spec.metric, "epochs_run", "status"]
    cells = [[(f"{r[c]:.2f}" if c == spec.metric else f"{r[c]:.6g}") if isinstance(r[c], float) else str(r[c])
              for c in columns] for r in rows]  # a knob as given (0.996, not 1.00); the metric to 2 decimals
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


