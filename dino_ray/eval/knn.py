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

from dino_ray.eval.features import extract_features


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: Optional[int] = None,
                   max_chunk_elements: int = 2 ** 26) -> tuple[float, float]:
    """Return (top-1, top-5) accuracy in percent. Features are l2-normalised here (cosine similarity)."""
    if len(test_labels) == 0:
        raise ValueError("knn_classifier: no test features")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_labels))
    train_t = F.normalize(train_features.float(), dim=1).t()
    test_features = F.normalize(test_features.float(), dim=1)
    chunk = max(1, max_chunk_elements // max(1, len(train_labels)))
    top1 = top5 = 0
    for start in range(0, len(test_labels), chunk):
        targets = test_labels[start:start + chunk]
        similarity = test_features[start:start + chunk] @ train_t
        distances, indices = similarity.topk(k, dim=1, largest=True, sorted=True)
        neighbours = train_labels[indices]
        votes = torch.zeros(len(targets), num_classes).scatter_add_(1, neighbours, (distances / T).exp())
        predictions = votes.topk(min(5, num_classes), dim=1).indices
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct[:, :1].sum().item()
        top5 += correct.sum().item()
    return top1 * 100.0 / len(test_labels), top5 * 100.0 / len(test_labels)


def evaluate_knn(backbone: torch.nn.Module, train_dataset: Optional[Dataset], val_dataset: Optional[Dataset],
                 nb_knn: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, batch_size: int = 128,
                 num_workers: int = 0, dump_features: Optional[str | Path] = None,
                 load_features: Optional[str | Path] = None, progress: bool = True) -> dict[int, tuple[float, float]]:
    """Extract (or reload) train/val features and return ``{k: (top1, top5)}`` for each k in ``nb_knn``.

    With ``load_features`` (a folder written by ``dump_features``) the datasets are not read.
    """
    if load_features:
        saved = torch.load(Path(load_features) / "features.pt", weights_only=True)
        train_f, train_l, val_f, val_l = (saved[k] for k in ("train_features", "train_labels", "val_features",
                                                              "val_labels"))
    else:
        train_f, train_l = extract_features(backbone, train_dataset, batch_size, num_workers, progress=progress)
        val_f, val_l = extract_features(backbone, val_dataset, batch_size, num_workers, progress=progress)
    if dump_features:
        Path(dump_features).mkdir(parents=True, exist_ok=True)
        torch.save({"train_features": train_f, "train_labels": train_l, "val_features": val_f, "val_labels": val_l},
                   Path(dump_features) / "features.pt")
    num_classes = int(max(train_l.max(), val_l.max())) + 1
    return {k: knn_classifier(train_f, train_l, val_f, val_l, k, temperature, num_classes) for k in nb_knn}
