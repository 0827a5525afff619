"""Ray Tune sweeps of DINO's knobs, ranked by the k-NN monitor, with an MLflow parent run and one child per trial.

A sweep file names a base pretraining config, overrides, and a search space over any config key::

    base: ../cifar10_cpu.yaml          # relative to the sweep file
    overrides: {epochs: 3}
    search_space:
      teacher_temp: {grid: [0.04, 0.07]}
      lr: {loguniform: [1.0e-4, 1.0e-2]}
    num_samples: 1                     # samples of the non-grid dimensions (x every grid point)
    metric: knn_top1_k20               # reported by the k-NN monitor
    mode: max
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    max_concurrent_trials: 1
    trial_cpus: 0.1                    # the trial's driver; its TorchTrainer asks for its own workers

A search space may also hold named ``variants``: each a set of overrides of the base (or of another config file,
``config:``), tried as one grid dimension (``dino_ray.platform.search`` builds its rounds this way).

Each trial is a Tune function trainable that builds and fits a full TorchTrainer pretraining (Ray
Train V2's supported pattern: ``TuneReportCallback`` forwards rank 0's reports to Tune). The monitor
runs inside the report (``eval.knn_sync``) so the scheduler ranks trials by k-NN, not by the loss,
which does not rank representations. A trial restarted by a resumed sweep resumes its own Ray
Train run and MLflow run from its latest checkpoint: no duplicate runs, no finished trial redone.
The file is checked whole (keys with typo hints, types, every value a valid config, the scheduler against the
epochs) before Ray starts or any folder is made.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402

from dino_ray.core.args import ConfigError, arg, build_args, check, one_of, unknown_keys  # noqa: E402
from dino_ray.core.config import build_config, flatten, load_config, parse_overrides, recipe_path  # noqa: E402
from dino_ray.platform.ray_session import ray_session  # noqa: E402
from dino_ray.platform.ray_train import fit  # noqa: E402
from dino_ray.platform.tracking.runs import RunTracker  # noqa: E402
from dino_ray.platform.tracking.store import RUN_ID_FILE, tracking_uri, ui_command  # noqa: E402
from dino_ray.platform.trainer import absolute_data_paths, build_trainer  # noqa: E402

log = logging.getLogger(__name__)
DOMAINS = ("grid", "choice", "uniform", "loguniform")
VARIANT = "variant"  # the search-space key of named variants
PARENT_RUN_FILE = "mlflow_parent_run_id.txt"
SPEC_FILE = "sweep.json"


@dataclass
class SweepSpec:
    """A resolved sweep: the sweep file's keys, with ``base`` (and each variant) as a flat, valid config."""
    name: str = arg("", "the sweep's folder and MLflow run name (default: the file's name)")
    base: dict = arg(help="the base pretraining config, flat (sections dotted)", factory=dict)
    search_space: dict = arg(help="config key: {grid|choice|uniform|loguniform: [...]}", factory=dict)
    variants: dict = arg(help="name: flat config of each named variant", factory=dict)
    num_samples: int = arg(1, "samples of the non-grid dimensions (x every grid point)")
    metric: str = arg("knn_top1_k20", "reported metric the trials are ranked by")
    mode: str = arg("max", "max or min")
    scheduler: dict = arg(help="{type: asha, grace_period, reduction_factor, max_t} or {type: none}",
                          factory=lambda: {"type": "asha"})
    max_concurrent_trials: int = arg(1, "trials at once")
    trial_cpus: float = arg(0.1, "CPUs of a trial's driver (its TorchTrainer asks for its own workers)")
    time_budget_s: Optional[float] = arg(None, "no trial runs past this many seconds from the start")
    storage_path: str = arg("outputs/sweeps", "where sweeps live")
    register: Optional[str] = arg(None, "register the best trial's teacher in the MLflow Model Registry as this name")
    alias: str = arg("best", "the alias of the registered version (models:/<register>@<alias>)")

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[str]:
        problems = one_of("mode", self.mode, ("max", "min")) + one_of(
            "scheduler.type", self.scheduler.get("type", "asha"), ("asha", "none"))
        problems += [f"{key} must be >= 1, got {getattr(self, key)}" for key in ("num_samples", "max_concurrent_trials")
                     if getattr(self, key) < 1]
        if self.register and not self.base.get("tracking.log_model", True):
            problems.append(f"register={self.register} needs the trials' MLflow models: tracking.log_model: true")
        for key, domain in self.search_space.items():
            if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
                problems.append(f"search_space.{key} must be one of {{grid|choice|uniform|loguniform: [...]}}, got "
                                f"{domain!r}")
        if self.scheduler.get("type", "asha") == "asha":
            max_t = self.scheduler.get("max_t", self.epochs())
            grace = self.scheduler.get("grace_period", 1)
            if grace > max_t:
                problems.append(f"scheduler.grace_period ({grace}) exceeds the epochs a trial runs ({max_t}): ASHA "
                                f"could stop no trial; lower grace_period or raise epochs")
        return problems

    def epochs(self) -> int:
        """The most epochs a trial runs (its base's, or its variant's)."""
        return max(int(config["epochs"]) for config in (self.variants or {"": self.base}).values())


def load_sweep(path: str | Path, overrides: Optional[list[str]] = None) -> SweepSpec:
    """Read and check a sweep file; ``key=value`` overrides apply to the base config (``epochs=2``), or to the
    sweep itself for its own keys (``register=dino-cifar``)."""
    path = recipe_path(path, "sweeps")
    raw = yaml.safe_load(path.read_text()) or {}
    own = {f.name for f in dataclasses.fields(SweepSpec)} - {"base", "search_space", "variants"}
    parsed = parse_overrides(overrides or [])
    raw.update({k: v for k, v in parsed.items() if k in own})
    overrides = [f"{k}={json.dumps(v)}" for k, v in parsed.items() if k not in own]
    unknown_keys(raw, [f.name for f in dataclasses.fields(SweepSpec) if f.name != "variants"] + ["overrides"],
                 f"sweep file '{path}'")
    if "base" not in raw or "search_space" not in raw:
        raise ConfigError(f"sweep file '{path}' needs 'base' (a pretraining config) and 'search_space'")
    base_overrides = [f"{k}={json.dumps(v)}" for k, v in flatten(raw.pop("overrides", None) or {}).items()]
    cfg = absolute_data_paths(load_config(path.parent / raw["base"], [*base_overrides, *(overrides or [])]))
    spec = build_args(SweepSpec, {"name": path.stem, **raw, "base": flatten(cfg.to_dict())}, f"sweep file '{path}'")
    check_values(spec, f"sweep file '{path}'")
    if spec.metric.startswith("knn") and cfg.eval.knn_every != 1:
        raise ConfigError(f"sweep '{path}': metric '{spec.metric}' comes from the k-NN monitor, which must run "
                          f"every epoch (eval.knn_every: 1, got {cfg.eval.knn_every}) so each report carries it")
    return spec


def check_values(spec: SweepSpec, source: str) -> None:
    """Every value of every dimension makes a valid config: fail now, not in trial 7 (a sampled range: its first
    bound)."""
    for key, domain in spec.search_space.items():
        kind, values = next(iter(domain.items()))
        for value in values if kind in ("grid", "choice") else values[:1]:
            for name, config in (spec.variants or {"": spec.base}).items():
                try:
                    build_config({**config, **({} if key == VARIANT else {key: value})})
                except ConfigError as exc:
                    raise ConfigError(f"{source}, search_space.{key} = {value!r}{f' ({name})' if name else ''}: "
                                      f"{exc}") from exc


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
    return ASHAScheduler(time_attr="epoch", max_t=options.pop("max_t", spec.epochs()), **options)


def run_trial(config: dict[str, Any], base: dict[str, Any], variants: dict[str, dict[str, Any]], sweep_dir: str,
              parent_run_id: Optional[str], uri: str) -> None:
    """One trial: a full TorchTrainer pretraining with the trial's values (over its variant's config, when the
    space has variants), reporting to Tune every epoch."""
    name = tune.get_context().get_trial_name()
    config = dict(config)
    own_base = variants[config.pop(VARIANT)] if VARIANT in config else base
    values = {**own_base, **config, "output_dir": f"{sweep_dir}/{name}", "run.name": name,
              "run.storage_path": f"{sweep_dir}/trials", "tracking.tracking_uri": uri,
              "tracking.parent_run_id": parent_run_id, "eval.knn_sync": True}
    cfg = absolute_data_paths(build_config(values, source=f"trial {name}"))
    fit(build_trainer(cfg, callbacks=[TuneReportCallback()]))


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
                                 variants={name: {**config, "tracking.experiment_name": experiment}
                                           for name, config in spec.variants.items()},
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
                                            num_samples=spec.num_samples, time_budget_s=spec.time_budget_s,
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
        own_base = spec.variants.get(result.config.get(VARIANT), spec.base)
        epochs = result.config.get("epochs", own_base["epochs"])  # the trial's own, when epochs is swept
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
        if spec.register:
            tracker.register(best_run_id(best["checkpoint"]), spec.register, spec.alias)
        tracker.close_children("KILLED")  # trials the scheduler stopped were killed mid-run: not RUNNING forever
        tracker.finish()
        log.info("sweep %s: MLflow parent run %s; see it with: %s", spec.name, parent, ui_command(uri))


def best_run_id(checkpoint: str) -> str:
    """The MLflow run of the trial a reported checkpoint belongs to (its ``mlflow_run_id.txt``)."""
    run_file = Path(checkpoint) / RUN_ID_FILE
    if not checkpoint or not run_file.exists():
        raise FileNotFoundError(f"the best trial's checkpoint '{checkpoint}' names no MLflow run: nothing to register")
    return run_file.read_text().strip()


def format_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    columns = ["trial", *spec.search_space, spec.metric, "epochs_run", "status"]
    cells = [[(f"{r[c]:.2f}" if c == spec.metric else f"{r[c]:.6g}") if isinstance(r[c], float) else str(r[c])
              for c in columns] for r in rows]  # a knob as given (0.996, not 1.00); the metric to 2 decimals
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


