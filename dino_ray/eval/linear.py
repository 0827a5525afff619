"""Linear evaluation of frozen features, the reference's ``eval_linear.py`` protocol.

A linear layer (weights N(0, 0.01), bias 0) on the frozen backbone's features: the CLS tokens of the
last ``n_last_blocks`` blocks, concatenated, with ``avgpool_patchtokens`` interleaving the last CLS
token and the patch-token mean per dimension (feature 2i = CLS[i], 2i+1 = mean[i]), the order the
released linear heads expect. With ``n_last_blocks > 1`` and avgpool (where the reference crashes),
the earlier blocks' CLS tokens come first, then the interleaved pair. SGD with momentum 0.9, weight
decay 0, lr scaled by the total batch / 256, cosine to 0 per epoch; RandomResizedCrop + flip for
training, resize + centre crop for validation. ``run_linear`` runs in one process or unchanged on
every rank of a ``torch.distributed`` group (Ray Train's workers for ``dino-ray eval-linear``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms
from tqdm.auto import tqdm

from dino_ray.core.data.augment import normalize
from dino_ray.core.data.datasets import build_dataset, collate_skipping_bad, require_labels
from dino_ray.core.models.backbones import get_intermediate_layers
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.core.models.hub import extract_state_dict, safe_load
from dino_ray.core.ranks import rank_and_world, seed_everything
from dino_ray.core.train.checkpoint import save_checkpoint
from dino_ray.eval.args import LinearArgs

log = logging.getLogger(__name__)


class LinearClassifier(nn.Module):
    """The reference's linear layer on frozen features."""

    def __init__(self, dim: int, num_labels: int = 1000) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.size(0), -1))


@torch.no_grad()
def linear_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """The frozen features the linear layer sees (see the module docstring for their order)."""
    if not hasattr(model, "blocks"):  # ResNet: the pooled output
        return model(images)
    blocks = get_intermediate_layers(model, images, n_last_blocks)
    cls = [x[:, 0] for x in blocks]
    if not avgpool:
        return torch.cat(cls, dim=-1)
    pair = torch.stack((cls[-1], blocks[-1][:, 1:].mean(dim=1)), dim=-1).reshape(len(images), -1)
    return torch.cat([*cls[:-1], pair], dim=-1)


def feature_dim(model: nn.Module, n_last_blocks: int, avgpool: bool) -> int:
    if not hasattr(model, "blocks"):
        return model.embed_dim
    return model.embed_dim * (n_last_blocks + int(avgpool))


def linear_transforms(args: LinearArgs) -> tuple[Callable, Callable]:
    train = transforms.Compose([transforms.RandomResizedCrop(args.crop_size), transforms.RandomHorizontalFlip(),
                                normalize()])
    val = transforms.Compose([transforms.Resize(args.resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(args.crop_size), normalize()])
    return train, val


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of correct predictions within the top k, for each k (k capped at the number of classes)."""
    predictions = output.topk(min(max(topk), output.shape[1]), dim=1).indices
    correct = predictions.eq(target.view(-1, 1))
    return [correct[:, :k].sum() for k in topk]


def _loader(dataset: Any, args: LinearArgs, shuffle: bool, epoch: int = 0) -> DataLoader:
    rank, world = rank_and_world()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=args.seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), collate_fn=collate_skipping_bad)


def train_epoch(model: nn.Module, classifier: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                args: LinearArgs, device: torch.device, epoch: int, show_progress: bool) -> float:
    classifier.train()
    total, batches = 0.0, 0
    for images, target, _ in tqdm(loader, desc=f"linear epoch {epoch}", disable=not show_progress, leave=False):
        if images is None:
            continue
        features = linear_features(model, images.to(device), args.n_last_blocks, args.avgpool_patchtokens)
        loss = nn.functional.cross_entropy(classifier(features), target.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
    return total / max(1, batches)


@torch.no_grad()
def validate(model: nn.Module, classifier: nn.Module, loader: DataLoader, args: LinearArgs,
             device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) and loss over the whole validation set, summed across ranks."""
    classifier.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for images, target, _ in loader:
        if images is None:
            continue
        target = target.to(device)
        output = classifier(linear_features(model, images.to(device), args.n_last_blocks, args.avgpool_patchtokens))
        top1, top5 = accuracy(output, target)
        sums += torch.stack([nn.functional.cross_entropy(output, target, reduction="sum").double(), top1.double(),
                             top5.double(), torch.tensor(len(target), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    if sums[3] == 0:
        raise ValueError(f"validation set '{args.split('val')}' has no readable image")
    return {"loss": (sums[0] / sums[3]).item(), "acc1": (100 * sums[1] / sums[3]).item(),
            "acc5": (100 * sums[2] / sums[3]).item()}


def run_linear(args: LinearArgs, on_epoch_end: Optional[Callable[[int, dict[str, float], Path], None]] = None,
               show_progress: bool = True, work_dir: Optional[str | Path] = None) -> dict[str, float]:
    """Train (or with ``evaluate`` only validate) the linear head; resumes from ``<dir>/checkpoint.pth``.

    Files (``checkpoint.pth`` with the head, optimizer, scheduler, epoch and best accuracy; ``log.txt``)
    go to ``work_dir`` or ``args.output_dir``. Returns the last validation's metrics plus ``best_acc1``.
    """
    rank, world = rank_and_world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(work_dir or args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = backbone_from_checkpoint(args.pretrained_weights, args.checkpoint_key, arch=args.arch,
                                        patch_size=args.patch_size, **args.vit_shape)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad = False
    seed_everything(args.seed, 0, 0)  # the same head initialisation on every rank
    classifier = LinearClassifier(feature_dim(model, args.n_last_blocks, args.avgpool_patchtokens), args.num_labels)
    classifier.to(device)
    train_tf, val_tf = linear_transforms(args)
    val_set = build_dataset(args.split("val"), val_tf, args.max_val_images)
    require_labels(val_set, args.split("val"), "the linear probe")
    checkpoint_path = out / "checkpoint.pth"

    if args.evaluate:
        head_path = Path(args.head_weights) if args.head_weights else checkpoint_path
        if not head_path.is_file():
            raise FileNotFoundError(f"--evaluate: linear head '{head_path}' does not exist")
        try:
            classifier.load_state_dict(extract_state_dict(safe_load(head_path), "state_dict"))
        except RuntimeError as exc:
            raise ValueError(f"linear head '{head_path}' does not fit these features: {exc}") from exc
        checkpoint_path = head_path
        stats = validate(model, classifier, _loader(val_set, args, shuffle=False), args, device)
        log.info("linear head %s: top-1 %.2f, top-5 %.2f on %d images", checkpoint_path, stats["acc1"],
                 stats["acc5"], len(val_set))
        return {**stats, "best_acc1": stats["acc1"]}

    ddp = nn.parallel.DistributedDataParallel(classifier) if world > 1 else classifier
    lr = args.lr * args.batch_size_per_gpu * world / 256.0
    optimizer = torch.optim.SGD(ddp.parameters(), lr, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    start_epoch, best_acc1 = 0, 0.0
    if checkpoint_path.exists():
        state = safe_load(checkpoint_path)
        classifier.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_acc1 = state["epoch"], state["best_acc"]
        log.info("linear eval resumed from %s at epoch %d", checkpoint_path, start_epoch)
    train_set = build_dataset(args.split("train"), train_tf, args.max_train_images)
    require_labels(train_set, args.split("train"), "the linear probe")

    stats: dict[str, float] = {"best_acc1": best_acc1}
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed, rank, epoch)
        train_loss = train_epoch(model, ddp, _loader(train_set, args, True, epoch), optimizer, args, device, epoch,
                                 show_progress and rank == 0)
        stats = {"train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            val = validate(model, classifier, _loader(val_set, args, shuffle=False), args, device)
            best_acc1 = max(best_acc1, val["acc1"])
            stats.update({"val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"]})
        stats["best_acc1"] = best_acc1
        if rank == 0:
            save_checkpoint({"epoch": epoch + 1, "state_dict": classifier.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "best_acc": best_acc1, "args": asdict(args)}, checkpoint_path)
            with open(out / "log.txt", "a") as f:
                f.write(json.dumps({**stats, "epoch": epoch}) + "\n")
            log.info("linear epoch %d/%d: train loss %.4f, val top-1 %s, best %.2f", epoch, args.epochs, train_loss,
                     f"{stats['val_acc1']:.2f}" if "val_acc1" in stats else "-", best_acc1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats, checkpoint_path)
    return stats
