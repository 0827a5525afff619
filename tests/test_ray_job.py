"""``ray job submit`` to an autoscaling cluster, end to end: the cluster grows for the job, loses a node, shrinks.

The cluster is Ray's fake multi-node provider on this machine, with token auth: a head with no CPU,
so the job's two 1-CPU training workers can only run on worker nodes the autoscaler launches for
them (each a real raylet here, as a cloud VM would be). After a checkpoint, three training worker
processes are killed one after another, then the node of one training worker (its raylet and every
process on it, as a preempted VM); a replacement node joins, the workers restart from the checkpoint
and the job finishes; once the autoscaler's nodes idle, the autoscaler removes them. The job is then
submitted again with more epochs (the autoscaler launches nodes again), stopped mid-epoch with
``ray job stop`` and submitted once more: it resumes and continues the same MLflow run. The jobs'
logs, status, checkpoint lineage and MLflow run are checked.

The replacement is started by hand (``ray start --address``): Ray 2.60's fake provider cannot
replace a lost node itself. Its nodes keep the launch status "uninitialized" (it has no node
updaters and refuses tag updates), so autoscaler v1 never declares a dead one lost and waits for it
forever; autoscaler v2 would, but its monitor needs ``fake_multi_node/example.yaml``, which the 2.60
wheel does not ship.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # noqa: E402  (installed by the ray extra: a missing Ray fails, never skips)
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # real Ray processes: make test, not make test-fast

from ray.util.state import list_actors  # noqa: E402

from .test_ray_trainer import free_port, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IDLE_MINUTES = 0.1


def fake_cluster_config(max_nodes: int) -> dict:
    """A cluster-launcher config for ``fake_multinode``: a 0-CPU head and 1-CPU worker nodes from 0 to max_nodes."""
    return {
        "cluster_name": "dino-ray-fake", "max_workers": max_nodes, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        # the fake provider starts raylets itself: no SSH updaters; a node's address is its id
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_1": {"resources": {"CPU": 1, "object_store_memory": 200 * 2**20}, "node_config": {},
                      "min_workers": 0, "max_workers": max_nodes},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }



@pytest.fixture
def autoscaling_head(tmp_path):
    config = tmp_path / "fake_cluster.json"
    config.write_text(json.dumps(fake_cluster_config(max_nodes=2)))
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_FAKE_CLUSTER="1",
               AUTOSCALER_UPDATE_INTERVAL_S="1")
    dashboard = free_port()
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=0", f"--autoscaling-config={config}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                    # a lost node is declared dead after 2 missed 1-s health checks (default: 5 x 3 s)
                    '--system-config={"health_check_period_ms": 1000, "health_check_failure_threshold": 2}'],
                   env=env, check=True, capture_output=True)
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    ray.init("auto", log_to_driver=False)  # this test's view of the cluster's nodes
    yield env
    ray.shutdown()
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def worker_nodes(alive: bool | None = None) -> list[dict]:
    return [n for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0 and (alive is None or n["Alive"] == alive)]



def job_status(job_id: str, env: dict) -> str:
    out = subprocess.run([str(BIN / "ray"), "job", "status", job_id], env=env, capture_output=True, text=True).stdout
    found = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out)  # the CLI's own words
    return found.group(1).split()[-1].upper() if found else ""


def submit(overrides: list[str], env: dict) -> str:
    """``ray job submit --no-wait`` of ``dino-ray pretrain`` with these overrides; returns the job id."""
    done = subprocess.run([str(BIN / "ray"), "job", "submit", "--no-wait", "--working-dir", str(ROOT), "--",
                           "dino-ray", "pretrain", *overrides], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", done.stdout + done.stderr).group(0)


def wait_for_job(job_id: str, env: dict, timeout: float = 300.0) -> tuple[str, str]:
    """The job's final status and its logs."""
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(2)
        status = job_status(job_id, env)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", job_id], env=env, capture_output=True, text=True).stdout
    return status, logs


def wait_for_epoch(run_dir: Path, epoch: int, timeout: float = 240.0) -> None:
    """Block until Ray has reported a checkpoint of ``epoch`` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(int(p.name[-4:]) >= epoch for p in run_dir.glob("checkpoint_epoch*")):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of epoch {epoch} in {run_dir} after {timeout} s")


def test_job_submit_scales_up_survives_worker_kills_and_a_lost_node_and_scales_down(autoscaling_head, tiny_cfg,
                                                                                   tmp_path):
    """Three training workers SIGKILLed one after another, then a whole node lost, in one job: every epoch is
    once in the final checkpoint's lineage and once in MLflow, the final checkpoint is complete."""
    assert worker_nodes(alive=True) == []  # nothing but the CPU-less head
    cfg = tiny_cfg(epochs=12, saveckp_freq=4, batch_size_per_gpu=8, output_dir=str(tmp_path / "job"),
                   scaling={"num_workers": 2}, failure={"max_failures": 6})
    overrides = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in cfg.to_dict().items()]
    job_id = submit(overrides, autoscaling_head)
    run_dir = tmp_path / "job" / "ray_results" / "job"
    wait_for(run_dir / "checkpoint_epoch0001", timeout=240)
    launched = worker_nodes(alive=True)
    first_workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    for epoch in (2, 4, 6):  # a worker process killed (an OOM kill, a crash), three times in a row
        alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(alive[epoch % len(alive)].pid, signal.SIGKILL)
        wait_for_epoch(run_dir, epoch)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    raylet = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(workers[0].pid)], capture_output=True,
                                text=True).stdout)  # a worker process's parent is its node's raylet
    os.kill(raylet, signal.SIGKILL)  # the node is lost, as a preempted VM would be
    subprocess.run([str(BIN / "ray"), "start", f"--address={ray.get_runtime_context().gcs_address}", "--num-cpus=1",
                    f"--object-store-memory={200 * 2**20}", '--resources={"replacement": 1}'],
                   env=autoscaling_head, check=True, capture_output=True)
    status, logs = wait_for_job(job_id, autoscaling_head)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "MLflow: run" in logs and "epoch 11/12" in logs and logs.count("resumed from") >= 4
    assert len(launched) == 2 and {w.node_id for w in first_workers} == {n["NodeID"] for n in launched}, \
        "the autoscaler launched one 1-CPU node per training worker, and the workers ran there"
    latest = max(run_dir.glob("checkpoint_epoch*"))
    assert latest.name == "checkpoint_epoch0011"
    epochs = [json.loads(line)["epoch"] for line in open(latest / "log.txt")]
    assert epochs == list(range(12)), "no epoch of the checkpoint's lineage trained twice"
    final = torch.load(latest / "checkpoint.pth", weights_only=True)
    assert final["epoch"] == 12 and set(final) >= {"student", "teacher", "optimizer", "dino_loss", "args"}

    client = MlflowClient(f"sqlite:///{tmp_path / 'job' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.data.tags["ray_job_id"] != "none" and run.info.status == "FINISHED"  # one run across the restart
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(12))  # once
    assert "checkpoints/checkpoint.pth" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}

    def autoscaled() -> list[dict]:
        return [n for n in worker_nodes(alive=True) if "replacement" not in n["Resources"]]

    deadline = time.time() + 120
    while autoscaled() and time.time() < deadline:
        time.sleep(1)
    assert autoscaled() == [], f"idle worker nodes were not removed after {IDLE_MINUTES} min"

    # `ray job stop` in the middle of an epoch, then the same job submitted again: it resumes, the MLflow run goes on
    longer = [o if not o.startswith("epochs=") else "epochs=16" for o in overrides]
    stopped = submit(longer, autoscaling_head)
    wait_for_epoch(run_dir, 13)
    time.sleep(0.3)  # inside epoch 14
    subprocess.run([str(BIN / "ray"), "job", "stop", stopped], env=autoscaling_head, check=True, capture_output=True,
                   timeout=120)
    assert wait_for_job(stopped, autoscaling_head)[0] == "STOPPED"
    status, logs = wait_for_job(submit(longer, autoscaling_head), autoscaling_head)
    assert status == "SUCCEEDED" and "continuing run" in logs, logs[-3000:]
    latest = max(run_dir.glob("checkpoint_epoch*"))
    assert [json.loads(line)["epoch"] for line in open(latest / "log.txt")] == list(range(16))
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(16))
