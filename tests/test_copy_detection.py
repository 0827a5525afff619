"""Copy detection (eval_copy_detection.py): the descriptor, the whitening, the mAP, the Copydays reader and the
edits of the generic mode."""
import numpy as np
import pytest
import torch
from PIL import Image

from dino_ray import build_backbone
from dino_ray.core.models.backbones import get_intermediate_layers
from dino_ray.eval.copy_detection import (
    EDITS,
    copy_descriptor,
    copy_map,
    copy_scores,
    edit_copy,
    learn_whitening,
    make_copies,
    read_copydays,
    whiten,
)


def test_the_descriptor_is_the_cls_token_beside_the_gem_of_the_patch_tokens():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=2, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 16)
    descriptor = copy_descriptor(model, images, 4)
    with torch.no_grad():
        tokens = get_intermediate_layers(model, images)[0]
    assert descriptor.shape == (2, 64) and torch.equal(descriptor[:, :32], tokens[:, 0])
    patch = tokens[1, 1:, 5].clamp(min=1e-6)  # one dimension by hand: (mean of x^4)^(1/4)
    assert descriptor[1, 32 + 5] == pytest.approx(float((patch ** 4).mean() ** 0.25), rel=1e-5)


def test_whitening_centres_and_decorrelates_to_unit_variance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 6, generator=generator) @ torch.randn(6, 6, generator=generator) + 3
    mean, projection = learn_whitening(features, power=0.5)
    white = whiten(features, mean, projection)
    assert torch.allclose(white.mean(dim=0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(white.T @ white / len(white), torch.eye(6), atol=1e-3)


def test_map_by_hand():
    database = torch.eye(4)
    queries = torch.tensor([[1.0, 0.1, 0, 0],  # ranks 0, 1, ...: its original (0) first
                            [0.2, 0.1, 0.9, 0]])  # ranks 2, 0, 1, 3: its original (1) third
    assert copy_map(queries, database, [[0], [1]]) == pytest.approx(100 * (1 + (0 + 1 / 3) / 2) / 2)
    assert copy_map(queries, database, [[0], [1]], top_k=2) == pytest.approx(50)  # not in the first 2: AP 0
    assert copy_map(queries, database, [[0, 1], [2]]) == pytest.approx(100)  # both strong originals found first
    random = copy_scores({"random": (torch.randn(300, 8), [[k] for k in range(300)])}, torch.randn(300, 8))
    assert random["random"] < 5  # chance: the original among 300 in the first 20


def copydays_layout(root):
    rng = np.random.default_rng(0)
    for folder, names in [("original", ["200000.jpg", "200100.jpg"]), ("strong", ["200001.jpg", "200002.jpg",
                                                                                  "200101.jpg"]),
                          ("jpegqual/30", ["200000.jpg", "200100.jpg"]), ("crops/50", ["200000.jpg"])]:
        (root / folder).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / folder / name)


def test_the_copydays_reader_takes_the_documented_layout(tmp_path):
    copydays_layout(tmp_path)
    data = read_copydays(tmp_path)
    assert [p.name for p in data["originals"]] == ["200000.jpg", "200100.jpg"]
    assert list(data["blocks"]) == ["original", "strong", "jpegqual/30", "crops/50"]
    assert data["blocks"]["strong"][1] == [[0], [0], [1]]  # by the first 4 characters of the name, as the reference
    assert data["blocks"]["crops/50"][1] == [[0]] and data["blocks"]["original"][1] == [[0], [1]]
    (tmp_path / "jpegqual" / "30" / "999999.jpg").write_bytes((tmp_path / "original" / "200000.jpg").read_bytes())
    with pytest.raises(ValueError, match="jpegqual/30' holds copies of no original: \\['999999.jpg'\\]"):
        read_copydays(tmp_path)
    with pytest.raises(FileNotFoundError, match="no original/\\*.jpg"):
        read_copydays(tmp_path / "strong")


def test_each_edit_changes_the_image_as_documented_and_is_reproducible():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    pixels = np.asarray(image, dtype=float)
    copies = make_copies([image, image], seed=3)
    assert list(copies) == list(EDITS)
    for edit, made in copies.items():
        assert all(copy.mode == "RGB" for copy in made)
        if edit not in ("crop", "strong"):
            assert made[0].size == image.size and np.abs(np.asarray(made[0], dtype=float) - pixels).mean() > 2, edit
    crop = copies["crop"][0]
    assert 0.25 <= crop.size[0] * crop.size[1] / (60 * 40) <= 0.75
    assert np.array_equal(np.asarray(make_copies([image], ["blur"], seed=3)["blur"][0]),
                          np.asarray(copies["blur"][0]))
    assert not np.array_equal(np.asarray(copies["blur"][0]), np.asarray(copies["blur"][1]))  # per image draws
    with pytest.raises(ValueError, match="edit 'paint' is unknown"):
        edit_copy(image, "paint", rng)
