"""DAVIS label propagation (eval_video_segmentation.py) and the J / F scores, on hand-made cases and a generated
video of a disc moving over a texture."""
import shutil

import numpy as np
import pytest
import torch

from dino_ray import build_backbone
from dino_ray.eval.synthetic import write_moving_disc
from dino_ray.eval.video_segmentation import (
    boundary_f,
    boundary_map,
    davis_frames,
    davis_palette,
    davis_scores,
    davis_videos,
    neighbourhood,
    norm_mask,
    propagate,
    read_labels,
    region_j,
    scaled_size,
    segment_video,
    write_indexed,
)


def square(size=(20, 20), top=5, left=5, side=8):
    mask = np.zeros(size, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_palette_and_indexed_pngs_are_davis_ones(tmp_path):
    palette = davis_palette()
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    labels = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    write_indexed(tmp_path / "00000.png", labels, palette)
    assert np.array_equal(read_labels(tmp_path / "00000.png"), labels)


def test_frame_sizes_follow_the_reference_rounding():
    assert scaled_size(480, 854, 480) == (480, 832)  # a DAVIS 480p frame: the longer side down to a multiple of 64
    assert scaled_size(1080, 607, 480) == (832, 480)
    with pytest.raises(ValueError, match="give a larger size"):
        scaled_size(32, 40, 32)


def test_j_and_f_by_hand():
    truth = square()
    assert region_j(truth, truth) == 1 and boundary_f(truth, truth) == 1
    shifted = square(left=7)  # 8 x 6 overlap of two 8 x 8 squares: 48 / 80
    assert region_j(shifted, truth) == pytest.approx(48 / 80)
    assert boundary_f(shifted, truth, bound_th=2) == 1  # boundaries within 2 pixels of each other
    assert 0.3 < boundary_f(shifted, truth, bound_th=1) < 1 and boundary_f(shifted, truth, bound_th=0.08) == 1
    assert region_j(np.zeros_like(truth), np.zeros_like(truth)) == 1 and region_j(np.zeros_like(truth), truth) == 0
    assert boundary_f(np.zeros_like(truth), truth) == 0
    void = np.zeros_like(truth)
    void[:, [5, 6, 13, 14]] = True  # the columns where they differ are void: a perfect J
    assert region_j(shifted, truth, void) == 1
    ring = boundary_map(truth)
    # DAVIS's seg2bmap marks pixels that differ from a right / lower / lower-right neighbour: the outline of a
    # 9 x 9 square, one pixel outside the top and left edges and on the last row and column of the mask
    assert ring.sum() == 4 * 9 - 4 and ring[4, 4:13].all() and ring[12, 4:13].all() and not ring[5:12, 5:12].any()


def test_propagation_copies_labels_across_identical_features_within_the_neighbourhood():
    torch.manual_seed(0)
    features = torch.randn(12, 16)  # a 3 x 4 grid of distinct patches
    labels = torch.zeros(1, 2, 3, 4)
    labels[0, 1, :, 2:] = 1  # the right half is object 1
    labels[0, 0] = 1 - labels[0, 1]
    votes = propagate(features, features[None], labels, topk=1)  # each patch finds itself
    assert torch.allclose(votes, labels[0], atol=1e-4)
    near = neighbourhood(3, 4, 1)
    assert near.shape == (12, 12) and near[0].sum() == 4 and near[5].sum() == 9  # a corner, an inner patch
    flipped = features.reshape(3, 4, 16).flip(1).reshape(12, 16)  # the patches swapped left-right
    assert torch.allclose(propagate(flipped, features[None], labels, topk=1), labels[0].flip(-1), atol=1e-4)
    far = propagate(flipped, features[None], labels, topk=1, near=neighbourhood(3, 4, 0))
    assert torch.allclose(far, labels[0], atol=1e-4)  # with no neighbourhood, only the patch itself may vote
    scaled = norm_mask(torch.tensor([[[2.0, 4.0]], [[0.0, 0.0]]]))
    assert scaled.tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]]


def test_a_moving_disc_is_tracked_far_better_than_by_its_first_mask(tmp_path):
    davis = write_moving_disc(tmp_path, num_frames=12)["davis"]
    (video,) = davis_videos(davis)
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=32, depth=2, num_heads=2)
    first = read_labels(davis / "Annotations" / "480p" / video / "00000.png")
    written = segment_video(model, davis_frames(davis, video), first, tmp_path / "pred" / video, 4, davis_palette(),
                            size=32)
    assert len(written) == 12 and read_labels(written[5]).shape == (32, 64)
    (tmp_path / "first" / video).mkdir(parents=True)
    for frame in written:  # the trivial baseline: the first mask, never moved
        shutil.copy(written[0], tmp_path / "first" / video / frame.name)
    tracked = davis_scores(tmp_path / "pred", davis, [video])
    baseline = davis_scores(tmp_path / "first", davis, [video])
    assert baseline["J"] < 20 and tracked["J"] > baseline["J"] + 40 and tracked["F"] > baseline["F"] + 40
    assert tracked["J&F"] == pytest.approx((tracked["J"] + tracked["F"]) / 2)


def test_missing_or_mismatched_predictions_and_layout_are_named(tmp_path):
    davis = write_moving_disc(tmp_path, num_frames=4)["davis"]
    with pytest.raises(FileNotFoundError, match="prediction .*moving_disc/00001.png' is missing"):
        davis_scores(tmp_path / "nothing", davis, ["moving_disc"])
    with pytest.raises(FileNotFoundError, match="ImageSets/2017/test.txt' does not exist"):
        davis_videos(davis, "test")
    with pytest.raises(FileNotFoundError, match="no frames in"):
        davis_frames(davis, "no_such_video")
