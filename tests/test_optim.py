"""Schedules, parameter groups, clipping, last-layer freezing, EMA and LARS against the reference's math."""
import copy

import numpy as np
import torch
from torch import nn

from dino_ray import LARS, DINOHead, MultiCropWrapper, build_backbone, cosine_scheduler, get_params_groups
from dino_ray.core.optim import cancel_gradients_last_layer, clip_gradients, update_teacher


def test_cosine_scheduler_warmup_endpoints_and_peak_twice():
    s = cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=3, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 12
    assert s[0] == 0.0                      # first lr is start_warmup_value
    assert np.allclose(s[:3], [0, 0.5, 1])  # linspace with its endpoint
    assert s[3] == 1.0                      # the peak again, first cosine iteration
    assert 0.1 < s[-1] < s[-2]              # decays but never quite reaches the final value
    assert np.allclose(s[3:], 0.1 + 0.45 * (1 + np.cos(np.pi * np.arange(9) / 9)))


def test_cosine_scheduler_without_warmup_starts_at_base():
    s = cosine_scheduler(0.04, 0.4, epochs=2, niter_per_ep=5)
    assert np.isclose(s[0], 0.04) and np.all(np.diff(s) > 0)


def test_fractional_warmup_spends_that_share_of_an_epoch():
    """Short runs: 0.25 of a 100-iteration epoch warms up for 25 iterations, then the cosine starts."""
    s = cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=100, warmup_epochs=0.25)
    assert len(s) == 200 and s[0] == 0.0 and s[24] == 1.0 and s[25] == 1.0 and s[26] < 1.0
    assert np.all(np.diff(s[:25]) > 0) and np.all(np.diff(s[25:]) < 0)
    assert np.isclose(s[-1], 0.5 * (1 + np.cos(np.pi * 174 / 175)))  # the reference's end, not quite 0


def test_fractional_freeze_drops_the_last_layer_gradients_only_for_that_share():
    head = DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    for epoch, frozen in ((0.0, True), (0.09, True), (0.1, False), (1.5, False)):
        head.zero_grad(set_to_none=False)
        head(torch.randn(2, 8)).sum().backward()
        cancel_gradients_last_layer(epoch, head, 0.1)
        assert (head.last_layer.weight_v.grad is None) == frozen
        assert head.mlp[0].weight.grad is not None


def test_params_groups_decay_matrices_not_biases_or_norms():
    model = MultiCropWrapper(build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=1, num_heads=2),
                             DINOHead(32, 16, norm_last_layer=False, hidden_dim=32, bottleneck_dim=8))
    decayed, plain = get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in decayed
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
                 "head.last_layer.weight_v", "head.last_layer.weight_g", "head.mlp.0.weight"):
        assert name in decayed_names
    for name in ("backbone.patch_embed.proj.bias", "backbone.norm.weight", "backbone.blocks.0.norm1.weight",
                 "head.mlp.0.bias"):
        assert name in plain_names
    frozen_g = DINOHead(8, 4, norm_last_layer=True, hidden_dim=8, bottleneck_dim=4)
    all_params = [p for g in get_params_groups(frozen_g) for p in g["params"]]
    assert not any(p is frozen_g.last_layer.weight_g for p in all_params)


def test_clip_gradients_is_per_parameter():
    model = nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5 -> clipped to 2.5
    model.bias.grad = torch.tensor([1.0])           # norm 1 -> kept
    norms = clip_gradients(model, 2.5)
    assert torch.allclose(norms, torch.tensor([5.0, 1.0]))
    assert torch.allclose(model.weight.grad, torch.tensor([[1.5, 2.0]]), atol=1e-5)
    assert torch.equal(model.bias.grad, torch.tensor([1.0]))  # a global clip_grad_norm_ would have scaled it too


def test_frozen_last_layer_gets_no_update_and_no_weight_decay():
    torch.manual_seed(0)
    head = DINOHead(8, 4, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    groups = get_params_groups(head)
    groups[0]["weight_decay"] = 0.5
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    before = copy.deepcopy(head.last_layer.state_dict())
    head(torch.randn(5, 8)).sum().backward()
    cancel_gradients_last_layer(epoch=0, model=head, freeze_last_layer=1)
    optimizer.step()
    for key, value in head.last_layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert head.last_layer.weight_v not in optimizer.state  # AdamW skipped it: no moments, no decay
    optimizer.zero_grad()
    head(torch.randn(5, 8)).sum().backward()
    cancel_gradients_last_layer(epoch=1, model=head, freeze_last_layer=1)
    optimizer.step()
    assert not torch.equal(head.last_layer.weight_v, before["weight_v"])


def test_teacher_ema_covers_parameters_not_buffers():
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student[1].running_mean.fill_(7.0)
    old = [p.clone() for p in teacher.parameters()]
    update_teacher(student, teacher, momentum=0.9)
    for t_old, s, t in zip(old, student.parameters(), teacher.parameters()):
        assert torch.allclose(t, 0.9 * t_old + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, torch.zeros(3))


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt = LARS([{"params": [w]}, {"params": [b]}], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    opt.step()
    update = torch.tensor([[1.5, 3.0]])  # grad + 0.5 * w
    trust = 0.001 * 5.0 / update.norm()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    assert torch.allclose(b, torch.tensor([1.0 - 0.1 * 2.0]))  # 1-D: no decay, no adaptation
