"""Shared fixtures: tiny configs and small real image sets (CIFAR-10 rows of the package's sample)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from dino_ray.core.config import build_config
from dino_ray.core.data.cifar10 import SAMPLE, shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = shards()  # the data root's CIFAR-10 (DINO_RAY_DATA), when there

torch.set_num_threads(2)

TINY = dict(arch="vit_tiny", patch_size=4, embed_dim=32, depth=1, num_heads=2, out_dim=64, head_hidden_dim=64,
            head_bottleneck_dim=32, global_crops_size=16, local_crops_size=8, local_crops_number=2,
            batch_size_per_gpu=16, epochs=3, warmup_epochs=1, num_workers=0, drop_path_rate=0.0, saveckp_freq=1,
            **{"tracking.log_model": False})  # the MLflow model costs seconds a run: one test checks it


@pytest.fixture(scope="session")
def cifar_rows(tmp_path_factory) -> Path:
    """A Parquet file of 256 real CIFAR-10 rows."""
    out = tmp_path_factory.mktemp("cifar") / "rows.parquet"
    pq.write_table(pq.read_table(SAMPLE / "train.parquet").slice(0, 256), out)
    return out


@pytest.fixture
def tiny_cfg(tmp_path, cifar_rows):
    """A config for a 1-block ViT on 16 px crops: a whole epoch of 128 images takes about a second."""
    def make(**overrides):
        values = dict(TINY, data_path=str(cifar_rows), output_dir=str(tmp_path / "run"), max_images=128)
        values.update(overrides)
        return build_config(values)
    return make


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server (moto) with an empty bucket, and the environment every S3 client here
    (pyarrow for Ray's storage, boto3 for MLflow's artifacts, and the Ray processes started after it) reads:
    ``AWS_ENDPOINT_URL`` and dummy credentials. Yields the bucket's URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(key, value)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    server.kill()
                    raise RuntimeError("the local S3 server did not start")
                time.sleep(0.2)
        filesystem, _ = pafs.FileSystem.from_uri("s3://dino-ray?allow_bucket_creation=true")
        filesystem.create_dir("dino-ray")  # the bucket
        yield "s3://dino-ray"
    server.terminate()
    server.wait()


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is not a passing one: any skip fails the run (a missing package, a missing file)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) skipped: every test must run (see the skip reasons above)",
                            red=True)
        session.exitstatus = 1


def write_images(folder: Path, count: int, start: int = 0, classes: bool = False) -> list[Path]:
    """``count`` real CIFAR-10 images of the sample as JPEG files under ``folder`` (``<class>/`` subfolders when
    ``classes``): a user's own folder of photos."""
    table = pq.read_table(SAMPLE / "train.parquet").slice(start, count)
    written = []
    for i, (data, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist())):
        path = folder / (f"class{label}" if classes else "") / f"img{start + i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written
