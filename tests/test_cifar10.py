"""Where the quickstart's CIFAR-10 comes from: given paths, the data root's shards, torchvision's download, the
package's sample."""
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_ray.core.data import cifar10
from dino_ray.core.data.datasets import build_dataset


def test_given_paths_come_first_and_go_in_pairs():
    assert cifar10.quickstart_data("a.parquet", "b.parquet") == ("a.parquet", "b.parquet", "given")
    with pytest.raises(ValueError, match="give both --train_data and --val_data"):
        cifar10.quickstart_data("a.parquet", None)


def test_the_data_roots_shards_then_download_then_sample(tmp_path, monkeypatch):
    shards = tmp_path / "data" / "cifar10" / "train"
    shards.mkdir(parents=True)
    (shards / "part-00004.parquet").touch()
    monkeypatch.setenv("DINO_RAY_DATA", str(tmp_path / "data"))
    train, val, source = cifar10.quickstart_data()
    assert (train, val) == (str(shards / "part-00000.parquet"), str(shards / "part-00004.parquet"))
    assert source.startswith("CIFAR-10 shards in the data root")

    monkeypatch.setenv("DINO_RAY_DATA", str(tmp_path / "absent"))  # a fresh install: nothing there yet
    monkeypatch.delenv("DINO_RAY_OFFLINE", raising=False)
    monkeypatch.setattr(cifar10, "online", lambda: True)
    monkeypatch.setattr(cifar10, "cifar10_parquet", lambda: (tmp_path / "train", tmp_path / "test"))
    assert cifar10.quickstart_data()[:2] == (str(tmp_path / "train"), str(tmp_path / "test"))
    monkeypatch.setenv("DINO_RAY_OFFLINE", "1")  # the switch that skips the download
    assert cifar10.quickstart_data()[2].startswith("the package's sample")
    monkeypatch.delenv("DINO_RAY_OFFLINE")

    def failing_download():
        raise RuntimeError("checksum mismatch")

    monkeypatch.setattr(cifar10, "cifar10_parquet", failing_download)
    train, val, source = cifar10.quickstart_data()
    assert (train, val) == (str(cifar10.SAMPLE / "train.parquet"), str(cifar10.SAMPLE / "val.parquet"))
    monkeypatch.setattr(cifar10, "online", lambda: False)
    assert cifar10.quickstart_data()[2].startswith("the package's sample")


def test_sample_is_within_its_budget_and_disjoint_from_its_held_out_part():
    train, val = (pq.read_table(cifar10.SAMPLE / f"{name}.parquet") for name in ("train", "val"))
    assert (train.num_rows, val.num_rows) == (4000, 1000)
    assert sum(f.stat().st_size for f in cifar10.SAMPLE.glob("*.parquet")) < 15 * 2**20
    assert not set(train.column("path").to_pylist()) & set(val.column("path").to_pylist())
    assert len(set(train.column("label").to_pylist())) == 10


class FakeCIFAR10:
    """torchvision's CIFAR10 interface (classes, (PIL image, label) items) over a few made-up images: the real
    download cannot be tested without internet, the conversion of what it gives can."""
    classes = ["airplane", "automobile"]

    def __init__(self, root, train, download):
        self.count = 6 if train else 4
        self.calls.append((root, train, download))

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return Image.new("RGB", (32, 32), (40 * index, 0, 0)), index % 2


def test_download_is_written_as_images_and_converted_to_parquet_once(tmp_path, monkeypatch):
    import torchvision.datasets

    FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    train, test = cifar10.cifar10_parquet(tmp_path)
    assert FakeCIFAR10.calls == [(str(tmp_path / "torchvision"), True, True), (str(tmp_path / "torchvision"), False, True)]
    train_set, test_set = build_dataset(train), build_dataset(test)
    assert (len(train_set), len(test_set)) == (6, 4)
    assert sorted(train_set.targets) == [0, 0, 0, 1, 1, 1]
    image, _ = train_set[train_set.paths.index("airplane/00002.png")]
    assert image.getpixel((0, 0)) == (80, 0, 0)  # PNG: the pixels exactly
    assert cifar10.cifar10_parquet(tmp_path) == (train, test) and len(FakeCIFAR10.calls) == 2  # cached: no new download
