"""Ranking models, one plain-PyTorch definition each (the reference for every fast path).

Every model is built from its config dataclass, ``Model(config)`` (plus
``user_features=`` / ``item_features=`` when the config says that side is
represented by precomputed feature vectors, and ``features=`` the data's
encoded feature fields when ``config.fields`` names some), and scores aligned pairs:
``model(users [B], items [B], history [B, L] = None, lengths [B] = None) -> [B]``
raw scores (logits). Only :class:`AttentionModel` and :class:`SASRec` use ``history`` and
``lengths``; the models with ``reads_context`` (:class:`FMModel`, :class:`DeepFM`,
:class:`DCNv2`) take ``context=`` too. ``model.save(dir)`` / :func:`load_model` round-trip a model
through ``config.json`` + ``model.safetensors``.
"""

from rankfast.models.attention import AttentionConfig, AttentionModel
from rankfast.models.base import ModelConfig, RankingModel, load_model
from rankfast.models.dcn import DCNConfig, DCNv2
from rankfast.models.dot import DotConfig, DotModel
from rankfast.models.fields import FieldEmbedding, FieldRepresentation
from rankfast.models.fm import DeepFM, DeepFMConfig, FMConfig, FMModel
from rankfast.models.itemitem import ItemItem, ItemItemConfig
from rankfast.models.layers import MLP, Representation
from rankfast.models.mlp import MLPConfig, MLPModel
from rankfast.models.neumf import GMF, GMFConfig, NeuMF, NeuMFConfig
from rankfast.models.rating import RecommenderNet, RecommenderNetConfig
from rankfast.models.sequential import SASRec, SASRecConfig

__all__ = [
    "AttentionConfig",
    "AttentionModel",
    "DCNConfig",
    "DCNv2",
    "DeepFM",
    "DeepFMConfig",
    "DotConfig",
    "DotModel",
    "FMConfig",
    "FMModel",
    "FieldEmbedding",
    "FieldRepresentation",
    "GMF",
    "GMFConfig",
    "ItemItem",
    "ItemItemConfig",
    "MLP",
    "MLPConfig",
    "MLPModel",
    "ModelConfig",
    "NeuMF",
    "NeuMFConfig",
    "RankingModel",
    "RecommenderNet",
    "RecommenderNetConfig",
    "Representation",
    "SASRec",
    "SASRecConfig",
    "load_model",
]
