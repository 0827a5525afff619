"""Checkpoints in the reference's layout, written atomically, read safely, restored completely.

Keys as ``main_dino.py`` writes them: ``student`` (``module.``-prefixed, as the reference's DDP
model), ``teacher``, ``optimizer``, ``epoch`` (the next epoch to run), ``args``, ``dino_loss`` (the
centre) and ``fp16_scaler`` when one is used. dino-ray stores ``args`` as a plain dict rather than an
``argparse.Namespace``, so the file loads with ``torch.load(weights_only=True)`` and no allow-list.
RNG state needs no key: the loop re-seeds from (seed, rank, epoch) at each epoch start.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from dino_ray.core.models.hub import load_checkpoint_weights, safe_load, strip_prefix


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file, and a
    failed write (a full disk, a quota) is an error naming the file while the previous checkpoint stays."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a failed write as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(f"could not write checkpoint '{path}' ({type(exc).__name__}: {exc}); {free:.0f} MiB free in "
                      f"{path.parent}; the previous checkpoint, if any, is intact") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a corrupt or foreign file raises naming it (it is never silently replaced)."""
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict) or "student" not in checkpoint or "epoch" not in checkpoint:
        raise ValueError(f"'{path}' is not a DINO training checkpoint (needs 'student' and 'epoch' keys)")
    return checkpoint


def kept_epoch(epoch: int, saveckp_freq: int) -> bool:
    """Whether epoch ``epoch`` (from 0) leaves a ``checkpointNNNN.pth`` beside the latest (the reference's rule)."""
    return bool(saveckp_freq) and epoch % saveckp_freq == 0


def training_state(student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   dino_loss: torch.nn.Module, scaler: Optional[Any], epoch: int, args: dict[str, Any]
                   ) -> dict[str, Any]:
    """The checkpoint dictionary in the reference's layout (the student under DDP's ``module.`` prefix);
    ``fp16_scaler`` only when loss scaling is on. ``restore_training_state`` reads it back."""
    state = {"student": {f"module.{k}": v for k, v in student.state_dict().items()}, "teacher": teacher.state_dict(),
             "optimizer": optimizer.state_dict(), "epoch": epoch, "args": args, "dino_loss": dino_loss.state_dict()}
    if scaler is not None and scaler.is_enabled():
        state["fp16_scaler"] = scaler.state_dict()
    return state


def restore_training_state(checkpoint: dict[str, Any], student: torch.nn.Module, teacher: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, dino_loss: torch.nn.Module,
                           fp16_scaler: Optional[Any] = None) -> int:
    """Load everything a checkpoint holds into the live objects; returns the epoch to start from."""
    student.load_state_dict(strip_prefix(checkpoint["student"]))
    teacher.load_state_dict(strip_prefix(checkpoint["teacher"]))
    optimizer.load_state_dict(checkpoint["optimizer"])
    dino_loss.load_state_dict(checkpoint["dino_loss"])
    if fp16_scaler is not None and fp16_scaler.is_enabled() and checkpoint.get("fp16_scaler") is not None:
        fp16_scaler.load_state_dict(checkpoint["fp16_scaler"])
    return int(checkpoint["epoch"])


def recorded_args(checkpoint: Any) -> dict[str, Any]:
    """The pretraining config a full checkpoint records (dino-ray: a dict; the reference: a Namespace)."""
    args = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    return dict(args) if isinstance(args, dict) else vars(args)


def checkpoint_epoch(checkpoint: Any) -> Optional[int]:
    return int(checkpoint["epoch"]) if isinstance(checkpoint, dict) and "epoch" in checkpoint else None


def initialize_from(checkpoint: Any, student: torch.nn.Module, teacher: torch.nn.Module, dino_loss: torch.nn.Module,
                    source: str) -> str:
    """Start a new run from existing weights (``init_from``): a full DINO checkpoint gives the student, the teacher
    and the centre ("full"); any other weights (a released backbone-only file, ``teacher_backbone.pth``, an
    export, a torchvision or timm checkpoint) go into both backbones, the heads starting fresh ("backbone").
    Nothing of the optimizer or the epoch comes along: that is resuming. Shapes that do not fit are an error
    naming the keys."""
    if isinstance(checkpoint, dict) and "student" in checkpoint and "teacher" in checkpoint:
        for name, network in (("student", student), ("teacher", teacher)):
            try:
                network.load_state_dict(strip_prefix(checkpoint[name]))
            except RuntimeError as exc:
                raise ValueError(f"init_from '{source}': its {name} does not fit this config's networks: "
                                 f"{' '.join(str(exc).split())[:1500]}") from exc
        center = checkpoint.get("dino_loss", {}).get("center")
        if center is not None and center.shape == dino_loss.center.shape:
            dino_loss.center.copy_(center)
        return "full"
    for network in (student, teacher):
        load_checkpoint_weights(network.backbone, checkpoint, "teacher", f"init_from '{source}'")
    return "backbone"
