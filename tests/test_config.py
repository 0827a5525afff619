"""Config: the reference's flags and defaults, YAML + key=value layering, errors that name the problem."""
from pathlib import Path

import pytest

from dino_ray.core.config import ConfigError, DINOConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]

MAIN_DINO_DEFAULTS = dict(
    arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
    use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, use_fp16=True,
    weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100, freeze_last_layer=1,
    lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw", drop_path_rate=0.1, global_crops_scale=(0.4, 1.0),
    local_crops_number=8, local_crops_scale=(0.05, 0.4), data_path="/path/to/imagenet/train/", output_dir=".",
    saveckp_freq=20, seed=0, num_workers=10,
)


def test_defaults_are_main_dino_defaults():
    cfg = DINOConfig()
    for key, value in MAIN_DINO_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.global_crops_size, cfg.local_crops_size) == (224, 96)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("arch: vit_tiny\nlr: 0.001\nlocal_crops_scale: [0.05, 0.3]\n")
    cfg = load_config(path, ["lr=2e-3", "norm_last_layer=false", "global_crops_scale=[0.3, 1]", "max_images=null"])
    assert (cfg.arch, cfg.lr, cfg.norm_last_layer) == ("vit_tiny", 0.002, False)
    assert cfg.local_crops_scale == (0.05, 0.3) and cfg.global_crops_scale == (0.3, 1.0)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides,message", [
    (["learning_rate=0.1"], r"unknown config key\(s\) 'learning_rate'$"),
    (["scaling.num_worker=2"], r"'scaling.num_worker' \(did you mean 'scaling.num_workers'\?\)"),
    (["lr=-0.1"], "lr must be >= 0, got -0.1"),
    (["arch=vit_huge"], "arch 'vit_huge' is unknown"),
    (["local_crops_scale=[0.05, 0.9]"], r"local_crops_scale \[0.05, 0.9\] is above global_crops_scale"),
    (["epochs=ten"], "config key 'epochs': value 'ten' is not a valid"),
    (["use_fp16=maybe"], "config key 'use_fp16'"),
    (["global_crops_size=30", "patch_size=16"], r"global_crops_size \(30\) is not a multiple of patch_size"),
    (["eval_image_size=40", "patch_size=16"], r"eval_image_size \(40\) is not a multiple of patch_size"),
    (["arch=resnet18", "eval_image_size=0"], "eval_image_size must be >= 1, got 0"),
    (["lr"], "override 'lr' is not of the form key=value"),
    (["arch=resnet18", "stem=conv"], "stem 'conv' is for ViTs"),
    (["stem=small"], "arch 'vit_small' takes stem default or conv"),
    (["arch=efficientnet_b0", "width=0.5"], "width 0.5 is for ResNet archs"),
    (["arch=resnet18", "width=0"], "width must be > 0"),
    (["centering=median"], "centering must be one of centering, sinkhorn_knopp, got 'median'"),
    (["epoch_length=0"], "epoch_length must be >= 1"),
    (["epoch_length=10", "data_loader=ray_data"], "epoch_length needs data_loader: torch"),
    (["momentum_teacher_end=1.5"], r"momentum_teacher_end must be in \[0, 1\]"),
    (["koleo_loss_weight=-1"], "koleo_loss_weight must be >= 0"),
    (["scaling.threads_per_worker=0"], "scaling.threads_per_worker must be >= 1, got 0"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_any_torchvision_arch_and_short_run_keys_are_accepted():
    cfg = load_config(None, ["arch=resnet18", "stem=small", "width=0.5", "warmup_epochs=0.25", "freeze_last_layer=0.1",
                             "epoch_length=50", "centering=sinkhorn_knopp", "koleo_loss_weight=0.1"])
    assert (cfg.arch, cfg.stem, cfg.width, cfg.warmup_epochs, cfg.epoch_length) == ("resnet18", "small", 0.5, 0.25, 50)
    assert load_config(None, ["arch=convnext_tiny"]).arch == "convnext_tiny"


def test_evaluations_see_the_crop_size_unless_told_otherwise():
    assert load_config(None, ["global_crops_size=96"]).eval_size() == 96  # unset: the crop size, as the reference
    cpu = load_config("cifar10_cpu")  # trained on 24 px crops, tested on whole 32 px images
    assert (cpu.global_crops_size, cpu.eval_size()) == (24, 32)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.arch in ("vit_tiny", "vit_small", "vit_base", "resnet50", "resnet18")
