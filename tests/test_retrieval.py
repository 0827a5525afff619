"""Retrieval scores on hand-checked cases, a random-feature baseline, and the revisited Oxford / Paris reader on a
tiny dataset in its documented layout (the job itself: test_eval_jobs.py)."""
import math
import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dino_ray.eval.retrieval import (
    generic_scores,
    protocol_ground_truth,
    ranking,
    read_revisited,
    revisited_ap,
    revisited_scores,
)

from .conftest import SAMPLE


def on_circle(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_generic_scores_on_a_hand_checked_case():
    # angles 0, 25, 10, 90 degrees, labels A A B B: the rankings are
    # q0: 2 1 3 (B A B) AP 1/2;  q1: 2 0 3 (B A B) AP 1/2;  q2: 0 1 3 (A A B) AP 1/3;  q3: 1 2 0 (A B A) AP 1/2
    scores = generic_scores(on_circle([0, 25, 10, 90]), torch.tensor([0, 0, 1, 1]), ks=(1, 2, 3))
    assert scores["mAP"] == pytest.approx(100 * (0.5 + 0.5 + 1 / 3 + 0.5) / 4)
    assert scores["recall@k"] == pytest.approx({1: 0.0, 2: 75.0, 3: 100.0})
    assert scores["queries"] == 4


def test_random_features_score_the_label_base_rate_and_labels_as_features_score_100():
    labels = torch.tensor(pq.read_table(SAMPLE / "val.parquet", columns=["label"]).column("label").to_numpy()[:400])
    rate = 100 * float(np.mean([(labels == c).float().mean() for c in labels]))  # chance a random other is relevant
    noise = generic_scores(torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(0)), labels)
    assert abs(noise["mAP"] - rate) < 3 and noise["recall@k"][1] < rate + 5
    perfect = generic_scores(torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.rand(len(labels), 10),
                             labels)
    assert perfect["mAP"] == pytest.approx(100) and perfect["recall@k"][1] == 100


def test_revisited_ap_and_junk_removal_by_hand():
    # positives at positions 0 and 2 of 2: (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2
    assert revisited_ap(np.array([0, 2]), 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    ranks = np.array([[5], [9], [7], [3]])  # one query: database images 5, 9, 7, 3 in that order
    scores = revisited_scores(ranks, [{"ok": np.array([5, 7]), "junk": np.array([9])}], ks=(1, 2))
    assert scores["mAP"] == pytest.approx(100) and scores["mP@k"] == {1: 100.0, 2: 100.0}  # 9 ignored: 5, 7, 3
    scores = revisited_scores(ranks, [{"ok": np.array([5, 7]), "junk": np.array([])}], ks=(1, 2))
    assert scores["mAP"] == pytest.approx(100 * (0.5 + (0.5 + 2 / 3) / 4)) and scores["mP@k"][2] == 50.0


def test_medium_and_hard_protocols():
    gnd = [{"easy": [1], "hard": [2], "junk": [3]}]
    medium, hard = protocol_ground_truth(gnd, "medium")[0], protocol_ground_truth(gnd, "hard")[0]
    assert sorted(medium["ok"]) == [1, 2] and list(medium["junk"]) == [3]
    assert list(hard["ok"]) == [2] and sorted(hard["junk"]) == [1, 3]
    ranks = ranking(on_circle([0, 10, 20, 30]), on_circle([12]))
    assert list(ranks[:, 0]) == [1, 2, 0, 3]


def write_revisited(root, dataset="roxford5k", payload=None):
    """A 4-image database and 2 queries in the layout of the reference's data: jpg/ and gnd_<dataset>.pkl."""
    folder = root / dataset
    (folder / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["db0", "db1", "db2", "db3", "q0", "q1"]:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "jpg" / f"{name}.jpg")
    gnd = payload or {"imlist": ["db0", "db1", "db2", "db3"], "qimlist": ["q0", "q1"],
                      "gnd": [{"bbx": [0, 0, 48, 40], "easy": np.array([0]), "hard": np.array([1]),
                               "junk": np.array([2])},
                              {"bbx": [4, 4, 30, 30], "easy": np.array([], dtype=np.int64), "hard": np.array([3]),
                               "junk": np.array([], dtype=np.int64)}]}
    (folder / f"gnd_{dataset}.pkl").write_bytes(pickle.dumps(gnd))
    return folder


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a function call all the same


def test_the_revisited_reader_takes_the_documented_layout_and_refuses_code(tmp_path):
    folder = write_revisited(tmp_path)
    data = read_revisited(tmp_path, "roxford5k")
    assert [p.name for p in data["images"]] == ["db0.jpg", "db1.jpg", "db2.jpg", "db3.jpg"]
    assert data["boxes"] == [(0, 0, 48, 40), (4, 4, 30, 30)] and list(data["gnd"][0]["hard"]) == [1]
    (folder / "jpg" / "db3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="db3.jpg"):
        read_revisited(tmp_path, "roxford5k")
    write_revisited(tmp_path / "evil", payload={"imlist": [RunsCode()]})
    with pytest.raises(pickle.UnpicklingError, match="getcwd: refused"):
        read_revisited(tmp_path / "evil", "roxford5k")
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k.pkl"):
        read_revisited(tmp_path, "rparis6k")
