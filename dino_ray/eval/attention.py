"""Self-attention maps of the CLS token, as the reference's ``visualize_attention.py``.

For each head of the last block: the CLS token's attention to every patch, upsampled (nearest) by
the patch size; optionally thresholded to keep the smallest set of patches holding ``threshold``
of the attention mass. Unlike the reference, non-square images keep their orientation (it reshapes
to width x height).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

from dino_ray.core.data.augment import denormalize, normalize  # noqa: E402
from dino_ray.core.data.datasets import ParquetImageDataset, build_dataset  # noqa: E402
from dino_ray.core.models.backbones import get_last_selfattention  # noqa: E402
from dino_ray.core.storage import is_uri  # noqa: E402


def load_image(path: str | Path, image_size: int | tuple[int, int], patch_size: int) -> torch.Tensor:
    """RGB image resized to ``image_size`` and cropped to a multiple of the patch size, normalised [3, H, W]."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"image '{path}' cannot be read: {exc}") from exc
    return model_input(img, image_size, patch_size)


def model_input(img: Image.Image, image_size: Optional[int | tuple[int, int]], patch_size: int) -> torch.Tensor:
    """A picture resized to ``image_size`` (None: as it is), normalised, cropped to whole patches: [3, H, W]."""
    steps = [transforms.Resize(image_size)] if image_size else []
    tensor = transforms.Compose([*steps, normalize()])(img)
    h, w = tensor.shape[1] - tensor.shape[1] % patch_size, tensor.shape[2] - tensor.shape[2] % patch_size
    return tensor[:, :h, :w]


def mass_mask(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Over the last dim: the fewest entries holding ``threshold`` of the mass (the reference's ``th_attn``)."""
    sorted_values, order = values.sort(dim=-1)
    mass = (sorted_values / sorted_values.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, order, mass > (1 - threshold))


@torch.no_grad()
def batch_attention_maps(model: nn.Module, images: torch.Tensor, patch_size: int, threshold: Optional[float] = None
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(attentions [B, heads, H, W], masks [B, heads, H, W] bool or None)`` for normalised images [B, 3, H, W]."""
    model.eval()
    batch, grid_h, grid_w = images.shape[0], images.shape[-2] // patch_size, images.shape[-1] // patch_size
    attn = get_last_selfattention(model, images)[:, :, 0, 1:]  # CLS -> patches, [B, heads, N]
    heads = attn.shape[1]
    masks = None
    if threshold is not None:
        keep = mass_mask(attn, threshold).reshape(batch, heads, grid_h, grid_w).float()
        masks = F.interpolate(keep, scale_factor=patch_size, mode="nearest").bool()
    maps = F.interpolate(attn.reshape(batch, heads, grid_h, grid_w), scale_factor=patch_size, mode="nearest")
    return maps, masks


def attention_maps(model: nn.Module, image: torch.Tensor, patch_size: int,
                   threshold: Optional[float] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(attentions [heads, H, W], masks [heads, H, W] bool or None)`` for one normalised image [3, H, W]."""
    maps, masks = batch_attention_maps(model, image[None], patch_size, threshold)
    return maps[0], None if masks is None else masks[0]


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised ``[3, H, W]`` image as the ``[H, W, 3]`` array in [0, 1] that matplotlib draws."""
    return denormalize(image).permute(1, 2, 0).numpy()


def save_attention(model: nn.Module, image_path: str | Path, output_dir: str | Path, patch_size: int,
                   image_size: int | tuple[int, int] = 480, threshold: Optional[float] = None) -> list[Path]:
    """Write ``img.png``, ``attn-head{j}.png`` (and ``mask-th{t}-head{j}.png``) and ``attention.png``
    (the image and every head side by side) to ``output_dir``; returns the written files."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = load_image(image_path, image_size, patch_size)
    maps, masks = attention_maps(model, image, patch_size, threshold)
    rgb = to_rgb(image)
    files = [out / "img.png"]
    plt.imsave(files[0], rgb)
    for j, head in enumerate(maps.numpy()):
        files.append(out / f"attn-head{j}.png")
        plt.imsave(files[-1], head, format="png")
    if masks is not None:
        for j, mask in enumerate(masks.numpy()):
            files.append(out / f"mask-th{threshold}-head{j}.png")
            plt.imsave(files[-1], rgb * mask[..., None] + 0.25 * rgb * ~mask[..., None])
    figure, axes = plt.subplots(1, len(maps) + 1, figsize=(2.2 * (len(maps) + 1), 2.4))
    axes[0].imshow(rgb)
    axes[0].set_title(Path(image_path).name, fontsize=8)
    for j, (ax, head) in enumerate(zip(axes[1:], maps.numpy())):
        ax.imshow(head)
        if masks is not None:
            ax.contour(masks[j].numpy(), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"head {j}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    figure.tight_layout()
    files.append(out / "attention.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)
    return files


def first_images(data_path: str, folder: Path, count: int) -> list[Path]:
    """The first ``count`` images of a dataset as files (Parquet rows written as PNGs under ``folder``): fixed
    inputs, so that figures of successive checkpoints compare."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(data_path, max_images=count)
    paths = []
    for i in range(len(dataset)):
        path = None if isinstance(dataset, ParquetImageDataset) or is_uri(dataset.paths[i]) else Path(dataset.paths[i])
        if path is None:  # no local file: the decoded image, written as one
            path = folder / f"img{i:02d}.png"
            dataset[i][0].save(path)
        paths.append(path)
    return paths


def attention_figures(model: nn.Module, data_path: str, output_dir: str | Path, count: int, patch_size: int,
                      image_size: int | tuple[int, int], threshold: Optional[float] = 0.6) -> list[Path]:
    """``save_attention`` for the first ``count`` images of ``data_path`` (inputs under ``output_dir/inputs``,
    figures under ``output_dir/imgNN/``); returns each image's side-by-side ``attention.png``."""
    inputs = first_images(data_path, Path(output_dir) / "inputs", count)
    return [save_attention(model, image, Path(output_dir) / f"img{i:02d}", patch_size, image_size, threshold)[-1]
            for i, image in enumerate(inputs)]
