"""Weighted k-NN classification of features (Wu et al. 2018), as the reference's ``eval_knn.py``.

Each test feature votes with its k most cosine-similar training features, each neighbour weighted
by ``exp(similarity / T)``. Unlike the reference this works for any number of test rows (it
crashes below 100) and any number of classes (it assumes 1000), and it chunks the test set by a
memory budget so a 1.28M x 384 training matrix fits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dino_ray.eval.features import extract_features, save_features
from dino_ray.eval.features import load_features as load_features_of


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: Optional[int] = None,
                   max_chunk_elements: int = 2 ** 26) -> tuple[float, float]:
    """Return (top-1, top-5) accuracy in percent. Features are l2-normalised here (cosine similarity)."""
    return knn_classifiers(train_features, train_labels, test_features, test_labels, [k], T, num_classes,
                           max_chunk_elements)[k]


@torch.no_grad()
def knn_classifiers(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                    test_labels: torch.Tensor, ks: Sequence[int], T: float, num_classes: Optional[int] = None,
                    max_chunk_elements: int = 2 ** 26) -> dict[int, tuple[float, float]]:
    """``{k: (top-1, top-5)}`` for several k in one pass: the similarities and the top max(k) neighbours are
    computed once per test chunk, and each k votes with its prefix of them (the reference redoes it per k)."""
    if len(test_labels) == 0:
        raise ValueError("knn_classifier: no test features")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), len(train_labels))
    train_t = F.normalize(train_features.float(), dim=1).t()
    test_features = F.normalize(test_features.float(), dim=1)
    chunk = max(1, max_chunk_elements // max(1, len(train_labels)))
    counts = {k: [0, 0] for k in ks}
    for start in range(0, len(test_labels), chunk):
        targets = test_labels[start:start + chunk].view(-1, 1)
        distances, indices = (test_features[start:start + chunk] @ train_t).topk(k_max, dim=1, largest=True,
                                                                                 sorted=True)
        neighbours, weights = train_labels[indices], (distances / T).exp()
        for k in ks:
            k_used = min(k, k_max)
            votes = torch.zeros(len(targets), num_classes).scatter_add_(1, neighbours[:, :k_used],
                                                                        weights[:, :k_used])
            correct = votes.topk(min(5, num_classes), dim=1).indices.eq(targets)
            counts[k][0] += correct[:, :1].sum().item()
            counts[k][1] += correct.sum().item()
    return {k: (top1 * 100.0 / len(test_labels), top5 * 100.0 / len(test_labels)) for k, (top1, top5) in counts.items()}


def evaluate_knn(backbone: torch.nn.Module, train_dataset: Optional[Dataset], val_dataset: Optional[Dataset],
                 nb_knn: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, batch_size: int = 128,
                 num_workers: int = 0, dump_features: Optional[str | Path] = None,
                 load_features: Optional[str | Path] = None, progress: bool = True) -> dict[int, tuple[float, float]]:
    """Extract (or reload) train/val features and return ``{k: (top1, top5)}`` for each k in ``nb_knn``.

    With ``load_features`` (a folder written by ``dump_features``, or by the distributed extraction) the
    datasets are not read.
    """
    if load_features:
        (train_f, train_l), (val_f, val_l) = load_features_of(load_features, "train"), load_features_of(
            load_features, "val")
    else:
        train_f, train_l = extract_features(backbone, train_dataset, batch_size, num_workers, progress=progress)
        val_f, val_l = extract_features(backbone, val_dataset, batch_size, num_workers, progress=progress)
    if dump_features:
        save_features(dump_features, "train", train_f, train_l)
        save_features(dump_features, "val", val_f, val_l)
    return knn_classifiers(train_f, train_l, val_f, val_l, nb_knn, temperature)

