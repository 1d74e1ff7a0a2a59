"""rankfast: fast ranking for recommender systems.

The public names load on first use (PEP 562), so ``import rankfast`` is light:
the command line answers ``--help`` and ``--version`` without importing torch.
"""

import importlib

from rankfast._version import __version__

#: name -> the module that defines it.
_ATTRIBUTES = {
    "topk": "rankfast.selection",
    "topk_merge": "rankfast.selection",
    "extension_available": "rankfast.selection",
    "score": "rankfast.scoring",
    "TrainConfig": "rankfast.train",
    "fit": "rankfast.train",
    "Ranker": "rankfast.ranker",
}
_SUBMODULES = ("models", "data", "datasets", "baselines", "ensemble", "evaluate", "metrics", "train")

__all__ = ["__version__", *_ATTRIBUTES, *_SUBMODULES]


def __getattr__(name):
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"rankfast.{name}")
    else:
        raise AttributeError(f"module 'rankfast' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
