"""Text encoders (HuggingFace, local directories) and transfer learning for rankfast models."""

from rankfast.encoders.cache import EmbeddingCache
from rankfast.encoders.features import add_rows, pool_history, render_texts
from rankfast.encoders.text import POOLINGS, TextEncoder, pool
from rankfast.encoders.transfer import (
    STRATEGIES,
    TransferConfig,
    apply_strategy,
    attach_text_encoder,
    load_adapter,
    parameter_groups,
    refresh_features,
    save_adapter,
    transformer_blocks,
)

__all__ = [
    "POOLINGS",
    "STRATEGIES",
    "EmbeddingCache",
    "TextEncoder",
    "TransferConfig",
    "add_rows",
    "apply_strategy",
    "attach_text_encoder",
    "load_adapter",
    "parameter_groups",
    "pool",
    "pool_history",
    "refresh_features",
    "render_texts",
    "save_adapter",
    "transformer_blocks",
]
