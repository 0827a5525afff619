"""N workers compute what one worker computes: 2 and 4 ranks x B images train the model that 1 rank x (N*B) trains,
for every shipped config's model family, fed the same views through both inputs of the loop: the DataLoader over
image files, and whole batches handed in per epoch (how Ray Data's shards reach it).

Without synchronised BatchNorm (``sync_bn: false``) every family with BatchNorm trains another model; the ViT
without BatchNorm agrees either way. KoLeo's nearest neighbour is taken within each rank's batch by design (as
DINOv2's), so a KoLeo run differs with the world size: checked as such. The ranks are forked processes on gloo,
one thread each (a spawned rank would re-import torch, seconds per rank on 2 cores).
"""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dino_ray.core.config import build_config
from dino_ray.core.models.build import build_student_teacher
from dino_ray.core.train import loop
from dino_ray.core.train.loop import train_dino

from .conftest import TINY

GLOBAL_BATCH, STEPS = 16, 2
SMALL_RESNET = dict(arch="resnet18", stem="small_stride2", width=0.25, patch_size=16, embed_dim=None, depth=None,
                    num_heads=None)
FAMILIES = {  # the shipped configs' model families, CPU-sized
    "vit": dict(centering="centering"),  # vit_*_*.yaml: no BatchNorm
    "vit_conv_stem_bn_head_sinkhorn": dict(stem="conv", use_bn_in_head=True, centering="sinkhorn_knopp"),  # cifar10_cpu_vit
    "resnet_bn_head_sinkhorn": dict(SMALL_RESNET, use_bn_in_head=True, centering="sinkhorn_knopp"),  # cifar10_cpu
    "resnet_sgd_centering": dict(SMALL_RESNET, optimizer="sgd", lr=0.03, centering="centering"),  # resnet50_sgd
}


def config(family: dict, world: int, tmp_path, **changes):
    """A family's tiny config for ``world`` ranks sharing the global batch; SGD whatever the family: AdamW divides
    each gradient by its running RMS, so a parameter whose gradient is only rounding noise (a bias right before a
    BatchNorm, the ViT's last LayerNorm bias before the BN head, attention's key bias) takes lr-sized steps of
    random sign at any world size (two 1-rank runs with different thread counts differ the same way); SGD maps
    gradients to updates linearly, so what is compared is the distributed math itself."""
    values = {**TINY, "optimizer": "sgd", "lr": 0.03, **family, "batch_size_per_gpu": GLOBAL_BATCH // world,
              "epochs": 1, "epoch_length": STEPS, "warmup_epochs": 0.5, "freeze_last_layer": 0, "saveckp_freq": 0,
              "drop_path_rate": 0.0, **changes}
    values["output_dir"] = str(tmp_path / f"world{world}-{'-'.join(map(str, changes.values()))}")
    return build_config(values)


def global_views(step: int) -> list[torch.Tensor]:
    """The 2 global and 2 local crops of a step's global batch (the same in every process)."""
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator) for size in (16, 16, 8, 8)]


def fixed_views(image):
    """A deterministic multi-crop for the DataLoader path: every rank must see the views one rank would."""
    pixels = torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1).float()[None] / 255
    return [F.interpolate(pixels, size=size, mode="bilinear", antialias=True)[0] for size in (16, 16, 8, 8)]


def _rank(rank: int, world: int, cfg, init_file: str, fed: bool, results) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
    train_dino(cfg, show_progress=False, epoch_batches=handed_in(cfg, rank) if fed else None)
    if rank == 0:
        results["checkpoint"] = torch.load(f"{cfg.output_dir}/checkpoint.pth", weights_only=True)
    if world > 1:
        dist.destroy_process_group()


def train(world: int, cfg, tmp_path, fed: bool) -> dict:
    """One run on ``world`` forked ranks; rank 0's final checkpoint."""
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(world, cfg, str(tmp_path / f"init{world}"), fed, results), nprocs=world,
                       start_method="fork")
    return results["checkpoint"]


def difference(one: dict, other: dict) -> float:
    """How far ``other`` is from ``one``, as a share of the way ``one`` moved from the initial weights: the norm of
    their difference over the norm of ``one``'s update, across the student, the teacher and the centre."""
    cfg = build_config(one["args"])
    torch.manual_seed(cfg.seed)
    student, teacher = build_student_teacher(cfg)  # the run's initial weights
    initial = {"student": {f"module.{k}": v for k, v in student.state_dict().items()}, "teacher": teacher.state_dict(),
               "dino_loss": {"center": torch.zeros_like(one["dino_loss"]["center"])}}
    moved, apart = [], []
    for key in ("student", "teacher", "dino_loss"):
        for name, tensor in one[key].items():
            if tensor.is_floating_point():
                moved.append((tensor - initial[key][name]).flatten())
                apart.append((tensor - other[key][name]).flatten())
    return (torch.cat(apart).norm() / torch.cat(moved).norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fed", [True, False], ids=["batches_handed_in", "dataloader"])
def test_two_and_four_ranks_train_what_one_rank_trains(family, fed, tmp_path, cifar_rows, monkeypatch):
    monkeypatch.setattr(loop, "build_augmentation", lambda cfg: fixed_views)  # the forked ranks inherit it
    extra = {} if fed else {"data_path": str(cifar_rows), "max_images": GLOBAL_BATCH * STEPS, "epoch_length": None}
    one = train(1, config(FAMILIES[family], 1, tmp_path, **extra), tmp_path, fed)
    for world in (2, 4) if fed else (2,):  # the DataLoader's 4-rank split is the handed-in one's
        synced = train(world, config(FAMILIES[family], world, tmp_path, **extra), tmp_path, fed)
        error = difference(one, synced)
        print(f"{family} ({'handed in' if fed else 'DataLoader'}), {world} ranks: {error:.2e} of the update")
        assert error < 1e-5, (family, world, error)
    has_bn = family != "vit"
    unsynced = train(2, config(FAMILIES[family], 2, tmp_path, sync_bn=False, **extra), tmp_path, fed)
    error = difference(one, unsynced)
    print(f"{family}, 2 ranks without sync_bn: {error:.2e} of the update")
    assert (error > 1e-3) if has_bn else (error < 1e-5), (family, error)  # synced: 100x closer at least


def test_koleo_is_per_rank_by_design(tmp_path):
    """KoLeo spreads each rank's batch: its nearest neighbours are among that rank's images, so 2 ranks differ
    from 1 (DINOv2 does the same); everything else of the run is synchronised."""
    family = FAMILIES["resnet_bn_head_sinkhorn"]
    one = train(1, config(family, 1, tmp_path, koleo_loss_weight=0.3), tmp_path, fed=True)
    two = train(2, config(family, 2, tmp_path, koleo_loss_weight=0.3), tmp_path, fed=True)
    error = difference(one, two)
    print(f"KoLeo, 2 ranks: {error:.2e} of the update")
    assert error > 1e-5  # the synchronised families agree to about 3e-7


def handed_in(cfg, rank: int):
    """``epoch -> batches``: this rank's slice of every step's global views, as Ray Data's shards hand them in."""
    local = slice(rank * cfg.batch_size_per_gpu, (rank + 1) * cfg.batch_size_per_gpu)
    return lambda epoch: [([v[local] for v in global_views(step)], torch.zeros(cfg.batch_size_per_gpu), 0)
                          for step in range(STEPS)]


def ray_train_rank(loop_config: dict) -> None:
    """A Ray Train worker (gloo, set up by Ray): the loop on this rank's slice of the handed-in batches."""
    import ray.train

    cfg = build_config(loop_config["config"])
    torch.set_num_threads(1)
    train_dino(cfg, show_progress=False, epoch_batches=handed_in(cfg, ray.train.get_context().get_world_rank()))


def _profiled_rank(rank: int, world: int, cfg, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    stats = train_dino(cfg, show_progress=False, epoch_batches=handed_in(cfg, rank))
    results[rank] = stats
    dist.destroy_process_group()


def test_the_profiled_all_reduce_sends_the_trainable_parameters_every_step(tmp_path):
    """``profile_allreduce``: the gradient all-reduce timed apart, its bytes those of the student's trainable fp32
    parameters (what the dry-run's scaling plan counts)."""
    from dino_ray.core.train.plan import gradient_bytes

    cfg = config(FAMILIES["resnet_bn_head_sinkhorn"], 2, tmp_path, profile_allreduce=True)
    results = mp.Manager().dict()
    mp.start_processes(_profiled_rank, args=(2, cfg, str(tmp_path / "init"), results), nprocs=2, start_method="fork")
    for stats in results.values():
        assert stats["allreduce_time"] > 0 and stats["allreduce_time"] < stats["step_time"]
        assert stats["allreduce_mb"] * 2**20 == pytest.approx(gradient_bytes(cfg))
