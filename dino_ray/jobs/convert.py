"""``dino-ray convert-data``: image files into Parquet shards, the shards converted in parallel Ray tasks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dino_ray.core.args import arg


@dataclass
class ConvertArgs:
    source: str = arg("", "image folder (with or without class folders) or a text file of image paths",
                      positional=True)
    target: str = arg("", "folder for part-NNNNN.parquet, _plan.json and _skipped.csv (resumable)", positional=True)
    rows_per_shard: int = arg(1000, "images per Parquet shard")
    use_ray: bool = arg(True, "convert in this process, without Ray", flag="--no-ray")


def convert_job(source: str | Path, target: str | Path, rows_per_shard: int = 1000, use_ray: bool = True
                ) -> dict[str, Any]:
    """``convert_images`` with its shards as Ray tasks (one CPU each), or in this process."""
    from dino_ray.core.data.convert import convert_images

    if not use_ray:
        return convert_images(source, target, rows_per_shard)
    from dino_ray.platform.ray_session import map_tasks, ray_session

    with ray_session():
        return convert_images(source, target, rows_per_shard, partial(map_tasks, unit="shard"))


def convert_data_job(args: ConvertArgs) -> dict[str, Any]:
    summary = convert_job(args.source, args.target, args.rows_per_shard, args.use_ray)
    print(json.dumps(summary))
    return summary
