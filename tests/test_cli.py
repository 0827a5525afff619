"""The dino-ray command line: errors that name the problem, and the k-NN command end to end."""
import json
import re
import subprocess
import sys

import pytest

from dino_ray.cli import main
from dino_ray.core.train.loop import train_dino


def test_unknown_key_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "dino_ray.cli", "pretrain", "teacher_tmp=0.05", f"output_dir={out}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key(s) 'teacher_tmp' (did you mean 'teacher_temp'?)" in proc.stderr
    assert not out.exists()


def test_missing_data_path_is_named(tmp_path, tiny_cfg):
    cfg = tiny_cfg(data_path=str(tmp_path / "no_such_data"))
    overrides = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in cfg.to_dict().items()]
    assert main(["pretrain", *overrides]) == 2


def test_help_needs_no_network():
    proc = subprocess.run([sys.executable, "-m", "dino_ray.cli", "pretrain", "--help"], capture_output=True, text=True,
                          env={"PATH": "", "no_proxy": "*", "http_proxy": "http://0.0.0.0:9", "https_proxy":
                               "http://0.0.0.0:9"})
    assert proc.returncode == 0 and "key=value" in proc.stdout


def test_eval_knn_on_a_pretraining_checkpoint(tiny_cfg, cifar_rows, tmp_path, capsys):
    cfg = tiny_cfg(epochs=1)
    train_dino(cfg, show_progress=False)
    out = tmp_path / "knn"
    code = main(["eval-knn", "--pretrained_weights", f"{cfg.output_dir}/checkpoint.pth", "--train_data_path",
                 str(cifar_rows), "--val_data_path", str(cifar_rows), "--max_train_images", "200",
                 "--max_val_images", "56", "--nb_knn", "5", "10", "--num_workers", "0", "--output_dir", str(out),
                 "--dump_features", str(out / "features"), "--no-ray", "--tracking_uri", f"sqlite:///{out}/mlflow.db"])
    assert code == 0
    assert "5-NN classifier result: Top1:" in capsys.readouterr().out
    record = json.loads((out / "knn.json").read_text())
    assert record["arch"] == "vit_tiny" and record["embed_dim"] == 32 and set(record["results"]) == {"5", "10"}
    assert (out / "features" / "train" / "part-00000.parquet").exists() and (out / "features" / "val").is_dir()
    again = main(["eval-knn", "--pretrained_weights", f"{cfg.output_dir}/checkpoint.pth", "--load_features",
                  str(out / "features"), "--nb_knn", "5", "--output_dir", str(out / "reloaded"), "--no-ray"])
    assert again == 0
    reloaded = json.loads((out / "reloaded" / "knn.json").read_text())
    assert reloaded["results"]["5"] == record["results"]["5"]


def test_dry_run_prints_the_paper_run_and_its_cost(capsys):
    assert main(["pretrain", "--config", "experiments/vit_small_16_100ep.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arch: vit_small" in out and "num_workers: 8" in out  # the resolved config
    assert "world size 8 x batch 64 = total batch 512; lr 0.0005 -> 0.001" in out
    assert "1,281,167 images (ImageNet-1k train" in out and "2,502 iterations per epoch" in out
    # the paper's own figure back: 100 epochs of ImageNet in 24.2 h on 16 GPUs = 387 GPU-hours
    gpu_hours = float(re.search(r"([\d,.]+) GPU-hours", out).group(1).replace(",", ""))
    assert gpu_hours == pytest.approx(24.2 * 16, rel=1e-3)
    assert main(["pretrain", "--config", "experiments/vit_small_16_100ep.yaml", "--dry-run", "--num_images", "100"]) == 2


def test_video_and_copy_commands_on_a_backbone_only_file(cifar_rows, tmp_path, capsys, caplog):
    """The three commands of the reference's video and copy programs, wired end to end on a released-style file
    (a bare backbone state dict: the shape flags say what it is)."""
    import torch

    from dino_ray import build_backbone
    from dino_ray.eval.synthetic import write_moving_disc
    from dino_ray.eval.video import video_info

    torch.manual_seed(0)
    torch.save(build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=1, num_heads=2).state_dict(),
               tmp_path / "backbone.pth")
    weights = ["--pretrained_weights", str(tmp_path / "backbone.pth"), "--arch", "vit_tiny", "--patch_size", "4",
               "--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--tracking_uri", f"sqlite:///{tmp_path}/m.db"]
    made = write_moving_disc(tmp_path / "made", num_frames=6)
    assert main(["attention-video", *weights, "--input_path", str(made["video"]), "--output_path",
                 str(tmp_path / "video"), "--resize", "16", "32", "--threshold", "0", "--no-mlflow"]) == 0
    assert video_info(tmp_path / "video" / "moving_disc-attention.mp4") == (6, 10)
    assert main(["eval-video-segmentation", *weights, "--data_path", str(made["davis"]), "--size", "32",
                 "--output_dir", str(tmp_path / "davis")]) == 0
    assert "DAVIS 1 video(s): J&F" in capsys.readouterr().out
    assert len(list((tmp_path / "davis" / "moving_disc").glob("*.png"))) == 6
    assert main(["eval-copy-detection", *weights, "--data_path", str(cifar_rows), "--max_images", "40",
                 "--imsize", "16", "--edits", "jpeg", "rotation", "--output_dir", str(tmp_path / "copy")]) == 0
    assert set(json.loads((tmp_path / "copy" / "copy_detection.json").read_text())["results"]) == {"jpeg", "rotation"}
    assert main(["eval-video-segmentation", *weights, "--data_path", str(tmp_path / "nowhere")]) == 2  # named, exit 2
    assert main(["eval-copy-detection", *weights, "--data_path", str(cifar_rows), "--edits", "paint"]) == 2
    assert "edit(s) ['paint'] unknown" in caplog.text
