"""benchmarks/recipe_search.py: which trials a spec makes, and how round 2 combines round 1's winners."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_search  # noqa: E402

SPEC = {"config": "experiments/cifar10_cpu.yaml", "knobs": {"min_lr": 0.001}, "epochs": 4, "epoch_length": 75,
        "seeds": 2, "combine": {"top": 3, "steps": [[4, 75, 1], [10, 123, 1]]},
        "trials": {"tt": {"teacher_temp": 0.02}, "lr": {"lr": 0.01}, "lr_low": {"lr": 0.004},
                   "noisy": {"clip_grad": 1.0}, "long": {"knobs": {"width": 0.5}, "epochs": 8},
                   "vit": {"config": "experiments/cifar10_cpu_vit.yaml", "knobs": {"lr": 0.001}}}}


def test_round_one_is_the_baseline_over_seeds_then_each_trial():
    trials = recipe_search.trial_list(SPEC)
    assert [t["name"] for t in trials] == ["baseline/s0", "baseline/s1", "tt", "lr", "lr_low", "noisy", "long", "vit"]
    assert [t["seed"] for t in trials[:2]] == [0, 1]
    long, vit = trials[-2], trials[-1]
    assert (long["knobs"], long["epochs"], long["epoch_length"]) == ({"width": 0.5}, 8, 75)
    # the spec's base knobs go with its own config only, before the trial's own
    assert recipe_search.command(long, Path("/d"), Path("/o"), ["num_workers=2"])[-3:] == [
        "num_workers=2", "min_lr=0.001", "width=0.5"]
    assert vit["base"] == {} and recipe_search.command(vit, Path("/d"), Path("/o"), [])[-1] == "lr=0.001"


def test_round_two_adds_the_winners_one_by_one_best_first_at_every_step_count():
    scores = {"baseline/s0": 38.0, "baseline/s1": 38.2, "tt": 40.0, "lr": 39.0, "lr_low": 39.5, "noisy": 38.3,
              "long": 45.0, "vit": 41.0}
    results = [{**t, "knn_top1": scores[t["name"]]} for t in recipe_search.trial_list(SPEC)]
    trials = recipe_search.combinations(results, SPEC)
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
    results = [{**t, "knn_top1": 40.0} for t in recipe_search.trial_list({**SPEC, "seeds": 1})]
    assert recipe_search.combinations(results, SPEC) == []


def test_the_table_shows_each_trial_against_the_baselines_mean():
    results = [{**t, "steps": 300, "knn_top1": v} for t, v in zip(recipe_search.trial_list(SPEC)[:3],
                                                                   (38.0, 39.0, 41.0))]
    table = recipe_search.markdown_table(results)
    assert table.startswith("baseline 38.50 (mean of 2 seeds: 38.00, 39.00)")
    assert table.splitlines()[-1] == "| tt | cifar10_cpu | 300 | teacher_temp=0.02 | 41.00 | +2.50 |"


@pytest.mark.parametrize("spec", sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "searches").glob("*.yaml")))
def test_the_shipped_search_specs_make_valid_configs(spec):
    """Every trial of a shipped spec is a config dino-ray accepts, except the two that round 1 recorded as
    refused (a local crop larger than the smallest global one)."""
    import yaml

    from dino_ray.config import ConfigError, load_config

    refused = []
    for trial in recipe_search.trial_list(yaml.safe_load(spec.read_text())):
        overrides = recipe_search.command(trial, Path("/d"), Path("/o"), [])[7:]
        try:
            load_config(Path(__file__).resolve().parents[1] / trial["config"], overrides)
        except ConfigError:
            refused.append(trial["name"])
    assert refused == (["gcrops0.2", "lcrops0.1-0.4"] if spec.stem == "cifar10_cpu" else [])


def test_a_search_is_recorded_in_mlflow_as_a_parent_run_with_a_child_per_trial(tmp_path):
    from mlflow.tracking import MlflowClient

    trials = recipe_search.trial_list(SPEC)[:3]
    results = [{**t, "steps": 300, "knn_top1": v, "train_loss": 7.0, "wall_s": 30.0}
               for t, v in zip(trials, (38.0, 39.0, 41.0))]
    path = tmp_path / "search.json"
    path.write_text(json.dumps({"spec": "s.yaml", "results": results}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = recipe_search.record_in_mlflow(path, uri)
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.run_name == "search-search" and run.data.metrics["baseline_knn_top1"] == 38.5
    assert [a.path for a in client.list_artifacts(parent)] == ["search.md"]
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not ./mlruns
    children = {c.info.run_name: c for c in client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
    assert sorted(children) == ["baseline/s0", "baseline/s1", "tt"]
    tt = children["tt"].data
    assert tt.params["knob.teacher_temp"] == "0.02" and tt.params["base.min_lr"] == "0.001"
    assert tt.metrics["knn_top1"] == 41.0 and tt.metrics["vs_baseline"] == 2.5
    assert children["tt"].info.status == "FINISHED"
