"""``rankfast demo``, ``train`` and ``evaluate``: data, a model, training, the metrics table."""

from __future__ import annotations

import argparse
import os
import time

import tomllib

import rankfast
from rankfast import datasets
from rankfast.cli import EXIT_USAGE, CLIError, add_command, positive_int

# torch and rankfast's modules (``import rankfast`` alone is light) load inside the
# functions that train or evaluate, so that --help and argument errors answer at once.

TRAIN_DESCRIPTION = """\
Trains a model on the training part of a per-user temporal split and writes a
model directory. Settings come from flags or a TOML file (flags win):

    out = "runs/dot"          # the model directory to write
    test_ratio = 0.2          # per-user temporal split; training sees the rest
    threads = 1
    task = "ranking"          # ranking | click (0/1 labels) | rating
    click_threshold = 4.0     # task "click" on ratings: click = rating >= this
    [data]
    movielens = "ml-latest-small"   # a name (downloaded once) or a MovieLens directory
    # or: synthetic = {num_users = 3000, num_items = 1500}
    [model]
    type = "dot"              # dot | mlp | neumf | attention | sasrec | itemitem | fm |
    dim = 32                  # deepfm | dcn | recnet; other keys go to its config, except
    # itemitem's ease_lambda = 300.0 (its start: EASE^R's weights; 0: zeros), half_life = 5.0
    # and floor = 0.1 (its users' history rows, weighted by recency)
    [train]                   # rankfast.TrainConfig fields
    epochs = 6
    loss = "softmax"
    [[fields]]                # the schema: feature fields the model reads (default none);
    name = "genres"           # MovieLens has genres, year, tags (item side), hour, weekday
    side = "item"             # (context); other keys are rankfast.data.Field's
    kind = "multi"
"""

#: --model -> the model class and its config class in rankfast.models.
MODELS = {
    "dot": ("DotModel", "DotConfig"),
    "mlp": ("MLPModel", "MLPConfig"),
    "neumf": ("NeuMF", "NeuMFConfig"),
    "attention": ("AttentionModel", "AttentionConfig"),
    "fm": ("FMModel", "FMConfig"),
    "deepfm": ("DeepFM", "DeepFMConfig"),
    "dcn": ("DCNv2", "DCNConfig"),
    "recnet": ("RecommenderNet", "RecommenderNetConfig"),
    "sasrec": ("SASRec", "SASRecConfig"),
    "itemitem": ("ItemItem", "ItemItemConfig"),
}
#: ``[model]`` keys of ``itemitem`` that build it rather than configure it, and their defaults
#: (bench_quality's, chosen on a validation split of ml-latest-small).
ITEMITEM_BUILD = {"ease_lambda": 300.0, "half_life": 5.0, "floor": 0.1}
TASKS = ("ranking", "click", "rating")
KS = (10, 20)
TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
#: The metrics table of each task: the point-wise metrics, then the ranking ones.
TASK_METRICS = {
    "ranking": TABLE_METRICS,
    "click": ("logloss", "auc", "gauc", "accuracy", "recall@20", "ndcg@20"),
    "rating": ("mae", "mse", "rmse", "recall@20", "ndcg@20"),
}


def defaults(data: dict, model_type: str, task: str = "ranking") -> dict:
    """Settings that train a sensible model for the data source and model type.

    The full softmax suits DotModel (one matrix product a step); the others
    use sampled softmax with popularity negatives. The MovieLens DotModel
    settings are bench_quality's (chosen on a validation split); the synthetic
    ones reach EASE^R's NDCG@20 on the demo data in a few seconds an epoch.
    """
    movielens = "movielens" in data
    if task != "ranking":  # point-wise: the task's own loss, no sampled negatives
        train = {"task": task, "epochs": 5, "lr": 1e-3, "batch_size": 1024}
        if model_type == "recnet":
            train["loss"] = "ce"
        model = {"type": "itemitem", **ITEMITEM_BUILD} if model_type == "itemitem" else {"type": model_type, "dim": 32}
        return {"data": data, "test_ratio": 0.2, "threads": 1, "model": model, "train": train}
    if model_type == "itemitem":  # EASE^R's weights fine-tuned by the full softmax, as in bench_quality
        model = {"type": "itemitem", **ITEMITEM_BUILD}
        train = {"loss": "softmax", "negatives": "all", "epochs": 4, "lr": 3e-5, "batch_size": 8192}
    elif model_type == "dot":
        model = {"type": "dot", "dim": 256 if movielens else 32}
        train = {
            "loss": "softmax",
            "negatives": "all",
            "epochs": 22 if movielens else 6,
            "lr": 0.1 if movielens else 0.05,
            "weight_decay": 0.3 if movielens else 1.0,
            "batch_size": 8192 if movielens else 2048,
        }
    else:
        model = {"type": model_type, "dim": 32}
        train = {
            "loss": "softmax",
            "negatives": "popularity",
            "negative_alpha": 1.0,
            "num_negatives": 32,
            "epochs": 10,
            "lr": 3e-3,
        }
    return {"data": data, "test_ratio": 0.2, "threads": 1, "model": model, "train": train}


# --- settings ---------------------------------------------------------------------------


def data_argument(text: str) -> str:
    """argparse ``type`` of --data: a data set name stays a name (what ``ranker.json``
    records), a directory becomes absolute; anything else is a usage error."""
    if text in datasets.MOVIELENS:
        return text
    if not os.path.isdir(text):
        names = ", ".join(datasets.MOVIELENS)
        raise argparse.ArgumentTypeError(f"{text!r} is neither a data set name ({names}) nor a directory")
    return os.path.abspath(text)


def _data_source(args, seed=0) -> dict | None:
    if getattr(args, "data", None):
        return {"movielens": args.data}
    sizes = {name: getattr(args, name) for name in ("num_users", "num_items") if getattr(args, name, None) is not None}
    return {"synthetic": {**sizes, "seed": seed}} if sizes else None


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise CLIError(f"--config: cannot read {path} ({err.strerror})", EXIT_USAGE) from None
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"--config: {path} is not valid TOML ({err})", EXIT_USAGE) from None
    except UnicodeDecodeError as err:
        raise CLIError(f"--config: {path} is not UTF-8 (byte {err.start}: {err.reason})", EXIT_USAGE) from None


def train_settings(args) -> dict:
    """Defaults <- the TOML file <- flags."""
    file = _read_toml(args.config) if args.config else {}
    allowed = ("out", "test_ratio", "threads", "task", "click_threshold", "data", "model", "train", "fields")
    unknown = sorted(set(file) - set(allowed))
    if unknown:
        raise CLIError(
            f"--config: unknown keys {unknown} (allowed: out, test_ratio, threads, task, click_threshold, [data], "
            "[model], [train], [[fields]])",
            EXIT_USAGE,
        )
    for table in ("model", "train"):
        if not isinstance(file.get(table, {}), dict):
            raise CLIError(f"[{table}]: expected a table, got {file[table]!r}", EXIT_USAGE)
    # The seed: --seed, else the file's [train] seed, else 0 (an unset flag must not hide the file's).
    seed = args.seed if args.seed is not None else file.get("train", {}).get("seed", 0)
    data = _data_source(args, seed) or file.get("data") or {"synthetic": {"seed": seed}}
    if not isinstance(data, dict) or len(data) != 1 or not set(data) <= {"movielens", "synthetic"}:
        raise CLIError(f"[data]: expected movielens = NAME or DIR, or synthetic = {{...}}, got {data!r}", EXIT_USAGE)
    if "movielens" in data:  # checked as --data is: a name, or a directory made absolute
        try:
            data = {"movielens": data_argument(str(data["movielens"]))}
        except argparse.ArgumentTypeError as err:
            raise CLIError(f"[data] movielens: {err}", EXIT_USAGE) from None
    else:
        check_synthetic(data["synthetic"])
    model_type = args.model or file.get("model", {}).get("type", "dot")
    if not isinstance(model_type, str) or model_type not in MODELS:
        raise CLIError(f"model type: expected one of {sorted(MODELS)}, got {model_type!r}", EXIT_USAGE)
    task = args.task or file.get("task") or file.get("train", {}).get("task") or "ranking"
    if not isinstance(task, str) or task not in TASKS:
        raise CLIError(f"task: expected one of {TASKS}, got {task!r}", EXIT_USAGE)
    settings = defaults(data, model_type, task)
    settings["task"] = task
    for key in ("out", "test_ratio", "threads"):
        settings[key] = file.get(key, settings.get(key))
    settings["click_threshold"] = file.get("click_threshold", 4.0)
    settings["fields"] = _fields(file.get("fields", []))
    settings["model"].update(file.get("model", {}))
    settings["train"].update(file.get("train", {}))
    flags = {"out": args.out, "test_ratio": args.test_ratio, "threads": args.threads}
    settings.update({k: v for k, v in flags.items() if v is not None})
    settings["model"].update({k: v for k, v in {"type": model_type, "dim": args.dim}.items() if v is not None})
    train_flags = {
        "epochs": args.epochs,
        "lr": args.lr,
        "loss": args.loss,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    settings["train"].update({k: v for k, v in train_flags.items() if v is not None})
    settings["train"]["task"] = task
    threshold = settings["click_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise CLIError(f"click_threshold: expected a number, got {threshold!r}", EXIT_USAGE)
    threads = settings["threads"]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CLIError(f"threads: expected a positive int, got {threads!r}", EXIT_USAGE)
    ratio = settings["test_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise CLIError(f"test_ratio: expected a number in (0, 1), got {ratio!r}", EXIT_USAGE)
    if settings.get("out") is not None and not isinstance(settings["out"], str):
        raise CLIError(f"out: expected a path, got {settings['out']!r}", EXIT_USAGE)
    if not settings.get("out"):
        raise CLIError("--out: where to write the model directory (or out = ... in the config file)", EXIT_USAGE)
    check_out(settings["out"])
    return settings


def check_synthetic(table) -> None:
    """``[data] synthetic``: a table of :func:`rankfast.data.synthetic_interactions`'s int
    arguments (their values are checked when the data is made: :func:`split`)."""
    allowed = ("num_users", "num_items", "per_user", "topics", "seed")
    if not isinstance(table, dict) or set(table) - set(allowed):
        raise CLIError(f"[data] synthetic: expected a table of {', '.join(allowed)}, got {table!r}", EXIT_USAGE)
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise CLIError(f"[data] synthetic: {key}: expected an int, got {value!r}", EXIT_USAGE)


def _fields(entries) -> list:
    """The ``[[fields]]`` tables of a config file as :class:`rankfast.data.Field` declarations."""
    from rankfast.data.fields import Field

    if not isinstance(entries, list):
        raise CLIError(f"[[fields]]: expected an array of tables, got {entries!r}", EXIT_USAGE)
    try:
        return [Field.from_dict(entry) for entry in entries]
    except ValueError as err:
        raise CLIError(f"[[fields]]: {err}", EXIT_USAGE) from None


def check_out(path: str):
    """Before training: the model directory is written by replacing ``path``
    whole, so it must be absent, empty or a model directory."""
    from rankfast.model_dir import check_target

    try:
        check_target(path)
    except FileExistsError as err:
        raise CLIError(f"out: {err}", EXIT_USAGE) from None


# --- the steps ----------------------------------------------------------------------------


def split(source: dict, test_ratio: float, *, fields=(), task: str = "ranking", click_threshold: float = 4.0):
    """``(train, test)`` of a data source, split per user by time, with the feature ``fields``
    (:class:`rankfast.data.Field`) and, for task ``click``, 0/1 labels (rating >= ``click_threshold``)."""
    from rankfast.data import load_movielens, synthetic_interactions, temporal_split

    if "movielens" in source:
        try:
            data = load_movielens(datasets.resolve(source["movielens"]), fields=tuple(fields))
        except ValueError as err:
            raise CLIError(f"[[fields]]: {err}", EXIT_USAGE) from None
    else:
        if fields:
            raise CLIError(
                f"[[fields]]: synthetic data has no feature fields, got {[f.name for f in fields]}", EXIT_USAGE
            )
        try:
            data = synthetic_interactions(**source["synthetic"])
        except ValueError as err:  # sizes that cannot make a data set (num_users = 0, ...)
            raise CLIError(f"[data] synthetic: {err}", EXIT_USAGE) from None
    if task == "click" and data.ratings is not None and not ((data.ratings == 0) | (data.ratings == 1)).all():
        data = data.clicks(click_threshold)
    return temporal_split(data, test_ratio)


def build_model(model_settings: dict, train):
    import torch

    from rankfast import models

    fields = dict(model_settings)
    model_type = fields.pop("type")
    cls, config_cls = (getattr(models, name) for name in MODELS[model_type])
    schema = () if train.features is None else train.features.schema
    features = train.features if schema else None
    build = {key: fields.pop(key, value) for key, value in ITEMITEM_BUILD.items()} if model_type == "itemitem" else {}
    try:
        config = config_cls(num_users=train.num_users, num_items=train.num_items, fields=schema, **fields)
        with torch.device("meta"):  # sized before anything is allocated
            rows = {"user_features": torch.empty(train.num_users, train.num_items)} if build else {}
            size = sum(p.numel() * p.element_size() for p in cls(config, features=features, **rows).parameters())
    except (TypeError, ValueError) as err:  # unknown or invalid fields of the config file
        raise CLIError(f"[model]: {err}", EXIT_USAGE) from None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > memory:
        raise CLIError(
            f"[model]: a {cls.__name__} of these sizes holds {size / 2**30:,.0f} GiB of weights, "
            f"more than this machine's {memory / 2**30:,.0f} GiB of memory",
            EXIT_USAGE,
        )
    if build:
        try:
            return cls.from_interactions(config, train, **build)
        except (TypeError, ValueError) as err:  # a bad ease_lambda, half_life or floor
            raise CLIError(f"[model]: {err}", EXIT_USAGE) from None
    return cls(config, features=features)


def train_model(settings: dict):
    """Trains on the training split; returns ``(model, train, test, seconds)``."""
    import torch

    torch.set_num_threads(int(settings["threads"]))
    try:  # before the data: a bad [train] value is reported at once
        config = rankfast.TrainConfig(**settings["train"])
    except (TypeError, ValueError) as err:
        raise CLIError(f"[train]: {err}", EXIT_USAGE) from None
    train, test = split(
        settings["data"],
        settings["test_ratio"],
        fields=settings.get("fields", ()),
        task=settings.get("task", "ranking"),
        click_threshold=settings.get("click_threshold", 4.0),
    )
    torch.manual_seed(config.seed)
    model = build_model(settings["model"], train)
    print(
        f"data: {train.num_users} users, {train.num_items} items, {len(train)} training / {len(test)} test interactions"
    )
    started = time.perf_counter()
    rankfast.fit(model, train, config)
    return model, train, test, time.perf_counter() - started


def save(settings: dict, model, train) -> str:
    from rankfast.ranker import save_model_dir

    data = {**settings["data"], "test_ratio": settings["test_ratio"]}
    if settings.get("task", "ranking") != "ranking":
        data.update(task=settings["task"], click_threshold=settings["click_threshold"])
    return save_model_dir(
        settings["out"], model, train, max_history=settings["train"].get("max_history", 50), data=data
    )


def metrics_rows(
    model, train, test, seconds, *, baselines: bool, task: str = "ranking"
) -> list[tuple[str, dict, float]]:
    """``(name, metrics, fit seconds or None)`` of the model and, with ``baselines``, popularity and EASE^R.

    Tasks ``click`` and ``rating`` add the point-wise metrics on the test rows; the ranking
    metrics then take a click task's clicked test items as the relevant ones."""
    from rankfast.baselines import EASE, Popularity
    from rankfast.evaluate import evaluate, evaluate_pointwise

    relevant = test.subset(test.ratings == 1) if task == "click" else test
    rows = []
    if baselines:
        for name, make in (
            ("popularity", lambda: Popularity(train)),
            ("EASE^R (lambda=100)", lambda: EASE(train, lam=100.0)),
        ):
            started = time.perf_counter()
            baseline = make()
            rows.append((name, evaluate(baseline, train, relevant, ks=KS), time.perf_counter() - started))
    found = {} if task == "ranking" else evaluate_pointwise(model, train, test, task=task)
    found.update(evaluate(model, train, relevant, ks=KS))
    rows.append((type(model).__name__, found, seconds))
    return rows


def print_table(rows, columns=TABLE_METRICS):
    header = ["model", *columns, "fit s"]
    body = [
        [name, *(f"{metrics[m]:.4f}" if m in metrics else "-" for m in columns), "-" if s is None else f"{s:.1f}"]
        for name, metrics, s in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *body]:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


# --- commands -----------------------------------------------------------------------------


def run_demo(args):
    from rankfast.ranker import Ranker

    started = time.perf_counter()
    data = _data_source(args, 0) or {"synthetic": {"seed": 0}}
    settings = defaults(data, "dot")
    settings.update(out=args.out, threads=args.threads)
    check_out(settings["out"])
    if args.epochs is not None:
        settings["train"]["epochs"] = args.epochs
    model, train, test, seconds = train_model(settings)
    print_table(metrics_rows(model, train, test, seconds, baselines=True))
    directory = save(settings, model, train)
    print(f"model directory: {directory}")
    ranker = Ranker.load(directory)
    user = train.user_ids.raw[int(test.users[0])].item()
    (result,) = ranker.score([user], k=10)
    print(f"top 10 for user {user} (training items excluded):")
    text = train.item_text
    for rank, (item, value) in enumerate(zip(result["items"], result["scores"], strict=True), start=1):
        label = f"  {text[int(train.item_ids.index([item])[0])]}" if text else ""
        print(f"{rank:3d}. item {item}  score {value:.3f}{label}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")


def run_train(args):
    settings = train_settings(args)
    model, train, test, seconds = train_model(settings)
    print(f"trained {type(model).__name__} ({settings['task']} task) in {seconds:.1f} s")
    print(f"model directory: {save(settings, model, train)}")


def run_evaluate(args):
    import torch

    from rankfast.ranker import Ranker

    torch.set_num_threads(args.threads)
    ranker = Ranker.load(args.model_dir)
    recorded = dict(ranker.meta.get("data") or {})
    test_ratio = args.test_ratio or recorded.pop("test_ratio", 0.2)
    task, threshold = recorded.pop("task", "ranking"), recorded.pop("click_threshold", 4.0)
    source = _data_source(args) or recorded
    if not source:
        raise CLIError(f"{args.model_dir}: records no training data; pass --data PATH", EXIT_USAGE)
    fields = ranker.model.config.fields  # fitted: the data is encoded with the model's vocabularies
    train, test = split(source, test_ratio, fields=fields, task=task, click_threshold=threshold)
    if train.user_ids != ranker.user_ids or train.item_ids != ranker.item_ids:
        raise CLIError(
            f"{args.model_dir}: the model's id mappings do not match this data's (was it trained on other data?)"
        )
    rows = metrics_rows(ranker.model, train, test, None, baselines=args.baselines, task=task)
    print_table(rows, TASK_METRICS[task])


# --- parsers ------------------------------------------------------------------------------


def _add_data_flags(parser, *, synthetic_help: str):
    names = ", ".join(datasets.MOVIELENS)
    parser.add_argument(
        "--data",
        type=data_argument,
        metavar="NAME|DIR",
        help=f"MovieLens by name ({names}; downloaded once into ${datasets.DATA_ENV}, default ~/.cache/rankfast) "
        "or a MovieLens directory",
    )
    parser.add_argument(
        "--users",
        dest="num_users",
        type=positive_int,
        metavar="N",
        help=f"synthetic data: number of users ({synthetic_help})",
    )
    parser.add_argument(
        "--items", dest="num_items", type=positive_int, metavar="N", help="synthetic data: number of items"
    )


def add_parsers(sub):
    threads_help = (
        "torch intra-op threads (default 1: small models gain little from more and lose much when other "
        "processes share the cores)"
    )
    demo = add_command(
        sub,
        "demo",
        description="Trains a DotModel on synthetic data (or --data), compares it with popularity and EASE^R, "
        "saves the model directory and prints one user's top 10.",
    )
    _add_data_flags(demo, synthetic_help="default 3000")
    demo.add_argument(
        "--epochs", type=positive_int, help="training epochs (default 6 on synthetic data, 22 on MovieLens)"
    )
    demo.add_argument(
        "--out",
        default="rankfast-demo",
        help="model directory to write (default ./rankfast-demo); absent, empty or an earlier model directory",
    )
    demo.add_argument("--threads", type=positive_int, default=1, help=threads_help)
    demo.set_defaults(run=run_demo)

    train = add_command(
        sub, "train", description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    train.add_argument("--config", metavar="FILE", help="TOML settings (layout above); flags override them")
    _add_data_flags(train, synthetic_help="default: built-in synthetic data")
    train.add_argument("--model", choices=sorted(MODELS), help="model type (default dot)")
    train.add_argument("--dim", type=positive_int, help="embedding width")
    train.add_argument("--epochs", type=positive_int)
    train.add_argument("--lr", type=float)
    train.add_argument(
        "--task", choices=TASKS, help="ranking (default), click (0/1 labels; MovieLens: rating >= 4) or rating"
    )
    train.add_argument("--loss", choices=["bce", "bpr", "mse", "softmax", "ce"])
    train.add_argument("--batch-size", type=positive_int)
    train.add_argument(
        "--seed", type=int, help="training seed, and the synthetic data's when [data] does not give one (default 0)"
    )
    train.add_argument(
        "--test-ratio", type=float, help="held out per user, by time, for `rankfast evaluate` (default 0.2)"
    )
    train.add_argument("--threads", type=positive_int, help=threads_help)
    train.add_argument(
        "--out", metavar="DIR", help="model directory to write: absent, empty or an earlier model directory"
    )
    train.set_defaults(run=run_train)

    ev = add_command(
        sub,
        "evaluate",
        description="Full-ranking metrics of a model directory on the held-out split of its data (or --data).",
    )
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    _add_data_flags(ev, synthetic_help="default: the data the model was trained on")
    ev.add_argument("--test-ratio", type=float, help="default: the ratio used in training")
    ev.add_argument("--baselines", action="store_true", help="also evaluate popularity and EASE^R")
    ev.add_argument("--threads", type=positive_int, default=1, help=threads_help)
    ev.set_defaults(run=run_evaluate)
