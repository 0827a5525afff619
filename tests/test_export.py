"""dino-ray export: safetensors that load back into dino_ray, timm and torchvision; TorchScript; ONNX equal to
PyTorch within 1e-4 on real images at any batch size; the JSON of what a user of the file needs."""
import json

import numpy as np
import onnxruntime
import timm
import torch
import torchvision
from safetensors.torch import load_file

from dino_ray.cli import main
from dino_ray.core.config import build_config
from dino_ray.core.data.augment import eval_transform
from dino_ray.core.data.datasets import build_dataset
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.core.train.checkpoint import training_state
from dino_ray.core.train.step import build_step

from .conftest import SAMPLE, TINY


def checkpoint_of(tmp_path, **changes):
    """A full training checkpoint of a network (its weights as they start: export needs no training)."""
    cfg = build_config({**TINY, "output_dir": str(tmp_path), "data_path": str(SAMPLE / "train.parquet"), **changes})
    step = build_step(cfg, torch.device("cpu"), 1, 1)
    path = tmp_path / "checkpoint.pth"
    torch.save(training_state(step.student, step.teacher, step.optimizer, step.dino_loss, None, 1, cfg.to_dict()), path)
    return cfg, path


def real_images(size, count):
    dataset = build_dataset(SAMPLE / "val.parquet", eval_transform(size, size), count)
    return torch.stack([dataset[i][0] for i in range(count)])


def test_safetensors_load_back_into_dino_ray_and_timm_with_a_description(tmp_path):
    cfg, checkpoint = checkpoint_of(tmp_path, arch="vit_small", patch_size=16, embed_dim=None, depth=None,
                                    num_heads=None, global_crops_size=224, local_crops_size=96)
    out = tmp_path / "vits16.safetensors"
    assert main(["export", str(checkpoint), "--output", str(out)]) == 0
    spec = json.loads(out.with_suffix(".json").read_text())
    assert (spec["arch"], spec["patch_size"], spec["image_size"], spec["feature_dim"]) == ("vit_small", 16, 224, 384)
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["max_abs_difference"] < 1e-5
    teacher, _ = backbone_from_checkpoint(checkpoint)
    images = real_images(224, 2)
    reloaded, shape = backbone_from_checkpoint(out)  # the file alone: its shape from its metadata
    assert shape["arch"] == "vit_small" and torch.allclose(reloaded.eval()(images), teacher.eval()(images), atol=1e-5)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False)
    vit.load_state_dict(load_file(out))  # strict: timm's own keys
    assert torch.allclose(vit.eval()(images), teacher(images), atol=1e-4)


def test_a_resnet_loads_into_torchvision(tmp_path):
    cfg, checkpoint = checkpoint_of(tmp_path, arch="resnet18", patch_size=16, embed_dim=None, depth=None,
                                    num_heads=None, global_crops_size=32, local_crops_size=16)
    out = tmp_path / "resnet18.safetensors"
    assert main(["export", str(checkpoint), "--output", str(out)]) == 0
    resnet = torchvision.models.resnet18()
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(load_file(out))
    teacher, _ = backbone_from_checkpoint(checkpoint)
    images = real_images(32, 3)
    assert torch.allclose(resnet.eval()(images), teacher.eval()(images), atol=1e-5)


def test_the_description_gives_the_evaluation_size_and_the_file_still_loads(tmp_path):
    _, checkpoint = checkpoint_of(tmp_path, eval_image_size=32)  # a ViT trained on 16 px crops, tested at 32 px
    out = tmp_path / "vit.safetensors"
    assert main(["export", str(checkpoint), "--output", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["image_size"] == 32
    reloaded, shape = backbone_from_checkpoint(out)  # its position embeddings keep the 16 px grid it learnt
    assert shape["image_size"] == 32 and reloaded.pos_embed.shape[1] == 1 + (16 // 4) ** 2
    teacher, _ = backbone_from_checkpoint(checkpoint)
    images = real_images(32, 2)
    assert torch.allclose(reloaded.eval()(images), teacher.eval()(images), atol=1e-5)


def test_onnx_matches_pytorch_on_real_images_at_any_batch_size(tmp_path):
    _, checkpoint = checkpoint_of(tmp_path, stem="conv", use_bn_in_head=True)  # the ViT CPU recipe's family
    out = tmp_path / "vit.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--output", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    teacher, _ = backbone_from_checkpoint(checkpoint)
    for batch in (1, 5):
        images = real_images(16, batch)
        exported = session.run(None, {"images": images.numpy().astype(np.float32)})[0]
        assert exported.shape == (batch, 32) and np.abs(exported - teacher.eval()(images).detach().numpy()).max() < 1e-4


def test_torchscript_runs_without_dino_ray(tmp_path):
    _, checkpoint = checkpoint_of(tmp_path)
    out = tmp_path / "vit.pt"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--output", str(out)]) == 0
    images = real_images(16, 2)
    teacher, _ = backbone_from_checkpoint(checkpoint)
    assert torch.allclose(torch.jit.load(str(out))(images), teacher.eval()(images), atol=1e-5)
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "torchscript"
    assert main(["export", str(checkpoint), "--format", "coreml"]) == 2  # refused, named
