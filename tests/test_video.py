"""Frames in and out of the video evaluations: a video file through PyAV, a folder of frames, and clear errors."""
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from dino_ray.eval.synthetic import moving_disc
from dino_ray.eval.video import read_frames, video_info, write_video


def test_a_written_video_reads_back_with_its_frames_size_and_rate(tmp_path):
    frames, _ = moving_disc(num_frames=9, height=32, width=48)
    path = write_video(tmp_path / "clip.mp4", frames, Fraction(25, 2))
    assert video_info(path) == (9, Fraction(25, 2))
    read = [np.array(frame) for frame in read_frames(path)]
    assert len(read) == 9 and read[0].shape == (32, 48, 3)
    assert np.abs(read[4].astype(float) - frames[4]).mean() < 12  # lossy H.264, but the same picture
    assert video_info(path, fps=5) == (9, Fraction(5))


def test_odd_sizes_lose_their_last_row_and_column(tmp_path):
    frames = [np.full((9, 13, 3), 100, dtype=np.uint8)] * 2  # H.264's yuv420p wants even sizes
    path = write_video(tmp_path / "odd.mp4", frames, 10)
    assert [np.array(frame).shape for frame in read_frames(path)] == [(8, 12, 3)] * 2


def test_a_frame_folder_reads_in_name_order_at_the_default_or_given_rate(tmp_path):
    for k in (2, 0, 1):
        Image.fromarray(np.full((8, 12, 3), 40 * k, dtype=np.uint8)).save(tmp_path / f"{k:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert video_info(tmp_path) == (3, Fraction(30)) and video_info(tmp_path, 12.5)[1] == Fraction(25, 2)
    assert [int(np.array(frame)[0, 0, 0]) for frame in read_frames(tmp_path)] == [0, 40, 80]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.mp4"):
        video_info(tmp_path / "no_such.mp4")
    (tmp_path / "fake.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="fake.mp4' is not a readable video"):
        video_info(tmp_path / "fake.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        video_info(tmp_path / "empty")
