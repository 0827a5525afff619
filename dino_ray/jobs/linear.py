"""``dino-ray eval-linear``: the linear probe on frozen features (the reference's ``eval_linear.py``), on the Ray
Train wrapper (``dino_ray.platform.ray_train``: checkpoints every epoch, a stopped job resumes) or in this process."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below, check
from dino_ray.eval.args import LinearArgs
from dino_ray.jobs.common import eval_tracking_uri, metric_step, resolve, track

log = logging.getLogger(__name__)


@dataclass
class LinearLaunch:
    """How the probe runs (``LinearArgs``: what it computes) and which store and checkpoint its weights come from."""
    use_ray: bool = arg(True, "run in this process, without Ray", flag="--no-ray")
    ray_workers: int = arg(1, "Ray Train workers")
    max_failures: int = arg(3, "worker failures the job survives, restarting from its checkpoint (-1: forever)")
    tracking_uri: Optional[str] = arg(None, "MLflow store (default: $MLFLOW_TRACKING_URI, else the pretraining's "
                                            "store, else sqlite under output_dir)")
    checkpoint: Optional[str] = arg(None, "with an MLflow run: which logged checkpoint (default: the latest)")

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[str]:
        return below(self, ("ray_workers",), 1) + below(self, ("max_failures",), -1)


def _linear_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: ``run_linear`` with checkpoints through ``ray.train.report``; rank 0 tracks."""
    from dino_ray.platform.ray_train import run_in_scratch

    run_in_scratch("dino_ray_linear", lambda local: _linear_in(local, config))


def _linear_in(local: Path, config: dict[str, Any]) -> None:
    from dino_ray.eval.linear import run_linear
    from dino_ray.platform.checkpoints import Weights
    from dino_ray.platform.ray_train import worker_context
    from dino_ray.platform.tracking.store import RUN_ID_FILE

    args = LinearArgs(**config["args"])
    weights = Weights(Path(args.pretrained_weights), config["pretraining_run"], config["checkpoint_epoch"])

    def open_tracker(resumed: Optional[str]) -> Any:
        from dino_ray.platform.tracking.runs import RunTracker, eval_tracker  # rank 0 alone imports MLflow

        if resumed is None:
            params = {k: v for k, v in asdict(args).items() if not isinstance(v, dict)}
            return eval_tracker(config["tracking_uri"], weights.run_id, "linear", params, epoch=weights.epoch)
        tracker = RunTracker(config["tracking_uri"], "", "", run_id=resumed)
        tracker.parent_run_id = weights.run_id
        return tracker

    worker = worker_context(local, ("checkpoint.pth", "log.txt", RUN_ID_FILE), open_tracker)

    def report(epoch: int, stats: dict[str, float], checkpoint_path: Path) -> None:
        worker.report(stats, epoch, f"linear_epoch{epoch:04d}")

    with worker.finishing():
        stats = run_linear(args, on_epoch_end=report, show_progress=False, work_dir=local)
        if worker.tracker is not None:
            worker.tracker.log_artifact(local / "checkpoint.pth", "linear_head")
            worker.tracker.log_artifact(local / "log.txt")
            if worker.tracker.parent_run_id:
                worker.tracker.log_metrics({"linear_top1": stats["best_acc1"]}, step=metric_step(weights),
                                           run_id=worker.tracker.parent_run_id)


def linear_job(args: LinearArgs, launch: Optional[LinearLaunch] = None) -> dict[str, float]:
    """Train the linear probe as a Ray Train job (resuming a stopped one with the same output_dir), or in
    this process; ``args.evaluate`` only validates a saved head. Writes ``output_dir/linear.json``."""
    from dino_ray.eval.linear import run_linear

    launch = launch or LinearLaunch()
    out = Path(args.output_dir).resolve()
    weights = resolve(args.pretrained_weights, launch.tracking_uri, launch.checkpoint, out)
    local = {k: str(Path(v).resolve()) if v and Path(v).exists() else v
             for k, v in (("train_data_path", args.split("train")), ("val_data_path", args.split("val")),
                          ("head_weights", args.head_weights))}
    args = LinearArgs(**{**asdict(args), **local, "pretrained_weights": str(weights.path.resolve()),
                         "arch": args.arch or weights.arch, "patch_size": args.patch_size or weights.patch_size,
                         "output_dir": str(out)})
    uri = eval_tracking_uri(launch.tracking_uri, weights, out)
    if args.evaluate and not args.head_weights:
        args.head_weights = str(out / "linear_head.pth")  # what a finished eval-linear here left
    if args.evaluate or not launch.use_ray:
        stats = run_linear(args)
        if not args.evaluate:
            shutil.copy(out / "checkpoint.pth", out / "linear_head.pth")
        track("linear-evaluate" if args.evaluate else "linear", asdict(args),
              {k: v for k, v in stats.items() if isinstance(v, float)}, {"linear_top1": stats["best_acc1"]}, weights,
              uri, [])
    else:
        from dino_ray.platform.ray_session import ray_session
        from dino_ray.platform.ray_train import fit, torch_trainer

        with ray_session():
            result = fit(torch_trainer(_linear_per_worker,
                                       {"args": asdict(args), "tracking_uri": uri, "pretraining_run": weights.run_id,
                                        "checkpoint_epoch": weights.epoch},
                                       name="linear", storage_path=str(out / "ray_results"),
                                       num_workers=launch.ray_workers, max_failures=launch.max_failures))
        with result.checkpoint.as_directory() as folder:
            shutil.copy(Path(folder) / "checkpoint.pth", out / "linear_head.pth")
            shutil.copy(Path(folder) / "log.txt", out / "log.txt")
        stats = dict(result.metrics)
    record = {"weights": str(weights.path), "pretraining_run": weights.run_id, "checkpoint_epoch": weights.epoch,
              **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear.json").write_text(json.dumps(record, indent=2))
    log.info("linear evaluation: best top-1 %.2f; head and linear.json in %s", stats["best_acc1"], out)
    return stats
