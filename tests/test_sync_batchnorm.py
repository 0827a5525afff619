"""Synchronised batch norm on CPU ranks (gloo): N ranks x B images are one step on 1 process x N*B images.

The ranks are forked (torch.multiprocessing.start_processes with start_method="fork"), not spawned: a spawned rank
re-imports torch, 15-35 s for 2-4 ranks on a 2-core machine, a forked one starts in a fraction of a second. Each
rank sets one thread, so no OpenMP pool crosses the fork.
"""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from dino_ray.core.models.sync_batchnorm import (
    CrossRankBatchNorm,
    CrossRankBatchNormFunction,
    convert_sync_batchnorm,
    has_batchnorm,
)

GLOBAL_BATCH = 16
STEPS = 2  # the second step starts from synchronised running statistics and updated weights
TOL = dict(atol=1e-5, rtol=1e-4)


def _net() -> nn.Sequential:
    """The same small network in every process: conv -> BN -> ReLU -> pool -> linear -> BN -> ReLU -> linear."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
                             nn.Linear(8, 3))


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=generator) * 2 + 1
    return images, torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """STEPS of SGD with the loss a mean over this process's batch; what each step saw, and the final state."""
    net = getattr(model, "module", model)  # DDP's wrapped network, for unprefixed names
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for _ in range(STEPS):
        x = images.clone().requires_grad_()
        out = model(x)
        F.cross_entropy(out, labels).backward()
        steps.append({"out": out.detach(), "input_grad": x.grad,
                      "grads": {name: p.grad.clone() for name, p in net.named_parameters()}})
        optimizer.step()
        optimizer.zero_grad()
    net.eval()
    with torch.no_grad():  # eval: each image normalised by the running statistics, not by its batch's
        eval_out = net(images)
    return {"steps": steps, "buffers": {name: b.clone() for name, b in net.named_buffers()}, "eval_out": eval_out}


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a mismatched collective fails, not hangs


def _ddp_worker(rank: int, world: int, init_file: str, channels_last: bool, results: dict) -> None:
    """This rank's slice of the global batch through DDP, with and without the conversion."""
    _init(rank, world, init_file)
    images, labels = _global_batch()
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    images = images[local]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    for synced in (True, False):
        net = convert_sync_batchnorm(_net(), "cpu") if synced else _net()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        results[rank, synced] = _train(DistributedDataParallel(net), images, labels[local])
    dist.destroy_process_group()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("world,channels_last", [(2, False), (4, True)])
def test_ranks_with_synchronised_batchnorm_take_the_single_process_step(world, channels_last, tmp_path):
    """DDP over `world` ranks of GLOBAL_BATCH / world images each, batch norms converted, is the single process on
    the GLOBAL_BATCH images: outputs, gradients, running statistics and eval outputs; unconverted, it is not."""
    images, labels = _global_batch()
    reference = _train(_net(), images, labels)  # one process, the whole batch, the loss a mean over it
    results = mp.Manager().dict()
    mp.start_processes(_ddp_worker, args=(world, str(tmp_path / "init"), channels_last, results), nprocs=world,
                       start_method="fork")
    diffs = {"out": 0.0, "input_grad": 0.0, "param_grad": 0.0, "buffers": 0.0, "eval_out": 0.0}
    for step, ref in enumerate(reference["steps"]):
        ranks = [results[rank, True]["steps"][step] for rank in range(world)]
        out = torch.cat([r["out"] for r in ranks])
        torch.testing.assert_close(out, ref["out"], **TOL)
        diffs["out"] = max(diffs["out"], _max_diff(out, ref["out"]))
        # A rank's input gradient is that of the SUM over ranks of their losses (as torch's SyncBatchNorm):
        # N means over B images each are N times the mean over the N*B images, hence the factor world.
        input_grad = torch.cat([r["input_grad"] for r in ranks])
        torch.testing.assert_close(input_grad, world * ref["input_grad"], **TOL)
        diffs["input_grad"] = max(diffs["input_grad"], _max_diff(input_grad, world * ref["input_grad"]))
        for r in ranks:  # after DDP's averaging over ranks, the gradient of the mean over the global batch
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(r["grads"][name], grad, **TOL, msg=f"step {step} {name}")
                diffs["param_grad"] = max(diffs["param_grad"], _max_diff(r["grads"][name], grad))
    for rank in range(world):
        synced = results[rank, True]
        for name, buffer in reference["buffers"].items():  # running mean, unbiased running var, batches seen
            torch.testing.assert_close(synced["buffers"][name], buffer, **TOL, msg=name)
            diffs["buffers"] = max(diffs["buffers"], _max_diff(synced["buffers"][name].double(), buffer.double()))
    eval_out = torch.cat([results[rank, True]["eval_out"] for rank in range(world)])
    torch.testing.assert_close(eval_out, reference["eval_out"], **TOL)
    diffs["eval_out"] = _max_diff(eval_out, reference["eval_out"])
    assert results[0, True]["buffers"]["6.num_batches_tracked"] == STEPS
    # Without the conversion each rank normalises by its own B images: the step is clearly another one.
    unsynced = max((results[0, False]["steps"][0]["grads"][name] - grad).norm().item() / grad.norm().item()
                   for name, grad in reference["steps"][0]["grads"].items())
    print(f"\nworld={world} channels_last={channels_last} max |synced - single process|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f"; unsynced parameter gradients: max relative error {unsynced:.2e}")
    assert unsynced > 1e-2


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity on a tensor every rank holds alike; backward sums the gradients every rank's graph gives it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _GatherOverRanks(torch.autograd.Function):
    """All-gather along dim 0; backward keeps this rank's rows of the gradient every rank holds alike."""

    @staticmethod
    def forward(ctx, y):
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, y.contiguous())
        ctx.rows = slice(dist.get_rank() * len(y), (dist.get_rank() + 1) * len(y))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows]


def _gradcheck_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(2)
    return tuple(torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
                 for shape in [(4, 3, 2), (3,), (3,)])


def _global_function(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The global batch's output as a function of the global batch and the weights, the same on every rank, each
    rank computing its slice with the distributed Function: a Jacobian gradcheck can compare numerically."""
    x, weight, bias = (_SumGradientOverRanks.apply(t) for t in (x, weight, bias))
    rows = len(x) // dist.get_world_size()
    local = x[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]
    return _GatherOverRanks.apply(CrossRankBatchNormFunction.apply(local, weight, bias, None, None, 1e-5, 0.1))


def _gradcheck_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    _init(rank, world, init_file)
    inputs = _gradcheck_inputs()
    results[rank] = {"out": _global_function(*inputs).detach(),
                     "gradcheck": torch.autograd.gradcheck(_global_function, inputs)}
    dist.destroy_process_group()


def test_the_distributed_function_passes_gradcheck(tmp_path):
    """In float64, the Jacobian of the global batch's output w.r.t. the global batch, weight and bias (backward's
    all-reduce included) is the numerical one; and the output is batch norm's over the global batch."""
    results = mp.Manager().dict()
    mp.start_processes(_gradcheck_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, start_method="fork")
    x, weight, bias = _gradcheck_inputs()
    expected = F.batch_norm(x, None, None, weight, bias, training=True).detach()
    for rank in (0, 1):
        assert results[rank]["gradcheck"]
        torch.testing.assert_close(results[rank]["out"], expected, atol=1e-12, rtol=1e-12)
    print(f"\ngradcheck: passed on both ranks; output vs F.batch_norm over the global batch (float64): max |diff| "
          f"{_max_diff(results[0]['out'], expected):.2e}")


def _empty_rank_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    _init(rank, world, init_file)
    x = (torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(3)) if rank == 0 else torch.empty(0, 3, 4))
    x.requires_grad_()
    bn = CrossRankBatchNorm(3)
    (bn(x) ** 3).sum().backward()
    results[rank] = {"x": x.detach(), "grad": x.grad, "running_var": bn.running_var}
    dist.destroy_process_group()


def test_a_rank_with_an_empty_batch_contributes_nothing(tmp_path):
    results = mp.Manager().dict()
    mp.start_processes(_empty_rank_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, start_method="fork")
    x = results[0]["x"].requires_grad_()
    bn = nn.BatchNorm1d(3)
    (bn(x) ** 3).sum().backward()
    torch.testing.assert_close(results[0]["grad"], x.grad, **TOL)
    assert results[1]["grad"].shape == (0, 3, 4)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["running_var"], bn.running_var, **TOL)
    print(f"\nempty rank: input grad max |diff| {_max_diff(results[0]['grad'], x.grad):.2e}, running_var "
          f"{max(_max_diff(results[rank]['running_var'], bn.running_var) for rank in (0, 1)):.2e}")


def test_without_a_process_group_it_is_the_ordinary_batchnorm():
    x = torch.randn(6, 4, 5, 5) * 3 + 2
    plain = nn.BatchNorm2d(4)
    converted = convert_sync_batchnorm(nn.BatchNorm2d(4), "cpu")
    assert isinstance(converted, CrossRankBatchNorm)
    outs, grads = [], []
    for bn in (plain, converted):
        xi = x.clone().requires_grad_()
        out = bn(xi)
        (out ** 2).mean().backward()
        outs.append(out)
        grads.append((xi.grad, bn.weight.grad, bn.bias.grad))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(converted.named_buffers())[name], buffer)
    plain.eval()
    converted.eval()  # eval: the running statistics, exactly as BatchNorm2d's
    assert torch.equal(converted(x), plain(x))
    x, weight, bias = _gradcheck_inputs()
    bn = CrossRankBatchNorm(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(bn, {"weight": w, "bias": b}, x),
                                    (x, weight, bias))


def test_checkpoints_load_both_ways():
    original = _net()
    with torch.no_grad():  # buffers and weights that differ from a fresh network's
        for tensor in list(original.parameters()) + [b for b in original.buffers() if b.is_floating_point()]:
            tensor.uniform_(0.5, 1.5)
    converted = convert_sync_batchnorm(_net(), "cpu")
    assert converted.state_dict().keys() == original.state_dict().keys()
    converted.load_state_dict(original.state_dict(), strict=True)
    fresh = _net()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    for name, tensor in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    convert_sync_batchnorm(_net(), "cuda").load_state_dict(converted.state_dict(), strict=True)  # GPU runs' too


def test_conversion_keeps_parameters_flags_and_mode():
    net = _net()
    weight, running_mean = net[1].weight.requires_grad_(False), net[1].running_mean
    net[6].eval()
    converted = convert_sync_batchnorm(net, "cpu")
    assert converted is net and has_batchnorm(converted)  # in place, the root kept
    assert isinstance(converted[1], CrossRankBatchNorm) and isinstance(converted[6], CrossRankBatchNorm)
    assert converted[1].weight is weight and converted[1].running_mean is running_mean  # shared, optimizer too
    assert not converted[1].weight.requires_grad
    assert converted[6].momentum is None and not converted[6].training and converted[1].training
    assert convert_sync_batchnorm(converted, "cpu")[1] is converted[1]  # already synchronised: left alone
    assert not has_batchnorm(nn.Sequential(nn.Linear(2, 2)))


def test_on_cuda_it_is_torchs_sync_batchnorm():
    net = _net()
    weight = net[1].weight
    converted = convert_sync_batchnorm(net, "cuda")  # the conversion alone needs no GPU
    assert [type(m) for m in converted.modules() if isinstance(m, _BatchNorm)] == [nn.SyncBatchNorm] * 2
    assert converted[1].weight is weight
