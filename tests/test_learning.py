"""A real learning test on CIFAR-10: ``make quickstart`` itself, through local Ray into the embedded MLflow store.

The CPU recipe lowers the loss and beats its own random init on k-NN; the pretraining, k-NN and
attention runs are in MLflow, the evaluations nested under the pretraining. It takes a few minutes
on 2 cores; CI runs it (marked ``slow`` only for selection).
"""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dino_ray.quickstart import run_quickstart

from .conftest import SAMPLE, SHARED_CIFAR


@pytest.mark.slow
def test_cpu_recipe_learns_on_cifar10_and_is_tracked(tmp_path):
    shared = (SHARED_CIFAR / "part-00000.parquet").exists()
    train = SHARED_CIFAR / "part-00000.parquet" if shared else SAMPLE / "train.parquet"
    val = SHARED_CIFAR / "part-00004.parquet" if shared else SAMPLE / "val.parquet"  # never pretrained on
    summary = run_quickstart(str(train), str(val), str(tmp_path / "run"), knn_val_images=2000)
    knn = summary["knn_k20"]
    print(summary)
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    assert knn["pretrained"]["top1"] > knn["random_init"]["top1"] + 1.0  # measured: 27.6 vs 25.7

    client = MlflowClient(summary["tracking_uri"])
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    pretraining = client.get_run(summary["mlflow_run_id"])
    assert pretraining.info.status == "FINISHED" and pretraining.data.params["epochs"] == "6"
    assert [m.step for m in client.get_metric_history(pretraining.info.run_id, "loss")] == list(range(6))
    per_iteration = client.get_metric_history(pretraining.info.run_id, "iter/loss")
    assert len(per_iteration) >= 6 * 5  # 50 iterations per epoch, every log_freq=10th
    assert pretraining.data.metrics["peak_rss_mb"] > 100
    # the k-NN monitor (Ray validation tasks, knn_every 2) evaluated the checkpoints of epochs 2, 4 and 6
    assert sorted(m.step for m in client.get_metric_history(pretraining.info.run_id, "knn_top1_k20")) == [1, 3, 5]
    assert {a.path for a in client.list_artifacts(pretraining.info.run_id, "attention/epoch0005")} == \
        {"attention/epoch0005/img00.png", "attention/epoch0005/img01.png"}
    children = client.search_runs([pretraining.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{pretraining.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"knn", "attention"}
    assert by_name["knn"].data.metrics["top1_k20"] == pytest.approx(knn["pretrained"]["top1"])
    assert by_name["knn"].data.tags["dino_ray.checkpoint_epoch"] == "6"
    figures = [a.path for a in client.list_artifacts(by_name["attention"].info.run_id, "attention/img00")]
    assert figures == ["attention/img00/attention.png"]
    assert len(list(Path(summary["attention"]).glob("img0*/attn-head*.png"))) == 4 * 4  # 4 images x 4 heads
