"""``dino-ray export``: the teacher backbone out of a run, as safetensors, TorchScript or ONNX, with what a user of
the file needs beside it (``<name>.json``: architecture, patch size, image size, normalisation, feature size,
where it came from).

safetensors holds tensors only: it loads back into ``dino_ray`` (``backbone_from_checkpoint``, which reads the
shape from the file's metadata) and, where the architecture exists there, into timm (the ViTs: the keys are
timm's) or torchvision (the ResNets, classifier removed). TorchScript is traced at the export's image size. ONNX
has a dynamic batch size, and every export is checked against PyTorch on a batch of the export's size before
the files are written: the largest difference is in the JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dino_ray.core.args import arg, one_of
from dino_ray.jobs.common import WeightsArgs, load_backbone

log = logging.getLogger(__name__)
FORMATS = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}


@dataclass
class ExportArgs(WeightsArgs):
    pretrained_weights: str = arg("", "the weights: a checkpoint file or URI, an MLflow run (<run id>, runs:/...), "
                                      "a registered model (models:/<name>@<alias>) or a hub name", positional=True)
    format: str = arg("safetensors", "safetensors, torchscript or onnx")
    output: Optional[str] = arg(None, "the file to write (default: outputs/export/teacher_backbone.<ext>); the "
                                      "JSON beside it takes its name")
    image_size: Optional[int] = arg(None, "the input size of TorchScript and ONNX (default: the pretraining's)")
    opset: int = arg(18, "ONNX opset")
    tolerance: float = arg(1e-4, "the largest output difference from PyTorch the export may show")

    def problems(self) -> list[str]:
        return super().problems() + one_of("format", self.format, tuple(FORMATS))


def export_job(args: ExportArgs) -> dict[str, Any]:
    """Write the backbone and its JSON; returns the JSON's content."""
    import torch

    from dino_ray.core.data.augment import IMAGENET_MEAN, IMAGENET_STD

    output = Path(args.output or f"outputs/export/teacher_backbone{FORMATS[args.format]}")
    output.parent.mkdir(parents=True, exist_ok=True)
    weights, backbone, shape = load_backbone(args, output.parent)
    size = args.image_size or shape["image_size"]
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = backbone(example)
    spec = {**shape, "image_size": size, "feature_dim": int(expected.shape[1]), "format": args.format,
            "input": "RGB, [batch, 3, image_size, image_size], values / 255 then normalised by mean and std",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "source": args.pretrained_weights,
            "checkpoint_key": args.checkpoint_key, "run_id": weights.run_id, "checkpoint_epoch": weights.epoch}
    exported = {"safetensors": _safetensors, "torchscript": _torchscript, "onnx": _onnx}[args.format](
        backbone, example, output, spec, args)
    difference = float((exported(example) - expected).abs().max())
    if difference > args.tolerance:
        output.unlink(missing_ok=True)
        raise ValueError(f"the {args.format} export differs from PyTorch by {difference:.2e} (more than "
                         f"{args.tolerance:g}): not written")
    spec.update(max_abs_difference=difference, sha256=hashlib.sha256(output.read_bytes()).hexdigest(),
                file=output.name)
    output.with_suffix(".json").write_text(json.dumps(spec, indent=2))
    log.info("exported the %s backbone of %s to %s (%s; outputs within %.1e of PyTorch); its description: %s",
             shape["arch"], args.pretrained_weights, output, args.format, difference, output.with_suffix(".json"))
    return spec


def _safetensors(backbone: Any, example: Any, output: Path, spec: dict, args: ExportArgs) -> Any:
    from safetensors.torch import save_file

    from dino_ray.core.models.build import EXPORT_METADATA, backbone_from_checkpoint

    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(output), metadata={EXPORT_METADATA: json.dumps(spec)})
    reloaded, _ = backbone_from_checkpoint(output)  # the file alone, as a user would load it
    return reloaded.eval()


def _torchscript(backbone: Any, example: Any, output: Path, spec: dict, args: ExportArgs) -> Any:
    import torch

    torch.jit.trace(backbone, example).save(str(output))
    return torch.jit.load(str(output))


def _onnx(backbone: Any, example: Any, output: Path, spec: dict, args: ExportArgs) -> Any:
    import numpy as np
    import onnxruntime
    import torch

    torch.onnx.export(backbone, (example,), str(output), input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=args.opset,
                      dynamo=False)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])

    def run(images: Any) -> Any:
        return torch.from_numpy(session.run(None, {"images": images.numpy().astype(np.float32)})[0])
    return run
