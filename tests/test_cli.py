"""The dino-ray command line: errors that name the problem, and the k-NN command end to end."""
import json
import subprocess
import sys

from dino_ray.cli import main
from dino_ray.train.loop import train_dino


def test_unknown_key_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "dino_ray.cli", "pretrain", "learning_rate=1", f"output_dir={out}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key(s) ['learning_rate']" in proc.stderr
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
