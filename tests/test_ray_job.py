"""``ray job submit`` end to end: a head started with ``ray start``, token auth, a tiny pretraining job, MLflow."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    port, dashboard = free_port(), free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    yield env
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_ray_job_submit_runs_a_tracked_pretraining(ray_head, tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2, output_dir=str(tmp_path / "job"))
    overrides = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in cfg.to_dict().items()]
    submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--no-wait", "--working-dir", str(ROOT), "--",
                             "dino-ray", "pretrain", *overrides], env=ray_head, capture_output=True, text=True,
                            timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout + submit.stderr).group(0)
    deadline, status = time.time() + 300, ""
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(2)
        out = subprocess.run([str(BIN / "ray"), "job", "status", job_id], env=ray_head, capture_output=True,
                             text=True).stdout
        found = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", out)  # the CLI's own words
        status = found.group(1).upper() if found else ""
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", job_id], env=ray_head, capture_output=True, text=True).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "MLflow: run" in logs and "epoch 1/2" in logs

    client = MlflowClient(f"sqlite:///{tmp_path / 'job' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.data.tags["ray_job_id"] != "none"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert "checkpoints/checkpoint.pth" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
