"""The training loop: exact resume, checkpoint layout and safety, non-finite loss, frozen last layer, DDP."""
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_ray import load_pretrained_weights
from dino_ray.core.data.loader import EpochSliceSampler
from dino_ray.core.models.backbones import build_backbone
from dino_ray.core.models.build import build_student_teacher
from dino_ray.core.train import loop
from dino_ray.core.train import step as step_module
from dino_ray.core.train.loop import train_dino


class Stop(Exception):
    pass


def read_log(cfg):
    return [json.loads(line) for line in open(f"{cfg.output_dir}/log.txt")]


def assert_same_state(a, b):
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {pid}.{name}"
    assert a["epoch"] == b["epoch"]


def test_interrupted_run_resumes_exactly(tiny_cfg, tmp_path):
    straight = tiny_cfg(output_dir=str(tmp_path / "straight"))
    train_dino(straight, show_progress=False)

    interrupted = tiny_cfg(output_dir=str(tmp_path / "interrupted"))

    def stop_after_epoch_1(epoch, stats, path):
        if epoch == 1:
            raise Stop  # as if the process died right after the epoch-1 checkpoint

    with pytest.raises(Stop):
        train_dino(interrupted, on_epoch_end=stop_after_epoch_1, show_progress=False)
    assert torch.load(f"{interrupted.output_dir}/checkpoint.pth", weights_only=True)["epoch"] == 2
    train_dino(interrupted, show_progress=False)

    a = torch.load(f"{straight.output_dir}/checkpoint.pth", weights_only=True)
    b = torch.load(f"{interrupted.output_dir}/checkpoint.pth", weights_only=True)
    assert_same_state(a, b)  # centre, optimizer moments and both networks: bit for bit
    assert [r["epoch"] for r in read_log(interrupted)] == [0, 1, 2]
    assert [r["train_loss"] for r in read_log(interrupted)] == [r["train_loss"] for r in read_log(straight)]


def test_killed_process_resumes_from_its_last_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=40, output_dir=str(tmp_path / "killed"))
    args = [sys.executable, "-m", "dino_ray.cli", "pretrain", "--no-ray"] + [
        f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in cfg.to_dict().items()]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = tmp_path / "killed" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and (not log_file.exists() or len(log_file.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(log_file.read_text().splitlines())
    assert 2 <= done < 40, "the run should have been killed mid-way"
    saved = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)  # complete, loadable
    assert saved["epoch"] in (done, done + 1)

    resumed = tiny_cfg(epochs=saved["epoch"] + 1, output_dir=str(tmp_path / "killed"))
    train_dino(resumed, show_progress=False)
    epochs = [r["epoch"] for r in read_log(resumed)]
    assert epochs == list(range(saved["epoch"] + 1)), "no epoch before the checkpoint is trained twice"


def test_checkpoint_has_the_reference_layout(tiny_cfg):
    cfg = tiny_cfg(epochs=2)
    train_dino(cfg, show_progress=False)
    ckpt = torch.load(f"{cfg.output_dir}/checkpoint.pth", weights_only=True)
    # the reference's keys, plus the minutes and steps so far (a resumed budget and step count continue from them)
    assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "train_seconds", "steps"}
    assert ckpt["steps"] == 2 * 128 // 16  # 2 epochs of 128 images in batches of 16
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert ckpt["epoch"] == 2 and ckpt["args"]["lr"] == cfg.lr and ckpt["dino_loss"]["center"].shape == (1, 64)
    kept = sorted(p.name for p in Path(cfg.output_dir).glob("checkpoint0*.pth"))
    assert kept == ["checkpoint0000.pth", "checkpoint0001.pth"]  # saveckp_freq=1
    backbone = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=1, num_heads=2)
    load_pretrained_weights(backbone, f"{cfg.output_dir}/checkpoint.pth", "teacher")
    assert "vit_tiny" in (Path(cfg.output_dir) / "config.yaml").read_text()


def test_corrupt_checkpoint_is_reported_not_replaced(tiny_cfg):
    cfg = tiny_cfg()
    path = Path(cfg.output_dir)
    path.mkdir(parents=True)
    (path / "checkpoint.pth").write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint '.*checkpoint.pth'"):
        train_dino(cfg, show_progress=False)
    assert (path / "checkpoint.pth").read_bytes() == b"half a checkpoint"


def test_non_finite_loss_stops_naming_epoch_and_iteration(tiny_cfg, monkeypatch):
    calls = []

    class ExplodingLoss(step_module.DINOLoss):
        def forward(self, student_output, teacher_output, epoch, **kwargs):
            calls.append(epoch)
            loss, monitors = super().forward(student_output, teacher_output, epoch, **kwargs)
            return (loss * float("nan") if epoch == 1 and calls.count(1) == 3 else loss), monitors

    monkeypatch.setattr(step_module, "DINOLoss", ExplodingLoss)
    cfg = tiny_cfg()
    with pytest.raises(FloatingPointError, match="at epoch 1, iteration 2"):
        train_dino(cfg, show_progress=False)
    assert torch.load(f"{cfg.output_dir}/checkpoint.pth", weights_only=True)["epoch"] == 1  # epoch 0's, intact


def test_last_layer_frozen_during_first_epochs(tiny_cfg):
    cfg = tiny_cfg(epochs=2, freeze_last_layer=1, norm_last_layer=False)
    torch.manual_seed(cfg.seed)
    initial, _ = build_student_teacher(cfg)
    train_dino(cfg, show_progress=False)
    after_0 = torch.load(f"{cfg.output_dir}/checkpoint0000.pth", weights_only=True)["student"]
    after_1 = torch.load(f"{cfg.output_dir}/checkpoint0001.pth", weights_only=True)["student"]
    for name in ("weight_v", "weight_g"):
        before = initial.head.last_layer.state_dict()[name]
        assert torch.equal(after_0[f"module.head.last_layer.{name}"], before)
        assert not torch.equal(after_1[f"module.head.last_layer.{name}"], before)
    assert not torch.equal(after_0["module.head.mlp.0.weight"], initial.head.mlp[0].weight)


def _ddp_worker(rank, cfg, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    seen = []
    original = loop.build_loader

    def recording_loader(*args, **kwargs):
        data = original(*args, **kwargs)
        seen.append(list(iter(data.sampler)))
        return data

    loop.build_loader = recording_loader
    stats = train_dino(cfg, show_progress=False)
    results[rank] = {"stats": stats, "seen": seen}
    dist.destroy_process_group()


def test_runs_unchanged_under_torch_distributed_gloo(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2, batch_size_per_gpu=8)
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(cfg, str(tmp_path / "init"), results), nprocs=2)
    ckpt = torch.load(f"{cfg.output_dir}/checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2
    # every image once per epoch across the two ranks
    for epoch in (1, 2):  # index 0 is the loader built to count iterations
        indices = results[0]["seen"][epoch] + results[1]["seen"][epoch]
        assert sorted(indices) == list(range(128))
    # lr scaled by the total batch: 8 per rank x 2 ranks = 16
    assert read_log(cfg)[0]["train_lr"] <= cfg.lr * 16 / 256


def test_fixed_length_epochs_walk_through_the_data_once_per_pass():
    """epoch_length (dinov2's fixed epochs): consecutive epochs continue one shuffled pass, ranks disjoint."""
    epochs = [[list(EpochSliceSampler(10, 3, 2, rank, seed=0, epoch=e)) for rank in (0, 1)] for e in range(5)]
    stream = [i for ranks in epochs for pair in zip(*ranks) for i in pair]  # 5 epochs x 6 = 30 = 3 passes of 10
    for data_pass in range(3):
        assert sorted(stream[10 * data_pass:10 * (data_pass + 1)]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each pass reshuffled
    assert all(len(r) == 3 for ranks in epochs for r in ranks)


def test_epochs_resized_by_a_budget_still_walk_through_each_pass_once(tiny_cfg):
    """The DataLoader input starts each epoch after the images the run's iterations took, whatever the epochs'
    lengths (a time budget re-sizes them as it goes): 1 + 3 + 1 batches of 8 over 40 images are exactly one pass,
    and a resumed run, counting from its checkpoint's iterations, continues the same stream."""
    cfg = tiny_cfg(epoch_length=1, batch_size_per_gpu=8, max_images=40, num_workers=0)
    current = {"cfg": cfg}
    epoch_batches = loop.dataloader_epochs(lambda: current["cfg"], rank=0, world_size=1)
    seen, steps = [], 0
    for epoch, length in enumerate((1, 3, 1)):
        current["cfg"] = dataclasses.replace(cfg, epoch_length=length)
        seen += list(iter(epoch_batches(epoch, steps).sampler))
        steps += length
    assert sorted(seen) == list(range(40))
    resumed = loop.dataloader_epochs(lambda: current["cfg"], rank=0, world_size=1)  # a new process, at epoch 2
    assert list(iter(resumed(2, 4).sampler)) == seen[32:]


def test_small_image_resnet_with_short_run_options_trains_and_resumes_its_shape(tiny_cfg):
    """A CIFAR ResNet-18 (narrow, small stem) with fixed-length epochs, Sinkhorn-Knopp centring and KoLeo."""
    cfg = tiny_cfg(arch="resnet18", patch_size=16, stem="small_stride2", width=0.25, epochs=2, epoch_length=3,
                   warmup_epochs=0.5, freeze_last_layer=0.4, centering="sinkhorn_knopp", koleo_loss_weight=0.1,
                   use_bn_in_head=True, **{"embed_dim": None, "depth": None, "num_heads": None})
    train_dino(cfg, show_progress=False)
    lines = read_log(cfg)
    assert [line["epoch"] for line in lines] == [0, 1] and all(line["train_epoch_seconds"] > 0 for line in lines)
    checkpoint = torch.load(f"{cfg.output_dir}/checkpoint.pth", weights_only=True)
    assert checkpoint["teacher"]["backbone.layer1.0.conv1.weight"].shape[0] == 16
    backbone = build_backbone("resnet18", stem="small_stride2", width=0.25)
    load_pretrained_weights(backbone, f"{cfg.output_dir}/checkpoint.pth", "teacher")
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 128)


def test_channels_last_is_a_layout_not_a_different_run(tiny_cfg, tmp_path):
    """A convolutional backbone trains channels-last by default: the same losses as contiguous memory."""
    resnet = dict(arch="resnet18", patch_size=16, stem="small_stride2", width=0.25, epochs=2, epoch_length=2,
                  use_bn_in_head=True, **{"embed_dim": None, "depth": None, "num_heads": None})
    losses = {}
    for layout in (True, False):
        cfg = tiny_cfg(channels_last=layout, output_dir=str(tmp_path / str(layout)), **resnet)
        train_dino(cfg, show_progress=False)
        losses[layout] = [line["train_loss"] for line in read_log(cfg)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    checkpoint = torch.load(tmp_path / "True" / "checkpoint.pth", weights_only=True)
    assert not checkpoint["teacher"]["backbone.conv1.weight"].is_contiguous()  # stored as it trained
    assert checkpoint["teacher"]["backbone.conv1.weight"].is_contiguous(memory_format=torch.channels_last)


def test_each_rank_and_epoch_draws_its_own_randomness_whatever_the_input(tiny_cfg, tmp_path, monkeypatch):
    """With another input than the DataLoader (Ray Data's shards: ``epoch_batches``), the loop still seeds
    every epoch from (seed, rank, epoch): two ranks fed the same batches draw different drop-path masks, and a
    rank's run is repeatable."""
    torch.manual_seed(0)
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)] + [torch.randn(8, 3, 8, 8) for _ in range(2)]

    def same_batches(epoch):
        return [(views, torch.zeros(8), 0)] * 2

    losses = {}
    for name, rank in (("rank0", 0), ("rank0 again", 0), ("rank1", 1)):
        cfg = tiny_cfg(epochs=2, depth=2, drop_path_rate=0.5, local_crops_number=2, output_dir=str(tmp_path / name))
        monkeypatch.setattr(loop, "rank_and_world", lambda rank=rank: (rank, 1))
        epochs = []
        train_dino(cfg, show_progress=False, epoch_batches=same_batches,
                   on_epoch_end=lambda epoch, stats, path: epochs.append(stats["loss"]))
        losses[name] = epochs
    assert losses["rank0"] == losses["rank0 again"]
    assert losses["rank0"][0] != losses["rank1"][0]
