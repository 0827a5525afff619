"""Pretraining on real Ray Train workers (gloo on CPU), tracked in the embedded MLflow store."""
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray  # noqa: E402  (installed by the ray extra: a missing Ray fails, never skips)
import torch

pytestmark = pytest.mark.slow  # real Ray processes: make test, not make test-fast

import mlflow.pytorch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dino_ray import build_backbone, load_pretrained_weights  # noqa: E402
from dino_ray.core.args import ConfigError, RunFailed  # noqa: E402
from dino_ray.core.data.cifar10 import SAMPLE  # noqa: E402
from dino_ray.core.storage import fetch  # noqa: E402
from dino_ray.core.train.loop import train_dino  # noqa: E402
from dino_ray.platform import trainer as ray_trainer  # noqa: E402
from dino_ray.platform.checkpoints import resolve_checkpoint  # noqa: E402
from dino_ray.platform.ray_data import count_images, image_dataset  # noqa: E402
from dino_ray.platform.ray_train import torch_trainer  # noqa: E402
from dino_ray.platform.tracking.store import tracking_uri  # noqa: E402
from dino_ray.platform.trainer import check_cluster_paths, pretrain_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(s3_server):  # started first: Ray's processes inherit the S3 server's environment
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def wait_for(path, timeout=180.0):
    """Block until ``path`` exists (a checkpoint Ray has written), or ``timeout`` seconds."""

    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.2)


def epoch_losses(result_path):
    return [json.loads(line)["train_loss"] for line in open(f"{result_path}/log.txt")]


def test_two_workers_train_and_resume_from_an_mlflow_run(local_ray, tiny_cfg, cifar_rows, tmp_path, monkeypatch):
    """2 Ray Train workers fed by Ray Data (decode and batched multi-crop in Ray tasks, on the CPU the workers
    leave free) against one process with the DataLoader and the reference augmentation: the same curve, every
    image once per epoch; then a 1-worker run resumes from the 2-worker run's MLflow run id."""
    one = tiny_cfg(epochs=2, batch_size_per_gpu=16, output_dir=str(tmp_path / "one"))
    two = tiny_cfg(epochs=2, batch_size_per_gpu=8, scaling={"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
                   output_dir=str(tmp_path / "two"), data_loader="ray_data", augmentation="batched",
                   ray_data={"num_cpus": 1, "batch_size": 32, "audit_dir": str(tmp_path / "audit")},
                   **{"tracking.log_model": True})
    train_dino(one, show_progress=False)
    result_two = pretrain_on_ray(two)
    b_dir = tmp_path / "two_checkpoint"
    result_two.checkpoint.to_directory(str(b_dir))
    losses_one, losses_two = epoch_losses(one.output_dir), epoch_losses(b_dir)
    ckpt = torch.load(f"{b_dir}/checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and len(losses_two) == 2
    # same total batch (16): the all-reduced centre, the sharding and the lr scaling give the same curve
    # up to the ranks' different augmentation draws
    for x, y in zip(losses_one, losses_two):
        assert abs(x - y) / x < 0.05, (losses_one, losses_two)
    images = sorted(pq.read_table(cifar_rows, columns=["path"]).column("path").to_pylist()[:128])
    for epoch in (0, 1):
        seen = [(tmp_path / "audit" / f"epoch{epoch:04d}_rank{rank}.txt").read_text().split() for rank in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == 64 and sorted(seen[0] + seen[1]) == images

    uri_two = tracking_uri(two)  # before MLFLOW_TRACKING_URI is set below, which tracking_uri() would follow
    client = MlflowClient(uri_two)
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id],
                                filter_string="tags.num_workers = '2'")
    assert run.data.params["scaling.num_workers"] == "2" and run.data.params["lr"] == str(two.lr)
    assert run.data.params["data_loader"] == "ray_data"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert {"teacher_entropy", "kl_teacher_student", "peak_rss_mb", "iter/loss"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "iter/loss")) == 2 * 2  # 8 iterations, log_freq 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"log.txt", "config.yaml", "checkpoints/checkpoint.pth", "checkpoints/teacher_backbone.pth"} <= artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_two)  # scoped to this test, unlike set_tracking_uri
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/teacher_backbone")
    backbone = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=1, num_heads=2)
    load_pretrained_weights(backbone, f"{b_dir}/checkpoint.pth", "teacher")
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(x), backbone.eval()(x), atol=1e-6)  # exported in eval mode: no train/eval switch

    # --resume-from an MLflow run id: a new Ray run (other name and storage, 1 worker, the DataLoader) continues
    # the 2-worker run's checkpoint and its MLflow run, in the same store
    assert run.data.tags["torch_threads"] == "1"  # Ray's default for a worker of one CPU or less
    # its k-NN monitor in Ray's asynchronous validation task (on these 2 CPUs it would run between epochs unasked)
    more = tiny_cfg(epochs=3, batch_size_per_gpu=16, output_dir=str(tmp_path / "more"),
                    tracking={"tracking_uri": uri_two}, scaling={"threads_per_worker": 2},
                    eval={"knn_every": 1, "knn_sync": False, "knn_val_data": str(SAMPLE / "val.parquet"),
                          "knn_train_images": 128, "knn_val_images": 64, "attention_images": 0})
    result = pretrain_on_ray(more, resume_from=run.info.run_id)
    assert result.error is None and result.checkpoint is not None, result.error
    with result.checkpoint.as_directory() as folder:
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == [2]  # 0 and 1 came from MLflow
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1_k20")] == [2]
    assert client.get_run(run.info.run_id).data.tags["torch_threads"] == "2"  # scaling.threads_per_worker
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor an MLflow run"):
        pretrain_on_ray(more, resume_from="0123456789abcdef" * 2)  # an MLflow run id this store lacks


def test_checkpoints_and_artifacts_on_s3_and_a_resume_from_there_alone(local_ray, s3_server, tiny_cfg, cifar_rows,
                                                                       tmp_path, monkeypatch, caplog):
    """Everything on the (local) S3 server: Ray's checkpoints and MLflow's artifacts. A new driver with no
    local file of the run (the first one's machine is gone) resumes from the bucket and continues the MLflow
    run. A worker or node lost mid-run is restored the same way, from the storage (test_ray_job.py)."""
    caplog.set_level(logging.INFO, logger="dino_ray")
    storage, artifacts = f"{s3_server}/ray_results", f"{s3_server}/mlartifacts"
    mlflow_db = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the server's database; its artifacts are in the bucket

    def on_s3(epochs: int):
        return tiny_cfg(epochs=epochs, batch_size_per_gpu=8, scaling={"num_workers": 2},
                        output_dir=str(tmp_path / "s3run"), run={"name": "s3run", "storage_path": storage},
                        tracking={"tracking_uri": mlflow_db, "artifact_location": artifacts},
                        eval={"knn_every": 1, "knn_val_data": str(SAMPLE / "val.parquet"), "knn_train_images": 128,
                              "knn_val_images": 64, "attention_images": 0})

    result = pretrain_on_ray(on_s3(2))
    assert result.error is None
    assert result.checkpoint.path == "dino-ray/ray_results/s3run/checkpoint_epoch0001"  # in the bucket
    assert not (tmp_path / "s3run").exists()  # nothing of the run is on this machine: a new driver has only S3

    result = pretrain_on_ray(on_s3(3))  # the same name and storage with more epochs
    assert result.error is None
    with result.checkpoint.as_directory() as folder:
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == [0, 1, 2]
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.info.status == "FINISHED"  # one MLflow run across the resume
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    # the monitor ran on rank 0 between epochs, unasked: the 2 workers keep both CPUs busy
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1_k20")] == [0, 1, 2]
    assert caplog.text.count("k-NN monitor every 1 epochs: on rank 0 between epochs") == 2
    assert run.info.artifact_uri.startswith(artifacts)
    s3, _ = pafs.FileSystem.from_uri(s3_server)  # as Ray and MLflow reach it: through AWS_ENDPOINT_URL
    stored = {info.path for info in s3.get_file_info(pafs.FileSelector("dino-ray/mlartifacts", recursive=True))}
    assert f"dino-ray/mlartifacts/{run.info.run_id}/artifacts/checkpoints/checkpoint.pth" in stored

    # Ray Data (data_loader: ray_data) reads training data from the bucket as from a local file
    s3.create_dir("dino-ray/data")
    with s3.open_output_stream("dino-ray/data/rows.parquet") as out:
        out.write(cifar_rows.read_bytes())
    assert count_images(f"{s3_server}/data") == 256
    rows = image_dataset(f"{s3_server}/data", max_images=8).take_all()
    local = pq.read_table(cifar_rows).slice(0, 256).to_pydict()
    assert len(rows) == 8 and all(local["image"][local["path"].index(row["path"])] == row["image"] for row in rows)

    # an evaluation reads the checkpoint straight from the storage and finds its MLflow run beside it
    weights = resolve_checkpoint(f"{s3_server}/ray_results/s3run/checkpoint_epoch0002/checkpoint.pth",
                              cache_dir=tmp_path / "weights")
    assert weights.epoch == 3 and weights.run_id == run.info.run_id and weights.tracking_uri == mlflow_db

    # --resume-from a file of this machine into a new run: the workers read the copy staged in the run's storage
    local = fetch(f"{s3_server}/ray_results/s3run/checkpoint_epoch0002/checkpoint.pth", tmp_path / "here")
    stage = ray_trainer.stage

    def stage_then_delete(*args, **kwargs):
        staged = stage(*args, **kwargs)
        local.unlink()  # from now on only the storage has it, as for a worker on another node
        return staged

    monkeypatch.setattr(ray_trainer, "stage", stage_then_delete)
    moved = dataclasses.replace(on_s3(4), run=dataclasses.replace(on_s3(4).run, name="s3moved"))
    result = pretrain_on_ray(moved, resume_from=str(local))
    assert result.error is None and not local.exists()
    with result.checkpoint.as_directory() as folder:  # epochs 0-2 came with the checkpoint, epoch 3 is new
        assert torch.load(f"{folder}/checkpoint.pth", weights_only=False)["epoch"] == 4
    assert "dino-ray/ray_results/s3moved/resume_from/checkpoint.pth" in {
        info.path for info in s3.get_file_info(pafs.FileSelector("dino-ray/ray_results/s3moved", recursive=True))}
    with pytest.raises(FileNotFoundError, match="'checkpints/last.pth' is neither a file"):
        pretrain_on_ray(moved, resume_from="checkpints/last.pth")  # a typo is named, not sent to MLflow


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


def test_tracking_server_killed_and_restarted_mid_run_loses_nothing(local_ray, tiny_cfg, tmp_path):
    """A real ``mlflow server`` SIGKILLed after epoch 3 and started again (same store, same port) two epochs
    later: every epoch's metrics reach it with their own steps, and the run ends FINISHED."""
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    cfg = tiny_cfg(epochs=8, saveckp_freq=4, tracking={"tracking_uri": uri, "experiment_name": "served",
                                                         "retry_timeout_s": 120},
                   output_dir=str(tmp_path / "served"))
    run_dir = tmp_path / "served" / "ray_results" / "served"
    logged_before_stop, servers = [], [server]

    def kill_then_restart():
        wait_for(run_dir / "checkpoint_epoch0003")
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        logged_before_stop.append(len(client.get_metric_history(run.info.run_id, "loss")))
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server goes away mid-run
        server.wait()
        wait_for(run_dir / "checkpoint_epoch0005")  # two epochs logged into the void
        servers.append(start_mlflow_server(tmp_path, port))

    outage = threading.Thread(target=kill_then_restart)
    outage.start()
    try:
        result = pretrain_on_ray(cfg)
        outage.join()
        assert result.error is None
        assert 3 <= logged_before_stop[0] < 8
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(8))
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert {"checkpoints/checkpoint0004.pth", "checkpoints/checkpoint.pth"} <= logged
        assert not (tmp_path / "served" / "mlflow_queue").exists()  # nothing left behind
    finally:
        for each in servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(each.pid, signal.SIGKILL)
    assert not (tmp_path / "served" / "mlflow.db").exists()  # the server was used, not the embedded store


def test_two_ray_train_workers_with_batchnorm_train_what_one_process_trains(local_ray, tmp_path):
    """Ray Train's own gloo group (2 CPU workers), the CIFAR ResNet with its BN head: synchronised BatchNorm makes
    2 x 8 images train the model 1 x 16 trains (tests/test_world_size.py runs every family on forked ranks)."""
    from .test_world_size import FAMILIES, config, difference, handed_in, ray_train_rank

    family = FAMILIES["resnet_bn_head_sinkhorn"]
    one = config(family, 1, tmp_path)
    train_dino(one, show_progress=False, epoch_batches=handed_in(one, 0))  # here: no fork beside Ray's threads
    two = config(family, 2, tmp_path)
    result = torch_trainer(ray_train_rank, {"config": two.to_dict()}, name="equivalence",
                           storage_path=str(tmp_path / "ray_results"), num_workers=2).fit()
    assert result.error is None
    error = difference(torch.load(f"{one.output_dir}/checkpoint.pth", weights_only=True),
                       torch.load(f"{two.output_dir}/checkpoint.pth", weights_only=True))
    print(f"2 Ray Train workers vs 1 process: {error:.2e} of the update")
    assert error < 1e-5


def test_with_the_shipped_failure_defaults_a_killed_worker_costs_only_a_restart(local_ray, tiny_cfg, tmp_path):
    """No failure settings given: a training worker SIGKILLed (an OOM kill, a crash) after epoch 1 restarts
    the run from its latest checkpoint and the run finishes; every epoch once in the checkpoint's lineage and in
    MLflow, one MLflow run, FINISHED."""
    from ray.util.state import list_actors

    cfg = tiny_cfg(epochs=5, batch_size_per_gpu=8, scaling={"num_workers": 2}, output_dir=str(tmp_path / "killed"))
    assert cfg.failure.max_failures == 3 and cfg.failure.max_preemption_failures == -1
    run_dir = tmp_path / "killed" / "ray_results" / "killed"
    killed = []

    def kill_a_worker():
        wait_for(run_dir / "checkpoint_epoch0001")
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(workers[-1].pid, signal.SIGKILL)
        killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    result = pretrain_on_ray(cfg)
    killer.join()
    assert killed and result.error is None
    with result.checkpoint.as_directory() as folder:
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == [0, 1, 2, 3, 4]
    client = MlflowClient(tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2, 3, 4]


def test_a_deterministic_error_stops_the_run_with_its_message_and_mlflow_says_failed(local_ray, tiny_cfg,
                                                                                     tmp_path):
    """A learning rate that makes the loss non-finite fails the same way after the restart: the run stops there
    (not after max_failures restarts), the error is the message, and the MLflow run is FAILED."""
    cfg = tiny_cfg(epochs=3, lr=1e30, output_dir=str(tmp_path / "diverges"))
    with pytest.raises(RunFailed, match=r"the same error twice from the start, not retried again: "
                                        r"FloatingPointError: loss is nan at epoch 0"):
        pretrain_on_ray(cfg)
    client = MlflowClient(tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert run.info.status == "FAILED"


def test_local_paths_a_machine_of_the_cluster_cannot_see_are_refused_before_any_worker_starts(local_ray, tiny_cfg,
                                                                                            tmp_path):
    """A second node joins the cluster from a mount namespace where the test's folder is an empty tmpfs, as
    another machine's disk would be: the local storage and data paths are refused, naming the node; the same run
    with both on a path every node shares (here /tmp itself) passes the check."""
    hidden = tmp_path / "here_only"
    hidden.mkdir()
    shutil.copy(tiny_cfg().data_path, hidden / "rows.parquet")
    ray_bin = Path(sys.executable).parent / "ray"
    current = Path("/tmp/ray/ray_current_cluster")  # `ray start` points later ray.init() calls at this cluster
    before = current.read_text() if current.exists() else None
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs none {hidden} && exec {ray_bin} start --block --num-cpus=1 "
                             f"--address={ray.get_runtime_context().gcs_address}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2, "the second node did not join"
        cfg = tiny_cfg(data_path=str(hidden / "rows.parquet"), output_dir=str(hidden / "run"))
        with pytest.raises(ConfigError, match=r"several machines and data_path '.*here_only/rows.parquet' is not "
                                              r"visible on .*; run.storage_path '.*here_only/run/ray_results' is not "
                                              r"visible on .*: use a location every machine reads"):
            check_cluster_paths(cfg)
        check_cluster_paths(tiny_cfg())  # the fixture's rows and tmp_path: /tmp, seen by both nodes
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        current.unlink(missing_ok=True)
        if before is not None:
            current.write_text(before)
