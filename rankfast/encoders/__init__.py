"""Text encoders (HuggingFace, local directories) and transfer learning for rankfast models."""

from rankfast.encoders.cache import EmbeddingCache
from rankfast.encoders.features import add_rows, pool_history, render_texts
from rankfast.encoders.text import POOLINGS, TextEncoder, pool
from rankfast.encoders.transfer import (
    STRATEGIES,
    FineTuning,
    TransferConfig,
    apply_strategy,
    attach_text_encoder,
    load_adapter,
    refresh_features,
    save_adapter,
    save_encoder,
    transformer_blocks,
)

__all__ = [
    "POOLINGS",
    "STRATEGIES",
    "EmbeddingCache",
    "FineTuning",
    "TextEncoder",
    "TransferConfig",
    "add_rows",
    "apply_strategy",
    "attach_text_encoder",
    "load_adapter",
    "pool",
    "pool_history",
    "refresh_features",
    "render_texts",
    "save_adapter",
    "save_encoder",
    "transformer_blocks",
]
