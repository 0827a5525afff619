"""Where checkpoints come from: files (and the pretraining run beside them), hub names, MLflow run ids."""
import pytest
import torch

from dino_ray import build_backbone
from dino_ray.core.train.loop import train_dino
from dino_ray.platform.checkpoints import resolve_checkpoint
from dino_ray.platform.tracking.store import RUN_ID_FILE


def test_a_ray_checkpoint_knows_its_run_and_store(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=1)
    train_dino(cfg, show_progress=False)
    (tmp_path / "run" / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    weights = resolve_checkpoint(f"{cfg.output_dir}/checkpoint.pth")
    assert weights.run_id == "0123456789abcdef0123456789abcdef" and weights.epoch == 1
    assert weights.tracking_uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"  # from the recorded config


def test_hub_names_use_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "hub" / "checkpoints" / "dino_deitsmall16_pretrain.pth"
    torch.save(build_backbone("vit_small", 16).state_dict(), cached)
    weights = resolve_checkpoint("dino_vits16")
    assert (weights.path, weights.arch, weights.patch_size, weights.run_id) == (cached, "vit_small", 16, None)


def test_run_ids_need_a_store_and_unknown_sources_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="--tracking_uri"):
        resolve_checkpoint("runs:/0123456789abcdef0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="'nope.pth' is neither a file, an s3:// or gs:// URI, an MLflow run"):
        resolve_checkpoint("nope.pth")
