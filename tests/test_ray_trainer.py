"""Pretraining on real Ray Train workers (gloo on CPU), tracked in the embedded MLflow store."""
import json

import pytest
import torch

ray = pytest.importorskip("ray")

from mlflow.tracking import MlflowClient  # noqa: E402

from dino_ray.tracking import tracking_uri  # noqa: E402
from dino_ray.train.ray_trainer import pretrain_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def epoch_losses(result_path):
    return [json.loads(line)["train_loss"] for line in open(f"{result_path}/log.txt")]


def test_two_workers_train_resume_and_track_one_mlflow_run(local_ray, tiny_cfg, tmp_path):
    one = tiny_cfg(epochs=2, batch_size_per_gpu=16, output_dir=str(tmp_path / "one"))
    two = tiny_cfg(epochs=2, batch_size_per_gpu=8, scaling={"num_workers": 2}, output_dir=str(tmp_path / "two"))
    result_one = pretrain_on_ray(one)
    result_two = pretrain_on_ray(two)
    with result_one.checkpoint.as_directory() as a, result_two.checkpoint.as_directory() as b:
        losses_one, losses_two = epoch_losses(a), epoch_losses(b)
        ckpt = torch.load(f"{b}/checkpoint.pth", weights_only=True)
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
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"log.txt", "config.yaml", "checkpoints/checkpoint.pth"} <= artifacts

    # the same name and storage with more epochs: resumes at epoch 2 and continues the same MLflow run
    longer = tiny_cfg(epochs=3, batch_size_per_gpu=8, scaling={"num_workers": 2}, output_dir=str(tmp_path / "two"))
    result = pretrain_on_ray(longer)
    with result.checkpoint.as_directory() as folder:
        assert [json.loads(line)["epoch"] for line in open(f"{folder}/log.txt")] == [0, 1, 2]
    runs = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id],
                              filter_string="tags.num_workers = '2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1, 2]
