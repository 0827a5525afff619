"""Continued pretraining (``init_from``): a new run from a full checkpoint (heads, teacher and centre come along)
or from a backbone alone (fresh heads, the backbone frozen while they warm up), from torchvision and timm files,
from an MLflow run; mismatched shapes named; a pickle offered as weights refused without running it."""
import json
import os

import pytest
import timm
import torch
import torchvision

from dino_ray.core.config import save_config
from dino_ray.core.models.build import build_student_teacher
from dino_ray.core.train.checkpoint import initialize_from
from dino_ray.core.train.loop import train_dino
from dino_ray.core.train.step import build_step
from dino_ray.jobs.pretrain import PretrainArgs, pretrain_job


def log_lines(cfg):
    return [json.loads(line) for line in open(f"{cfg.output_dir}/log.txt")]


def test_a_full_checkpoint_brings_both_networks_and_the_centre(tiny_cfg, tmp_path):
    first = tiny_cfg(epochs=1, output_dir=str(tmp_path / "first"))
    train_dino(first, show_progress=False)
    saved = torch.load(f"{first.output_dir}/checkpoint.pth", weights_only=True)
    cfg = tiny_cfg(output_dir=str(tmp_path / "second"), init_from=f"{first.output_dir}/checkpoint.pth")
    step = build_step(cfg, torch.device("cpu"), 1, 4)
    assert initialize_from(saved, step.student, step.teacher, step.dino_loss, cfg.init_from) == "full"
    for name, tensor in step.teacher.state_dict().items():
        assert torch.equal(tensor, saved["teacher"][name])
    assert torch.equal(step.dino_loss.center, saved["dino_loss"]["center"]) and step.dino_loss.center.abs().sum() > 0
    train_dino(cfg, show_progress=False)  # a new run: epoch 0 onwards, nothing frozen
    assert [line["epoch"] for line in log_lines(cfg)] == [0, 1, 2]
    assert {line["train_backbone_frozen"] for line in log_lines(cfg)} == {0.0}


def test_a_backbone_alone_starts_fresh_heads_behind_a_frozen_backbone(tiny_cfg, tmp_path):
    first = tiny_cfg(epochs=1, output_dir=str(tmp_path / "first"))
    train_dino(first, show_progress=False)
    backbone = {k[len("backbone."):]: v for k, v in torch.load(f"{first.output_dir}/checkpoint.pth",
                                                                weights_only=True)["teacher"].items()
                if k.startswith("backbone.")}
    torch.save(backbone, tmp_path / "teacher_backbone.pth")  # the released files' layout
    cfg = tiny_cfg(epochs=2, output_dir=str(tmp_path / "second"), init_from=str(tmp_path / "teacher_backbone.pth"))
    train_dino(cfg, show_progress=False)
    lines = log_lines(cfg)
    assert [line["train_backbone_frozen"] for line in lines] == [1.0, 0.0]  # the head's warm-up, in the metrics
    after_0 = torch.load(f"{cfg.output_dir}/checkpoint0000.pth", weights_only=True)
    after_1 = torch.load(f"{cfg.output_dir}/checkpoint0001.pth", weights_only=True)
    assert all(torch.equal(after_0["student"][f"module.backbone.{k}"], v) for k, v in backbone.items())
    assert not torch.equal(after_1["student"]["module.backbone.cls_token"], backbone["cls_token"])
    torch.manual_seed(cfg.seed)
    fresh, _ = build_student_teacher(cfg)  # the head started where a new run's would
    assert not torch.equal(after_0["student"]["module.head.mlp.0.weight"], fresh.head.mlp[0].weight)
    assert after_0["args"]["freeze_backbone_epochs"] == 1.0 and after_0["args"]["init_from"] == cfg.init_from


def test_torchvision_and_timm_checkpoints_start_a_run_their_classifier_left_out(tiny_cfg, tmp_path):
    resnet = torchvision.models.resnet18(num_classes=10)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    cfg = tiny_cfg(arch="resnet18", patch_size=16, embed_dim=None, depth=None, num_heads=None, epochs=1,
                   init_from=str(tmp_path / "resnet18.pth"), output_dir=str(tmp_path / "resnet"))
    step = build_step(cfg, torch.device("cpu"), 1, 4)
    assert initialize_from(resnet.state_dict(), step.student, step.teacher, step.dino_loss, cfg.init_from) == "backbone"
    assert torch.equal(step.teacher.backbone.conv1.weight, resnet.conv1.weight.to(memory_format=torch.channels_last))

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                            img_size=32)  # trained at 32 px, with its classifier
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    cfg = tiny_cfg(epochs=1, init_from=str(tmp_path / "vit.pth"), output_dir=str(tmp_path / "vit"))  # 16 px crops
    step = build_step(cfg, torch.device("cpu"), 1, 4)
    initialize_from(vit.state_dict(), step.student, step.teacher, step.dino_loss, cfg.init_from)
    assert torch.equal(step.student.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert step.student.backbone.pos_embed.shape == (1, 1 + 16, 32)  # resampled from the 8 x 8 grid to 4 x 4


def test_weights_of_another_shape_are_an_error_naming_the_keys(tiny_cfg, tmp_path):
    first = tiny_cfg(epochs=1, output_dir=str(tmp_path / "first"))
    train_dino(first, show_progress=False)
    wider = tiny_cfg(embed_dim=48, init_from=f"{first.output_dir}/checkpoint.pth", output_dir=str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"init_from '.*checkpoint.pth': its student does not fit .*"
                                         r"backbone.cls_token"):
        train_dino(wider, show_progress=False)


def test_an_mlflow_run_starts_a_new_run_without_ray(tiny_cfg, tmp_path):
    from dino_ray.platform.tracking.runs import RunTracker

    first = tiny_cfg(epochs=1, output_dir=str(tmp_path / "first"))
    train_dino(first, show_progress=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(store, "dino-ray", "first")
    tracker.log_artifact(f"{first.output_dir}/checkpoint.pth", "checkpoints")
    assert tracker.finish()
    cfg = tiny_cfg(epochs=1, output_dir=str(tmp_path / "second"), init_from=f"runs:/{tracker.run_id}",
                   tracking={"tracking_uri": store})
    save_config(cfg, tmp_path / "second.yaml")
    pretrain_job(PretrainArgs(config=str(tmp_path / "second.yaml"), use_ray=False))  # dino-ray pretrain --no-ray
    assert (tmp_path / "second" / "init" / tracker.run_id / "checkpoint.pth").exists()  # fetched from the run
    assert torch.load(f"{cfg.output_dir}/checkpoint.pth", weights_only=True)["args"]["freeze_backbone_epochs"] == 0


class Bomb:
    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_a_pickle_offered_as_weights_is_refused_without_running(tiny_cfg, tmp_path):
    bomb = Bomb()
    bomb.target = tmp_path / "exploded"
    torch.save({"teacher": bomb}, tmp_path / "weights.pth")
    cfg = tiny_cfg(init_from=str(tmp_path / "weights.pth"))
    with pytest.raises(ValueError, match="holds objects outside the allow-list"):
        train_dino(cfg, show_progress=False)
    from dino_ray.core.models.build import backbone_from_checkpoint

    with pytest.raises(ValueError, match="holds objects outside the allow-list"):
        backbone_from_checkpoint(tmp_path / "weights.pth")
    assert not (tmp_path / "exploded").exists()
