"""Self-attention maps (visualize_attention.py): values, threshold masks, orientation and the saved figure."""
import numpy as np
import torch
from PIL import Image

from dino_ray import build_backbone
from dino_ray.core.data.datasets import build_dataset
from dino_ray.core.models.backbones import get_last_selfattention
from dino_ray.eval.attention import attention_figures, attention_maps, load_image, save_attention


def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=2, num_heads=2).eval()


def test_maps_are_the_cls_rows_of_the_softmax_upsampled_by_the_patch_size():
    model, image = tiny_vit(), torch.randn(3, 32, 48)  # not square: 8 x 12 patches
    maps, masks = attention_maps(model, image, patch_size=4)
    assert maps.shape == (2, 32, 48) and masks is None
    attn = get_last_selfattention(model, image[None])[0]
    per_patch = maps[:, ::4, ::4]  # nearest upsampling: each 4x4 block holds its patch's value
    assert torch.allclose(per_patch.reshape(2, -1), attn[:, 0, 1:])
    # the CLS row is a softmax: its patch entries plus the CLS self-attention sum to one
    assert torch.allclose(per_patch.sum(dim=(1, 2)) + attn[:, 0, 0], torch.ones(2), atol=1e-5)
    assert torch.equal(maps[:, :4, :4], per_patch[:, :1, :1].expand(2, 4, 4))


def test_threshold_keeps_the_fewest_patches_holding_that_share_of_the_mass():
    model, image = tiny_vit(), torch.randn(3, 32, 32)
    maps, masks = attention_maps(model, image, patch_size=4, threshold=0.6)
    for head in range(2):
        values, kept = maps[head, ::4, ::4].flatten(), masks[head, ::4, ::4].flatten()
        share = values[kept].sum() / values.sum()
        assert share >= 0.6 - 1e-6  # the kept patches hold at least the threshold's share of the mass...
        assert share - values[kept].min() / values.sum() < 0.6  # ...and without the weakest of them they would not
        assert values[kept].min() >= values[~kept].max()  # the kept patches are the most attended


def test_saved_files_and_the_side_by_side_figure(tmp_path):
    Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    image = load_image(tmp_path / "photo.png", (36, 30), patch_size=4)
    assert image.shape == (3, 36, 28)  # cropped to a multiple of the patch size
    files = save_attention(tiny_vit(), tmp_path / "photo.png", tmp_path / "out", 4, image_size=(36, 30),
                           threshold=0.5)
    names = sorted(f.name for f in files)
    assert names == sorted(["img.png", "attn-head0.png", "attn-head1.png", "mask-th0.5-head0.png",
                            "mask-th0.5-head1.png", "attention.png"])
    with Image.open(tmp_path / "out" / "attn-head0.png") as head:
        assert head.size == (28, 36)
    with Image.open(tmp_path / "out" / "attention.png") as figure:
        figure.load()  # decodes: a readable PNG
        assert figure.format == "PNG" and figure.size[0] > 2 * figure.size[1]  # image + 2 heads side by side


def test_a_conv_stem_vit_has_attention_maps_too(tmp_path):
    """The ViT CPU recipe's convolutional stem keeps the patch grid: one map per head at the image's size."""
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=2, num_heads=2, stem="conv").eval()
    files = save_attention(model, tmp_path / "photo.png", tmp_path / "out", 4, image_size=128, threshold=0.6)
    assert {f.name for f in files} >= {"attn-head0.png", "attn-head1.png", "attention.png"}
    with Image.open(tmp_path / "out" / "attn-head1.png") as head:
        assert head.size == (128, 128)


def test_figures_of_a_datasets_first_images_keep_their_inputs(tmp_path, cifar_rows):
    """What the quickstart and the k-NN monitor draw: the same first rows every time, one figure per image."""
    figures = attention_figures(tiny_vit(), str(cifar_rows), tmp_path / "att", 3, 4, image_size=32)
    assert [f.relative_to(tmp_path / "att").as_posix() for f in figures] == [f"img{i:02d}/attention.png"
                                                                              for i in range(3)]
    assert sorted(f.name for f in (tmp_path / "att" / "inputs").iterdir()) == ["img00.png", "img01.png", "img02.png"]
    with Image.open(tmp_path / "att" / "inputs" / "img01.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(build_dataset(str(cifar_rows), max_images=3)[1][0]))
    with Image.open(figures[1]) as figure:
        figure.load()
        assert figure.format == "PNG"
