"""``dino-ray convert-data``: any image folder (labelled or not) or a list of image paths into Parquet shards.

Millions of small files are slow to list, copy and read from cloud storage; a few hundred Parquet
shards are not, and both the DataLoader mode and Ray Data read them (``dino_ray.core.data.datasets``).
Each row keeps the file's encoded bytes unchanged (no re-encoding: pixels round-trip exactly), its label (-1
when the source has none), class name and path relative to the source. Shards are converted in parallel Ray
tasks (or in this process), each written under a temporary name and renamed when complete, so an interrupted
conversion resumes where it stopped; a plan file (``_plan.json``, written
before any shard) ties the shards to the source's file list. Files that are not images by their names, and
files that do not read or decode, are skipped; each shard records its own skipped files in its Parquet
metadata, so the report (``_skipped.csv``, with the reasons) is rebuilt from the shards however many
runs wrote them. A final pass reads every shard back, checks its row count and decodes every image.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from dino_ray.core.data.datasets import list_images
from dino_ray.core.storage import is_uri, read_bytes

log = logging.getLogger(__name__)

PLAN_FILE, SKIPPED_FILE = "_plan.json", "_skipped.csv"
SKIPPED_KEY = b"dino_ray.skipped"  # a shard's metadata: JSON [[path, reason], ...] of the files it left out
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()),
                    ("path", pa.string())])


ROW_GROUP_ROWS = 100  # the unit a lazy reader (ParquetImageDataset) fetches for one image: keep it small

def conversion_files(source: str | Path) -> tuple[str, list[tuple[str, int, str]], list[str], list[list[str]]]:
    """``(root, [(path, label, class name), ...], classes, [[path, reason], ...] left out)`` for any image source
    ``list_images`` reads: a folder (labelled by class subfolders when that is its layout) or a path list. Paths
    under the root are kept relative to it (the Parquet rows' ``path``), others absolute or URIs."""
    listing = list_images(source)
    root = str(Path(source).resolve() if Path(source).is_dir() else Path(source).resolve().parent)

    def named(path: str) -> str:
        inside = not is_uri(path) and os.path.commonpath([root, os.path.abspath(path)]) == root
        return os.path.relpath(path, root) if inside else path

    files = [(named(path), label, listing.classes[label] if label >= 0 else "")
             for path, label in zip(listing.files, listing.labels)]
    return root, files, listing.classes, [[named(path), "not an image by its name"] for path in listing.left_out]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def convert_shard(root: str, files: list[tuple[str, int, str]], target: str) -> None:
    """Write one shard of the files that read and decode, with ``[path, reason]`` of the others in its metadata."""
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    skipped = []
    for path, label, class_name in files:
        try:
            data = read_bytes(path) if is_uri(path) else (Path(root) / path).read_bytes()
            Image.open(io.BytesIO(data)).convert("RGB")  # decodes every pixel, not just the header
        except Exception as exc:  # noqa: BLE001 - unreadable, or not an image whatever its name says
            skipped.append([path, f"{type(exc).__name__}: {exc}"])
            continue
        for name, value in zip(SCHEMA.names, (data, label, class_name, path)):
            rows[name].append(value)
    partial = Path(target).with_suffix(".parquet.partial")
    schema = SCHEMA.with_metadata({SKIPPED_KEY: json.dumps(skipped).encode()})
    pq.write_table(pa.table(rows, schema=schema), partial, row_group_size=ROW_GROUP_ROWS)
    partial.rename(target)  # complete shards only ever have their final name


def shard_skipped(path: str | Path) -> list[list[str]]:
    return json.loads(pq.read_schema(path).metadata[SKIPPED_KEY])


def verify_shard(path: str, expected_rows: int) -> Optional[str]:
    """None if the shard has ``expected_rows`` rows that all decode; otherwise what is wrong."""
    table = pq.read_table(path)
    if table.num_rows != expected_rows:
        return f"{path}: {table.num_rows} rows, expected {expected_rows}"
    for relative, data in zip(table.column("path").to_pylist(), table.column("image").to_pylist()):
        try:
            Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:  # noqa: BLE001
            return f"{path}: row {relative} does not decode ({exc})"
    return None


MapCalls = Callable[[Callable, list[tuple], str], list[Any]]


def map_here(fn: Callable, calls: list[tuple], description: str) -> list[Any]:
    """``[fn(*args) for args in calls]`` in this process, with a progress bar (a ``MapCalls``)."""
    return [fn(*args) for args in tqdm(calls, desc=description, unit="shard")]


def convert_images(source: str | Path, target: str | Path, rows_per_shard: int = 1000,
                   map_calls: MapCalls = map_here) -> dict[str, Any]:
    """Convert (or finish converting) ``source`` into ``target``/part-NNNNN.parquet; returns a summary.
    ``map_calls`` runs the shards' conversions and checks: here, or as Ray tasks (``dino-ray convert-data``)."""
    root, files, classes, left_out = conversion_files(source)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shards = [files[i:i + rows_per_shard] for i in range(0, len(files), rows_per_shard)]
    plan = {"source": str(Path(source).resolve()), "classes": classes, "rows_per_shard": rows_per_shard,
            "files": len(files), "files_sha1": hashlib.sha1(json.dumps(files).encode()).hexdigest()}
    plan_path = target / PLAN_FILE
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        changed = [k for k in plan if previous.get(k) != plan[k]]
        if changed:
            raise ValueError(f"'{target}' holds a conversion of another source or layout ({', '.join(changed)} "
                             f"differ from {plan_path}): convert into an empty folder")
    plan_path.write_text(json.dumps(plan, indent=1))  # before any shard: a resumed run checks it
    todo = [i for i in range(len(shards)) if not (target / shard_name(i)).exists()]
    log.info("converting %d files of %d classes from %s into %d shards in %s (%d already done)", len(files),
             len(classes), root, len(shards), target, len(shards) - len(todo))
    map_calls(convert_shard, [(root, shards[i], str(target / shard_name(i))) for i in todo], "convert")
    skipped = [shard_skipped(target / shard_name(i)) for i in range(len(shards))]
    with open(target / SKIPPED_FILE, "w", newline="") as report:
        writer = csv.writer(report)
        writer.writerow(["path", "reason"])
        writer.writerows(left_out + [row for rows in skipped for row in rows])
    expected = [len(shard) - len(left_out) for shard, left_out in zip(shards, skipped)]
    problems = [p for p in map_calls(verify_shard, [(str(target / shard_name(i)), n) for i, n in enumerate(expected)],
                                     "verify") if p]
    if problems:
        raise RuntimeError(f"conversion into '{target}' failed verification: {'; '.join(problems)}")
    summary = {"rows": sum(expected), "skipped": len(left_out) + sum(len(v) for v in skipped),
               "shards": len(shards),
               "classes": len(classes), "target": str(target)}
    log.info("converted: %s; skipped files listed in %s", json.dumps(summary), target / SKIPPED_FILE)
    return summary
