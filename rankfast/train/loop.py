"""The training loop: :func:`fit` and its :class:`TrainConfig`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from rankfast.data import Interactions
from rankfast.encoders.transfer import FineTuning, apply_strategy, attach_text_encoder, refresh_features
from rankfast.evaluate import evaluate, evaluate_pointwise, evaluate_sampled
from rankfast.models import RankingModel, SASRec
from rankfast.scoring.registry import training_backend
from rankfast.train.batching import Examples, strategy_for
from rankfast.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from rankfast.train.distributed import DistContext, distributed_context
from rankfast.train.multitask import MultiTask
from rankfast.train.optim import build_optimizer, build_scheduler, check_optimizer, check_schedule
from rankfast.train.tasks import resolve_task

__all__ = ["TrainConfig", "fit"]

#: One INFO line per epoch (loss, learning rate, validation metrics, seconds).
logger = logging.getLogger(__name__)

#: Validation metrics where lower is better; all others are maximised.
_LOWER_IS_BETTER = ("mae", "mse", "rmse", "logloss")

#: Fields that may change between a checkpointed run and its resumption.
_RESUMABLE_CHANGES = ("epochs", "progress", "checkpoint_dir", "resume", "log_dir")
#: ``TrainConfig.valid_protocol`` values.
VALID_PROTOCOLS = ("full", "sampled")


@dataclass
class TrainConfig:
    """How :func:`fit` trains.

    ``task``: ``"ranking"`` (implicit feedback), ``"click"`` (0/1 labels,
    point-wise log-loss on exactly the labelled rows) or ``"rating"`` (``"mse"``
    regression or ``"ce"``, cross-entropy over a :class:`RecommenderNet`'s rating
    classes); see :mod:`rankfast.train.tasks` for the losses and negatives each
    takes (a mix that does not fit is a ``ValueError``). Unset, it follows the
    loss; unset ``loss`` and ``negatives`` take the task's defaults.

    Loss: ``"mse"`` regresses ``data.ratings``; ``"bce"``, ``"bpr"`` and
    ``"softmax"`` (sampled softmax with logQ correction) rank each
    interaction against ``num_negatives`` items the user never interacted
    with, drawn ``"uniform"`` or by ``"popularity"`` (count ** ``negative_alpha``).
    ``negatives="all"`` (with ``loss="softmax"`` only) is the full softmax:
    each interaction against every item, ``num_negatives`` unused. Each
    distinct user of a micro-batch is scored against the catalogue once and
    that row is shared by the user's interactions, so a step costs
    ``[users in batch, num_items]`` scores (one matrix product for a
    :class:`DotModel`); models that read histories, and :class:`MultiTask`,
    need sampled negatives, except :class:`rankfast.models.SASRec`, which
    trains on next-item targets with either (``rankfast.train.batching.NextItem``).

    ``negatives="partition"`` (with ``loss="softmax"`` only) is the full
    softmax over a random part of the catalogue: each epoch the items are
    shuffled and cut into parts of ``num_negatives`` items, and a micro-batch
    is one part with every training interaction of its items (``batch_size``
    unused), each user's softmax running over that part alone. The parts are
    uniform draws without replacement, so no logQ correction is needed, and
    every item is represented once per epoch: with an encoder trained
    through :class:`rankfast.encoders.FineTuning` each item's text is encoded
    once per epoch, where ``"all"`` encodes the whole catalogue every step.
    A part none of whose items has a training interaction contributes no loss.

    ``batch_size`` interactions per micro-batch (per rank); ``grad_accum``
    micro-batches per optimizer step. The learning rate warms up linearly
    over ``warmup_steps`` optimizer steps, then follows ``schedule``.
    ``grad_clip`` caps the global gradient norm. ``bf16`` runs forward
    passes under bfloat16 autocast.

    With validation data, the metric ``monitor`` (e.g. ``"ndcg@20"`` for
    ranking losses, ``"rmse"`` for ``"mse"``) is computed every
    ``eval_every`` epochs; with ``patience`` training stops after that many
    evaluations without improvement, and the best weights are restored.
    ``valid_protocol``: ``"full"`` ranks each validation user's items against
    every item (:func:`rankfast.evaluate.evaluate`: recall, ndcg, ... at
    ``eval_ks``); ``"sampled"`` ranks each validation item among
    ``valid_num_negatives`` items the user has in neither split, drawn once
    from ``seed`` (:func:`rankfast.evaluate.evaluate_sampled`: ``hr@K``,
    ``ndcg@K``, ``mrr``, ``auc``), the leave-one-out protocol of the NCF paper.

    ``log_dir``: TensorBoard scalars per epoch (``train/loss``, ``train/lr``,
    ``valid/<metric>``) written there through ``torch.utils.tensorboard``
    (needs the ``tensorboard`` package: ``pip install "rankfast[tensorboard]"``).
    Every epoch is also logged as one INFO line of the ``rankfast.train.loop``
    logger (``logging.basicConfig(level=logging.INFO)`` shows them).

    ``checkpoint_dir``: after every epoch the full training state is written
    there atomically (rank 0 only), and with ``resume`` a run finds it and
    continues after the last finished epoch; at the end the model directory
    :meth:`rankfast.Ranker.load` reads (:func:`rankfast.ranker.save_model_dir`:
    the model, the data's id mappings, each user's seen items and histories)
    is written to ``checkpoint_dir/model``, which must be absent, empty or an
    earlier model directory.

    Every field is checked when the config is made: a value not of the
    field's type (``epochs=1.7``, ``lr="fast"``; a bool is not a number) is a
    ``TypeError`` naming the field, a value out of range (``lr=-1``) a
    ``ValueError``.
    """

    epochs: int = 10
    batch_size: int = 1024
    grad_accum: int = 1
    task: str | None = None
    loss: str | None = None
    num_negatives: int = 4
    negatives: str | None = None
    negative_alpha: float = 0.75
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    bf16: bool = False
    max_history: int = 50
    monitor: str | None = None
    eval_ks: tuple[int, ...] = (10, 20)
    eval_every: int = 1
    patience: int | None = None
    valid_protocol: str = "full"
    valid_num_negatives: int = 99
    checkpoint_dir: str | os.PathLike | None = None
    log_dir: str | os.PathLike | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        _check_field_types(self)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        resolve_task(self)  # task, loss, negatives and monitor: filled in and checked together
        check_optimizer(self.optimizer, lr=self.lr, weight_decay=self.weight_decay)
        check_schedule(self.schedule, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)
        if self.valid_protocol not in VALID_PROTOCOLS:
            raise ValueError(f"valid_protocol: expected one of {VALID_PROTOCOLS}, got {self.valid_protocol!r}")
        if self.negatives in ("all", "partition") and self.loss != "softmax":
            raise ValueError(f"negatives: {self.negatives!r} (full softmax) needs loss='softmax', got {self.loss!r}")
        if self.negatives not in ("all", "none") and int(self.num_negatives) < 1:
            raise ValueError(f"num_negatives: must be at least 1 for loss {self.loss!r}, got {self.num_negatives}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: must be positive or None, got {self.grad_clip}")
        if int(self.valid_num_negatives) < 1:
            raise ValueError(f"valid_num_negatives: must be at least 1, got {self.valid_num_negatives}")
        if self.patience is not None and int(self.patience) < 1:
            raise ValueError(f"patience: must be at least 1 or None, got {self.patience}")
        self.eval_ks = tuple(int(k) for k in self.eval_ks)


#: The annotations of TrainConfig's fields, as types (``tuple`` fields convert themselves).
_FIELD_TYPES = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool, "os.PathLike": os.PathLike}


def _check_field_types(config) -> None:
    """Raises ``TypeError`` naming the first field of ``config`` whose value is not of its
    annotated type (an int is a float; a bool is neither; ``None`` where the type allows)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kinds = [kind.strip() for kind in field.type.split("|")]
        if kinds[0].startswith("tuple") or (value is None and "None" in kinds):
            continue
        types = tuple(_FIELD_TYPES[kind] for kind in kinds if kind != "None")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(kind for kind in kinds if kind != "None")
            raise TypeError(f"{field.name}: expected {want}, got {value!r}")


class _Trainer:
    def __init__(
        self,
        model,
        train: Interactions,
        config: TrainConfig,
        valid: Interactions | None,
        context: DistContext,
        fine_tuning: FineTuning | None,
    ):
        self.model, self.data, self.config, self.valid, self.context = model, train, config, valid, context
        self.multitask = isinstance(model, MultiTask)
        self.ranker = model.base if self.multitask else model
        needs_ratings = config.task == "rating" or self.multitask
        if needs_ratings and train.ratings is None:
            raise ValueError(f"train: loss {config.loss!r} (or a MultiTask model) needs ratings, and the data has none")
        if self.multitask and config.task != "ranking":
            raise ValueError("loss: a MultiTask model trains ratings itself; pick a ranking loss (bce, bpr, softmax)")
        if self.multitask:  # a resumed run reads the same values back from its checkpoint
            model.set_rating_scale(train.ratings)
        self.fine_tuning = fine_tuning
        # While training, the encoder lives inside the model; if setting up fails, it leaves again.
        with contextlib.ExitStack() as scope:
            module_lrs = self._attach_encoder(scope) if fine_tuning is not None else None
            examples = Examples(train, config.max_history, getattr(model, "uses_history", False))
            # A fine-tuned encoder has weights its pooling never reads (e.g. BERT's pooler).
            unused = fine_tuning is not None and fine_tuning.trains_encoder
            self.device = next(model.parameters()).device
            backend = None if self.multitask or config.negatives == "partition" else training_backend(model)
            self.strategy = strategy_for(config, model)(
                model, train, examples, config, context, self.device, backend=backend
            )
            module = self.strategy.module()
            self.net = DistributedDataParallel(module, find_unused_parameters=unused) if context.enabled else module
            self.steps_per_epoch = -(-self.strategy.num_micro_batches() // config.grad_accum)
            self.optimizer = build_optimizer(
                model,
                config.optimizer,
                lr=config.lr,
                weight_decay=config.weight_decay,
                momentum=config.momentum,
                module_lrs=module_lrs,
            )
            self.scheduler = build_scheduler(
                self.optimizer,
                total_steps=self.steps_per_epoch * config.epochs,
                warmup_steps=config.warmup_steps,
                schedule=config.schedule,
                min_lr_ratio=config.min_lr_ratio,
            )
            self.epoch, self.history = 0, []
            self.best_metric, self.best_state, self.bad_evals, self.stopped = None, None, 0, False
            self.encoder_scope = scope.pop_all()

    def _attach_encoder(self, scope: contextlib.ExitStack):
        """Frozen: fills the feature matrix from the encoder once. Otherwise
        applies the strategy and runs the encoder inside the model until the
        run ends; returns the encoder's learning rate for the optimizer."""
        tuning, config = self.fine_tuning, self.config
        encoder, transfer = tuning.encoder.to(next(self.ranker.parameters()).device), tuning.transfer
        if not tuning.trains_encoder:
            refresh_features(
                self.ranker,
                encoder,
                tuning.texts,
                tuning.side,
                batch_size=transfer.batch_size,
                progress=config.progress,
            )
            return None
        apply_strategy(encoder, transfer)
        scope.enter_context(
            attach_text_encoder(
                self.ranker, encoder, tuning.texts, tuning.side, transfer.batch_size, transfer.encoder_dropout
            )
        )
        return None if transfer.encoder_lr is None else {encoder: transfer.encoder_lr}

    # --- one epoch ------------------------------------------------------------------

    def _train_epoch(self, bar) -> float:
        config = self.config
        batches = self.strategy.micro_batches(self.epoch)
        self.model.train()
        total, count = 0.0, 0
        for step in range(0, len(batches), config.grad_accum):
            group = batches[step : step + config.grad_accum]
            for j, (idx, neg) in enumerate(group):
                last = j == len(group) - 1
                # DDP all-reduces gradients only on the last micro-batch of a step.
                sync = self.net.no_sync() if self.context.enabled and not last else contextlib.nullcontext()
                with sync:
                    loss = self.strategy.loss(self.net, idx, neg)
                    (loss / len(group)).backward()
                total, count = total + float(loss.detach()), count + 1
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        return self.context.mean(total / max(count, 1))

    # --- validation, checkpoints ----------------------------------------------------

    def _validate(self) -> dict:
        """Validation metrics, computed on rank 0 and shared with every rank."""
        metrics = None
        if self.context.is_main:
            config = self.config
            kwargs = {"max_history": config.max_history}
            metrics = {}
            if config.task == "ranking" and config.valid_protocol == "sampled":
                metrics.update(
                    evaluate_sampled(
                        self.ranker,
                        self.data,
                        self.valid,
                        num_negatives=config.valid_num_negatives,
                        ks=config.eval_ks,
                        seed=config.seed,
                        **kwargs,
                    )
                )
            elif config.task == "ranking":
                metrics.update(
                    evaluate(self.ranker, self.data, self.valid, ks=config.eval_ks, progress=False, **kwargs)
                )
            if config.task == "click":
                metrics.update(evaluate_pointwise(self.model, self.data, self.valid, task="click", **kwargs))
            if (config.task == "rating" or self.multitask) and self.valid.ratings is not None:
                metrics.update(evaluate_pointwise(self.model, self.data, self.valid, task="rating", **kwargs))
            if config.monitor not in metrics:
                raise ValueError(f"monitor: {config.monitor!r} is not among the validation metrics {sorted(metrics)}")
        return self.context.from_main(metrics)

    def _improved(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        lower = self.config.monitor in _LOWER_IS_BETTER
        return value < self.best_metric if lower else value > self.best_metric

    def _state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": self.context.gather(torch.get_rng_state()),
            "cuda_rng": self.context.gather(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
            "history": self.history,
            "best_metric": self.best_metric,
            "best_state": self.best_state,
            "bad_evals": self.bad_evals,
            "stopped": self.stopped,
        }

    def _restore(self, state: dict, path: str):
        saved = state["config"]
        mine = dataclasses.asdict(self.config)
        for name, value in mine.items():
            if name not in _RESUMABLE_CHANGES and saved.get(name) != value:
                raise ValueError(
                    f"config.{name}: {value!r} differs from the checkpoint's {saved.get(name)!r} ({path}); use "
                    "another checkpoint_dir"
                )
        if len(state["torch_rng"]) != self.context.world_size:
            raise ValueError(
                f"checkpoint_dir: {path} was written by {len(state['torch_rng'])} processes, this run has "
                f"{self.context.world_size}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"][self.context.rank])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"][self.context.rank])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best_metric, self.best_state = state["best_metric"], state["best_state"]
        self.bad_evals, self.stopped = state["bad_evals"], state["stopped"]

    # --- the run --------------------------------------------------------------------

    def run(self) -> list[dict]:
        config, context = self.config, self.context
        path = None if config.checkpoint_dir is None else os.path.join(config.checkpoint_dir, CHECKPOINT_FILE)
        with self.encoder_scope:  # on leaving, a fine-tuned encoder's vectors fill the feature matrix
            self._run_epochs(path)
        if config.checkpoint_dir is not None and context.is_main:
            from rankfast.model_dir import save_model_dir

            tuned = self.fine_tuning is not None and self.fine_tuning.trains_encoder
            encoder = self.fine_tuning.encoder if tuned else None
            save_model_dir(
                os.path.join(config.checkpoint_dir, "model"),
                self.ranker,
                self.data,
                max_history=config.max_history,
                encoder=encoder,
            )
        context.barrier()
        return self.history

    def _run_epochs(self, path):
        config, context = self.config, self.context
        if path is not None and config.resume and os.path.exists(path):
            self._restore(load_checkpoint(path), path)
        else:
            torch.manual_seed(config.seed + context.rank)
        scalars = contextlib.nullcontext()
        if config.log_dir is not None and context.is_main:  # a resumed run drops events after its checkpoint
            scalars = summary_writer_class()(config.log_dir, purge_step=self.epoch + 1 if self.epoch else None)
        with scalars as writer:
            self._epochs(path, writer)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def _epochs(self, path, writer):
        config, context = self.config, self.context
        while self.epoch < config.epochs and not self.stopped:
            self.epoch += 1
            started = time.perf_counter()
            disable = not config.progress or not context.is_main
            with tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {self.epoch}/{config.epochs}",
                unit="step",
                disable=disable or None,
            ) as bar:
                record = {"epoch": self.epoch, "loss": self._train_epoch(bar), "lr": self.scheduler.get_last_lr()[0]}
                if self.valid is not None and (self.epoch % config.eval_every == 0 or self.epoch == config.epochs):
                    record.update(self._validate())
                    value = record[config.monitor]
                    if self._improved(value):
                        self.best_metric, self.bad_evals = value, 0
                        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                    else:
                        self.bad_evals += 1
                        self.stopped = config.patience is not None and self.bad_evals >= config.patience
                    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", config.monitor)})
                record["seconds"] = time.perf_counter() - started
            self.history.append(record)
            if context.is_main:
                self._report(record, writer)
            if path is not None:
                state = self._state()  # collective (gathers RNG states): every rank takes part
                if context.is_main:
                    save_checkpoint(state, path)
            context.barrier()

    def _report(self, record: dict, writer):
        """The epoch's log line and, with a TensorBoard ``writer``, its scalars."""
        metrics = {k: v for k, v in record.items() if k not in ("epoch", "loss", "lr", "seconds")}
        logger.info(
            "epoch %d/%d: loss %.4f, lr %.3g%s, %.1f s",
            record["epoch"],
            self.config.epochs,
            record["loss"],
            record["lr"],
            "".join(f", {name} {value:.4f}" for name, value in metrics.items()),
            record["seconds"],
        )
        if writer is not None:
            step = record["epoch"]
            writer.add_scalar("train/loss", record["loss"], step)
            writer.add_scalar("train/lr", record["lr"], step)
            for name, value in metrics.items():
                writer.add_scalar(f"valid/{name}", value, step)
            writer.flush()


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; without the tensorboard package, an
    ImportError that says how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            'log_dir: TensorBoard logs need the tensorboard package: pip install "rankfast[tensorboard]" '
            f"(or pip install tensorboard); importing torch.utils.tensorboard failed: {err}"
        ) from None
    return SummaryWriter


def fit(
    model,
    train: Interactions,
    config: TrainConfig | None = None,
    *,
    valid: Interactions | None = None,
    fine_tuning: FineTuning | None = None,
) -> list[dict]:
    """Trains ``model`` on ``train`` and returns the history, one dict per epoch
    (``epoch``, ``loss``, ``lr``, ``seconds`` and any validation metrics).

    ``model`` is a :class:`rankfast.models.RankingModel` or a
    :class:`MultiTask` around one; ``valid`` (same id maps as ``train``) is
    ranked against all items with ``train``'s items excluded. Under
    ``torchrun`` the same call trains with DistributedDataParallel, each rank
    on its shard of every epoch, rank 0 evaluating and writing checkpoints.
    Randomness comes from ``config.seed``: the global torch RNG is seeded
    (per rank) at the start, and data order and negatives derive from
    (seed, epoch, rank), so reruns and resumed runs repeat exactly.

    ``fine_tuning`` (:class:`rankfast.encoders.FineTuning`) trains the model
    through a text encoder: with the ``frozen`` strategy its vectors fill the
    model's feature matrix first; otherwise the encoder runs inside the model
    (its trainable weights at ``transfer.encoder_lr``, checkpointed with the
    model), the feature matrix holds the fine-tuned vectors afterwards, and
    the encoder is saved to ``checkpoint_dir/model/encoder``.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, (RankingModel, MultiTask)):
        raise TypeError(f"model: expected a rankfast.models.RankingModel or MultiTask, got {type(model).__name__}")
    if not isinstance(train, Interactions) or not len(train):
        raise ValueError("train: expected a non-empty Interactions")
    ranker = model.base if isinstance(model, MultiTask) else model
    if (ranker.config.num_users, ranker.config.num_items) != (train.num_users, train.num_items):
        raise ValueError(
            f"train: has {train.num_users} users and {train.num_items} items, the model was built for "
            f"{ranker.config.num_users} and {ranker.config.num_items}"
        )
    if config.negatives in ("all", "partition") and (
        isinstance(model, MultiTask) or (getattr(ranker, "uses_history", False) and not isinstance(ranker, SASRec))
    ):
        raise ValueError(
            f"negatives: {config.negatives!r} (full softmax) needs a history-free RankingModel, got "
            f"{type(model).__name__}"
        )
    if valid is None and config.patience is not None:
        raise ValueError("patience: early stopping needs validation data (valid=...)")
    if valid is not None and (valid.user_ids != train.user_ids or valid.item_ids != train.item_ids):
        raise ValueError("valid: must share train's id maps (split one Interactions)")
    if config.log_dir is not None:
        summary_writer_class()  # a missing tensorboard fails before any training
    if fine_tuning is not None and not isinstance(fine_tuning, FineTuning):
        raise TypeError(f"fine_tuning: expected a rankfast.encoders.FineTuning, got {type(fine_tuning).__name__}")
    return _Trainer(model, train, config, valid, distributed_context(), fine_tuning).run()
