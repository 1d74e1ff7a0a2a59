"""Text encoders: a fine-tuned HuggingFace model from a local directory, pooled to one vector per text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

POOLINGS = ("mean", "cls", "last")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``hidden [B, T, H]`` -> ``[B, H]``: mean over real tokens, the first
    token (``cls``), or the last real token (``last``; left or right padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp_min(1.0)
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.to(torch.long) * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class TextEncoder(nn.Module):
    """A HuggingFace encoder and its tokenizer, pooled to one vector per text.

    Load with :meth:`from_pretrained` from a local directory (never
    downloads). :meth:`encode` turns texts into vectors for inference;
    calling the module on a tokenized batch does the same with gradients, for
    the fine-tuning strategies in :mod:`rankfast.encoders.transfer`.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, pooling: str = "mean", max_length: int = 128, normalize: bool = False
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.max_length, self.normalize = pooling, int(max_length), bool(normalize)
        self.train(model.training)  # follow the wrapped model's mode (eval after from_pretrained)

    @classmethod
    def from_pretrained(
        cls, path, *, pooling: str = "mean", max_length: int = 128, normalize: bool = False, device=None, dtype=None
    ) -> TextEncoder:
        """Loads the encoder and tokenizer in directory ``path`` with transformers' Auto classes.

        Raises ``FileNotFoundError`` naming what is missing (the directory,
        ``config.json``, the weights or the tokenizer files).
        """
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"encoder directory not found: {path}")
        missing = []
        if not (path / "config.json").is_file():
            missing.append("config.json")
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            missing.append("weights (one of " + ", ".join(_WEIGHT_FILES) + ")")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            missing.append("tokenizer files (one of " + ", ".join(_TOKENIZER_FILES) + ")")
        if missing:
            raise FileNotFoundError(f"encoder directory {path} is incomplete: missing " + "; ".join(missing))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        encoder = cls(model, tokenizer, pooling=pooling, max_length=max_length, normalize=normalize)
        return encoder.to(device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], *, padding: bool = True) -> dict:
        return self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt" if padding else None,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """Pooled vectors ``[B, dim]`` of a tokenized batch (with gradients where enabled)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        vectors = pool(out.last_hidden_state, attention_mask, self.pooling).float()
        return nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors

    def encode(self, texts, *, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """Vectors ``[len(texts), dim]`` (float32, CPU) under inference mode.

        Texts are batched in order of token length, so a batch pads little.
        """
        texts = _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = torch.empty(len(texts), self.dim)
        if not texts:
            return out
        lengths = [len(ids) for ids in self.tokenize(texts, padding=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                starts = range(0, len(order), batch_size)
                for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress or len(starts) < 2):
                    rows = order[start : start + batch_size]
                    batch = {k: v.to(self.device) for k, v in self.tokenize([texts[r] for r in rows]).items()}
                    out[rows] = self(**batch).cpu()
        finally:
            self.train(was_training)
        return out

    def identity(self) -> str:
        """A digest of everything that decides the vectors: config, weights, pooling, max length, normalization.

        Computed from the current weights, so an encoder changed by
        fine-tuning gets a new identity (and a fresh cache).
        """
        digest = hashlib.sha256()
        digest.update(self.model.config.to_json_string(use_diff=False).encode())
        digest.update(
            f"|{self.pooling}|{self.max_length}|{self.normalize}|{type(self.tokenizer).__name__}|{len(self.tokenizer)}".encode()
        )
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
    return texts
