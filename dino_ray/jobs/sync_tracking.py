"""``dino-ray sync-tracking``: replay the MLflow calls a run left on disk while its server was away."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from dino_ray.core.args import arg


@dataclass
class SyncTrackingArgs:
    folder: str = arg("", "the folder holding mlflow_queue.json (a run's output_dir/mlflow_queue, or a checkpoint "
                          "folder)", positional=True)
    tracking_uri: Optional[str] = arg(None, "default: the server the run was using")
    wait_s: float = arg(60.0, "how long to wait for an unreachable server")


def sync_tracking_job(args: SyncTrackingArgs) -> dict[str, Any]:
    from dino_ray.platform.tracking.queue import sync_tracking

    summary = sync_tracking(args.folder, args.tracking_uri, args.wait_s)
    print(json.dumps(summary))
    return summary
