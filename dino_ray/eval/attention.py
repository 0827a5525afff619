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

from dino_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dino_ray.models.backbones import get_last_selfattention  # noqa: E402


def load_image(path: str | Path, image_size: int | tuple[int, int], patch_size: int) -> torch.Tensor:
    """RGB image resized to ``image_size`` and cropped to a multiple of the patch size, normalised [3, H, W]."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"image '{path}' cannot be read: {exc}") from exc
    tensor = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    h, w = tensor.shape[1] - tensor.shape[1] % patch_size, tensor.shape[2] - tensor.shape[2] % patch_size
    return tensor[:, :h, :w]


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, patch_size: int,
                   threshold: Optional[float] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(attentions [heads, H, W], masks [heads, H, W] bool or None)`` for one normalised image [3, H, W]."""
    model.eval()
    grid_h, grid_w = image.shape[1] // patch_size, image.shape[2] // patch_size
    attn = get_last_selfattention(model, image[None])[0, :, 0, 1:]  # CLS -> patches, [heads, N]
    heads = attn.shape[0]
    masks = None
    if threshold is not None:
        values, order = attn.sort(dim=1)
        mass = (values / values.sum(dim=1, keepdim=True)).cumsum(dim=1)
        keep_sorted = mass > (1 - threshold)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # back to patch order
        masks = F.interpolate(keep.reshape(1, heads, grid_h, grid_w).float(), scale_factor=patch_size,
                              mode="nearest")[0].bool()
    maps = F.interpolate(attn.reshape(1, heads, grid_h, grid_w), scale_factor=patch_size, mode="nearest")[0]
    return maps, masks


def denormalize(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def save_attention(model: nn.Module, image_path: str | Path, output_dir: str | Path, patch_size: int,
                   image_size: int | tuple[int, int] = 480, threshold: Optional[float] = None) -> list[Path]:
    """Write ``img.png``, ``attn-head{j}.png`` (and ``mask-th{t}-head{j}.png``) and ``attention.png``
    (the image and every head side by side) to ``output_dir``; returns the written files."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = load_image(image_path, image_size, patch_size)
    maps, masks = attention_maps(model, image, patch_size, threshold)
    rgb = denormalize(image)
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
