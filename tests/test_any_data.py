"""A user's own images, whatever their layout: flat and nested folders, class folders, path lists, Parquet without
labels; hidden files, non-images and corrupt files skipped and named; evaluations that need labels say so."""
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dino_ray.core.data.datasets import ImageFiles, ParquetImageDataset, build_dataset, list_images, require_labels

from .conftest import SAMPLE, write_images


def test_a_flat_folder_at_any_depth_is_unlabelled_and_what_is_not_an_image_is_named(tmp_path, caplog):
    write_images(tmp_path / "photos", 6)
    write_images(tmp_path / "photos" / "2024" / "june", 3, start=6)  # nested: still one unlabelled set
    (tmp_path / "photos" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "photos" / ".thumbnails").mkdir()
    write_images(tmp_path / "photos" / ".thumbnails", 2)
    (tmp_path / "photos" / "notes.txt").write_text("shot on a phone")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 cut short")
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(tmp_path / "photos")
    assert isinstance(dataset, ImageFiles) and len(dataset) == 10 and set(dataset.targets) == {-1}
    assert "1 files left out, not images by their names" in caplog.text and "notes.txt" in caplog.text
    assert not any("thumbnails" in p or "DS_Store" in p for p in dataset.paths)  # hidden: not even listed
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(item is None for item in items) == 1 and "broken.jpg" in caplog.text
    with pytest.raises(ValueError, match=r"k-NN needs labelled images, and '.*photos' has none"):
        require_labels(dataset, tmp_path / "photos", "k-NN")


def test_class_subfolders_at_any_depth_give_labels(tmp_path):
    write_images(tmp_path / "data", 12, classes=True)
    write_images(tmp_path / "data" / "class3" / "more", 2, start=100)
    (tmp_path / "data" / "empty_class").mkdir()  # no image: not a class
    listing = list_images(tmp_path / "data")
    assert listing.labelled and "empty_class" not in listing.classes
    dataset = build_dataset(tmp_path / "data")
    names = [listing.classes[label] for label in dataset.targets]
    assert all(f"/{name}/" in path for name, path in zip(names, dataset.paths))
    require_labels(dataset, tmp_path / "data", "k-NN")  # labelled: no complaint


def test_a_path_list_names_images_relative_to_it_or_absolute(tmp_path):
    files = write_images(tmp_path / "pool", 4)
    listed = tmp_path / "lists" / "train.txt"
    listed.parent.mkdir()
    listed.write_text(f"# my selection\n../pool/{files[0].name}\n\n{files[2]}\n../pool/missing.jpg\n")
    dataset = build_dataset(listed)
    assert len(dataset) == 3 and set(dataset.targets) == {-1}
    assert [dataset[i] is None for i in range(3)] == [False, False, True]  # a missing file: skipped at load


def test_parquet_with_only_an_image_column_is_unlabelled(tmp_path):
    table = pq.read_table(SAMPLE / "train.parquet", columns=["image"]).slice(0, 8)
    pq.write_table(table, tmp_path / "images.parquet")
    dataset = build_dataset(tmp_path / "images.parquet")
    assert isinstance(dataset, ParquetImageDataset) and list(dataset.targets) == [-1] * 8
    assert dataset[3][0].size == (32, 32) and dataset[3][1] == -1
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="lacks the 'image' column"):
        build_dataset(tmp_path / "wrong.parquet")


def test_a_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="no image files .* under '.*empty'"):
        build_dataset(tmp_path / "empty")
