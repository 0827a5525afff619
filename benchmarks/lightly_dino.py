"""The peer curve of benchmarks/time_to_accuracy.py: lightly's DINO with its CIFAR-10 benchmark settings.

Settings of lightly's ``cifar10_benchmark.py`` DINO model: lightly's CIFAR ResNet-18 (``ResNetGenerator``),
``DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)``, ``DINOLoss(output_dim=2048)``, SGD lr 0.06 at
batch 128 with momentum 0.9 and weight decay 5e-4 under a cosine schedule, teacher momentum 0.99, and
``DINOTransform(global_crop_size=32, n_local_views=0, gaussian_blur=(0, 0, 0))``: two 32 px global crops.
The cosine runs over the steps that fit the budget (measured over a few steps first), as lightly's runs
over its epochs. Needs ``pip install -e ".[bench]"`` (the ``lightly`` package); dino-ray itself does not.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from dino_ray.core.data.datasets import build_dataset, collate_skipping_bad

BATCH_SIZE = 128


def _views_collate(batch: list) -> list[torch.Tensor]:
    images, _, _ = collate_skipping_bad(batch)
    return images


def _model() -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    from lightly.models import ResNetGenerator
    from lightly.models.modules import DINOProjectionHead

    resnet = ResNetGenerator("resnet-18")
    backbone = nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    head = DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)
    # lightly's benchmark builds the teacher head anew (its weight norm refuses deepcopy) and starts it equal
    teacher_backbone, teacher_head = copy.deepcopy(backbone), DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)
    teacher_head.load_state_dict(head.state_dict())
    for p in [*teacher_backbone.parameters(), *teacher_head.parameters()]:
        p.requires_grad = False
    return backbone, head, teacher_backbone, teacher_head


def lightly_curve(train_data: Path, minutes: float, points: int, bank: Any, test: Any,
                  knn_top1: Callable[[Any, Any, nn.Module], float], calibration_steps: int = 8) -> dict[str, Any]:
    """Train for ``minutes`` (training time only), k-NN of the teacher backbone every ``minutes / points``."""
    from lightly.loss import DINOLoss
    from lightly.models.utils import update_momentum
    from lightly.transforms.dino_transform import DINOTransform

    torch.manual_seed(0)
    transform = DINOTransform(global_crop_size=32, n_local_views=0, gaussian_blur=(0.0, 0.0, 0.0))
    dataset = build_dataset(train_data, transform)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=1, drop_last=True,
                        collate_fn=_views_collate, persistent_workers=True)
    backbone, head, teacher_backbone, teacher_head = _model()
    random_init = knn_top1(bank, test, teacher_backbone)
    teacher_backbone.train(True)
    criterion = DINOLoss(output_dim=2048)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.06 * BATCH_SIZE / 128, momentum=0.9, weight_decay=5e-4)

    def step(views: list[torch.Tensor], epoch: int) -> float:
        update_momentum(backbone, teacher_backbone, m=0.99)
        update_momentum(head, teacher_head, m=0.99)
        teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
        student_out = [head(backbone(v)) for v in views]
        loss = criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        head.cancel_last_layer_gradients(epoch)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def batches():
        epoch = 0
        while True:
            for views in loader:
                yield views, epoch
            epoch += 1

    stream = batches()
    base_lr = optimizer.param_groups[0]["lr"]
    # the step time, measured on a throw-away copy so that the timed run starts from the seeded init
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (backbone, head, teacher_backbone,
                                                                          teacher_head)]
    next(stream)
    start = time.perf_counter()
    for _ in range(calibration_steps):
        step(*next(stream))
    step_seconds = (time.perf_counter() - start) / calibration_steps
    for module, state in zip((backbone, head, teacher_backbone, teacher_head), saved):
        module.load_state_dict(state)
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=5e-4)
    total_steps = int(minutes * 60 / step_seconds)
    print(f"lightly: {step_seconds:.3f} s/step -> {total_steps} steps", flush=True)

    curve, trained, elapsed = [], 0, 0.0
    for point in range(1, points + 1):
        target = total_steps * point // points
        start = time.perf_counter()
        losses = []
        while trained < target:
            views, epoch = next(stream)
            for group in optimizer.param_groups:  # cosine over the budget, as CosineAnnealingLR over its epochs
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * trained / total_steps))
            losses.append(step(views, epoch))
            trained += 1
        elapsed += time.perf_counter() - start
        curve.append({"minutes": round(elapsed / 60, 2), "knn_top1": knn_top1(bank, test, teacher_backbone),
                      "images": trained * BATCH_SIZE, "loss": sum(losses) / max(1, len(losses))})
        teacher_backbone.train(True)  # the k-NN put it in eval mode; lightly's teacher trains in train mode
        print(f"  lightly {curve[-1]}", flush=True)
    return {"step_seconds": step_seconds, "total_steps": total_steps, "random_init": random_init, "curve": curve}
