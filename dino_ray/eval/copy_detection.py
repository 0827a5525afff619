"""Copy detection with frozen features (the reference's ``eval_copy_detection.py``, INRIA Copydays protocol of
Douze et al. 2009): each query, an edited copy of an original image, ranks the database (the originals, plus
distractor images) by cosine similarity; AP counts the originals it was made from among the first 20 results.

Descriptor: the last block's normed CLS token beside a GeM pooling (p = 4) of its patch tokens. With whitening
images, the descriptors are centred on their mean and PCA-whitened (eigenvalues to the power -0.5) before the
L2 normalisation. The reference estimates the covariance from the *uncentred* whitening features while it centres
the descriptors; here the covariance is of the centred features, as a PCA whitening is meant to be.

Copydays layout (``--dataset copydays``)::

    ROOT/original/*.jpg              the database (157 images)
    ROOT/strong/*.jpg                strong edits; a copy's originals share its name's first 4 characters
    ROOT/jpegqual/<quality>/*.jpg    one copy per original, same file name (3, 5, ... 75)
    ROOT/crops/<percent>/*.jpg       one copy per original, same file name (10, 15, ... 80)

Generic mode: the copies are made here from any image set with the edits the protocol is about (``EDITS``).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch import nn

from dino_ray.core.models.backbones import get_intermediate_layers
from dino_ray.eval.retrieval import revisited_ap

TOP_K = 20  # the reference scores the first 20 results only
JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 50, 75)
CROP_PERCENTS = (10, 15, 20, 30, 40, 50, 60, 70, 80)
EDITS = ("crop", "jpeg", "colour", "blur", "rotation", "strong")


@torch.no_grad()
def copy_descriptor(model: nn.Module, images: torch.Tensor, patch_size: int, p: float = 4.0) -> torch.Tensor:
    """``[B, 2 D]``: the CLS token and the GeM (exponent ``p``) of the patch tokens of the last normed layer."""
    tokens = get_intermediate_layers(model, images, n=1)[0]
    gem = tokens[:, 1:].clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)
    return torch.cat([tokens[:, 0], gem], dim=1)


def learn_whitening(features: torch.Tensor, power: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, projection)`` of a PCA whitening from ``features`` [N, D]: eigenvalues below 1e-5 of the largest are
    raised to it (as the reference's ``PCA``), every component kept, scaled by eigenvalue ** -power."""
    mean = features.double().mean(dim=0)
    centred = features.double() - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / len(features))
    values = values.clamp(min=float(values.max()) * 1e-5)
    order = torch.argsort(values, descending=True)
    projection = torch.diag(values[order] ** -power) @ vectors[:, order].T
    return mean.float(), projection.float()


def whiten(features: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return (features - mean) @ projection.T


def copy_map(queries: torch.Tensor, database: torch.Tensor, positives: Sequence[Sequence[int]],
             top_k: int = TOP_K) -> float:
    """mAP (%) of copy detection: the originals of each query among its ``top_k`` cosine neighbours, scored with
    the trapezoidal AP the reference (and the revisited protocol) uses, over all its originals."""
    similarity = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    ranked = similarity.topk(min(top_k, database.shape[0]), dim=1).indices.numpy()
    aps = [revisited_ap(np.flatnonzero(np.isin(row, list(wanted))), len(wanted))
           for row, wanted in zip(ranked, positives)]
    return 100 * float(np.mean(aps))


def _jpg_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.jpg"))


def read_copydays(root: str | Path) -> dict[str, Any]:
    """The Copydays files: ``originals`` (paths) and ``blocks``: name -> ``(query paths, positives per query)``,
    for every block present (``original`` against itself, ``strong``, ``jpegqual/q``, ``crops/p``)."""
    root = Path(root)
    originals = _jpg_names(root / "original") if (root / "original").is_dir() else []
    if not originals:
        raise FileNotFoundError(f"no original/*.jpg under '{root}' (the Copydays layout: original/, strong/, "
                                f"jpegqual/<q>/, crops/<p>/)")
    index = {name: k for k, name in enumerate(originals)}
    blocks: dict[str, tuple[list[Path], list[list[int]]]] = {
        "original": ([root / "original" / n for n in originals], [[k] for k in range(len(originals))])}
    if (root / "strong").is_dir():
        names = _jpg_names(root / "strong")
        positives = [[index[o] for o in originals if o[:4] == n[:4]] for n in names]
        lonely = [n for n, found in zip(names, positives) if not found]
        if lonely:
            raise ValueError(f"strong copies without an original of the same 4-character prefix: {lonely[:3]}")
        blocks["strong"] = ([root / "strong" / n for n in names], positives)
    for family, levels in (("jpegqual", JPEG_QUALITIES), ("crops", CROP_PERCENTS)):
        for level in levels:
            folder = root / family / str(level)
            if not folder.is_dir():
                continue
            names = _jpg_names(folder)
            unknown = [n for n in names if n not in index]
            if unknown:
                raise ValueError(f"'{folder}' holds copies of no original: {unknown[:3]} (names must match "
                                 f"original/)")
            blocks[f"{family}/{level}"] = ([folder / n for n in names], [[index[n]] for n in names])
    return {"originals": [root / "original" / n for n in originals], "blocks": blocks}


def edit_copy(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """One edited copy of ``image``: ``crop`` (30-70 % of the area kept), ``jpeg`` (quality 5-30), ``colour``
    (brightness, contrast, saturation x0.5-1.5, hue shift, or greyscale), ``blur`` (Gaussian, 2-5 % of the size),
    ``rotation`` (10-30 degrees either way), ``strong`` (crop, rotation, colour, blur and JPEG in turn)."""
    width, height = image.size
    if edit == "crop":
        area = rng.uniform(0.3, 0.7)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = min(width, max(1, round(width * np.sqrt(area * aspect))))
        h = min(height, max(1, round(height * np.sqrt(area / aspect))))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return image.crop((left, top, left + w, top + h))
    if edit == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(5, 31)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if edit == "colour":
        if rng.random() < 0.2:
            return ImageOps.grayscale(image).convert("RGB")
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.5, 1.5))
        hue, saturation, value = image.convert("HSV").split()
        hue = hue.point(lambda v, shift=int(rng.integers(-25, 26)): (v + shift) % 256)
        return Image.merge("HSV", (hue, saturation, value)).convert("RGB")
    if edit == "blur":
        return image.filter(ImageFilter.GaussianBlur(max(width, height) * rng.uniform(0.02, 0.05)))
    if edit == "rotation":
        return image.rotate(float(rng.choice([-1, 1]) * rng.uniform(10, 30)), resample=Image.BILINEAR)
    if edit == "strong":
        for step in ("crop", "rotation", "colour", "blur", "jpeg"):
            image = edit_copy(image, step, rng)
        return image
    raise ValueError(f"edit '{edit}' is unknown (choose from {', '.join(EDITS)})")


def make_copies(images: Sequence[Image.Image], edits: Sequence[str] = EDITS, seed: int = 0
                ) -> dict[str, list[Image.Image]]:
    """For every edit, one copy of each image (copy k of an edit is made from image k), reproducible by ``seed``."""
    return {edit: [edit_copy(image, edit, np.random.default_rng([seed, k, EDITS.index(edit)]))
                   for k, image in enumerate(images)] for edit in edits}


def copy_scores(queries: dict[str, tuple[torch.Tensor, list[list[int]]]], database: torch.Tensor,
                whitening: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
    """mAP (%) of every block of queries against the database descriptors (whitened first when given)."""
    if whitening is not None:
        database = whiten(database, *whitening)
    return {name: copy_map(whiten(q, *whitening) if whitening is not None else q, database, positives)
            for name, (q, positives) in queries.items()}
