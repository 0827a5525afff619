"""Attention videos (video_generation.py): a generated video in, a video of the same length, size and rate out."""
import numpy as np
import pytest
import torch

from dino_ray import build_backbone
from dino_ray.eval.attention import batch_attention_maps, mass_mask, to_rgb
from dino_ray.eval.attention_video import attention_video, overlay, render_batch, tile
from dino_ray.eval.synthetic import moving_disc
from dino_ray.eval.video import read_frames, video_info, write_video


def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=2, num_heads=2).eval()


def test_the_attention_video_has_the_input_frame_count_size_and_rate(tmp_path):
    frames, _ = moving_disc(num_frames=10, height=32, width=64)
    source = write_video(tmp_path / "disc.mp4", frames, 12)
    result = attention_video(tiny_vit(), source, tmp_path / "out", patch_size=4, batch_size=4)  # 3 batches
    assert result["num_frames"] == 10 and result["fps"] == 12
    assert video_info(result["video"]) == (10, 12)
    assert {np.array(f).shape for f in read_frames(result["video"])} == {(32, 64, 3)}
    assert sorted(p.name for p in result["frames"].iterdir()) == [f"attn-{k:05d}.png" for k in range(10)]

    every_head = attention_video(tiny_vit(), source, tmp_path / "heads", 4, resize=(16, 32), heads="all",
                                 video_only=True)  # 2 heads side by side, each at the resized 16 x 32
    assert every_head["frames"] is None and not (tmp_path / "heads" / "frames").exists()
    assert {np.array(f).shape for f in read_frames(every_head["video"])} == {(16, 64, 3)}


def test_a_rendered_frame_is_the_head_mean_over_the_frame_dimmed_outside_the_kept_mass():
    model, images = tiny_vit(), torch.randn(2, 3, 16, 24)
    (frame, _) = render_batch(model, images, 4, threshold=0.6, heads="mean")
    maps, _ = batch_attention_maps(model, images, 4)
    mean = maps[0].mean(dim=0)
    keep = mass_mask(mean.flatten(), 0.6).reshape(mean.shape).numpy()
    assert 0 < keep.sum() < keep.size
    assert np.array_equal(frame, overlay(to_rgb(images[0]), mean.numpy(), keep))
    rgb = to_rgb(images[0])
    assert np.abs(frame[~keep].astype(float) - 0.3 * rgb[~keep] * 255).max() <= 0.5 + 1e-3  # only dimmed
    hottest = np.unravel_index(mean.argmax().item(), mean.shape)  # the most attended pixel: frame + inferno's top
    assert keep[hottest] and frame[hottest][0] >= (0.6 * 0.98 + 0.4 * rgb[hottest][0]) * 255 - 1


def test_tiles_fill_a_near_square_grid_row_by_row():
    images = [np.full((2, 3, 3), k, dtype=np.uint8) for k in (1, 2, 3)]
    grid = tile(images)
    assert grid.shape == (4, 6, 3)
    assert grid[0, 0, 0] == 1 and grid[0, 3, 0] == 2 and grid[2, 0, 0] == 3 and grid[2, 3, 0] == 0


def test_unknown_head_mode_and_a_resnet_are_refused(tmp_path):
    with pytest.raises(ValueError, match="heads 'max' is unknown"):
        attention_video(tiny_vit(), tmp_path, tmp_path / "out", 4, heads="max")
    with pytest.raises(ValueError, match="need a ViT"):
        attention_video(torch.nn.Linear(2, 2), tmp_path, tmp_path / "out", 4)
