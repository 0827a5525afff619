"""Backbones, head and multi-crop wrapper: official key layout, reference pos-embed resampling, attention."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from dino_ray import DINOHead, MultiCropWrapper, build_backbone, get_intermediate_layers, get_last_selfattention


def official_vit_keys(depth: int) -> list[str]:
    """The key list of the released DINO ViT backbones (vision_transformer.py of the reference)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return keys + ["norm.weight", "norm.bias"]


@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_vit_state_dict_has_the_official_keys_and_shapes(arch, dim):
    model = build_backbone(arch, patch_size=16)
    sd = model.state_dict()
    assert list(sd) == official_vit_keys(12)
    assert sd["pos_embed"].shape == (1, 197, dim) and sd["patch_embed.proj.weight"].shape == (dim, 3, 16, 16)
    assert model.embed_dim == dim
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, dim)


def test_resnet50_has_no_classifier():
    model = build_backbone("resnet50")
    assert model.embed_dim == 2048 and not any(k.startswith("fc.") for k in model.state_dict())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2048)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("mobilenet_v3_small", 1024),
                                      ("efficientnet_b0", 1280), ("regnet_x_400mf", 400)])
def test_torchvision_archs_lose_their_classifier_and_train_a_step(arch, dim):
    """As the reference's ``--arch``: any torchvision classification network, its last Linear removed."""
    model = build_backbone(arch)
    assert model.embed_dim == dim
    wrapper = MultiCropWrapper(model, DINOHead(dim, 16, hidden_dim=32, bottleneck_dim=8))
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    wrapper([torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]).sum().backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_small_image_stem_is_a_3x3_stride_1_convolution_without_max_pool():
    model = build_backbone("resnet18", stem="small")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    seen = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert seen == [32]  # full resolution in the first stage (the default stem leaves 8 of 32)
    model = build_backbone("resnet18", stem="small_stride2")
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    model(torch.randn(1, 3, 32, 32))
    assert seen[-1] == 16


def test_width_scales_resnet_stages_and_keeps_torchvision_names():
    narrow = build_backbone("resnet18", width=0.25, stem="small")
    full = build_backbone("resnet18")
    assert narrow.embed_dim == 128 and narrow(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert list(narrow.state_dict()) == list(full.state_dict())  # torchvision's parameter names, narrower tensors
    assert narrow.conv1.out_channels == 16  # the stem too
    wide50 = build_backbone("resnet50", width=0.5)
    assert wide50.embed_dim == 1024 and wide50(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
    assert list(wide50.state_dict()) == list(build_backbone("resnet50").state_dict())
    assert narrow.state_dict()["layer1.0.conv1.weight"].shape[0] == 16
    with pytest.raises(ValueError, match="width 0.5 is for the ResNets"):
        build_backbone("efficientnet_b0", width=0.5)


def test_vit_conv_stem_has_the_patch_stride_and_trains():
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=1, num_heads=2, stem="conv")
    strides = [m.stride[0] for m in model.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert strides == [2, 2, 1]  # two 3x3 stride-2 convolutions, then the 1x1 projection
    assert model.patch_embed.proj[-1].out_channels == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32) and model(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert get_last_selfattention(model, torch.randn(1, 3, 32, 32)).shape == (1, 2, 65, 65)  # 8x8 patches + CLS
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        build_backbone("vit_tiny", 3, img_size=30, embed_dim=32, depth=1, num_heads=2, stem="conv")
    with pytest.raises(ValueError, match="a ViT takes stem 'default' or 'conv'"):
        build_backbone("vit_tiny", 4, stem="small")
    with pytest.raises(ValueError, match="stem 'conv' is for ViTs"):
        build_backbone("resnet18", stem="conv")


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="unknown arch 'vit_huge'"):
        build_backbone("vit_huge")


def reference_interpolate_pos_encoding(pos_embed, w, h, patch_size):
    """The reference's ``VisionTransformer.interpolate_pos_encoding``, as an oracle for the test."""
    N = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size + 0.1, h // patch_size + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("size", [(96, 96), (64, 96), (480, 480)])
def test_pos_embed_resampling_matches_the_reference_not_timm(size):
    torch.manual_seed(0)
    model = build_backbone("vit_small", 16).eval()
    height, width = size
    captured = {}
    model.pos_drop.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", i[0]))
    x = torch.randn(1, 3, height, width)
    model(x)
    patches = model.patch_embed(x).flatten(1, 2)
    ours = captured["tokens"] - torch.cat((model.cls_token, patches), dim=1)
    reference = reference_interpolate_pos_encoding(model.pos_embed, height, width, 16)
    assert torch.allclose(ours, reference, atol=1e-6)
    timm_resized = resample_abs_pos_embed(model.pos_embed, new_size=(height // 16, width // 16), num_prefix_tokens=1)
    assert (timm_resized - reference).abs().max() > 1e-3  # why we replace timm's resize


def test_pos_embed_unchanged_at_native_size():
    model = build_backbone("vit_tiny", 8, img_size=32, embed_dim=16, depth=1, num_heads=2)
    from dino_ray.core.models.backbones import interpolate_pos_encoding
    assert interpolate_pos_encoding(model.pos_embed, 4, 4) is model.pos_embed


def test_last_selfattention_shape_and_rows_sum_to_one():
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=2, num_heads=4).eval()
    x = torch.randn(3, 3, 32, 24)
    attn = get_last_selfattention(model, x)
    assert attn.shape == (3, 4, 1 + 8 * 6, 1 + 8 * 6)
    assert torch.allclose(attn.sum(-1), torch.ones(3, 4, 49), atol=1e-5)
    assert model.blocks[-1].attn.fused_attn  # restored after the call


def test_intermediate_layers_are_normed_block_outputs():
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = get_intermediate_layers(model, x, n=2)
    assert len(layers) == 2 and all(t.shape == (2, 65, 32) for t in layers)
    assert torch.allclose(layers[-1][:, 0], model(x), atol=1e-5)


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    fused = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=2, num_heads=2, fused_attn=True).eval()
    explicit = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=2, num_heads=2, fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(fused(x), explicit(x), atol=1e-5)


def test_head_layout_init_and_frozen_norm():
    head = DINOHead(16, 10, norm_last_layer=True, hidden_dim=32, bottleneck_dim=8)
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(head.state_dict())
    assert not head.last_layer.weight_g.requires_grad
    assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1))
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10))
    assert len([m for m in head.mlp if isinstance(m, nn.Linear)]) == 3
    assert DINOHead(16, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    copy.deepcopy(head)  # torch's weight_norm hook breaks deepcopy; ours does not


def test_head_loads_torch_weight_norm_layouts():
    torch.manual_seed(0)
    old_api = nn.utils.weight_norm(nn.Linear(8, 5, bias=False))
    new_api = nn.utils.parametrizations.weight_norm(nn.Linear(8, 5, bias=False))
    new_api.load_state_dict({"parametrizations.weight.original0": old_api.weight_g.detach(),
                             "parametrizations.weight.original1": old_api.weight_v.detach()})
    x = torch.randn(3, 8)
    for source in (old_api, new_api):
        head = DINOHead(4, 5, hidden_dim=8, bottleneck_dim=8)
        sd = {f"last_layer.{k}": v for k, v in source.state_dict().items()}
        sd.update({f"mlp.{k}": v for k, v in head.mlp.state_dict().items()})
        head.load_state_dict(sd)
        assert torch.allclose(head.last_layer(x), old_api(x), atol=1e-6)


def test_multicrop_wrapper_runs_backbone_once_per_resolution():
    backbone = build_backbone("vit_tiny", 4, img_size=16, embed_dim=16, depth=1, num_heads=2)
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model = MultiCropWrapper(backbone, DINOHead(16, 7, hidden_dim=16, bottleneck_dim=8))
    crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 3
    out = model(crops)
    assert out.shape == (20, 7)
    assert calls == [(8, 3, 16, 16), (12, 3, 8, 8)]
    single = model(crops[0])
    assert torch.allclose(single, out[:4], atol=1e-5)
