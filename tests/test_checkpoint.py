"""Checkpoints survive the faults of a real machine: a process killed mid-write, a disk that fills up."""
import resource
import signal
import subprocess
import sys

import pytest
import torch

from dino_ray.core.train.checkpoint import load_checkpoint, save_checkpoint

WRITER = """
import os, signal, sys, torch
from dino_ray.core.train.checkpoint import save_checkpoint
for epoch in (1, 2):
    save_checkpoint({"student": {"w": torch.full((1000,), float(epoch))}, "epoch": epoch}, sys.argv[1])


def dies_halfway(state, f):  # the third write: half a zip on disk, then the process is killed
    f.write(b"PK" + bytes(100_000))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = dies_halfway
save_checkpoint({"student": {}, "epoch": 3}, sys.argv[1])
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    writer = subprocess.run([sys.executable, "-c", WRITER, str(path)], capture_output=True, text=True)
    assert writer.returncode == -signal.SIGKILL, writer.stderr
    (half,) = tmp_path.glob(".checkpoint.pth.*.tmp")  # killed mid-write: the half-written file is there
    assert half.stat().st_size == 100_002
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 2 and torch.equal(checkpoint["student"]["w"], torch.full((1000,), 2.0))
    save_checkpoint({"student": {}, "epoch": 99}, path)  # the next save clears the half-written temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"student": {"w": torch.zeros(10)}, "epoch": 1}, path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limits[1]))  # files may not outgrow 1 MB: a full disk
    try:
        with pytest.raises(OSError, match=f"could not write checkpoint '{path}'.*the previous checkpoint, if any, "
                                          f"is intact"):
            save_checkpoint({"student": {"w": torch.zeros(1_000_000)}, "epoch": 2}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
