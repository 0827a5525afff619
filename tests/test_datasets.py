"""Parquet and ImageFolder datasets on real CIFAR-10 images, with bad files skipped and named."""
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dino_ray.core.data.augment import DataAugmentationDINO, eval_transform
from dino_ray.core.data.datasets import ImageFiles, ParquetImageDataset, build_dataset, collate_skipping_bad


def test_parquet_rows_decode_with_labels(cifar_rows):
    ds = build_dataset(cifar_rows)
    assert isinstance(ds, ParquetImageDataset) and len(ds) == 256
    image, label = ds[0]
    assert image.size == (32, 32) and 0 <= label <= 9
    assert len(build_dataset(cifar_rows, max_images=10)) == 10


def test_corrupt_row_is_skipped_counted_and_named(tmp_path, cifar_rows, caplog):
    table = pq.read_table(cifar_rows).slice(0, 4)
    images = table.column("image").to_pylist()
    images[2] = b"not a jpeg"
    table = table.set_column(0, "image", pa.array(images, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    ds = build_dataset(tmp_path / "bad.parquet", eval_transform(32, 32))
    with caplog.at_level(logging.WARNING):
        images, labels, skipped = collate_skipping_bad([ds[i] for i in range(4)])
    assert images.shape == (3, 3, 32, 32) and len(labels) == 3 and skipped == 1
    assert table.column("path")[2].as_py() in caplog.text


def test_image_folder_skips_unreadable_file(tmp_path, caplog):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), (i * 100, 50, 50)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    ds = build_dataset(tmp_path)
    assert isinstance(ds, ImageFiles) and ds.classes == ["cat", "dog"] and len(ds) == 5
    with caplog.at_level(logging.WARNING):
        results = [ds[i] for i in range(len(ds))]
    assert sum(r is None for r in results) == 1 and "broken.jpg" in caplog.text


def test_missing_path_and_missing_columns_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_path '.*nowhere' does not exist"):
        build_dataset(tmp_path / "nowhere")
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match=r"lacks the 'image' column"):
        build_dataset(tmp_path / "wrong.parquet")


def test_multicrop_views_have_reference_sizes_and_normalisation(cifar_rows):
    aug = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 6, global_crops_size=32, local_crops_size=16)
    image, _ = build_dataset(cifar_rows)[0]
    crops = aug(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    stacked = torch.cat([c.flatten() for c in crops])
    # ImageNet normalisation: pixel 0 -> about -2.1, pixel 1 -> about 2.6
    assert stacked.min() >= -2.2 and stacked.max() <= 2.7 and stacked.std() > 0.3


def test_second_global_crop_alone_is_solarized():
    aug = DataAugmentationDINO((0.99, 1.0), (0.05, 0.4), 0, global_crops_size=8)
    names = [type(t).__name__ for t in aug.global_transfo2.transforms]
    assert "RandomSolarize" in names
    assert "RandomSolarize" not in [type(t).__name__ for t in aug.global_transfo1.transforms]
    blur_probs = [t.prob for tr in (aug.global_transfo1, aug.global_transfo2, aug.local_transfo)
                  for t in tr.transforms if type(t).__name__ == "GaussianBlur"]
    assert blur_probs == [1.0, 0.1, 0.5]


def test_parquet_is_read_lazily_a_row_group_at_a_time_within_its_cache(tmp_path, cifar_rows):
    table = pq.read_table(cifar_rows)
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=16)  # 16 row groups
    group = pq.ParquetFile(tmp_path / "groups.parquet").read_row_group(0, columns=["image", "path"]).nbytes
    ds = ParquetImageDataset(tmp_path / "groups.parquet", cache_mb=3.5 * group / 2**20)  # about 3 groups
    assert not ds._cache  # only labels and the layout at start
    assert list(ds.targets) == table.column("label").to_pylist()
    pixels = [np.asarray(ds[i][0]).tolist() for i in range(len(ds))]
    assert 1 <= len(ds._cache) <= 3  # older row groups left the cache
    eager = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).tolist() for b in table.column("image").to_pylist()]
    assert pixels == eager and ds.paths == table.column("path").to_pylist()
    assert len(ParquetImageDataset(tmp_path / "groups.parquet", max_images=20)) == 20


def test_truncated_shard_is_named_before_training(tmp_path, cifar_rows):
    data = cifar_rows.read_bytes()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-00000.parquet").write_bytes(data)
    (tmp_path / "shards" / "part-00001.parquet").write_bytes(data[:len(data) // 2])  # a copy cut short
    with pytest.raises(ValueError, match="part-00001.parquet' is unreadable"):
        build_dataset(tmp_path / "shards")


def test_an_unreadable_row_group_is_skipped_counted_and_named(tmp_path, cifar_rows, caplog):
    pq.write_table(pq.read_table(cifar_rows).slice(0, 64), tmp_path / "hurt.parquet", row_group_size=32,
                   compression="zstd")
    footer = pq.ParquetFile(tmp_path / "hurt.parquet").metadata.row_group(1).column(0)
    data = bytearray((tmp_path / "hurt.parquet").read_bytes())
    start = footer.dictionary_page_offset or footer.data_page_offset  # the second group's first page header
    data[start:start + 32] = bytes(range(200, 232))
    (tmp_path / "hurt.parquet").write_bytes(bytes(data))
    ds = build_dataset(tmp_path / "hurt.parquet", eval_transform(32, 32))
    with caplog.at_level(logging.WARNING):
        _, labels, skipped = collate_skipping_bad([ds[i] for i in range(64)])
    assert (len(labels), skipped) == (32, 32)
    assert "row group 1 of" in caplog.text and "hurt.parquet" in caplog.text
