"""k-NN speed: 50,000 train x 10,000 test features of dimension 384 (ImageNet-sized classes: 1000), ours
against a straightforward version of the reference's chunked loop (100 chunks, a dense one-hot of the
neighbours' labels per chunk), for the reference's k = 10, 20, 100, 200: each k alone (``knn_classifier``)
and all four as ``eval-knn`` runs them (``knn_classifiers``: one pass; the reference loops once per k).
Both get the same l2-normalised features and must agree on the accuracies. Saved as JSON.

Usage: ``python benchmarks/knn.py [--train N] [--test N] [--dim D] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dino_ray.eval.knn import knn_classifier, knn_classifiers

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def reference_style_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                        test_labels: torch.Tensor, k: int, T: float, num_classes: int = 1000) -> tuple[float, float]:
    """The reference's algorithm as it is written there: fixed 100 chunks, a [chunk x k, classes] one-hot."""
    top1 = top5 = total = 0
    train_t = train_features.t()
    chunk = test_labels.shape[0] // 100
    one_hot = torch.zeros(k, num_classes)
    for start in range(0, test_labels.shape[0], chunk):
        features, targets = test_features[start:start + chunk], test_labels[start:start + chunk]
        batch = targets.shape[0]
        distances, indices = torch.mm(features, train_t).topk(k, largest=True, sorted=True)
        neighbours = torch.gather(train_labels.view(1, -1).expand(batch, -1), 1, indices)
        one_hot.resize_(batch * k, num_classes).zero_()
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = distances.clone().div_(T).exp_()
        probs = torch.sum(one_hot.view(batch, -1, num_classes) * weights.view(batch, -1, 1), 1)
        predictions = probs.sort(1, True).indices
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k)).sum().item()
        total += batch
    return top1 * 100.0 / total, top5 * 100.0 / total


def clustered_features(n: int, centres: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around one centre per class, so the accuracies mean something."""
    classes, dim = centres.shape
    labels = torch.randint(0, classes, (n,), generator=generator)
    return F.normalize(centres[labels] + 3.0 * torch.randn(n, dim, generator=generator), dim=1), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knn.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=generator)
    train_f, train_l = clustered_features(args.train, centres, generator)
    test_f, test_l = clustered_features(args.test, centres, generator)
    rows = []
    for k in (10, 20, 100, 200):
        start = time.perf_counter()
        reference = reference_style_knn(train_f, train_l, test_f, test_l, k, 0.07, args.classes)
        reference_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = knn_classifier(train_f, train_l, test_f, test_l, k, 0.07, args.classes)
        ours_s = time.perf_counter() - start
        assert abs(ours[0] - reference[0]) < 0.05, (k, ours, reference)  # the same votes (ties aside)
        rows.append({"k": k, "reference_s": round(reference_s, 3), "ours_s": round(ours_s, 3),
                     "speedup": round(reference_s / ours_s, 2), "top1": round(ours[0], 2),
                     "reference_top1": round(reference[0], 2)})
        print(f"k={k:3d}: reference loop {reference_s:6.2f} s, ours {ours_s:6.2f} s (x{reference_s / ours_s:.2f}); "
              f"top-1 {ours[0]:.2f} / {reference[0]:.2f}")
    start = time.perf_counter()
    all_k = knn_classifiers(train_f, train_l, test_f, test_l, [10, 20, 100, 200], 0.07, args.classes)
    all_s = time.perf_counter() - start
    reference_all_s = sum(row["reference_s"] for row in rows)
    assert all(abs(all_k[row["k"]][0] - row["top1"]) < 0.01 for row in rows)
    print(f"all four k: reference loop {reference_all_s:.2f} s, ours (one pass) {all_s:.2f} s "
          f"(x{reference_all_s / all_s:.2f})")
    result = {"train": args.train, "test": args.test, "dim": args.dim, "classes": args.classes,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows,
              "all_k": {"reference_s": round(reference_all_s, 3), "ours_s": round(all_s, 3),
                        "speedup": round(reference_all_s / all_s, 2)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
