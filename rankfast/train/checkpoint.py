"""Atomic training checkpoints."""

from __future__ import annotations

import os

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(state: dict, path) -> None:
    """Writes ``state`` to a temporary file beside ``path``, flushes it to disk,
    then renames it over ``path``: a crash leaves the old checkpoint or the
    new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"path: {path} is not a readable checkpoint ({err})") from err
