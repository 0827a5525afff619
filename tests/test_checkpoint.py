"""Checkpoints survive the faults of a real machine: a process killed mid-write, a disk that fills up."""
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from dino_ray.train.checkpoint import load_checkpoint, save_checkpoint

WRITER = """
import sys, torch
from dino_ray.train.checkpoint import save_checkpoint
epoch = 0
while True:  # large enough that a write takes a while; killed from outside at some point
    epoch += 1
    save_checkpoint({"student": {"w": torch.full((6_000_000,), float(epoch))}, "epoch": epoch}, sys.argv[1])
    print(epoch, flush=True)
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(2):  # two complete checkpoints, then kill during a later write
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] >= 2 and torch.equal(checkpoint["student"]["w"][:3], torch.full((3,), float(
        checkpoint["epoch"])))
    save_checkpoint({"student": {}, "epoch": 99}, path)  # the next save clears a half-written temporary file
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
