"""Training: the loop, losses, optimizers and schedules, checkpoints, DDP helpers."""

from rankfast.train.catalogue import catalogue_scores
from rankfast.train.checkpoint import load_checkpoint, save_checkpoint
from rankfast.train.distributed import DistContext, distributed_context
from rankfast.train.loop import TrainConfig, fit
from rankfast.train.losses import bce_loss, bpr_loss, full_softmax_loss, mse_loss, sampled_softmax_loss
from rankfast.train.multitask import MultiTask
from rankfast.train.optim import build_optimizer, build_scheduler

__all__ = [
    "TrainConfig",
    "fit",
    "MultiTask",
    "mse_loss",
    "bce_loss",
    "bpr_loss",
    "sampled_softmax_loss",
    "full_softmax_loss",
    "catalogue_scores",
    "build_optimizer",
    "build_scheduler",
    "save_checkpoint",
    "load_checkpoint",
    "DistContext",
    "distributed_context",
]
