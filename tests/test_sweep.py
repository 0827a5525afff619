"""Ray Tune sweeps on CPU with real Tune, Train and MLflow: ASHA stops a clearly worse trial, an interrupted
sweep resumes without redoing or duplicating anything, and the parent/child runs hold the results."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # real Ray processes: make test, not make test-fast

import mlflow.artifacts  # noqa: E402
import mlflow.pytorch  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dino_ray.core.config import ConfigError  # noqa: E402
from dino_ray.jobs.knn import KnnArgs, knn_job  # noqa: E402
from dino_ray.platform.sweep import format_table, load_sweep, param_space  # noqa: E402

from .conftest import SAMPLE, TINY  # noqa: E402


def write_sweep(tmp_path, **changes):
    """A sweep where one trial is clearly worse: with the teacher equal to the student (momentum 0), weight
    decay 1000 shrinks the backbone's weights toward zero, so its features lose the images (measured k-NN top-1
    after 2 epochs: 22.3 with weight decay 0.04, 18.0 with 1000, on 256 held-out images)."""
    base = dict(TINY, epochs=3, lr=0.005, momentum_teacher=0.0, data_path=str(SAMPLE / "train.parquet"),
                max_images=128, output_dir=str(tmp_path), **{"tracking.log_model": True},
                eval={"knn_every": 1, "knn_val_data": str(SAMPLE / "val.parquet"), "knn_train_images": 256,
                      "knn_val_images": 256, "attention_images": 0})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "wd", "base": "base.yaml", "search_space": {"weight_decay": {"grid": [0.04, 1000.0]}},
            "metric": "knn_top1_k20", "mode": "max", "scheduler": {"type": "asha", "grace_period": 1,
                                                                  "reduction_factor": 2},
            "max_concurrent_trials": 1, "trial_cpus": 0.1, "storage_path": str(tmp_path / "sweeps")}
    spec.update(changes)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "sweep.yaml"


def test_sweep_files_are_checked_before_any_trial(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, search_space={"teacher_temp": {"uniform": [0.02, 0.08]},
                                                          "norm_last_layer": {"choice": [True, False]}}))
    space = param_space(spec.search_space)
    assert set(space) == {"teacher_temp", "norm_last_layer"} and spec.base["epochs"] == 3
    with pytest.raises(ConfigError, match="search_space.lr"):
        load_sweep(write_sweep(tmp_path, search_space={"lr": {"grid": [0.001, -1.0]}}))  # a negative lr: now, not later
    with pytest.raises(ConfigError, match="not_a_key"):
        load_sweep(write_sweep(tmp_path, search_space={"not_a_key": {"grid": [1, 2]}}))
    with pytest.raises(ConfigError, match="grid|choice"):
        load_sweep(write_sweep(tmp_path, search_space={"lr": [0.1, 0.2]}))
    assert load_sweep("experiments/sweeps/boosting_vit_small.yaml").base["scaling.num_workers"] == 16
    with pytest.raises(ConfigError, match=r"scheduler.grace_period \(2\) exceeds the epochs a trial runs \(1\)"):
        load_sweep("experiments/sweeps/cifar10_cpu.yaml", ["epochs=1"])  # before Ray starts, no folder made
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) 'num_sample' \(did you mean 'num_samples'"):
        load_sweep(write_sweep(tmp_path, num_sample=2))
    with pytest.raises(ConfigError, match="register=x needs the trials' MLflow models"):
        load_sweep(write_sweep(tmp_path), ["register=x", "tracking.log_model=false"])
    cpu = load_sweep("experiments/sweeps/cifar10_cpu.yaml")  # the table shows a knob as given, not rounded
    table = format_table(cpu, [{"trial": "t0", "teacher_temp": 0.015, "seed": 1, "knn_top1_k20": 29.04,
                                "epochs_run": 3, "status": "STOPPED"}])
    assert table.splitlines()[1].split() == ["t0", "0.015", "1", "29.04", "3", "STOPPED"]


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "dino_ray.cli", "sweep", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_interrupted_sweep_resumes_and_asha_stops_the_weak_trial(tmp_path, monkeypatch):
    """...then registers the best trial's teacher, which every command that takes weights finds by its alias."""
    spec_file = write_sweep(tmp_path)
    trials = tmp_path / "sweeps" / "wd" / "trials"
    first = run_cli(str(spec_file), "register=wd-teacher")
    deadline = time.time() + 300
    while time.time() < deadline and not list(trials.glob("*/checkpoint_epoch0000")):
        time.sleep(0.5)
    assert first.poll() is None, first.stdout.read()
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C during the first trial
    first.communicate(timeout=120)

    resumed = run_cli("--resume", "wd", "--storage_path", str(tmp_path / "sweeps"))  # register= as first given
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert "best:" in output and "checkpoint:" in output

    rows = list(csv_rows(tmp_path / "sweeps" / "wd" / "results.csv"))
    by_wd = {float(r["weight_decay"]): r for r in rows}
    good, weak = by_wd[0.04], by_wd[1000.0]
    assert good["status"] == "TERMINATED" and good["epochs_run"] == "3"
    assert weak["status"] == "STOPPED" and int(weak["epochs_run"]) < 3  # ASHA: worse k-NN at the first rung
    assert float(good["knn_top1_k20"]) > float(weak["knn_top1_k20"])
    with open(max((trials / good["trial"]).glob("checkpoint_epoch*")) / "log.txt") as log:
        assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2]  # resumed, no epoch trained twice

    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'wd' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dino-ray").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`dino_ray.sweep` = 'wd'")
    assert parent.data.params["search.weight_decay"] == json.dumps({"grid": [0.04, 1000.0]})
    assert parent.data.tags["best_trial"] == good["trial"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "metric_vs_knobs.png"}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(float(c.data.params["weight_decay"]) for c in children) == [0.04, 1000.0]  # one run per trial
    statuses = {float(c.data.params["weight_decay"]): c.info.status for c in children}
    # no run is left RUNNING: the stopped trial's run is closed KILLED, or FINISHED when its last (tiny) epoch
    # completed before Tune's stop reached it (results.csv still says STOPPED: Tune saw 2 of 3 epochs)
    assert statuses[0.04] == "FINISHED" and statuses[1000.0] in ("KILLED", "FINISHED")
    good_run = next(c for c in children if float(c.data.params["weight_decay"]) == 0.04)
    # every epoch's monitor reached the trial's run (the epoch cut short by Ctrl-C before its checkpoint was
    # retrained after the resume, so its step may hold two values; the checkpoint lineage above has no repeat)
    assert sorted({m.step for m in client.get_metric_history(good_run.info.run_id, "knn_top1_k20")}) == [0, 1, 2]

    # the best trial's teacher, registered as wd-teacher@best: an MLflow model saved without pickle, and weights
    # every command takes by name
    store = f"sqlite:///{tmp_path / 'sweeps' / 'wd' / 'mlflow.db'}"
    version = client.get_model_version_by_alias("wd-teacher", "best")
    assert version.run_id == good_run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the registry's store too, for this test only
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/wd-teacher@best", dst_path=str(tmp_path / "model")))
    assert (model_dir / "data" / "model.pt2").exists() and not list(model_dir.rglob("*.pkl"))
    with monkeypatch.context() as no_pickle:  # loading it unpickles nothing
        no_pickle.setattr(pickle, "load", lambda *args, **kwargs: pytest.fail("pickle.load called"))
        no_pickle.setattr(pickle, "loads", lambda *args, **kwargs: pytest.fail("pickle.loads called"))
        teacher = mlflow.pytorch.load_model(str(model_dir))
    assert teacher(torch.randn(3, 3, 16, 16)).shape == (3, 32)
    record = knn_job(KnnArgs(pretrained_weights="models:/wd-teacher@best", tracking_uri=store, use_ray=False,
                             train_data_path=str(SAMPLE / "train.parquet"), val_data_path=str(SAMPLE / "val.parquet"),
                             max_train_images=256, max_val_images=128, nb_knn=[5], num_workers=0,
                             output_dir=str(tmp_path / "knn")))
    assert record["pretraining_run"] == good_run.info.run_id and record["checkpoint_epoch"] == 3


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_a_search_round_runs_its_named_variants_as_one_sweep(tmp_path):
    """The recipe search on the sweep engine: round 1 (two baseline seeds and one knob) as a sweep of named
    variants, each a TorchTrainer pretraining scored by the k-NN monitor at its last epoch, in MLflow under the
    round's parent run."""
    import shutil

    from dino_ray.platform.search import run_search

    (tmp_path / "data" / "train").mkdir(parents=True)
    shutil.copy(SAMPLE / "train.parquet", tmp_path / "data" / "train" / "part-00000.parquet")
    shutil.copy(SAMPLE / "val.parquet", tmp_path / "data" / "part-00004.parquet")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(dict(TINY, batch_size_per_gpu=16)))
    spec = {"config": "tiny.yaml", "epochs": 1, "epoch_length": 2, "seeds": 2, "round1_share": 1.0,
            "combine": {"top": 1, "steps": [[1, 2, 1]]}, "trials": {"lr_high": {"lr": 0.01}}}
    results = run_search(spec, "tiny", tmp_path, tmp_path / "data", parallel=1, threads=1, budget_s=900,
                         storage_path=str(tmp_path / "searches"))
    assert [r["name"] for r in results[:3]] == ["baseline/s0", "baseline/s1", "lr_high"]
    assert all(0 < r["knn_top1"] <= 100 and r["steps"] == 2 for r in results)
    client = MlflowClient(f"sqlite:///{tmp_path / 'searches' / 'tiny-round1' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dino-ray").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`dino_ray.sweep` = 'tiny-round1'")
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.params["lr"] for c in children) == sorted([str(TINY.get("lr", 0.0005))] * 2 + ["0.01"])
    assert {c.data.params["seed"] for c in children} == {"0", "1"}
