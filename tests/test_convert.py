"""``dino-ray convert-data``: ImageFolder trees and file lists into Parquet shards, in Ray tasks or in-process."""
import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_ray.core.data import convert
from dino_ray.core.data.convert import PLAN_FILE, SKIPPED_FILE, convert_images, shard_name
from dino_ray.core.data.datasets import build_dataset
from dino_ray.jobs.convert import convert_job

CLASSES = ["cat", "dog", "ship"]


def make_image_folder(root):
    """4 PNGs of random pixels per class (sizes differ), a truncated JPEG and a text file: the pixels by path."""
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in CLASSES:
        for i in range(4):
            array = rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / cls / f"{i}.png")
            pixels[f"{cls}/{i}.png"] = array
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    (root / "cat" / "notes.txt").write_text("not an image")
    return pixels


def read_rows(target):
    return pq.read_table(sorted(target.glob("part-*.parquet"))).to_pylist()


def test_image_folder_round_trips_labels_and_pixels_and_resumes(tmp_path, monkeypatch):
    pixels = make_image_folder(tmp_path / "src")
    summary = convert_images(tmp_path / "src", tmp_path / "out", rows_per_shard=5)
    # notes.txt is left out by its name, broken.jpg when it does not decode: both named in the report
    assert summary == {"rows": 12, "skipped": 2, "shards": 3, "classes": 3, "target": str(tmp_path / "out")}
    rows = read_rows(tmp_path / "out")
    assert sorted(row["path"] for row in rows) == sorted(pixels)
    for row in rows:
        assert row["class_name"] == row["path"].split("/")[0] and row["label"] == CLASSES.index(row["class_name"])
        decoded = np.asarray(Image.open(io.BytesIO(row["image"])))
        assert np.array_equal(decoded, pixels[row["path"]])  # the file's own bytes: lossless
    with open(tmp_path / "out" / SKIPPED_FILE) as report:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(report)}
    assert set(skipped) == {"dog/broken.jpg", "cat/notes.txt"} and all(skipped.values())
    dataset = build_dataset(tmp_path / "out")  # what pretraining and evaluation read
    assert len(dataset) == 12 and sorted(dataset.targets) == [0] * 4 + [1] * 4 + [2] * 4

    # a conversion that dies while writing shard 2, after shards 0 and 1 (which hold both skipped files):
    # a rerun writes shard 2 alone and still reports the files that shards 0 and 1 left out
    real_convert_shard = convert.convert_shard

    def dies_on_the_last_shard(root, files, target):
        if target.endswith(shard_name(2)):
            raise KeyboardInterrupt
        real_convert_shard(root, files, target)

    monkeypatch.setattr(convert, "convert_shard", dies_on_the_last_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_images(tmp_path / "src", tmp_path / "again", rows_per_shard=5)
    monkeypatch.undo()
    assert not (tmp_path / "again" / shard_name(2)).exists() and not (tmp_path / "again" / SKIPPED_FILE).exists()
    kept = {i: (tmp_path / "again" / shard_name(i)).stat().st_mtime_ns for i in (0, 1)}
    assert convert_images(tmp_path / "src", tmp_path / "again", rows_per_shard=5) == \
        {**summary, "target": str(tmp_path / "again")}
    assert {i: (tmp_path / "again" / shard_name(i)).stat().st_mtime_ns for i in (0, 1)} == kept
    assert read_rows(tmp_path / "again") == rows
    with open(tmp_path / "again" / SKIPPED_FILE) as report:
        assert {row["path"] for row in csv.DictReader(report)} == {"dog/broken.jpg", "cat/notes.txt"}
    with pytest.raises(ValueError, match=f"rows_per_shard differ from {tmp_path / 'out' / PLAN_FILE}"):
        convert_images(tmp_path / "src", tmp_path / "out", rows_per_shard=4)


@pytest.mark.slow
def test_ray_tasks_write_the_same_shards_and_a_file_list_works(tmp_path, tiny_cfg):
    """The conversion in Ray tasks; then Ray Data (``data_loader: ray_data``) reads the folder and the shards as
    the same 12 images, each multi-cropped in a Ray Data task, the broken file dropped there."""
    import ray

    from dino_ray.platform.ray_data import VIEW, count_images, image_dataset, multicrop_batch

    make_image_folder(tmp_path / "src")
    convert_images(tmp_path / "src", tmp_path / "here", rows_per_shard=5)
    config = tiny_cfg(augmentation="batched").to_dict()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        summary = convert_job(tmp_path / "src", tmp_path / "ray", rows_per_shard=5)
        for source, listed in [(tmp_path / "src", 13), (tmp_path / "ray", 12)]:  # notes.txt is left out by name
            assert count_images(str(source)) == listed and count_images(str(source), 3) == 3
            rows = image_dataset(str(source)).map_batches(multicrop_batch, fn_kwargs={"config": config},
                                                          batch_format="numpy", batch_size=4).take_all()
            assert sorted(Path(row["path"]).name for row in rows) == sorted([f"{i}.png" for i in range(4)] * 3)
            assert all(row[VIEW.format(0)].shape == (3, 16, 16) for row in rows)
    finally:
        ray.shutdown()
    assert summary["rows"] == 12 and read_rows(tmp_path / "ray") == read_rows(tmp_path / "here")
    assert json.loads((tmp_path / "ray" / PLAN_FILE).read_text())["classes"] == CLASSES

    (tmp_path / "src" / "list.txt").write_text("ship/1.png\ncat/0.png\ndog/broken.jpg\nship/404.png\n")
    summary = convert_images(tmp_path / "src" / "list.txt", tmp_path / "listed")
    assert summary["rows"] == 2 and summary["skipped"] == 2  # a path list has no labels: -1
    assert [(r["path"], r["label"]) for r in read_rows(tmp_path / "listed")] == [("ship/1.png", -1), ("cat/0.png", -1)]
    with open(tmp_path / "listed" / SKIPPED_FILE) as report:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(report)}
    assert reasons["ship/404.png"].startswith("FileNotFoundError") and "dog/broken.jpg" in reasons
