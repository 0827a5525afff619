"""``dino-ray eval-retrieval``: image retrieval (the reference's ``eval_image_retrieval.py``): the revisited
Oxford / Paris protocol, or any labelled image set."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, below, one_of
from dino_ray.jobs.common import WeightsArgs, eval_tracking_uri, load_backbone, load_rgb, track

log = logging.getLogger(__name__)
FIGURE_QUERIES, FIGURE_RESULTS = 5, 5


@dataclass
class RetrievalArgs(WeightsArgs):
    """``eval_image_retrieval.py``'s flags, plus the generic mode's."""
    data_path: str = arg("", "with dataset: the folder holding <dataset>/jpg/*.jpg and <dataset>/gnd_<dataset>.pkl; "
                             "without: labelled images (image folder, path list or Parquet)")
    dataset: Optional[str] = arg(None, "roxford5k / rparis6k: the revisited protocol (medium and hard mAP); "
                                       "default: the generic mode (mAP and recall@k, relevant = same label)")
    multiscale: bool = arg(False, "descriptors averaged over 1, 1/sqrt(2), 1/2 scales")
    imsize: int = arg(224, "with dataset: the longer side of every image")
    image_size: Optional[int] = arg(None, "generic mode: centre-crop size (default: the pretraining's)")
    max_images: Optional[int] = arg(None, "generic mode: the first N images only")
    recall_at: list[int] = arg(help="k of recall@k and mP@k", factory=lambda: [1, 5, 10])
    batch_size_per_gpu: int = arg(128, "images per forward pass")
    output_dir: str = arg("outputs/retrieval", "where retrieval.json goes")

    def problems(self) -> list[str]:
        problems = super().problems() + ([] if self.data_path else ["data_path is required"])
        problems += one_of("dataset", self.dataset, (None, "roxford5k", "rparis6k"))
        return problems + below(self, ("imsize", "image_size", "max_images", "recall_at", "batch_size_per_gpu"), 1)


def retrieval_job(args: RetrievalArgs) -> dict[str, Any]:
    """With ``dataset`` the revisited protocol over ``data_path/<dataset>``, medium and hard mAP; without, the
    generic mode over the labelled images of ``data_path``, mAP and recall@k. Writes ``retrieval.json`` and
    ``retrieval.png`` (the first queries' rankings); an MLflow run nested under the pretraining."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from dino_ray.core.data.augment import eval_transform, normalize
    from dino_ray.core.data.datasets import build_dataset, require_labels
    from dino_ray.eval.features import extract_features
    from dino_ray.eval.retrieval import (
        generic_scores,
        global_descriptor,
        protocol_ground_truth,
        ranking,
        read_revisited,
        revisited_scores,
    )

    out = Path(args.output_dir)
    weights, backbone, shape = load_backbone(args, out)
    record: dict[str, Any] = {"weights": args.pretrained_weights, "checkpoint_epoch": weights.epoch,
                              "pretraining_run": weights.run_id, **shape}
    if args.dataset:
        data = read_revisited(args.data_path, args.dataset)
        to_tensor = normalize()

        def describe(path: Path, box: Optional[tuple] = None) -> torch.Tensor:
            image = Image.open(path).convert("RGB")
            image = image.crop(box) if box else image
            image.thumbnail((args.imsize, args.imsize), Image.LANCZOS)  # the longer side to imsize (the reference)
            return global_descriptor(backbone, to_tensor(image), args.multiscale,
                                     shape["patch_size"] if shape["arch"].startswith("vit") else 1)

        database = torch.stack([describe(p) for p in tqdm(data["images"], desc="database", leave=False)])
        queries = torch.stack([describe(p, b) for p, b in tqdm(list(zip(data["queries"], data["boxes"])),
                                                               desc="queries", leave=False)])
        ranks = ranking(database, queries)
        record.update({"dataset": args.dataset, "multiscale": args.multiscale, "imsize": args.imsize,
                       "database": len(database)})
        record["results"] = {protocol: revisited_scores(ranks, protocol_ground_truth(data["gnd"], protocol),
                                                        args.recall_at) for protocol in ("medium", "hard")}
        metrics = {f"{p}_mAP": r["mAP"] for p, r in record["results"].items()}
        metrics.update({f"{p}_mP_at_{k}": v for p, r in record["results"].items() for k, v in r["mP@k"].items()})
        print(f"{args.dataset}: mAP M: {metrics['medium_mAP']:.2f}, H: {metrics['hard_mAP']:.2f}")
        shown = range(min(FIGURE_QUERIES, len(data["queries"])))
        figure = ranking_figure(
            [picture.crop(box) for picture, box in zip(load_rgb([data["queries"][q] for q in shown]),
                                                       data["boxes"])],  # PIL: crop(None) is the whole picture
            [load_rgb([data["images"][i] for i in ranks[:FIGURE_RESULTS, q]]) for q in shown],
            [[verdict(i, data["gnd"][q]) for i in ranks[:FIGURE_RESULTS, q]] for q in shown], out / "retrieval.png")
    else:
        size = args.image_size or shape["image_size"]
        dataset = build_dataset(args.data_path, eval_transform(size), args.max_images)
        require_labels(dataset, args.data_path, "generic retrieval (relevant = the same label)")
        features, labels = extract_features(backbone, dataset, args.batch_size_per_gpu)
        record.update({"data_path": args.data_path, "image_size": size, "images": len(labels)})
        record["results"] = {"generic": generic_scores(features, labels, args.recall_at)}
        result = record["results"]["generic"]
        metrics = {"mAP": result["mAP"], **{f"recall_at_{k}": v for k, v in result["recall@k"].items()}}
        print(f"retrieval over {len(labels)} images: mAP {result['mAP']:.2f}, "
              + ", ".join(f"recall@{k} {v:.2f}" for k, v in result["recall@k"].items()))
        normed = torch.nn.functional.normalize(features, dim=1)
        shown = range(min(FIGURE_QUERIES, len(labels)))
        similarity = normed[list(shown)] @ normed.T
        similarity[torch.arange(len(shown)), torch.arange(len(shown))] = -float("inf")  # not itself
        top = similarity.topk(min(FIGURE_RESULTS, len(labels) - 1), dim=1).indices
        figure = None
        if len(labels) == len(dataset):  # feature row = dataset index: decode only the pictures shown
            dataset.transform = None
            figure = ranking_figure([dataset[q][0] for q in shown], [[dataset[i][0] for i in row] for row in
                                                                     top.tolist()],
                                    [[bool(labels[i] == labels[q]) for i in top[q].tolist()] for q in shown],
                                    out / "retrieval.png")
        else:
            log.info("%d image(s) did not decode: no retrieval.png (its rows would not match the dataset's)",
                     len(dataset) - len(labels))
    (out / "retrieval.json").write_text(json.dumps(record, indent=2))
    track("retrieval", record, metrics, {f"retrieval_{k}": v for k, v in metrics.items() if "mAP" in k}, weights,
          eval_tracking_uri(args.tracking_uri, weights, out), [out / "retrieval.json", *([figure] if figure else [])])
    log.info("retrieval results written to %s", out / "retrieval.json")
    return record


def verdict(index: int, truth: dict[str, Any]) -> Optional[bool]:
    """A revisited-protocol result: True (easy or hard), None (junk), False (wrong)."""
    if index in set(truth.get("easy", [])) | set(truth.get("hard", [])):
        return True
    return None if index in set(truth.get("junk", [])) else False


def ranking_figure(queries: list, results: list[list], verdicts: list[list[Optional[bool]]], path: Path,
                   size: int = 96) -> Path:
    """A row per query: the query, then its first results framed green (relevant), red (not) or grey (junk)."""
    import matplotlib.pyplot as plt

    columns = 1 + max(len(row) for row in results)
    figure, axes = plt.subplots(len(queries), columns, figsize=(1.3 * columns, 1.4 * len(queries)), squeeze=False)
    for q, query in enumerate(queries):
        row = [(query, "query", "black")] + [(picture, f"#{k + 1}", {True: "green", False: "red", None: "grey"}[v])
                                             for k, (picture, v) in enumerate(zip(results[q], verdicts[q]))]
        for ax in axes[q]:
            ax.axis("off")
        for ax, (picture, title, colour) in zip(axes[q], row):
            ax.imshow(picture.resize((size, size)))
            ax.set_title(title, fontsize=7)
            ax.add_patch(plt.Rectangle((0, 0), size - 1, size - 1, fill=False, edgecolor=colour, linewidth=3))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
