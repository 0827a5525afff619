"""``dino-ray convert-data``: an ImageFolder tree (or a list of image files) into Parquet shards.

Millions of small files are slow to list, copy and read from cloud storage; a few hundred Parquet
shards are not, and both the DataLoader mode and Ray Data read them (``dino_ray.core.data.datasets``).
Each row keeps the file's encoded bytes unchanged (no re-encoding: pixels round-trip exactly), its
label, class name and path relative to the source. Shards are converted in parallel Ray tasks (or
in this process), each written under a temporary name and renamed when
complete, so an interrupted conversion resumes where it stopped; a plan file (``_plan.json``, written
before any shard) ties the shards to the source's file list. Files that do not decode as images
(corrupt, or not images at all) are skipped; each shard records its own skipped files in its Parquet
metadata, so the report (``_skipped.csv``, with the reasons) is rebuilt from the shards however many
runs wrote them. A final pass reads every shard back, checks its row count and decodes every image.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

PLAN_FILE, SKIPPED_FILE = "_plan.json", "_skipped.csv"
SKIPPED_KEY = b"dino_ray.skipped"  # a shard's metadata: JSON [[path, reason], ...] of the files it left out
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()),
                    ("path", pa.string())])


ROW_GROUP_ROWS = 100  # the unit a lazy reader (ParquetImageDataset) fetches for one image: keep it small

def list_images(source: str | Path) -> tuple[Path, list[tuple[str, str]]]:
    """``(root, [(relative path, class name), ...])`` sorted by path; the class is the file's folder.

    ``source`` is an ImageFolder root (``<root>/<class>/<file>``, every file taken: the decoder decides
    what is an image) or a text file listing image paths, one per line (relative to the list's folder).
    """
    source = Path(source)
    if source.is_dir():
        classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise ValueError(f"'{source}' has no class folders: expected <root>/<class>/<image files>")
        files = [(str(p.relative_to(source)), cls) for cls in classes for p in sorted((source / cls).rglob("*"))
                 if p.is_file() and not p.name.startswith(".")]
        return source, files
    if source.is_file():
        root = source.parent
        lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        missing = [line for line in lines if not (root / line).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) listed in '{source}' do not exist, e.g. '{missing[0]}'")
        return root, sorted((line, Path(line).parent.name) for line in lines)
    raise FileNotFoundError(f"convert-data source '{source}' is neither a folder nor a list file")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def convert_shard(root: str, files: list[tuple[str, str]], labels: dict[str, int], target: str) -> None:
    """Write one shard of the files that decode, with ``[path, reason]`` of those skipped in its metadata."""
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    skipped = []
    for relative, class_name in files:
        data = (Path(root) / relative).read_bytes()
        try:
            Image.open(io.BytesIO(data)).convert("RGB")  # decodes every pixel, not just the header
        except Exception as exc:  # noqa: BLE001 - whatever the decoder says, the file is not a usable image
            skipped.append([relative, f"{type(exc).__name__}: {exc}"])
            continue
        for name, value in zip(SCHEMA.names, (data, labels[class_name], class_name, relative)):
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
    root, files = list_images(source)
    if not files:
        raise ValueError(f"no files found in '{source}'")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    classes = sorted({cls for _, cls in files})
    labels = {cls: i for i, cls in enumerate(classes)}
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
    map_calls(convert_shard, [(str(root), shards[i], labels, str(target / shard_name(i))) for i in todo], "convert")
    skipped = [shard_skipped(target / shard_name(i)) for i in range(len(shards))]
    with open(target / SKIPPED_FILE, "w", newline="") as report:
        writer = csv.writer(report)
        writer.writerow(["path", "reason"])
        writer.writerows(row for rows in skipped for row in rows)
    expected = [len(shard) - len(left_out) for shard, left_out in zip(shards, skipped)]
    problems = [p for p in map_calls(verify_shard, [(str(target / shard_name(i)), n) for i, n in enumerate(expected)],
                                     "verify") if p]
    if problems:
        raise RuntimeError(f"conversion into '{target}' failed verification: {'; '.join(problems)}")
    summary = {"rows": sum(expected), "skipped": sum(len(v) for v in skipped), "shards": len(shards),
               "classes": len(classes), "target": str(target)}
    log.info("converted: %s; skipped files listed in %s", json.dumps(summary), target / SKIPPED_FILE)
    return summary
