"""A job's typed arguments: made by keyword from the command line, unknown keys and bad values named before any work."""
import pytest

import dino_ray.jobs.knn
from dino_ray.cli import main
from dino_ray.core.args import build_args
from dino_ray.core.config import ConfigError
from dino_ray.eval.args import LinearArgs
from dino_ray.jobs.attention import AttentionArgs, AttentionVideoArgs
from dino_ray.jobs.knn import KnnArgs
from dino_ray.jobs.linear import LinearLaunch
from dino_ray.jobs.retrieval import RetrievalArgs

WEIGHTS = {"pretrained_weights": "checkpoint.pth"}


def test_values_from_a_file_or_a_command_line_are_converted_to_the_fields_types():
    args = build_args(KnnArgs, {**WEIGHTS, "data_path": "images", "nb_knn": ["5", 10], "temperature": "0.1",
                                "use_ray": False})
    assert args.nb_knn == [5, 10] and args.temperature == 0.1 and args.use_ray is False
    assert args.split("train") == "images/train"
    assert KnnArgs(**WEIGHTS, data_path="d", val_data_path="v").split("val") == "v"  # a split's own path first
    assert AttentionArgs(**WEIGHTS, image_path=["cat.png"], embed_dim=32, depth=1).vit_shape == {"embed_dim": 32,
                                                                                                 "depth": 1}


@pytest.mark.parametrize("make, message", [
    (lambda: build_args(KnnArgs, {**WEIGHTS, "data_path": "d", "nb_kn": [5]}),
     r"unknown config key\(s\) 'nb_kn' \(did you mean 'nb_knn'\?\)"),
    (lambda: build_args(KnnArgs, {**WEIGHTS, "data_path": "d", "batch_size_per_gpu": "many"}),
     "config key 'batch_size_per_gpu': value 'many' is not a valid"),
    (lambda: KnnArgs(data_path="d"), "KnnArgs: pretrained_weights is required"),
    (lambda: KnnArgs(**WEIGHTS), r"data_path \(or train_data_path and val_data_path, or load_features\) is required"),
    (lambda: KnnArgs(**WEIGHTS, data_path="d", nb_knn=[20, 0], temperature=-1),
     r"nb_knn must be >= 1, got \[20, 0\]; temperature must be >= 0, got -1"),
    (lambda: KnnArgs(**WEIGHTS, data_path="d", checkpoint_key="ema"), "checkpoint_key must be teacher or student"),
    (lambda: RetrievalArgs(**WEIGHTS, data_path="d", dataset="oxford5k"),
     "dataset must be one of None, roxford5k, rparis6k, got 'oxford5k'"),
    (lambda: AttentionArgs(**WEIGHTS, image_path=["a.png"], image_size=[1, 2, 3]), "image_size takes h w or one size"),
    (lambda: AttentionVideoArgs(**WEIGHTS, input_path="v.mp4", heads="max"), "heads must be one of mean, all"),
    (lambda: LinearArgs(**WEIGHTS, val_data_path="v"), r"train_data_path \(or data_path\) is required \(unless evaluate\)"),
    (lambda: LinearArgs(**WEIGHTS, train_data_path="t", val_data_path="v", epochs=0), "epochs must be >= 1, got 0"),
    (lambda: LinearLaunch(ray_workers=0), "ray_workers must be >= 1, got 0"),
])
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_command_line_passes_every_flag_by_name(monkeypatch):
    received = []
    monkeypatch.setattr(dino_ray.jobs.knn, "knn_job", received.append)
    assert main(["eval-knn", "--pretrained_weights", "run", "--arch", "vit_small", "--patch_size", "8",
                 "--embed_dim", "48", "--data_path", "images", "--nb_knn", "5", "--no-ray", "--num_shards", "3"]) == 0
    (args,) = received
    assert (args.arch, args.patch_size, args.vit_shape, args.nb_knn) == ("vit_small", 8, {"embed_dim": 48}, [5])
    assert args.use_ray is False and args.num_shards == 3 and args.output_dir == "outputs/knn"


def test_a_bad_flag_value_stops_the_command_before_any_work(tmp_path, caplog):
    out = tmp_path / "never"
    assert main(["eval-retrieval", "--pretrained_weights", str(tmp_path / "missing.pth"), "--data_path", "images",
                 "--recall_at", "0", "--output_dir", str(out)]) == 2
    assert "RetrievalArgs: recall_at must be >= 1, got [0]" in caplog.text and not out.exists()
