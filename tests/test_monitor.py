"""The k-NN monitor of a running pretraining, given a reported checkpoint (a plain folder as Ray's Checkpoint) and
the pretraining's MLflow run in a SQLite store: it scores the teacher and logs into that run at the epoch."""
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray.train import Checkpoint

from dino_ray.core.config import build_config, load_config
from dino_ray.core.train.loop import train_dino
from dino_ray.platform.monitor import knn_monitor, monitor_between_epochs, training_cpus
from dino_ray.platform.tracking.store import RUN_ID_FILE, tracking_uri

from .conftest import SAMPLE


def test_the_monitor_scores_the_reported_teacher_and_logs_into_the_pretraining_run(tiny_cfg):
    cfg = tiny_cfg(epochs=1, eval={"knn_every": 1, "knn_val_data": str(SAMPLE / "val.parquet"),
                                   "knn_train_images": 300, "knn_val_images": 100, "attention_images": 1})
    train_dino(cfg, show_progress=False)
    folder = Path(cfg.output_dir)
    metrics = knn_monitor(Checkpoint.from_directory(folder), cfg.to_dict(), epoch=0)
    assert set(metrics) == {"knn_top1_k20", "knn_top5_k20"} and 0 < metrics["knn_top1_k20"] <= 100
    assert not list(folder.glob("*.png"))  # no run to log into: no figures either

    client = MlflowClient(tracking_uri(cfg))
    run = client.create_run(client.create_experiment("dino-ray")).info.run_id
    (folder / RUN_ID_FILE).write_text(run)
    again = knn_monitor(Checkpoint.from_directory(folder), cfg.to_dict(), epoch=0)
    assert again == metrics  # the same teacher and images: the same score
    history = client.get_metric_history(run, "knn_top1_k20")
    assert [(m.step, m.value) for m in history] == [(0, metrics["knn_top1_k20"])]
    assert [a.path for a in client.list_artifacts(run, "attention/epoch0000")] == \
        ["attention/epoch0000/img00.png"]  # the ViT's attention on the first held-out image


def test_the_monitor_runs_between_epochs_where_the_training_takes_every_cpu():
    """Where the training's threads fill the cluster, a monitor task would compete with them for the cores: the
    monitor then runs on rank 0 in the epoch's report. With CPUs to spare it gets its own Ray task; an explicit
    ``eval.knn_sync`` wins either way."""
    laptop = load_config("cifar10_cpu")  # 1 worker of 2 torch threads
    assert training_cpus(laptop) == 2
    assert monitor_between_epochs(laptop, cluster_cpus=2) and not monitor_between_epochs(laptop, cluster_cpus=8)
    assert not monitor_between_epochs(load_config("cifar10_cpu", ["eval.knn_sync=false"]), cluster_cpus=2)
    assert monitor_between_epochs(load_config("cifar10_cpu", ["eval.knn_sync=true"]), cluster_cpus=64)
    gpus = build_config({"scaling": {"num_workers": 8, "resources_per_worker": {"CPU": 10, "GPU": 1}}})
    assert training_cpus(gpus) == 80 and not monitor_between_epochs(gpus, cluster_cpus=96)
    assert monitor_between_epochs(build_config({"eval": {"num_cpus": 4}}), cluster_cpus=4)  # 3 CPUs left, 4 asked
    halves = build_config({"scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}})
    assert training_cpus(halves) == 2  # a worker of half a CPU still runs a thread
    # Ray Data's decode tasks take CPUs beside the workers: with them, nothing is left for a task
    loading = build_config({"data_loader": "ray_data", "ray_data": {"num_cpus": 2}})
    assert monitor_between_epochs(loading, cluster_cpus=3) and not monitor_between_epochs(loading, cluster_cpus=4)
    # an autoscaling cluster still without its GPU workers (a head of 0 CPUs): it will grow, the monitor gets a task
    assert not monitor_between_epochs(gpus, cluster_cpus=0)
