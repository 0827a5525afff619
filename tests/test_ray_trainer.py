"""Pretraining on real Ray Train workers (gloo on CPU), tracked in the embedded MLflow store."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import mlflow.pytorch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ray.util.state import list_actors  # noqa: E402

from dino_ray import build_backbone, load_pretrained_weights  # noqa: E402

from dino_ray.tracking import tracking_uri  # noqa: E402
from dino_ray.train.ray_trainer import pretrain_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def wait_for(path, timeout=180.0):
    """Block until ``path`` exists (a checkpoint Ray has written), or ``timeout`` seconds."""

    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.2)


def epoch_losses(result_path):
    return [json.loads(line)["train_loss"] for line in open(f"{result_path}/log.txt")]


def test_two_workers_train_resume_and_track_one_mlflow_run(local_ray, tiny_cfg, tmp_path, monkeypatch):
    one = tiny_cfg(epochs=2, batch_size_per_gpu=16, output_dir=str(tmp_path / "one"))
    two = tiny_cfg(epochs=2, batch_size_per_gpu=8, scaling={"num_workers": 2}, output_dir=str(tmp_path / "two"),
                   **{"tracking.log_model": True})
    result_one = pretrain_on_ray(one)
    result_two = pretrain_on_ray(two)
    uri_one = tracking_uri(one)  # before MLFLOW_TRACKING_URI is set below, which tracking_uri() would follow
    b_dir = tmp_path / "two_checkpoint"
    result_two.checkpoint.to_directory(str(b_dir))
    with result_one.checkpoint.as_directory() as a:
        losses_one, losses_two = epoch_losses(a), epoch_losses(b_dir)
    ckpt = torch.load(f"{b_dir}/checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and len(losses_two) == 2
    # same total batch (16): the all-reduced centre, the sampler and the lr scaling give the same curve
    # up to the ranks' different augmentation draws
    for x, y in zip(losses_one, losses_two):
        assert abs(x - y) / x < 0.05, (losses_one, losses_two)

    client = MlflowClient(tracking_uri(two))
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id],
                                filter_string="tags.num_workers = '2'")
    assert run.data.params["scaling.num_workers"] == "2" and run.data.params["lr"] == str(two.lr)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert {"teacher_entropy", "kl_teacher_student", "peak_rss_mb", "iter/loss"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "iter/loss")) == 2 * 2  # 8 iterations, log_freq 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"log.txt", "config.yaml", "checkpoints/checkpoint.pth", "checkpoints/teacher_backbone.pth"} <= artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(two))  # scoped to this test, unlike set_tracking_uri
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/teacher_backbone")
    backbone = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=1, num_heads=2)
    load_pretrained_weights(backbone, f"{b_dir}/checkpoint.pth", "teacher")
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.eval()(x), backbone.eval()(x), atol=1e-6)

    # the same name and storage with more epochs: resumes at epoch 2 and continues the same MLflow run
    longer = tiny_cfg(epochs=3, batch_size_per_gpu=8, scaling={"num_workers": 2}, output_dir=str(tmp_path / "two"))
    result = pretrain_on_ray(longer)
    with result.checkpoint.as_directory() as folder:
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == [0, 1, 2]
    runs = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id],
                              filter_string="tags.num_workers = '2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1, 2]

    # --resume-from an MLflow run id: a new Ray run (other name and storage) continues the 1-worker run's
    # checkpoint and its MLflow run, in the same store
    client_one = MlflowClient(uri_one)
    (run_one,) = client_one.search_runs([client_one.get_experiment_by_name("dino-ray").experiment_id])
    more = tiny_cfg(epochs=3, batch_size_per_gpu=16, output_dir=str(tmp_path / "more"),
                    tracking={"tracking_uri": uri_one})
    result = pretrain_on_ray(more, resume_from=run_one.info.run_id)
    assert result.error is None and result.checkpoint is not None, result.error
    with result.checkpoint.as_directory() as folder:
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == [2]  # 0 and 1 came from MLflow
    assert [m.step for m in client_one.get_metric_history(run_one.info.run_id, "loss")] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor an MLflow run"):
        pretrain_on_ray(more, resume_from="0123456789abcdef")


def test_killed_worker_is_replaced_and_the_run_finishes(local_ray, tiny_cfg, tmp_path):

    cfg = tiny_cfg(epochs=12, saveckp_freq=4, batch_size_per_gpu=8, scaling={"num_workers": 2},
                   failure={"max_failures": 2},
                   output_dir=str(tmp_path / "ft"))
    run_dir = tmp_path / "ft" / "ray_results" / "ft"
    killed = []

    def kill_a_worker_mid_run():
        wait_for(run_dir / "checkpoint_epoch0002")
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(workers[-1].pid, signal.SIGKILL)  # a worker process dies mid-run
        killed.append(len(workers))

    killer = threading.Thread(target=kill_a_worker_mid_run)
    killer.start()
    result = pretrain_on_ray(cfg)  # the driver stays on the main thread
    killer.join()
    assert killed == [2]
    assert result.error is None
    with result.checkpoint.as_directory() as folder:
        epochs = [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")]
        final = torch.load(f"{folder}/checkpoint.pth", weights_only=True)
    assert epochs == list(range(12)), "no epoch of the checkpoint's lineage trained twice"
    assert final["epoch"] == 12 and set(final) >= {"student", "teacher", "optimizer", "dino_loss"}
    client = MlflowClient(tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.info.status == "FINISHED"  # one MLflow run across the restart


def free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(tmp_path, port):

    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen([mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                               "--artifacts-destination", str(tmp_path / "server_artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not start")


def test_tracking_server_and_its_loss_mid_run(local_ray, tiny_cfg, tmp_path):

    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    cfg = tiny_cfg(epochs=12, saveckp_freq=4, tracking={"tracking_uri": uri, "experiment_name": "served"},
                   output_dir=str(tmp_path / "served"))
    run_dir = tmp_path / "served" / "ray_results" / "served"
    logged_before_stop = []

    def stop_server_mid_run():
        wait_for(run_dir / "checkpoint_epoch0003")
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        logged_before_stop.append(len(client.get_metric_history(run.info.run_id, "loss")))
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server goes away mid-run
        server.wait()

    stopper = threading.Thread(target=stop_server_mid_run)
    stopper.start()
    result = pretrain_on_ray(cfg)
    stopper.join()
    assert logged_before_stop[0] >= 3
    assert result.error is None
    with result.checkpoint.as_directory() as folder:  # nothing lost: every epoch is in log.txt
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == list(range(12))
    assert not (tmp_path / "served" / "mlflow.db").exists()  # the server was used, not the embedded store
