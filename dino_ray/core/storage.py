"""Files on cloud storage (``s3://``, ``gs://``, ...) through pyarrow's filesystems, the ones Ray Train writes with.

Checkpoints reported to a cloud ``run.storage_path`` survive the loss of any node; these helpers read them back
(for ``--resume-from``, ``init_from`` and the evaluations' ``--pretrained_weights``), and images or path lists
from a bucket. Credentials and endpoints come from the environment as for any pyarrow / boto3 client: instance
roles on a cloud, ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, or the local one the tests start).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str | Path) -> bool:
    """A cloud location (``scheme://...``), not a local path (``file://`` counts as local)."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI or a local path alike."""
    return "/".join([str(base).rstrip("/"), *parts])


def fetch(uri: str, target_dir: str | Path) -> Path:
    """Copy the file ``uri`` into ``target_dir`` (made if needed); returns the local path."""
    filesystem, path = pafs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"'{uri}' is not a file on its storage ({info.type.name})")
    local = Path(target_dir) / Path(path).name
    local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def exists(location: str | Path) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    filesystem, path = pafs.FileSystem.from_uri(str(location))
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The content of the file ``uri`` (an image or a path list on cloud storage)."""
    filesystem, path = pafs.FileSystem.from_uri(uri)
    with filesystem.open_input_file(path) as f:
        return f.read()
