"""The k-NN monitor of a running pretraining, given a reported checkpoint (a plain folder as Ray's Checkpoint) and
the pretraining's MLflow run in a SQLite store: it scores the teacher and logs into that run at the epoch."""
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray.train import Checkpoint

from dino_ray.core.train.loop import train_dino
from dino_ray.platform.monitor import knn_monitor
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
