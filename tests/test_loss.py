"""DINOLoss against the paper's formula on hand-checkable cases."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dino_ray import DINOLoss
from dino_ray.core.loss import koleo_loss, sinkhorn_knopp, teacher_temp_schedule


def manual_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """Eq. (1) of the paper, written out pair by pair."""
    s = [F.log_softmax(c / student_temp, dim=-1) for c in student.chunk(ncrops)]
    t = [F.softmax((c - center) / teacher_temp, dim=-1) for c in teacher.chunk(2)]
    terms = [-(t[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    return sum(terms) / len(terms), len(terms)


def test_loss_uses_every_pair_but_same_views():
    torch.manual_seed(0)
    ncrops, batch, dim = 4, 3, 5
    loss_fn = DINOLoss(dim, ncrops, 0.04, 0.04, 0, 10)
    student, teacher = torch.randn(ncrops * batch, dim), torch.randn(2 * batch, dim)
    expected, n_terms = manual_loss(student, teacher, torch.zeros(1, dim), ncrops, 0.1, 0.04)
    assert n_terms == 2 * (ncrops - 1)
    assert torch.allclose(loss_fn(student, teacher, epoch=0), expected, atol=1e-6)


def test_two_crops_pair_each_global_view_only_with_the_other():
    """With 2 crops the only pairs are (teacher 1, student 2) and (teacher 2, student 1)."""
    torch.manual_seed(1)
    loss_fn = DINOLoss(4, 2, 0.04, 0.04, 0, 1)
    g = torch.randn(2, 4)
    teacher = g.clone()
    student = g.clone() * 10  # student rows equal (scaled) teacher rows: pairs are (t1, s2) and (t2, s1) only
    expected = -(F.softmax(g[0] / 0.04, -1) * F.log_softmax(student[1] / 0.1, -1)).sum() / 2 \
        - (F.softmax(g[1] / 0.04, -1) * F.log_softmax(student[0] / 0.1, -1)).sum() / 2
    assert torch.allclose(loss_fn(student, teacher, 0), expected, atol=1e-5)


def test_center_used_is_the_one_before_the_call_then_ema_of_teacher_mean():
    torch.manual_seed(2)
    dim = 6
    loss_fn = DINOLoss(dim, 3, 0.04, 0.04, 0, 1, center_momentum=0.9)
    old_center = torch.randn(1, dim)
    loss_fn.center.copy_(old_center)
    student, teacher = torch.randn(6, dim), torch.randn(4, dim)
    expected, _ = manual_loss(student, teacher, old_center, 3, 0.1, 0.04)
    assert torch.allclose(loss_fn(student, teacher, 0), expected, atol=1e-6)
    assert torch.allclose(loss_fn.center, 0.9 * old_center + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)


def test_teacher_temperature_schedule_reaches_target_one_epoch_early():
    schedule = teacher_temp_schedule(0.04, 0.07, 3, 5)
    assert np.allclose(schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    loss_fn = DINOLoss(3, 2, 0.04, 0.07, 3, 5)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    expected, _ = manual_loss(s, t, torch.zeros(1, 3), 2, 0.1, 0.055)
    assert torch.allclose(loss_fn(s, t, epoch=1), expected, atol=1e-6)


def _center_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    loss_fn = DINOLoss(4, 2, 0.04, 0.04, 0, 1)
    teacher = torch.full((2 * (rank + 1), 4), float(rank + 1))  # unequal batches: 2 rows of 1s, 4 rows of 2s
    loss_fn(torch.randn(len(teacher), 4), teacher, 0)
    results[rank] = loss_fn.center.clone()
    dist.destroy_process_group()


def test_center_is_all_reduced_across_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_center_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
    global_mean = (2 * 1.0 + 4 * 2.0) / 6
    for rank in range(2):
        assert torch.allclose(results[rank], torch.full((1, 4), 0.1 * global_mean))


def _sinkhorn_worker(rank, world, init_file, teacher, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results[rank] = sinkhorn_knopp(teacher.chunk(world)[rank], 0.1)
    dist.destroy_process_group()


def test_sinkhorn_knopp_over_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(6)
    teacher = torch.randn(8, 5) * 3
    results = mp.Manager().dict()
    mp.spawn(_sinkhorn_worker, args=(2, str(tmp_path / "init"), teacher, results), nprocs=2)
    assert torch.allclose(torch.cat([results[0], results[1]]), sinkhorn_knopp(teacher, 0.1), atol=1e-6)


def test_works_without_a_process_group():
    assert not (dist.is_available() and dist.is_initialized())
    loss = DINOLoss(8, 4, 0.04, 0.04, 0, 1)(torch.randn(8, 8), torch.randn(4, 8), 0)
    assert torch.isfinite(loss)
    with pytest.raises(IndexError):
        DINOLoss(8, 4, 0.04, 0.04, 0, 1)(torch.randn(8, 8), torch.randn(4, 8), 1)  # past the schedule


def test_collapse_monitors_are_teacher_entropy_and_pairwise_kl():
    torch.manual_seed(5)
    ncrops, batch, dim = 4, 3, 6
    loss_fn = DINOLoss(dim, ncrops, 0.04, 0.04, 0, 10)
    student, teacher = torch.randn(ncrops * batch, dim), torch.randn(2 * batch, dim)
    _, (teacher_entropy, kl_monitor) = loss_fn(student, teacher, epoch=0, return_monitors=True)
    s = [F.log_softmax(c / 0.1, dim=-1) for c in student.chunk(ncrops)]
    t = [F.softmax(c / 0.04, dim=-1) for c in teacher.chunk(2)]
    entropy = torch.cat([-(p * p.log()).sum(-1) for p in t]).mean()
    kl = [(t[i] * (t[i].log() - s[v])).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    assert torch.allclose(teacher_entropy, entropy, atol=1e-5)
    assert torch.allclose(kl_monitor, sum(kl) / len(kl), atol=1e-5)


def test_collapse_monitors_read_zero_and_log_k_at_the_two_collapses():
    dim, batch = 8, 4
    loss_fn = DINOLoss(dim, 2, 0.04, 0.04, 0, 1)
    uniform = torch.zeros(2 * batch, dim)  # every output equal: the teacher is uniform, student = teacher
    _, (entropy, kl) = loss_fn(uniform, uniform, 0, return_monitors=True)
    assert entropy.item() == pytest.approx(np.log(dim), abs=1e-5)
    assert kl.item() == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.zeros(2 * batch, dim)
    one_hot[:, 0] = 100.0  # one dimension dominates everywhere: entropy 0
    loss_fn = DINOLoss(dim, 2, 0.04, 0.04, 0, 1)
    _, (entropy, kl) = loss_fn(one_hot, one_hot, 0, return_monitors=True)
    assert entropy.item() == pytest.approx(0.0, abs=1e-4)
    assert kl.item() == pytest.approx(0.0, abs=1e-4)


def test_sinkhorn_knopp_equals_its_definition_on_a_hand_case():
    """DINOv2's three iterations written out on a 2-prototype, 2-sample case: Q = exp(t / temp) normalised,
    then rows to 1/K and columns to 1/B in turn, scaled by B."""
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.5]])  # both samples prefer prototype 0
    q = torch.exp(teacher / 0.5).t()
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True) / 2
        q = q / q.sum(dim=0, keepdim=True) / 2
    expected = (q * 2).t()
    targets = sinkhorn_knopp(teacher, 0.5)
    assert torch.allclose(targets, expected, atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(2), atol=1e-6)   # each row a distribution
    assert torch.allclose(targets.sum(dim=0), torch.ones(2), atol=2e-2)   # prototypes shared (nearly) equally
    assert targets[1, 1] > targets[0, 1]  # the sample that leans to prototype 1 gets more of it


def test_sinkhorn_knopp_balances_a_collapsed_teacher_and_survives_large_logits():
    torch.manual_seed(3)
    teacher = torch.randn(64, 16) * 0.01 + torch.arange(16.0) * 0.3  # every row prefers the last prototype
    softmax = F.softmax(teacher / 0.04, dim=-1)
    targets = sinkhorn_knopp(teacher, 0.04, n_iterations=10)
    assert softmax.mean(0).max() > 0.9  # plain softmax: one prototype takes the batch
    assert torch.allclose(targets.mean(0), torch.full((16,), 1 / 16), atol=1e-3)
    assert torch.isfinite(sinkhorn_knopp(teacher * 1e4, 0.04)).all()  # exp(1e5) would overflow unshifted


def test_dino_loss_with_sinkhorn_knopp_uses_its_targets_and_leaves_the_center():
    torch.manual_seed(4)
    loss_fn = DINOLoss(8, 3, 0.04, 0.04, 0, 1, centering="sinkhorn_knopp")
    student, teacher = torch.randn(6, 8), torch.randn(4, 8)
    targets = sinkhorn_knopp(teacher, 0.04).chunk(2)
    s = [F.log_softmax(c / 0.1, dim=-1) for c in student.chunk(3)]
    terms = [-(targets[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(3) if v != i]
    assert torch.allclose(loss_fn(student, teacher, 0), sum(terms) / len(terms), atol=1e-5)
    assert torch.equal(loss_fn.center, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="centering 'median'"):
        DINOLoss(8, 3, 0.04, 0.04, 0, 1, centering="median")


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    """Three unit vectors: (1,0), (0,1) and (0.6,0.8). Nearest neighbours: (1,0)->(0.6,0.8) at sqrt(0.8),
    (0,1)->(0.6,0.8) at sqrt(0.4), (0.6,0.8)->(0,1) at sqrt(0.4); inputs are normalised first."""
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.6, 0.8]], requires_grad=True)
    expected = -(np.log(np.sqrt(0.8)) + 2 * np.log(np.sqrt(0.4))) / 3
    loss = koleo_loss(features)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_koleo_prefers_spread_features():
    spread = torch.eye(4)
    bunched = torch.eye(4) * 0.1 + 1.0
    assert koleo_loss(spread) < koleo_loss(bunched)
