"""A real learning test on CIFAR-10: ``make quickstart`` itself, through local Ray into the embedded MLflow store.

The CPU recipe, sized to the quickstart's time budget, lowers the loss and beats its own random init on k-NN (and
the raw pixels, on the CIFAR-10 shards), on whatever data the quickstart finds (the shared shards here; the
package's sample on a fresh clone without them); the pretraining and k-NN runs are in MLflow, the evaluations
nested under the pretraining. It takes a few minutes on 2 cores; CI runs it (marked ``slow`` only for selection).
"""
import math

import pytest
from mlflow.tracking import MlflowClient

from dino_ray.core.config import load_config
from dino_ray.jobs.quickstart import BUDGET_MINUTES, CONFIG, run_quickstart

from .conftest import SHARED_CIFAR


@pytest.mark.slow
def test_cpu_recipe_learns_on_cifar10_and_is_tracked(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_RAY_OFFLINE", "1")  # without the shards: the package's sample, never a download
    summary = run_quickstart(None, None, str(tmp_path / "run"), knn_val_images=2000)  # the data it finds
    knn = summary["knn_k20"]
    print(summary)
    assert summary["data"].startswith("CIFAR-10 shards" if (SHARED_CIFAR / "part-00004.parquet").exists()
                                      else "the package's sample")
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    assert knn["pretrained"]["top1"] > knn["random_init"]["top1"] + 2.0  # measured: see the README's quickstart
    if summary["data"].startswith("CIFAR-10 shards"):  # 10,000 training images: the features beat the pixels
        assert knn["pretrained"]["top1"] > knn["raw_pixels"]["top1"]
    assert (summary["global_crops_size"], summary["eval_image_size"]) == (24, 32)  # evaluated on whole images
    cfg = load_config(CONFIG)

    client = MlflowClient(summary["tracking_uri"])
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    pretraining = client.get_run(summary["mlflow_run_id"])
    assert pretraining.info.status == "FINISHED" and pretraining.data.params["epochs"] == str(cfg.epochs)
    assert [m.step for m in client.get_metric_history(pretraining.info.run_id, "loss")] == list(range(cfg.epochs))
    per_iteration = client.get_metric_history(pretraining.info.run_id, "iter/loss")
    # the time budget chose each epoch's length (and logged it): every log_freq-th iteration of each is recorded
    lengths = [m.value for m in client.get_metric_history(pretraining.info.run_id, "plan_epoch_length")]
    assert len(lengths) == cfg.epochs and summary["budget_minutes"] == BUDGET_MINUTES
    assert len(per_iteration) >= sum(math.ceil(length / cfg.log_freq) for length in lengths)
    assert pretraining.data.metrics["lr"] == pytest.approx(cfg.min_lr, rel=0.05)  # the schedule ran to its end
    assert pretraining.data.metrics["peak_rss_mb"] > 100
    # the k-NN monitor (between epochs on 2 cores, else in Ray's validation tasks; every knn_every-th epoch)
    # evaluated those checkpoints
    monitored = sorted(m.step for m in client.get_metric_history(pretraining.info.run_id, "knn_top1_k20"))
    assert monitored == list(range(cfg.eval.knn_every - 1, cfg.epochs, cfg.eval.knn_every))
    children = client.search_runs([pretraining.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{pretraining.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == ({"knn", "attention"} if cfg.arch.startswith("vit") else {"knn"})
    assert by_name["knn"].data.metrics["top1_k20"] == pytest.approx(knn["pretrained"]["top1"])
    assert by_name["knn"].data.metrics["raw_pixels_top1_k20"] == pytest.approx(knn["raw_pixels"]["top1"])
    assert by_name["knn"].data.tags["dino_ray.checkpoint_epoch"] == str(cfg.epochs)
