"""Atomic training checkpoints."""

from __future__ import annotations

import os

import torch

from rankfast._io import atomic_file

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(state: dict, path) -> None:
    """Writes ``state`` to ``path`` atomically (:func:`rankfast._io.atomic_file`):
    a crash leaves the old checkpoint or the new one, never a torn file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"path: {path} is not a readable checkpoint ({err})") from err
