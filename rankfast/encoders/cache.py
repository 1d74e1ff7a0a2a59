"""On-disk cache of text vectors, so unchanged texts are never encoded twice."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rankfast._io import atomic_file
from rankfast.encoders.text import TextEncoder, _check_texts


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EmbeddingCache:
    """Text vectors on disk, one safetensors file per encoder identity.

    The file is named by :meth:`TextEncoder.identity` (config, weights,
    pooling, max length), so a changed encoder starts a fresh file; rows are
    keyed by a hash of each text, so only new texts are encoded. Files are
    replaced atomically (:func:`rankfast._io.atomic_file`). ``hits`` and
    ``misses`` count texts served from disk and texts encoded.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def encode(self, encoder: TextEncoder, texts, *, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """Vectors ``[len(texts), encoder.dim]``, encoding only texts not cached yet."""
        texts = _check_texts(texts)
        identity = encoder.identity()
        path = self.directory / f"{identity[:32]}.safetensors"
        keys, vectors = self._read(path, identity, encoder.dim)
        row_of = {key: row for row, key in enumerate(keys)}
        wanted = [text_key(t) for t in texts]
        new_texts = {}
        for key, text in zip(wanted, texts, strict=True):
            if key not in row_of and key not in new_texts:
                new_texts[key] = text
        misses = sum(key not in row_of for key in wanted)
        if new_texts:
            fresh = encoder.encode(list(new_texts.values()), batch_size=batch_size, progress=progress)
            for key in new_texts:
                row_of[key] = len(keys)
                keys.append(key)
            vectors = torch.cat([vectors, fresh])
            self._write(path, identity, keys, vectors)
        self.hits += len(texts) - misses
        self.misses += misses
        return vectors[[row_of[key] for key in wanted]] if wanted else vectors[:0]

    @staticmethod
    def _read(path: Path, identity: str, dim: int):
        empty = ([], torch.empty(0, dim))
        if not path.is_file():
            return empty
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                vectors = f.get_tensor("vectors")
            keys = json.loads(meta["keys"])
            if meta.get("identity") != identity or vectors.shape != (len(keys), dim):
                raise ValueError("identity or shape mismatch")
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            warnings.warn(f"{path}: unreadable embedding cache ({err}); rebuilding it", RuntimeWarning, stacklevel=3)
            return empty
        return keys, vectors

    def _write(self, path: Path, identity: str, keys: list[str], vectors: torch.Tensor) -> None:
        with atomic_file(path) as tmp:
            save_file({"vectors": vectors.contiguous()}, tmp, metadata={"identity": identity, "keys": json.dumps(keys)})
