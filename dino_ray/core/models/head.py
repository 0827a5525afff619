"""DINOHead: the projection MLP, l2-normalised bottleneck and weight-normalised prototypes layer.

Follows ``vision_transformer.DINOHead`` of the reference (Caron et al. 2021, Sec. 3.1). The last
layer is weight-normalised with its own two parameters named ``weight_g`` / ``weight_v``, the keys
of the official checkpoints; it also loads the ``parametrizations.weight.original0/1`` layout of
torch's newer weight-norm API. Unlike ``torch.nn.utils.weight_norm`` it survives ``copy.deepcopy``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


class WeightNormLinear(nn.Module):
    """``y = x W^T`` with ``W = g * v / ||v||`` row-wise (bias-free), as weight_norm(dim=0)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's own init, as the reference gets
        self._register_load_state_dict_pre_hook(self._rename_parametrized_keys)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @staticmethod
    def _rename_parametrized_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for new_name, ours in _PARAMETRIZED.items():
            if prefix + new_name in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + new_name)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # norm_last_layer freezes g at 1: the prototypes stay unit-norm (the paper's stability trick).
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
