"""rankfast: fast ranking for recommender systems."""

from rankfast.selection import extension_available, topk, topk_merge

__version__ = "0.1.0"

__all__ = ["topk", "topk_merge", "extension_available", "__version__"]
