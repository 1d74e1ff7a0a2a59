"""Transfer learning: which encoder weights train, and how the encoder feeds a ranking model.

Strategies (``TransferConfig.strategy``):

* ``frozen``: no encoder weight trains; precomputed vectors enter the ranking
  model through its feature-vector interface (a trainable projection).
* ``top_layers``: the last ``top_layers`` transformer blocks train.
* ``full``: every encoder weight trains.
* ``lora``: low-rank adapters (the ``peft`` library) train; the base stays frozen.

For the trainable strategies, :func:`attach_text_encoder` makes a model's
item (or user) representation run the encoder on each batch's texts, through
the same projection the frozen vectors use (plus the ID part of a hybrid
representation); :func:`refresh_features` writes
the fine-tuned vectors back into the model's feature matrix, so scoring and
serving need no encoder.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from rankfast.encoders.text import TextEncoder

STRATEGIES = ("frozen", "top_layers", "full", "lora")


@dataclass
class TransferConfig:
    """How to adapt a text encoder while training a ranker.

    ``encoder_lr``: learning rate of the encoder's trainable weights (the
    ranking head keeps the training config's rate); ``None`` uses the head's.
    LoRA fields follow ``peft.LoraConfig``; ``lora_target_modules=None`` lets
    peft pick the usual attention projections for the architecture, and
    ``lora_layers`` (block indices, peft's ``layers_to_transform``) puts
    adapters in those blocks only: with the top blocks, the backward pass
    stops there and the blocks below run without autograd, cheaper on a CPU.
    ``encoder_dropout=False`` keeps the encoder in inference mode while the
    model trains (no dropout: the vectors the ``frozen`` strategy computes,
    e.g. to fine-tune a model trained on them, and a cheaper step).
    ``batch_size``: texts per encoder call.
    """

    strategy: str = "frozen"
    top_layers: int = 0
    encoder_lr: float | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = None
    lora_layers: tuple[int, ...] | None = None
    encoder_dropout: bool = True
    batch_size: int = 64

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"TransferConfig.strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "top_layers" and self.top_layers < 1:
            raise ValueError("TransferConfig.top_layers: must be >= 1 for strategy 'top_layers'")
        if self.strategy == "lora" and self.lora_rank < 1:
            raise ValueError(f"TransferConfig.lora_rank: must be >= 1, got {self.lora_rank}")
        if self.lora_layers is not None:
            self.lora_layers = tuple(int(i) for i in self.lora_layers)
            if not self.lora_layers or min(self.lora_layers) < 0:
                raise ValueError(f"TransferConfig.lora_layers: expected block indices >= 0, got {self.lora_layers}")
        if self.encoder_lr is not None and self.encoder_lr <= 0:
            raise ValueError(f"TransferConfig.encoder_lr: must be > 0, got {self.encoder_lr}")


@dataclass
class FineTuning:
    """A text encoder for :func:`rankfast.train.fit` to train a model through.

    ``texts`` holds one text per item (or user, with ``side="user"``); the
    model must represent that side by feature vectors of the encoder's width
    (``item_feature_dim=encoder.dim``). ``fit`` applies ``transfer``: with
    ``frozen`` it fills the feature matrix from the encoder once; otherwise
    the encoder runs inside the model during training (its weights at
    ``transfer.encoder_lr``), and afterwards the feature matrix holds the
    fine-tuned vectors.
    """

    encoder: TextEncoder
    texts: list[str]
    transfer: TransferConfig = field(default_factory=TransferConfig)
    side: str = "item"

    def __post_init__(self):
        _side_attr(self.side)
        self.texts = list(self.texts)

    @property
    def trains_encoder(self) -> bool:
        return self.transfer.strategy != "frozen"


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList of same-type modules."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no stack of transformer blocks")
    return best


def apply_strategy(encoder: TextEncoder, config: TransferConfig) -> TextEncoder:
    """Sets which encoder weights train (wrapping the model in LoRA adapters for ``lora``)."""
    if config.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules) if config.lora_target_modules else None,
            layers_to_transform=list(config.lora_layers) if config.lora_layers else None,
            bias="none",
        )
        if config.lora_layers and max(config.lora_layers) >= len(transformer_blocks(encoder.model)):
            raise ValueError(
                f"TransferConfig.lora_layers: {config.lora_layers} exceeds the encoder's "
                f"{len(transformer_blocks(encoder.model))} blocks"
            )
        encoder.model = get_peft_model(encoder.model, lora)  # freezes the base itself
        return encoder
    encoder.requires_grad_(config.strategy == "full")
    if config.strategy == "top_layers":
        blocks = transformer_blocks(encoder.model)
        if config.top_layers > len(blocks):
            raise ValueError(
                f"TransferConfig.top_layers: {config.top_layers} exceeds the encoder's {len(blocks)} blocks"
            )
        for block in blocks[len(blocks) - config.top_layers :]:
            block.requires_grad_(True)
    return encoder


class TextRepresentation(nn.Module):
    """A representation computed by the encoder from each id's text, then projected.

    Same interface as :class:`rankfast.models.layers.Representation`
    (``forward(ids)``, ``all()``); the feature-based ``representation`` it
    stands in for turns the encoder's vectors into rows (its projection, and
    its ID part if hybrid), so a model trains end to end through the encoder.

    Every text is tokenized once, here; a call encodes only the distinct ids
    it is given, in chunks of ``batch_size`` texts of similar token length,
    each padded only to its own longest text.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        texts: list[str],
        representation: nn.Module,
        batch_size: int = 64,
        dropout: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder, self.representation, self.batch_size, self.dropout = encoder, representation, batch_size, dropout
        if not dropout:
            encoder.train(False)
        self.texts = list(texts)
        self.num, self.dim = len(self.texts), representation.dim
        tokens = encoder.tokenize(self.texts, padding=False) if self.texts else {}
        self.tokens = [{name: values[i] for name, values in tokens.items()} for i in range(self.num)]
        self.lengths = torch.tensor([len(t["input_ids"]) for t in self.tokens], dtype=torch.long)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.dropout:
            self.encoder.train(False)  # inference mode even while the model trains
        return self

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Encoder vectors ``[len(ids), encoder.dim]`` of the texts of distinct ``ids`` (with gradients where
        enabled)."""
        ids = ids.reshape(-1).cpu()
        order = torch.argsort(self.lengths[ids], stable=True)
        chunks = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[order[start : start + self.batch_size]].tolist()
            batch = self.encoder.tokenizer.pad([self.tokens[r] for r in rows], padding=True, return_tensors="pt")
            chunks.append(self.encoder(**{k: v.to(self.encoder.device) for k, v in batch.items()}))
        if not chunks:
            return torch.empty(0, self.encoder.dim, device=self.encoder.device)
        vectors = torch.cat(chunks)
        return vectors[torch.argsort(order).to(vectors.device)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        vectors = self.encode_ids(unique)
        rows = self.representation.project(vectors.to(self.representation.projection.weight.dtype), unique)
        return rows[inverse].reshape(*ids.shape, self.dim)

    def all(self) -> torch.Tensor:
        return self(torch.arange(self.num))


@contextlib.contextmanager
def attach_text_encoder(
    model: nn.Module,
    encoder: TextEncoder,
    texts: list[str],
    side: str = "item",
    batch_size: int = 64,
    dropout: bool = True,
):
    """Within the block, ``model``'s ``side`` representation runs ``encoder`` on ``texts``
    (``dropout=False``: the encoder stays in inference mode while the model trains).

    The model must represent that side by feature vectors (its projection,
    and a hybrid's ID part, are reused). On exit the feature-based representation is restored and, unless
    the block raised, its feature matrix refreshed from the (now fine-tuned) encoder.
    """
    attr = _side_attr(side)
    original = getattr(model, attr)
    if not getattr(original, "uses_features", False):
        raise ValueError(f"model.{attr}: must use feature vectors (config.{side}_feature_dim) to attach an encoder")
    if len(texts) != original.num:
        raise ValueError(f"texts: expected {original.num} (one per {side}), got {len(texts)}")
    setattr(model, attr, TextRepresentation(encoder, texts, original, batch_size, dropout))
    try:
        yield model
    except BaseException:
        setattr(model, attr, original)
        raise
    setattr(model, attr, original)
    refresh_features(model, encoder, texts, side, batch_size=batch_size)


def refresh_features(
    model: nn.Module,
    encoder: TextEncoder,
    texts: list[str],
    side: str = "item",
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> None:
    """Re-encodes ``texts`` into ``model``'s ``side`` feature matrix (e.g. after fine-tuning)."""
    attr = _side_attr(side)
    representation = getattr(model, attr)
    if not getattr(representation, "uses_features", False):
        raise ValueError(f"model.{attr}: must use feature vectors (config.{side}_feature_dim) to take encoder vectors")
    if tuple(representation.features.shape) != (len(texts), encoder.dim):
        raise ValueError(
            f"model.{attr}: feature matrix is {tuple(representation.features.shape)}, "
            f"the encoder gives ({len(texts)}, {encoder.dim}) for these texts"
        )
    vectors = encoder.encode(texts, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        representation.features.copy_(vectors.to(representation.features))


def save_adapter(encoder: TextEncoder, directory: str | os.PathLike, *, merged: bool = False) -> None:
    """Saves a LoRA-adapted encoder: the adapter alone (load it with
    :func:`load_adapter`), or with ``merged=True`` a plain encoder directory
    with the adapters folded into the weights (load it with
    :meth:`TextEncoder.from_pretrained`)."""
    from peft import PeftModel

    if not isinstance(encoder.model, PeftModel):
        raise ValueError("encoder: has no LoRA adapter (apply_strategy with strategy='lora' first)")
    model = encoder.model
    if merged:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory)
    encoder.tokenizer.save_pretrained(directory)


def save_encoder(encoder: TextEncoder, directory: str | os.PathLike) -> None:
    """Saves ``encoder`` as a plain HuggingFace directory (LoRA adapters merged
    in), loadable with :meth:`TextEncoder.from_pretrained`."""
    from peft import PeftModel

    if isinstance(encoder.model, PeftModel):
        save_adapter(encoder, directory, merged=True)
        return
    encoder.model.save_pretrained(directory)
    encoder.tokenizer.save_pretrained(directory)


def load_adapter(
    base_path: str | os.PathLike, adapter_path: str | os.PathLike, *, merge: bool = False, **encoder_kwargs
) -> TextEncoder:
    """Loads the encoder in ``base_path`` with the LoRA adapter saved in ``adapter_path``;
    ``merge=True`` folds the adapter into the weights."""
    from peft import PeftModel

    encoder = TextEncoder.from_pretrained(base_path, **encoder_kwargs)
    model = PeftModel.from_pretrained(encoder.model, adapter_path)
    encoder.model = (model.merge_and_unload() if merge else model).eval()
    return encoder


def _side_attr(side: str) -> str:
    if side not in ("item", "user"):
        raise ValueError(f"side: expected 'item' or 'user', got {side!r}")
    return f"{side}_repr"


__all__ = [
    "STRATEGIES",
    "FineTuning",
    "TransferConfig",
    "apply_strategy",
    "attach_text_encoder",
    "load_adapter",
    "refresh_features",
    "save_adapter",
    "save_encoder",
    "transformer_blocks",
]
