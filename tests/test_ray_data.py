"""``data_loader: ray_data``: the dataset of views Ray Data streams to the training workers. Reading an image
folder and its Parquet conversion is in test_convert.py (beside the conversion's Ray tasks), the 2-worker training
in test_ray_trainer.py."""
import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # real Ray processes: make test, not make test-fast

from dino_ray.core.config import ConfigError  # noqa: E402
from dino_ray.platform import ray_data  # noqa: E402
from dino_ray.platform.ray_data import VIEW, multicrop_batch  # noqa: E402


def test_a_task_decodes_and_multicrops_a_batch_and_drops_what_does_not_decode(cifar_rows, tiny_cfg):
    rows = pq.read_table(cifar_rows).slice(0, 5).to_pydict()
    batch = {"image": np.array(rows["image"] + [b"not an image"], dtype=object), "label": np.arange(6),
             "path": np.array(rows["path"] + ["broken.jpg"], dtype=object)}
    for augmentation in ("reference", "batched"):
        config = tiny_cfg(augmentation=augmentation, local_crops_number=3).to_dict()
        out = multicrop_batch(batch, config)
        assert list(out["label"]) == [0, 1, 2, 3, 4] and "broken.jpg" not in list(out["path"])
        assert [out[VIEW.format(i)].shape for i in range(5)] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
        again = multicrop_batch(batch, config)  # seeded from the config's seed and the batch's paths
        assert np.array_equal(out[VIEW.format(0)], again[VIEW.format(0)])


def test_a_config_whose_workers_take_every_cpu_is_refused(monkeypatch, tiny_cfg):
    monkeypatch.setattr(ray_data.ray, "cluster_resources", lambda: {"CPU": 2.0})
    deadlock = tiny_cfg(data_loader="ray_data", scaling={"num_workers": 2})
    with pytest.raises(ConfigError, match=r"scaling.num_workers=2 x 1 .* leave 0.*resources_per_worker: \{CPU: 0.5\}"):
        ray_data.check_cpus_for_data(deadlock)
    ray_data.check_cpus_for_data(tiny_cfg(data_loader="ray_data",
                                          scaling={"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}))
    with pytest.raises(ConfigError, match="at least 1 for Ray Data's file listing"):  # 0.5 CPU left: it hangs
        ray_data.check_cpus_for_data(tiny_cfg(data_loader="ray_data", ray_data={"num_cpus": 0.5},
                                              scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1.5}}))
    monkeypatch.setattr(ray_data.ray, "cluster_resources", lambda: {})  # autoscaling from no worker node
    ray_data.check_cpus_for_data(deadlock)
