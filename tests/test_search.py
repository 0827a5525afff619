"""The recipe search: which trials a spec makes, how round 2 combines round 1's winners, and a round as a sweep of
named variants (run for real in tests/test_sweep.py)."""
from pathlib import Path

import pytest

from dino_ray.platform import search
from dino_ray.platform.sweep import VARIANT

ROOT = Path(__file__).resolve().parents[1]

SPEC = {"config": "experiments/cifar10_cpu.yaml", "knobs": {"min_lr": 0.001}, "epochs": 4, "epoch_length": 75,
        "seeds": 2, "combine": {"top": 3, "steps": [[4, 75, 1], [10, 123, 1]]},
        "trials": {"tt": {"teacher_temp": 0.02}, "lr": {"lr": 0.01}, "lr_low": {"lr": 0.004},
                   "noisy": {"clip_grad": 1.0}, "long": {"knobs": {"width": 0.5}, "epochs": 8},
                   "vit": {"config": "experiments/cifar10_cpu_vit.yaml", "knobs": {"lr": 0.001}}}}


def test_round_one_is_the_baseline_over_seeds_then_each_trial():
    trials = search.trial_list(SPEC)
    assert [t["name"] for t in trials] == ["baseline/s0", "baseline/s1", "tt", "lr", "lr_low", "noisy", "long", "vit"]
    assert [t["seed"] for t in trials[:2]] == [0, 1]
    long, vit = trials[-2], trials[-1]
    assert (long["knobs"], long["epochs"], long["epoch_length"]) == ({"width": 0.5}, 8, 75)
    # the spec's base knobs go with its own config only, before the trial's own
    assert search.trial_overrides(long, Path("/d"), 1)[-2:] == ["min_lr=0.001", "width=0.5"]
    assert vit["base"] == {} and search.trial_overrides(vit, Path("/d"), 1)[-1] == "lr=0.001"


def test_round_two_adds_the_winners_one_by_one_best_first_at_every_step_count():
    scores = {"baseline/s0": 38.0, "baseline/s1": 38.2, "tt": 40.0, "lr": 39.0, "lr_low": 39.5, "noisy": 38.3,
              "long": 45.0, "vit": 41.0}
    results = [{**t, "knn_top1": scores[t["name"]]} for t in search.trial_list(SPEC)]
    trials = search.combinations(results, SPEC)
    # noisy is within twice the seeds' deviation (0.14) or 0.3; long and vit ran other steps or another config;
    # lr_low beats lr on the same knob, so lr is not combined
    assert [(t["name"], t["knobs"], t["epochs"] * t["epoch_length"]) for t in trials] == [
        ("baseline@1230/s0", {}, 1230),
        ("tt@300/s1", {"teacher_temp": 0.02}, 300),
        ("tt@1230/s1", {"teacher_temp": 0.02}, 1230),
        ("tt+lr_low@300/s1", {"teacher_temp": 0.02, "lr": 0.004}, 300),
        ("tt+lr_low@1230/s1", {"teacher_temp": 0.02, "lr": 0.004}, 1230)]
    assert all(t["base"] == {"min_lr": 0.001} for t in trials)


def test_no_noise_estimate_no_second_round():
    results = [{**t, "knn_top1": 40.0} for t in search.trial_list({**SPEC, "seeds": 1})]
    assert search.combinations(results, SPEC) == []


def test_the_table_shows_each_trial_against_the_baselines_mean():
    results = [{**t, "steps": 300, "knn_top1": v} for t, v in zip(search.trial_list(SPEC)[:3],
                                                                   (38.0, 39.0, 41.0))]
    table = search.markdown_table(results)
    assert table.startswith("baseline 38.50 (mean of 2 seeds: 38.00, 39.00)")
    assert table.splitlines()[-1] == "| tt | cifar10_cpu | 300 | teacher_temp=0.02 | 41.00 | +2.50 |"


@pytest.mark.parametrize("spec", sorted((ROOT / "benchmarks" / "searches").glob("*.yaml")))
def test_a_round_is_a_sweep_of_named_variants_and_refuses_invalid_trials(spec, tmp_path):
    """Every trial of a shipped spec becomes a variant of the round's sweep (its own config, steps and the
    end-of-run k-NN monitor), except the two a config refuses (a local crop larger than the smallest global one)."""
    import yaml

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-00000.parquet").touch()
    trials = search.trial_list(yaml.safe_load(spec.read_text()))
    sweep = search.round_sweep(trials, "round1", ROOT, tmp_path, parallel=8, threads=1, budget_s=480,
                               storage_path=str(tmp_path / "searches"))
    refused = sorted({t["name"] for t in trials} - set(sweep.variants))
    assert refused == (["gcrops0.2", "lcrops0.1-0.4"] if spec.stem == "cifar10_cpu" else [])
    assert sweep.search_space == {VARIANT: {"grid": list(sweep.variants)}} and sweep.scheduler == {"type": "none"}
    baseline = sweep.variants["baseline/s0"]
    assert baseline["eval.knn_every"] == baseline["epochs"] and baseline["eval.knn_train_images"] == 10000
    assert baseline["eval.knn_train_data"] == str(tmp_path / "train" / "part-00000.parquet")
    assert (sweep.max_concurrent_trials, sweep.time_budget_s, baseline["scaling.threads_per_worker"]) == (8, 480, 1)
