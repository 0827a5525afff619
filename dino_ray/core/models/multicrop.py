"""MultiCropWrapper: run the backbone once per group of same-resolution crops, then the head once.

As ``utils.MultiCropWrapper`` of the reference: the 2 global crops go through the backbone in one
batch, the local crops in another, and the concatenated features through the head together.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor | list[torch.Tensor], return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops stacked; with ``return_features`` also the backbone's (KoLeo needs them)."""
        crops = x if isinstance(x, (list, tuple)) else [x]
        features = []
        for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            out = self.backbone(torch.cat(list(group)))
            features.append(out[0] if isinstance(out, tuple) else out)
        features = torch.cat(features)
        output = self.head(features)
        return (output, features) if return_features else output
