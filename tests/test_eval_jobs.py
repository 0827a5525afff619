"""Evaluation jobs on real Ray with real MLflow: k-NN features in Ray tasks, the linear probe as a Ray Train job,
attention maps, retrieval, copy detection, video segmentation and attention videos; each an MLflow run nested under
the pretraining it evaluates."""
import json
import pickle
import shutil

import numpy as np
import pytest
import ray  # noqa: E402  (installed by the ray extra: a missing Ray fails, never skips)
import torch
from PIL import Image

pytestmark = pytest.mark.slow  # real Ray processes: make test, not make test-fast

from mlflow.tracking import MlflowClient  # noqa: E402

from dino_ray.core.config import build_config  # noqa: E402
from dino_ray.core.data.augment import eval_transform  # noqa: E402
from dino_ray.core.data.datasets import build_dataset  # noqa: E402
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.eval.copy_detection import copy_scores  # noqa: E402
from dino_ray.eval.features import extract_features  # noqa: E402
from dino_ray.eval.linear import LinearArgs  # noqa: E402
from dino_ray.eval.retrieval import generic_scores  # noqa: E402
from dino_ray.eval.synthetic import write_moving_disc  # noqa: E402
from dino_ray.eval.video import video_info  # noqa: E402
from dino_ray.eval.video_segmentation import davis_scores  # noqa: E402
from dino_ray.jobs.attention import AttentionArgs, AttentionVideoArgs, attention_job, attention_video_job  # noqa: E402
from dino_ray.jobs.copy_detection import CopyDetectionArgs, copy_detection_job  # noqa: E402
from dino_ray.jobs.knn import KnnArgs, knn_job  # noqa: E402
from dino_ray.jobs.linear import linear_job  # noqa: E402
from dino_ray.jobs.retrieval import RetrievalArgs, retrieval_job  # noqa: E402
from dino_ray.jobs.video_segmentation import VideoSegmentationArgs, video_segmentation_job  # noqa: E402
from dino_ray.platform.ray_features import extract_features_on_ray  # noqa: E402
from dino_ray.platform.tracking.store import tracking_uri  # noqa: E402
from dino_ray.platform.trainer import pretrain_on_ray  # noqa: E402

from .conftest import SAMPLE, TINY  # noqa: E402

VAL = str(SAMPLE / "val.parquet")


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """One real 2-epoch pretraining on Ray, tracked in its embedded MLflow store."""
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    out = tmp_path_factory.mktemp("pretraining")
    cfg = build_config(dict(TINY, epochs=2, data_path=str(SAMPLE / "train.parquet"), max_images=256,
                            output_dir=str(out)))
    result = pretrain_on_ray(cfg)
    client = MlflowClient(tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    yield {"cfg": cfg, "checkpoint": f"{result.checkpoint.path}/checkpoint.pth", "run": run, "client": client,
           "uri": tracking_uri(cfg)}
    ray.shutdown()


def children(pretraining, name):
    client, run = pretraining["client"], pretraining["run"]
    return [r for r in client.search_runs([run.info.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
            if r.info.run_name == name]


def test_features_from_ray_tasks_equal_one_process(pretraining, tmp_path):
    spec = {"pretrained_weights": pretraining["checkpoint"], "checkpoint_key": "teacher"}
    spread = extract_features_on_ray(spec, VAL, "val", tmp_path / "features", 16, max_images=100, num_shards=3)
    backbone, _ = backbone_from_checkpoint(**spec)
    single = extract_features(backbone, build_dataset(VAL, eval_transform(16), 100), progress=False)
    assert spread[0].shape == (100, 32) and torch.equal(spread[1], single[1])
    assert torch.allclose(spread[0], single[0], atol=1e-5)
    assert len(list((tmp_path / "features" / "val").glob("part-*.parquet"))) == 3


def test_knn_from_an_mlflow_run_id_is_nested_under_it(pretraining, tmp_path):
    run = pretraining["run"]
    record = knn_job(KnnArgs(pretrained_weights=run.info.run_id, train_data_path=str(SAMPLE / "train.parquet"),
                             val_data_path=VAL, output_dir=str(tmp_path / "knn"), nb_knn=[5, 20], max_train_images=400,
                             max_val_images=200, tracking_uri=pretraining["uri"], num_shards=2))
    assert record["checkpoint_epoch"] == 2 and record["pretraining_run"] == run.info.run_id
    assert set(record["results"]) == {"5", "20"} and 0 < record["results"]["20"]["top5"] <= 100
    (knn_run,) = children(pretraining, "knn")
    assert knn_run.data.metrics["top1_k20"] == pytest.approx(record["results"]["20"]["top1"])
    assert knn_run.data.tags["dino_ray.checkpoint_epoch"] == "2"
    parent = pretraining["client"].get_run(run.info.run_id)  # side by side with the pretraining's own metrics
    assert parent.data.metrics["knn_top1_k20"] == pytest.approx(record["results"]["20"]["top1"])


def test_linear_probe_on_ray_train_resumes_and_links_to_the_pretraining(pretraining, tmp_path):
    # a checkpoint file from the Ray storage: its MLflow run id and store are found beside it / in its args
    args = LinearArgs(pretrained_weights=pretraining["checkpoint"], n_last_blocks=1, avgpool_patchtokens=True,
                      epochs=2, lr=0.5, batch_size_per_gpu=32, num_workers=0, num_labels=10,
                      train_data_path=str(SAMPLE / "train.parquet"), val_data_path=VAL, max_train_images=256,
                      max_val_images=128, crop_size=16, resize_size=16, output_dir=str(tmp_path / "linear"))
    linear_job(args)
    stats = linear_job(LinearArgs(**{**args.__dict__, "epochs": 3}))  # the stopped job, resumed with more epochs
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "linear" / "log.txt")] == [0, 1, 2]
    assert (tmp_path / "linear" / "linear_head.pth").exists() and stats["best_acc1"] > 0
    (linear_run,) = children(pretraining, "linear")  # one run across the restart
    client = pretraining["client"]
    assert [m.step for m in client.get_metric_history(linear_run.info.run_id, "val_acc1")] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(linear_run.info.run_id, "linear_head")] == \
        ["linear_head/checkpoint.pth"]
    parent = client.get_run(pretraining["run"].info.run_id)
    assert parent.data.metrics["linear_top1"] == pytest.approx(stats["best_acc1"])
    evaluated = linear_job(LinearArgs(**{**args.__dict__, "evaluate": True}))  # the saved head, evaluated again
    assert evaluated["acc1"] == pytest.approx(stats["val_acc1"])


def test_attention_maps_of_an_official_layout_backbone_file(pretraining, tmp_path):
    # the released layout: the teacher backbone alone, no prefix, no args
    backbone, _ = backbone_from_checkpoint(pretraining["checkpoint"])
    torch.save(backbone.state_dict(), tmp_path / "dino_backbone.pth")
    build_dataset(VAL, max_images=1)[0][0].save(tmp_path / "cat.png")
    files = attention_job(AttentionArgs(pretrained_weights=str(tmp_path / "dino_backbone.pth"),
                                        image_path=[str(tmp_path / "cat.png")], output_dir=str(tmp_path / "att"),
                                        arch="vit_tiny", patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                        image_size=[32], threshold=0.6, tracking_uri=pretraining["uri"]))
    assert {f.name for f in files} >= {"attention.png", "attn-head0.png", "attn-head1.png", "mask-th0.6-head1.png"}
    client = pretraining["client"]
    (run,) = [r for r in client.search_runs([pretraining["run"].info.experiment_id]) if r.info.run_name == "attention"]
    assert "mlflow.parentRunId" not in run.data.tags  # a file with no pretraining run: a top-level eval run
    assert "attention/cat/attention.png" in {a.path for a in client.list_artifacts(run.info.run_id, "attention/cat")}


def test_retrieval_generic_and_revisited_modes_link_to_the_pretraining(pretraining, tmp_path):
    run = pretraining["run"]
    record = retrieval_job(RetrievalArgs(pretrained_weights=run.info.run_id, data_path=VAL,
                                         output_dir=str(tmp_path / "generic"), max_images=200, batch_size_per_gpu=64,
                                         tracking_uri=pretraining["uri"]))
    labels = build_dataset(VAL, None, 200).targets
    chance = generic_scores(torch.randn(200, 32, generator=torch.Generator().manual_seed(0)), torch.tensor(labels))
    assert record["images"] == 200 and record["results"]["generic"]["mAP"] > chance["mAP"] + 2

    # the revisited layout: database images of 4 colours; query 0 is image 0 (full box); queries 1 and 2 are one
    # picture, mostly image 1's colour with a patch of image 3's: boxed to the patch (1) it finds image 3, whole (2)
    # image 1, so the box is what decides
    folder = tmp_path / "revisited" / "rparis6k"
    (folder / "jpg").mkdir(parents=True)
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40)]
    rng = np.random.default_rng(0)
    pictures = [np.clip(np.array(c) + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8) for c in colours]
    for i, pixels in enumerate(pictures):
        Image.fromarray(pixels).save(folder / "jpg" / f"db{i}.jpg", quality=95)
    shutil.copy(folder / "jpg" / "db0.jpg", folder / "jpg" / "q0.jpg")
    composite = pictures[1].copy()
    composite[8:32, 8:32] = pictures[3][8:32, 8:32]
    Image.fromarray(composite).save(folder / "jpg" / "q1.jpg", quality=95)
    gnd = {"imlist": [f"db{i}" for i in range(4)], "qimlist": ["q0", "q1", "q1"],
           "gnd": [{"bbx": [0, 0, 64, 48], "easy": [0], "hard": [], "junk": [1]},
                   {"bbx": [8, 8, 32, 32], "easy": [], "hard": [3], "junk": []},
                   {"bbx": None, "easy": [1], "hard": [], "junk": []}]}
    (folder / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(gnd))
    record = retrieval_job(RetrievalArgs(pretrained_weights=run.info.run_id, data_path=str(tmp_path / "revisited"),
                                         output_dir=str(tmp_path / "paris"), dataset="rparis6k", multiscale=True,
                                         imsize=32, tracking_uri=pretraining["uri"]))
    assert record["results"]["medium"]["mAP"] == pytest.approx(100) and record["results"]["medium"]["queries"] == 3
    assert record["results"]["hard"]["mAP"] == pytest.approx(100) and record["results"]["hard"]["queries"] == 1
    retrieval_runs = children(pretraining, "retrieval")
    assert len(retrieval_runs) == 2
    assert {r.data.metrics.get("hard_mAP") for r in retrieval_runs} >= {100.0}
    assert json.loads((tmp_path / "paris" / "retrieval.json").read_text())["dataset"] == "rparis6k"
    for retrieval_run in retrieval_runs:  # results and the figure of the first queries' first results
        artifacts = {a.path for a in pretraining["client"].list_artifacts(retrieval_run.info.run_id)}
        assert artifacts == {"retrieval.json", "retrieval.png"}


def test_copy_detection_generic_and_copydays_modes_link_to_the_pretraining(pretraining, tmp_path):
    run = pretraining["run"]
    record = copy_detection_job(CopyDetectionArgs(pretrained_weights=run.info.run_id, data_path=VAL,
                                                  output_dir=str(tmp_path / "generic"), imsize=16, max_images=400,
                                                  edits=["jpeg", "blur", "strong"], tracking_uri=pretraining["uri"]))
    assert record["originals"] == 200 and record["whitening_images"] == 200 and record["database"] == 200
    chance = copy_scores({"random": (torch.randn(200, 64), [[k] for k in range(200)])}, torch.randn(200, 64))
    assert record["results"]["jpeg"] > 50 > 10 > chance["random"]  # a JPEG copy is found; at random it would not
    assert record["results"]["strong"] < record["results"]["jpeg"]
    assert (tmp_path / "generic" / "copies.png").stat().st_size > 0

    copydays = tmp_path / "copydays"  # 3 originals, their JPEG-30 copies, and strong copies named by prefix
    rng = np.random.default_rng(0)
    for k in range(3):
        pixels = np.clip(np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)][k]) + rng.normal(0, 25, (24, 24, 3)),
                         0, 255).astype(np.uint8)
        for folder, name in [("original", f"20{k}000"), ("jpegqual/30", f"20{k}000"), ("strong", f"20{k}001")]:
            (copydays / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(copydays / folder / f"{name}.jpg", quality=30 if "jpeg" in folder else 95)
    record = copy_detection_job(CopyDetectionArgs(pretrained_weights=run.info.run_id, data_path=str(copydays),
                                                  output_dir=str(tmp_path / "days"), dataset="copydays", imsize=16,
                                                  tracking_uri=pretraining["uri"]))
    assert set(record["results"]) == {"original", "strong", "jpegqual/30"} and record["whitening_images"] == 0
    assert record["results"]["original"] == pytest.approx(100)
    assert record["results"]["jpegqual/30"] == pytest.approx(100)
    runs = children(pretraining, "copy_detection")
    assert len(runs) == 2 and {r.data.metrics.get("mAP_jpegqual_30") for r in runs} >= {100.0}


def test_video_segmentation_and_attention_video_of_a_generated_video(pretraining, tmp_path):
    made = write_moving_disc(tmp_path, num_frames=12)
    run = pretraining["run"]
    record = video_segmentation_job(VideoSegmentationArgs(pretrained_weights=run.info.run_id,
                                                          data_path=str(made["davis"]),
                                                          output_dir=str(tmp_path / "davis"), size=32,
                                                          tracking_uri=pretraining["uri"]))
    predicted = sorted((tmp_path / "davis" / "moving_disc").glob("*.png"))
    assert [p.name for p in predicted] == [f"{k:05d}.png" for k in range(12)]
    with Image.open(predicted[3]) as mask:
        assert mask.mode == "P" and mask.size == (64, 32)  # indexed, at the frames' size, as DAVIS wants
    first = tmp_path / "first" / "moving_disc"  # the trivial baseline: the first mask copied to every frame
    first.mkdir(parents=True)
    for path in predicted:
        shutil.copy(predicted[0], first / path.name)
    baseline = davis_scores(tmp_path / "first", made["davis"], ["moving_disc"])
    assert record["results"]["J"] > baseline["J"] + 40
    (davis_run,) = children(pretraining, "video_segmentation")
    assert davis_run.data.metrics["J_and_F"] == pytest.approx(record["results"]["J&F"])

    result = attention_video_job(AttentionVideoArgs(pretrained_weights=run.info.run_id, input_path=str(made["video"]),
                                                    output_path=str(tmp_path / "video"), heads="all",
                                                    tracking_uri=pretraining["uri"]))
    assert video_info(result["video"]) == (12, 10) and len(list(result["frames"].glob("*.png"))) == 12
    (video_run,) = children(pretraining, "attention_video")
    artifacts = {a.path for a in pretraining["client"].list_artifacts(video_run.info.run_id)}
    assert artifacts == {"moving_disc-attention.mp4", "attn-00000.png"}

    # a store that lacks the pretraining run (another --tracking_uri): the eval is recorded there, not nested
    other = f"sqlite:///{tmp_path}/other.db"
    attention_video_job(AttentionVideoArgs(pretrained_weights=pretraining["checkpoint"], input_path=str(made["video"]),
                                           output_path=str(tmp_path / "elsewhere"), video_only=True,
                                           tracking_uri=other))
    client = MlflowClient(other)
    (lone,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    assert lone.data.tags["dino_ray.pretraining_run"] == run.info.run_id and "mlflow.parentRunId" not in lone.data.tags
