"""Image retrieval with frozen features: the reference's revisited Oxford / Paris protocol (``eval_image_retrieval.py``,
after Radenovic et al., "Revisiting Oxford and Paris", CVPR 2018) and a generic mode over any labelled image set.

Revisited protocol: every database image is ranked by cosine similarity to each query (the query image cropped
to its box); the dataset's ground-truth file lists per query the ``easy``, ``hard`` and ``junk`` database images.
Medium counts easy + hard as positives and ignores junk; hard counts only hard ones and ignores junk + easy.
Ignored images are removed from the ranking before scoring, and AP is the trapezoidal average of the precision
just before and at each positive (the protocol's own definition). Generic mode: each image is a query against
all the others, relevant = same label; AP is the usual mean of the precision at each relevant image, and
recall@k the share of queries with a relevant image in their first k.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("roxford5k", "rparis6k")
SCALES = (1.0, 2 ** -0.5, 0.5)  # the reference's multi-scale descriptor


def ranking(database: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Database indices by decreasing cosine similarity: ``[n_database, n_queries]``, as the protocol's ``ranks``."""
    similarity = F.normalize(database, dim=1) @ F.normalize(queries, dim=1).T
    return torch.argsort(-similarity, dim=0, stable=True).numpy()


def revisited_ap(positions: np.ndarray, positives: int) -> float:
    """The protocol's AP from the 0-based positions of the positives in the junk-free ranking."""
    ap = 0.0
    for found, rank in enumerate(np.sort(positions)):
        before = 1.0 if rank == 0 else found / rank
        at = (found + 1) / (rank + 1)
        ap += (before + at) / 2 / positives
    return ap


def revisited_scores(ranks: np.ndarray, ground_truth: list[dict[str, np.ndarray]], ks: Sequence[int] = (1, 5, 10)
                     ) -> dict[str, Any]:
    """mAP and mean precision@k over queries with positives; ``ground_truth[q]`` holds ``ok`` and ``junk``."""
    aps, precisions = [], []
    for q, truth in enumerate(ground_truth):
        ok = np.asarray(truth["ok"], dtype=np.int64)
        if len(ok) == 0:
            continue
        order = ranks[:, q]
        kept = order[~np.isin(order, np.asarray(truth.get("junk", []), dtype=np.int64))]
        positions = np.flatnonzero(np.isin(kept, ok))
        aps.append(revisited_ap(positions, len(ok)))
        last = positions.max() + 1
        precisions.append([(positions < min(k, last)).sum() / min(k, last) for k in ks])
    return {"mAP": 100 * float(np.mean(aps)), "mP@k": {k: 100 * float(v) for k, v in zip(ks, np.mean(precisions, 0))},
            "queries": len(aps)}


def protocol_ground_truth(gnd: list[dict[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """``easy`` / ``hard`` / ``junk`` per query -> ``ok`` / ``junk`` for ``medium`` or ``hard``."""
    if protocol not in ("medium", "hard"):
        raise ValueError(f"protocol '{protocol}' is unknown (medium or hard)")
    out = []
    for g in gnd:
        easy, hard, junk = (np.asarray(g.get(key, []), dtype=np.int64) for key in ("easy", "hard", "junk"))
        out.append({"ok": np.concatenate([easy, hard]), "junk": junk} if protocol == "medium"
                   else {"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


class _GroundTruthUnpickler(pickle.Unpickler):
    """The ground-truth files are pickles: let them build lists, dicts and numpy arrays, nothing that runs code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"the ground-truth file wants {module}.{name}: refused (only lists, dicts "
                                         f"and numpy arrays are expected)")
        return super().find_class(module, name)


def read_revisited(root: str | Path, dataset: str) -> dict[str, Any]:
    """``root/<dataset>/gnd_<dataset>.pkl`` (``imlist``, ``qimlist``, ``gnd`` with ``bbx``, ``easy``, ``hard``,
    ``junk``) and the image files it names, ``root/<dataset>/jpg/<name>.jpg``: the layout the reference reads."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset '{dataset}' is unknown (choose from {', '.join(DATASETS)})")
    folder = Path(root) / dataset
    gnd_file = folder / f"gnd_{dataset}.pkl"
    if not gnd_file.is_file():
        raise FileNotFoundError(f"ground-truth file '{gnd_file}' does not exist (expected {root}/{dataset}/"
                                f"gnd_{dataset}.pkl and {root}/{dataset}/jpg/*.jpg)")
    cfg = _GroundTruthUnpickler(io.BytesIO(gnd_file.read_bytes()), encoding="latin1").load()
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"'{gnd_file}' lacks '{key}' (has {sorted(cfg)})")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"'{gnd_file}': {len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries")
    missing = [name for name in [*cfg["imlist"], *cfg["qimlist"]] if not (folder / "jpg" / f"{name}.jpg").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of '{gnd_file}' are not in {folder / 'jpg'}, e.g. "
                                f"{missing[0]}.jpg")
    return {"images": [folder / "jpg" / f"{n}.jpg" for n in cfg["imlist"]],
            "queries": [folder / "jpg" / f"{n}.jpg" for n in cfg["qimlist"]],
            "boxes": [tuple(g["bbx"]) if g.get("bbx") is not None else None for g in cfg["gnd"]], "gnd": cfg["gnd"]}


@torch.no_grad()
def global_descriptor(model: torch.nn.Module, image: torch.Tensor, multiscale: bool, patch_size: int = 1
                      ) -> torch.Tensor:
    """The model's output for one normalised image ``[3, H, W]``; multi-scale: the mean over the image at
    1, 1/sqrt(2) and 1/2 its size (bilinear), as the reference; L2-normalised. Each input is cut to a multiple of
    ``patch_size`` (the last partial patches dropped, as the reference's strided patch convolution does)."""
    def forward(batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        return model(batch[..., :height - height % patch_size, :width - width % patch_size])

    batch = image[None]
    if not multiscale:
        return F.normalize(forward(batch), dim=1)[0]
    total = sum(forward(batch if s == 1 else F.interpolate(batch, scale_factor=s, mode="bilinear",
                                                           align_corners=False)) for s in SCALES)
    return F.normalize(total / len(SCALES), dim=1)[0]


def generic_scores(features: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Each image a query against all others, relevant = same label: mAP and recall@k (in %)."""
    normed = F.normalize(features.float(), dim=1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-float("inf"))  # a query is not its own result
    order = torch.argsort(-similarity, dim=1, stable=True)[:, :-1]
    relevant = (labels[order] == labels[:, None]).float()
    hits = relevant.cumsum(dim=1)
    ranks = torch.arange(1, order.shape[1] + 1, dtype=torch.float32)
    counts = relevant.sum(dim=1)
    has = counts > 0
    ap = ((hits / ranks) * relevant).sum(dim=1)[has] / counts[has]
    return {"mAP": 100 * float(ap.mean()),
            "recall@k": {k: 100 * float((hits[has, :k][:, -1] > 0).float().mean()) for k in ks},
            "queries": int(has.sum())}
