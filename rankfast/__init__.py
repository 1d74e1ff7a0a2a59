"""rankfast: fast ranking for recommender systems."""

from rankfast.selection import extension_available, topk, topk_merge

__version__ = "0.1.0"

__all__ = ["topk", "topk_merge", "extension_available", "__version__"]

from rankfast import models  # noqa: E402
from rankfast.scoring import score  # noqa: E402

__all__ += ["models", "score"]

from rankfast import baselines, data, evaluate, metrics, train  # noqa: E402
from rankfast.train import TrainConfig, fit  # noqa: E402

__all__ += ["baselines", "data", "evaluate", "metrics", "train", "TrainConfig", "fit"]

from rankfast.ranker import Ranker  # noqa: E402

__all__ += ["Ranker"]
