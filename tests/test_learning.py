"""A real learning test on CIFAR-10: the CPU recipe lowers the loss and beats its own random init on k-NN.

This is ``make quickstart`` itself (same config, same data choice), so the test also guards the
quickstart. It takes a few minutes on 2 cores; CI runs it (marked ``slow`` only for selection).
"""
import pytest

from dino_ray.quickstart import run_quickstart

from .conftest import SAMPLE, SHARED_CIFAR


@pytest.mark.slow
def test_cpu_recipe_learns_on_cifar10(tmp_path):
    shared = (SHARED_CIFAR / "part-00000.parquet").exists()
    train = SHARED_CIFAR / "part-00000.parquet" if shared else SAMPLE / "train.parquet"
    val = SHARED_CIFAR / "part-00004.parquet" if shared else SAMPLE / "val.parquet"  # never pretrained on
    summary = run_quickstart(str(train), str(val), str(tmp_path / "run"), knn_val_images=2000)
    knn = summary["knn_k20"]
    print(summary)
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    assert knn["pretrained"]["top1"] > knn["random_init"]["top1"] + 1.0  # measured: 27.6 vs 25.7
