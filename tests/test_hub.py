"""Loading official-layout files safely and strictly, and the hub-style constructors offline."""
import argparse
import os

import numpy as np
import pytest
import torch

from dino_ray import DINOHead, MultiCropWrapper, build_backbone, dino_vits16, load_pretrained_weights
from dino_ray.core.models.hub import OFFICIAL_URL, OFFICIAL_WEIGHTS


def tiny_vit():
    return build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=2, num_heads=2)


def official_full_checkpoint(student, teacher):
    """The layout main_dino.py writes: DDP student (module.), bare teacher, a Namespace and numpy floats."""
    return {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", lr=np.float64(0.0005), patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }


def wrapped(seed):
    torch.manual_seed(seed)
    return MultiCropWrapper(tiny_vit(), DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8))


def test_backbone_only_file_loads_strictly(tmp_path):
    source = tiny_vit()
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = load_pretrained_weights(tiny_vit(), tmp_path / "backbone.pth")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), source(x))


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_full_checkpoint_loads_teacher_or_student_backbone(tmp_path, key):
    student, teacher = wrapped(1), wrapped(2)
    torch.save(official_full_checkpoint(student, teacher), tmp_path / "checkpoint.pth")
    model = load_pretrained_weights(tiny_vit(), tmp_path / "checkpoint.pth", checkpoint_key=key)
    expected = (teacher if key == "teacher" else student).backbone
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name])


def test_full_checkpoint_loads_into_a_whole_student(tmp_path):
    student = wrapped(1)
    torch.save(official_full_checkpoint(student, wrapped(2)), tmp_path / "checkpoint.pth")
    model = load_pretrained_weights(wrapped(3), tmp_path / "checkpoint.pth", checkpoint_key="student")
    assert torch.equal(model.head.last_layer.weight_v, student.head.last_layer.weight_v)


def test_wrong_arch_fails_loudly(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "backbone.pth")
    deeper = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(ValueError, match=r"do not fit this model: 12 missing keys \['blocks.2"):
        load_pretrained_weights(deeper, tmp_path / "backbone.pth")
    wider = build_backbone("vit_tiny", 4, img_size=16, embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="size mismatch"):
        load_pretrained_weights(wider, tmp_path / "backbone.pth")


def test_missing_checkpoint_key_is_named(tmp_path):
    torch.save(official_full_checkpoint(wrapped(1), wrapped(2)), tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="checkpoint_key 'ema'"):
        load_pretrained_weights(tiny_vit(), tmp_path / "checkpoint.pth", checkpoint_key="ema")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dino_ray_pwned",))


def test_untrusted_pickle_cannot_run_code(tmp_path):
    torch.save({"teacher": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="outside the allow-list"):
        load_pretrained_weights(tiny_vit(), tmp_path / "evil.pth")
    assert not os.path.exists("/tmp/dino_ray_pwned")


def test_hub_constructor_from_a_local_file_and_from_the_url_cache(tmp_path):
    weights = build_backbone("vit_small", 16).state_dict()
    torch.save(weights, tmp_path / "mine.pth")
    model = dino_vits16(weights=tmp_path / "mine.pth")
    assert torch.equal(model.pos_embed, weights["pos_embed"])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / os.path.basename(OFFICIAL_WEIGHTS["dino_vits16"][2])).write_bytes((tmp_path / "mine.pth").read_bytes())
    cached = dino_vits16(model_dir=cache)  # found in the cache: no network needed
    assert torch.equal(cached.cls_token, weights["cls_token"])


@pytest.mark.timeout(120)
def test_hub_constructor_offline_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="Offline\\? Put the file at"):
        dino_vits16(model_dir=tmp_path)
    assert OFFICIAL_URL.startswith("https://")
