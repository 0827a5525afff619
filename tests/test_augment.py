"""Each random step of each multi-crop view fires at the reference's probability (Caron et al. 2021, App. D).

Every step is taken out of the view's own pipeline and applied to a probe image on which its effect
is unmistakable (a flip on a half-black image, grayscale on a colour, solarize on a light gray);
the blur is counted where it is called, with the radius it draws. 4,000 draws a step: the
tolerance, 5 standard deviations of a binomial, is at most 0.04.
"""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from dino_ray.core.data.augment import DataAugmentationDINO, denormalize, normalize, normalize_tensor

DRAWS = 4000
NAMES = {"RandomHorizontalFlip": "flip", "RandomApply": "jitter", "RandomGrayscale": "grayscale",
         "GaussianBlur": "blur", "RandomSolarize": "solarize"}


def random_steps(pipeline: transforms.Compose) -> dict:
    """The random steps of one view's pipeline, by name."""
    found = {}
    for step in pipeline.transforms:
        for inner in step.transforms if isinstance(step, transforms.Compose) else [step]:
            if type(inner).__name__ in NAMES:
                found[NAMES[type(inner).__name__]] = inner
    return found


def half_black() -> Image.Image:
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, 8:] = 255
    return Image.fromarray(pixels)


PROBES = {  # (probe image, did the step fire on it?)
    "flip": (half_black, lambda out: out[0, 0, 0] == 255),
    "jitter": (lambda: Image.new("RGB", (16, 16), (100, 50, 30)), lambda out: (out != (100, 50, 30)).any()),
    "grayscale": (lambda: Image.new("RGB", (16, 16), (200, 40, 90)),
                  lambda out: (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()),
    "solarize": (lambda: Image.new("RGB", (16, 16), (200, 200, 200)), lambda out: (out == 55).all()),
}


def fired_share(step, name: str) -> float:
    make, fired = PROBES[name]
    return sum(bool(fired(np.asarray(step(make())))) for _ in range(DRAWS)) / DRAWS


def tolerance(p: float) -> float:
    return 5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9


@pytest.fixture(scope="module")
def views():
    random.seed(0)  # the blur draws with random, torchvision's steps with torch
    torch.manual_seed(0)
    aug = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, global_crops_size=16, local_crops_size=8)
    return {"global 1": random_steps(aug.global_transfo1), "global 2": random_steps(aug.global_transfo2),
            "local": random_steps(aug.local_transfo)}


@pytest.mark.parametrize("view", ["global 1", "global 2", "local"])
@pytest.mark.parametrize("name, p", [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2)])
def test_flip_jitter_and_grayscale_in_every_view(views, view, name, p):
    assert abs(fired_share(views[view][name], name) - p) <= tolerance(p)


def test_solarize_on_the_second_global_view_only(views):
    assert abs(fired_share(views["global 2"]["solarize"], "solarize") - 0.2) <= tolerance(0.2)
    assert "solarize" not in views["global 1"] and "solarize" not in views["local"]


@pytest.mark.parametrize("view, p", [("global 1", 1.0), ("global 2", 0.1), ("local", 0.5)])
def test_blur_probability_and_radius(views, view, p, monkeypatch):
    radii = []
    real = ImageFilter.GaussianBlur

    def counting(radius):
        radii.append(radius)
        return real(radius)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", counting)
    blur = views[view]["blur"]
    blurred = [blur(half_black()) for _ in range(DRAWS)]
    assert abs(len(radii) / DRAWS - p) <= tolerance(p)
    assert 0.1 <= min(radii) and max(radii) <= 2.0 and abs(np.mean(radii) - 1.05) < 0.05  # U(0.1, 2.0)
    edge_values = {int(v) for image in blurred for v in np.unique(np.asarray(image))}
    assert len(edge_values) > 2, "a blurred edge has values between black and white"


def test_one_imagenet_normalisation_for_pil_images_tensors_and_figures():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(normalize()(image), normalize_tensor(pixels), atol=1e-6)
    assert torch.allclose(normalize_tensor(pixels[None])[0], normalize_tensor(pixels))  # batches too
    assert torch.allclose(normalize_tensor(torch.ones(3, 1, 1)).flatten(),
                          torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
    assert torch.allclose(denormalize(normalize_tensor(pixels)), pixels, atol=1e-6)
