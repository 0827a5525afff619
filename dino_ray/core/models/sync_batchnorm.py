"""Batch norm over the global batch on every device, CPU workers (gloo) included.

The reference DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers";
facebookresearch/dino, main_dino.py: "synchronize batch norms (if any)") converts every BatchNorm of the student
and the teacher to ``nn.SyncBatchNorm`` before DistributedDataParallel, so batch statistics are over the global
batch and one step on N ranks x B images is one step on 1 rank x N*B images. torch's ``nn.SyncBatchNorm`` only
runs on CUDA (and a few accelerators): on CPU it raises. ``CrossRankBatchNorm`` gives CPU ranks the same
semantics with plain ``torch.distributed`` collectives, and ``convert_sync_batchnorm`` picks the right one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.batchnorm import _BatchNorm


def _world_size() -> int:
    """The default group's size; 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CrossRankBatchNormFunction(torch.autograd.Function):
    """Batch norm with statistics over the samples of all ranks: one all-reduce forward, one backward.

    grad_input is the derivative of the sum of all ranks' losses w.r.t. this rank's input, and grad_weight /
    grad_bias are this rank's local sums (DDP all-reduces parameter gradients): both as torch's SyncBatchNorm.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, eps: float, momentum: float) -> Tensor:
        # Statistics and arithmetic in float32 at least (as F.batch_norm for half inputs); a no-op copy otherwise.
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        channels, dims, shape = x.size(1), [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // channels
        if count:
            var, mean = torch.var_mean(x, dims, correction=0)
        else:  # an empty local batch still joins the collective, contributing nothing
            var = mean = x.new_zeros(channels)
        # One all-reduce of [sum, sum of squares, count] per channel, but not summed naively: each rank's sums come
        # from its own stable mean and variance (no E[x^2] - E[x]^2 over its elements) and are added up in
        # float64, so the one cancellation left, across ranks, costs ~1e-16 * (mean/std)^2 of the variance:
        # accurate even for activations whose mean is far larger than their spread.
        mean64, var64 = mean.double(), var.double()
        stats = torch.cat([mean64 * count, (var64 + mean64 * mean64) * count, mean64.new_full((1,), count)])
        dist.all_reduce(stats)
        total = int(stats[-1].item())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} over all ranks")
        global_mean = stats[:channels] / total
        global_var = (stats[channels:-1] / total - global_mean * global_mean).clamp_(min=0)
        if running_mean is not None and running_var is not None:
            running_mean.lerp_(global_mean.to(running_mean.dtype), momentum)
            running_var.lerp_((global_var * total / (total - 1)).to(running_var.dtype), momentum)
        mean, invstd = global_mean.to(x.dtype), (global_var + eps).rsqrt().to(x.dtype)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total = total
        scale = invstd if weight is None else invstd * weight
        out = (x - mean.view(shape)) * scale.view(shape)
        if bias is not None:
            out += bias.view(shape)
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        x, dy = input.to(mean.dtype), grad_output.to(mean.dtype)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xmu = x - mean.view(shape)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            channels = sum_dy.numel()
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums)
            mean_dy, mean_dy_xmu = sums[:channels] / ctx.total, sums[channels:] / ctx.total
            scale = invstd if weight is None else invstd * weight
            grad_input = ((dy - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape))
                          * scale.view(shape)).to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype)  # a bias comes with a weight (affine)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class CrossRankBatchNorm(_BatchNorm):
    """A BatchNorm (any input [N, C] or [N, C, *], any memory format) whose batch statistics span all ranks.

    Same parameters and buffers as BatchNorm1d/2d/3d and nn.SyncBatchNorm, so checkpoints load either way. With
    batch statistics (training, or no running statistics) and an initialised process group of more than one
    rank it normalises over the global batch and updates the running statistics as nn.SyncBatchNorm does;
    otherwise it is the ordinary BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_stats or _world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.training and self.track_running_stats
        return CrossRankBatchNormFunction.apply(input, self.weight, self.bias,
                                                self.running_mean if tracked else None,
                                                self.running_var if tracked else None, self.eps, factor)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any submodule is a batch norm (BatchNorm1d/2d/3d, SyncBatchNorm or CrossRankBatchNorm)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with every batch norm synchronised across ranks, as the reference does before DDP.

    On CUDA it is torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm``; elsewhere each BatchNorm (not already
    synchronised) becomes a CrossRankBatchNorm sharing its parameters and buffers (so flags, values and optimizer
    references carry over). Like torch's, it converts in place and returns the root (a new one if the root itself
    is a batch norm).
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, CrossRankBatchNorm)):
        converted = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device_type))
    return converted
