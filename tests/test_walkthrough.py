"""The docs' walk-through, run: a flat folder of photos -> dino-ray pretrain (on Ray) -> export -> embed -> the
nearest images of a query; then a continued pretraining from the run's checkpoint. Every step is the command a
user types (``dino_ray.cli.main``), in one Ray session."""
import json

import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml

from dino_ray.cli import main

from .conftest import TINY, write_images

pytestmark = pytest.mark.slow  # real Ray Train runs and Ray tasks


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_flat_folder_pretrained_exported_embedded_and_searched(local_ray, tmp_path, capsys):
    photos = tmp_path / "photos"
    files = write_images(photos, 160)  # no class folders: unlabelled
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "epochs": 2, "batch_size_per_gpu": 32}))

    # 1. pretrain on the folder as it is
    assert main(["pretrain", "--config", str(recipe), f"data_path={photos}", f"output_dir={tmp_path / 'run'}"]) == 0
    checkpoint = max((tmp_path / "run" / "ray_results" / "run").glob("checkpoint_epoch*")) / "checkpoint.pth"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    # 2. the teacher backbone out, for another framework
    assert main(["export", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "export" / "b.onnx")]) == 0
    assert json.loads((tmp_path / "export" / "b.json").read_text())["feature_dim"] == 32

    # 3. every photo's embedding, in Ray tasks; a stopped run continues where it stopped
    out = tmp_path / "photos.parquet"
    assert main(["embed", str(checkpoint), str(photos), str(out), "--num_shards", "3"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 160 and sorted(table.column("path").to_pylist()) == sorted(map(str, files))
    assert set(table.column("label").to_pylist()) == {-1} and len(table.column("feature")[0]) == 32
    parts = sorted((tmp_path / "photos.parquet.parts" / "embeddings").glob("part-*.parquet"))
    kept = {p.name: p.stat().st_mtime_ns for p in parts[:2]}
    parts[2].unlink()  # as if the run had stopped before its last shard
    assert main(["embed", str(checkpoint), str(photos), str(out), "--num_shards", "3"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in parts[:2]} == kept and pq.read_table(out).equals(table)

    # 4. the nearest photos of one of them: itself first
    capsys.readouterr()
    assert main(["embed", str(checkpoint), str(out), "--query", str(files[7]), "--top_k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[0] == "1" and printed[1].split()[2] == str(files[7])
    assert float(printed[1].split()[1]) > 0.999

    # 5. a new run continued from this one's weights (heads, teacher and centre come along)
    assert main(["pretrain", "--config", str(recipe), f"data_path={photos}", f"output_dir={tmp_path / 'more'}",
                 f"init_from={checkpoint}", "epochs=1"]) == 0
    more = max((tmp_path / "more" / "ray_results" / "more").glob("checkpoint_epoch*"))
    assert [json.loads(line)["epoch"] for line in open(more / "log.txt")] == [0]
    assert torch.load(more / "checkpoint.pth", weights_only=True)["args"]["init_from"] == str(checkpoint)
