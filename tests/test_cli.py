"""The rankfast command line, each subcommand end to end in a temporary directory."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points, version

import numpy as np
import pytest
import torch

import rankfast
from rankfast import Ranker
from rankfast.cli import EXIT_FAILED, EXIT_MISSING_DEPENDENCY, EXIT_USAGE, main, workflow
from rankfast.data import synthetic_interactions, temporal_split
from rankfast.evaluate import evaluate

TINY = ["--users", "60", "--items", "40"]


@pytest.fixture(autouse=True)
def keep_threads():
    """Commands set torch's thread count for their (normally short-lived) process."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny trained model directory (``rankfast train`` from a TOML file plus flags)."""
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "train.toml"
    config.write_text(
        f'out = "{tmp / "model"}"\n'
        "[data]\nsynthetic = {num_users = 60, num_items = 40, seed = 2}\n"
        '[model]\ntype = "mlp"\nhidden = [8]\n'
        "[train]\nepochs = 3\nbatch_size = 256\n"
    )
    before = torch.get_num_threads()
    assert main(["train", "--config", str(config), "--dim", "6", "--epochs", "1"]) == 0
    torch.set_num_threads(before)
    return tmp / "model"


def test_console_script_is_declared():
    (script,) = entry_points(group="console_scripts", name="rankfast")
    assert script.value == "rankfast.cli:main"


def test_train_writes_a_model_directory_with_file_and_flag_settings(model_dir):
    ranker = Ranker.load(model_dir)
    config = ranker.model.config
    assert (
        type(ranker.model).__name__ == "MLPModel" and config.dim == 6 and config.hidden == (8,)
    )  # flag beat nothing, file
    assert ranker.meta["data"] == {"synthetic": {"num_users": 60, "num_items": 40, "seed": 2}, "test_ratio": 0.2}


def test_train_settings_unset_flags_keep_the_file(tmp_path):
    """Flags win over the file, but only flags that were given (--seed's default hid [train] seed)."""
    from rankfast.cli import build_parser
    from rankfast.cli.workflow import train_settings

    config = tmp_path / "train.toml"
    config.write_text('out = "m"\nthreads = 2\n[train]\nseed = 7\nepochs = 4\n')
    settings = train_settings(build_parser().parse_args(["train", "--config", str(config)]))
    assert settings["train"]["seed"] == 7 and settings["train"]["epochs"] == 4 and settings["threads"] == 2
    assert settings["data"] == {"synthetic": {"seed": 7}}
    settings = train_settings(
        build_parser().parse_args(["train", "--config", str(config), "--seed", "3", "--epochs", "1"])
    )
    assert (
        settings["train"]["seed"] == 3
        and settings["train"]["epochs"] == 1
        and settings["data"] == {"synthetic": {"seed": 3}}
    )
    settings = train_settings(build_parser().parse_args(["train", "--out", "m"]))
    assert rankfast.TrainConfig(**settings["train"]).seed == 0 and settings["data"] == {"synthetic": {"seed": 0}}


def test_demo_tiny(tmp_path, capsys):
    code, out, _ = run(["demo", *TINY, "--epochs", "1", "--out", tmp_path / "demo"], capsys)
    assert code == 0
    for row in ("popularity", "EASE^R (lambda=100)", "DotModel", "top 10 for user"):
        assert row in out
    ranked = [line for line in out.splitlines() if line.strip()[:3].strip().rstrip(".").isdigit()]
    assert len(ranked) == 10
    assert Ranker.load(tmp_path / "demo").model.config.num_users == 60


def _movielens_dir(path, users=40, per_user=12, seed=0):
    """A small MovieLens-format folder (ratings.csv with timestamps, movies.csv)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, users + 1):
        for t, item in enumerate(rng.choice(np.arange(100, 130), per_user, replace=False)):
            lines.append(f"{user},{item},{rng.integers(1, 6)}.0,{1000 + t}")
    (path / "ratings.csv").write_text("\n".join(lines) + "\n")
    movies = [f"{item},Movie {item} (2000),Drama" for item in range(100, 130)]
    (path / "movies.csv").write_text("movieId,title,genres\n" + "\n".join(movies) + "\n")
    return path


def test_data_by_name_is_recorded_by_name(tmp_path, capsys, monkeypatch):
    """--data NAME reads <data home>/NAME (here a small stand-in: nothing is downloaded), and the
    model directory records the name, which evaluate reads back; a directory is recorded absolute."""
    folder = _movielens_dir(tmp_path / "home" / "ml-latest-small")
    monkeypatch.setenv("RANKFAST_DATA", str(tmp_path / "home"))
    train_flags = ["--epochs", "1", "--dim", "4", "--batch-size", "64"]
    code, out, err = run(["train", "--data", "ml-latest-small", *train_flags, "--out", tmp_path / "by-name"], capsys)
    assert code == 0, err
    assert Ranker.load(tmp_path / "by-name").meta["data"] == {"movielens": "ml-latest-small", "test_ratio": 0.2}
    code, by_name, err = run(["evaluate", tmp_path / "by-name"], capsys)
    assert code == 0 and "DotModel" in by_name, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", "--data", "home/ml-latest-small", *train_flags, "--out", "by-path"], capsys)
    assert code == 0, err
    assert Ranker.load(tmp_path / "by-path").meta["data"]["movielens"] == str(folder)
    code, by_path, err = run(["evaluate", "by-path"], capsys)
    assert code == 0 and by_path == by_name, err  # the same data, trained alike
    (tmp_path / "bad.toml").write_text('out = "m"\n[data]\nmovielens = "ml-nope"\n')
    code, _, err = run(["train", "--config", tmp_path / "bad.toml"], capsys)
    assert code == EXIT_USAGE and "[data] movielens: 'ml-nope' is neither a data set name" in err


# Runs commands in a fresh interpreter and reports, after each, its exit code and whether torch was imported.
_STARTUP_PROBE = """
import json, sys
from rankfast.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exit:  # --help and --version exit from argparse
        code = exit.code
    print("PROBE", json.dumps([argv, code, "torch" in sys.modules]), flush=True)
"""


def test_help_version_and_argument_errors_do_not_import_torch():
    helps = [
        ["train", "--help"],
        ["demo", "--help"],
        ["evaluate", "--help"],
        ["score", "--help"],
        ["bench", "--help"],
        ["info", "--help"],
    ]
    errors = [
        ["train", "--epochs", "0"],
        ["demo", "--data", "ml-nope"],
        ["evaluate", "m", "--threads", "0"],
        ["score", "m", "-k", "0"],
    ]
    cases = [["--version"], ["--help"], [], ["trian"], *helps, *errors]
    done = subprocess.run([sys.executable, "-c", _STARTUP_PROBE, json.dumps(cases)], capture_output=True, text=True)
    probes = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert [p[0] for p in probes] == cases, done.stderr
    assert [p[0] for p in probes if p[2]] == []  # none imported torch
    assert [p[1] for p in probes] == [0, 0, EXIT_USAGE, EXIT_USAGE, *[0] * len(helps), *[EXIT_USAGE] * len(errors)]
    assert f"rankfast {version('rankfast')}\n" in done.stdout and rankfast.__version__ == version("rankfast")


def test_import_rankfast_is_light_and_loads_names_on_use():
    probe = (
        "import sys, rankfast; light = 'torch' not in sys.modules; "
        "missing = [n for n in rankfast.__all__ if getattr(rankfast, n, None) is None]; "
        "print(light, missing, set(rankfast.__all__) <= set(dir(rankfast)), rankfast.topk.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == ["True", "[]", "True", "rankfast.selection"], done.stderr


def test_evaluate_matches_the_library(model_dir, capsys):
    code, out, _ = run(["evaluate", model_dir, "--baselines"], capsys)
    assert code == 0
    train, test = temporal_split(synthetic_interactions(60, 40, seed=2), 0.2)
    expected = evaluate(Ranker.load(model_dir).model, train, test, ks=(10, 20), progress=False)
    row = next(line.split() for line in out.splitlines() if line.startswith("MLPModel"))
    assert [float(v) for v in row[1:5]] == pytest.approx(
        [expected[m] for m in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")], abs=1e-4
    )
    assert "popularity" in out and "EASE^R" in out


def test_score_writes_json_lines(model_dir, tmp_path, capsys):
    (tmp_path / "users.txt").write_text("3\n\n17\n59\n")
    code, _, _ = run(
        ["score", model_dir, "-i", tmp_path / "users.txt", "-o", tmp_path / "out.jsonl", "-k", "4"], capsys
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == Ranker.load(model_dir).score([3, 17, 59], k=4)
    assert all(len(r["items"]) == 4 and r["scores"] == sorted(r["scores"], reverse=True) for r in rows)


@pytest.mark.parametrize("model", ["attention", "sasrec"])
def test_train_logs_epochs_and_score_explains(model, model_dir, tmp_path, capsys):
    """`rankfast train` reports each epoch on stderr (through logging, terminal or not);
    `rankfast score --explain N` adds each item's most weighed history items (attention and
    sequential models)."""
    out = tmp_path / model
    code, _, err = run(
        [
            "train",
            "--model",
            model,
            "--users",
            "60",
            "--items",
            "40",
            "--dim",
            "4",
            "--epochs",
            "2",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0
    epochs = [line for line in err.splitlines() if line.startswith("epoch ") and ": loss " in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    (tmp_path / "users.txt").write_text("3\n17\n")
    code, stdout, _ = run(["score", out, "-i", tmp_path / "users.txt", "-k", "3", "--explain", "2"], capsys)
    assert code == 0
    ranker = Ranker.load(out)
    for line, user in zip(stdout.splitlines(), (3, 17), strict=True):
        row = json.loads(line)
        assert row["explanations"] == [ranker.explain(user, item, top=2) for item in row["items"]]
    code, _, err = run(["score", model_dir, "--explain", "2"], capsys)
    assert code == 2 and "--explain: this MLPModel does not weigh history items" in err


def test_train_itemitem_starts_from_ease_weights_over_recency_weighted_rows(tmp_path, capsys):
    """`rankfast train --model itemitem`: EASE^R's weights (lambda 300 by default) over the
    history rows weighted by recency, fine-tuned; at a vanishing learning rate the saved model
    scores what EASE^R scores from the same rows. A width is an error naming the config field."""
    out = tmp_path / "itemitem"
    argv = ["train", "--model", "itemitem", "--users", "60", "--items", "40", "--epochs", "1", "--out", out]
    code, stdout, _ = run([*argv, "--lr", "1e-12"], capsys)
    assert code == 0 and "trained ItemItem" in stdout
    train, _ = workflow.split({"synthetic": {"num_users": 60, "num_items": 40, "seed": 0}}, 0.2)
    rows = rankfast.data.history_features(train, half_life=5.0, floor=0.1)
    want = rankfast.baselines.EASE(train, lam=300.0, history=rows).score(np.arange(train.num_users))
    model = Ranker.load(out).model
    torch.testing.assert_close(model.user_repr.features, rows)
    torch.testing.assert_close(model.user_scores(torch.arange(train.num_users)).detach(), want, rtol=1e-4, atol=1e-5)
    code, _, err = run([*argv[:-2], "--dim", "8", "--out", tmp_path / "other"], capsys)
    assert code == EXIT_USAGE and "[model]: ItemItemConfig.dim" in err
    for task in workflow.TASKS:  # no default width, which the item-item weights would reject
        model = workflow.defaults({"synthetic": {}}, "itemitem", task)["model"]
        assert model["type"] == "itemitem" and "dim" not in model and model["ease_lambda"] == 300.0


def test_score_failure_leaves_no_partial_output(model_dir, tmp_path, capsys):
    """An unknown id in a later batch: the output file keeps its old content, or is not created."""
    (tmp_path / "users.txt").write_text("3\n17\n999\n")
    argv = ["score", model_dir, "-i", tmp_path / "users.txt", "--batch-size", "1"]
    (tmp_path / "old.jsonl").write_text("old\n")
    code, _, err = run([*argv, "-o", tmp_path / "old.jsonl"], capsys)
    assert code == EXIT_FAILED and "unknown user id 999" in err
    assert (tmp_path / "old.jsonl").read_text() == "old\n"
    code, _, _ = run([*argv, "-o", tmp_path / "new.jsonl"], capsys)
    assert code == EXIT_FAILED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl", "users.txt"]
    (tmp_path / "users.txt").write_text("3\n17\n")
    code, _, _ = run([*argv, "-o", tmp_path / "old.jsonl"], capsys)
    assert code == 0 and [json.loads(line)["user"] for line in (tmp_path / "old.jsonl").read_text().splitlines()] == [
        3,
        17,
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl", "users.txt"]


@pytest.mark.parametrize(
    "argv, code, message",
    [
        ([], EXIT_USAGE, "required: COMMAND"),
        (["train", "--bogus"], EXIT_USAGE, "unrecognized arguments: --bogus"),
        (["train", "--model", "xyz"], EXIT_USAGE, "invalid choice: 'xyz'"),
        (["train", "--epochs", "two"], EXIT_USAGE, "invalid int value: 'two'"),
        (["train", "--config", "/nonexistent.toml", "--out", "x"], EXIT_USAGE, "--config: cannot read"),
        (["score", "/nonexistent/model"], EXIT_FAILED, "/nonexistent/model: no such model directory"),
        (["evaluate", "/nonexistent/model"], EXIT_FAILED, "no such model directory"),
        (["demo", "--data", "/nonexistent/ml"], EXIT_USAGE, "--data: '/nonexistent/ml' is neither a data set name"),
        (["bench", "--bench-dir", "/nonexistent"], EXIT_USAGE, "no benchmark suites"),
        # Counts are checked before any work: -1 users per batch used to write nothing and exit 0,
        # 0 threads gave torch's traceback.
        (
            ["score", "/nonexistent/model", "--batch-size", "-1"],
            EXIT_USAGE,
            "--batch-size: expected a positive int, got -1",
        ),
        (
            ["score", "/nonexistent/model", "--batch-size", "0"],
            EXIT_USAGE,
            "--batch-size: expected a positive int, got 0",
        ),
        (["score", "/nonexistent/model", "-k", "0"], EXIT_USAGE, "-k: expected a positive int, got 0"),
        (["train", "--threads", "0", "--out", "x"], EXIT_USAGE, "--threads: expected a positive int, got 0"),
        (["evaluate", "/nonexistent/model", "--threads", "0"], EXIT_USAGE, "--threads: expected a positive int, got 0"),
        (["demo", "--users", "0"], EXIT_USAGE, "--users: expected a positive int, got 0"),
    ],
)
def test_bad_arguments_one_line_error(argv, code, message, capsys):
    got, out, err = run(argv, capsys)
    assert got == code
    assert err.count("\n") == 1 and err.startswith("rankfast: error: ") and message in err
    assert "Traceback" not in err


def test_bad_config_and_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.toml").write_text('[model]\ncolour = "red"\n')
    code, _, err = run(["train", "--config", tmp_path / "bad.toml", "--out", tmp_path / "m", *TINY], capsys)
    assert code == EXIT_USAGE and "unexpected keyword argument 'colour'" in err
    (tmp_path / "threads.toml").write_text(f'out = "{tmp_path / "m"}"\nthreads = 0\n')
    code, _, err = run(["train", "--config", tmp_path / "threads.toml", *TINY], capsys)
    assert code == EXIT_USAGE and "threads: expected a positive int, got 0" in err and err.count("\n") == 1
    # Invalid values in the file are usage errors too, not failures (exit 2, as documented).
    for body, message in (
        ("test_ratio = 2\n", "test_ratio: expected a number in (0, 1), got 2"),
        ("[model]\ndim = -3\n", "[model]: "),
        ('[train]\nloss = "hinge"\n', "[train]: loss"),
    ):
        (tmp_path / "values.toml").write_text(f'out = "{tmp_path / "m"}"\n' + body)
        code, _, err = run(["train", "--config", tmp_path / "values.toml", *TINY], capsys)
        assert code == EXIT_USAGE and message in err and err.count("\n") == 1, err
    (tmp_path / "bad2.toml").write_text("epochs = [")
    code, _, err = run(["train", "--config", tmp_path / "bad2.toml"], capsys)
    assert code == EXIT_USAGE and "not valid TOML" in err and err.count("\n") == 1
    for text, message in (("abc\n", "line 1: user id 'abc' is not an integer"), ("5\n999\n", "unknown user id 999")):
        (tmp_path / "u.txt").write_text(text)
        code, out, err = run(["score", model_dir, "-i", tmp_path / "u.txt"], capsys)
        assert code == EXIT_FAILED and message in err and err.count("\n") == 1


def _config(out, *, top="", data="synthetic = {num_users = 60, num_items = 40, seed = 1}", model=None, train=None):
    """A train config file's text: a valid one, but for the parts given (None leaves a table out)."""
    model = 'type = "dot"\ndim = 4' if model is None else model
    train = "epochs = 1\nbatch_size = 256" if train is None else train
    tables = [("data", data), ("model", model), ("train", train)]
    return f'out = "{out}"\n{top}\n' + "".join(f"[{name}]\n{body}\n" for name, body in tables if body != "-")


# Every train config of the reliability probe (docs: shared/reviews/reliability.md, the CLI table):
# 14 printed a traceback, 6 exited 1 and one trained. Each is one line and exit 2 (a bad config).
BAD_CONFIGS = {
    "not UTF-8": (None, "is not UTF-8 (byte"),
    "model = 5": ({"top": "model = 5", "model": "-"}, "[model]: expected a table, got 5"),
    "train = 'x'": ({"top": "train = 'x'", "train": "-"}, "[train]: expected a table, got 'x'"),
    "data = 5": ({"top": "data = 5", "data": "-"}, "[data]: expected movielens = NAME or DIR"),
    "unknown top-level key": ({"top": "colour = 1"}, "--config: unknown keys ['colour']"),
    "synthetic = 5": ({"data": "synthetic = 5"}, "[data] synthetic: expected a table of num_users"),
    "synthetic bogus key": ({"data": "synthetic = {bogus = 1}"}, "[data] synthetic: expected a table of"),
    "num_users = 'abc'": ({"data": "synthetic = {num_users = 'abc'}"}, "num_users: expected an int, got 'abc'"),
    "num_users = 0": ({"data": "synthetic = {num_users = 0}"}, "[data] synthetic: num_users: must be at least 1"),
    "movielens = 5": ({"data": "movielens = 5"}, "[data] movielens: '5' is neither a data set name"),
    "movielens missing": ({"data": "movielens = '/nonexistent'"}, "'/nonexistent' is neither a data set name"),
    "type = 5": ({"model": "type = 5"}, "model type: expected one of"),
    "type = []": ({"model": "type = []"}, f"model type: expected one of {sorted(workflow.MODELS)}, got []"),
    "dim = '32'": ({"model": "dim = '32'"}, "[model]: DotConfig.dim: expected a positive int, got '32'"),
    "dim = 10**12": ({"model": "dim = 1000000000000"}, "[model]: a DotModel of these sizes holds 372,529 GiB"),
    "model bogus key": ({"model": "bogus = 1"}, "unexpected keyword argument 'bogus'"),
    "hidden = 'abc'": ({"model": "type = 'mlp'\nhidden = 'abc'"}, "MLPConfig.hidden: expected a sequence"),
    "epochs = '3'": ({"train": "epochs = '3'"}, "[train]: epochs: expected int, got '3'"),
    "epochs = 1.7": ({"train": "epochs = 1.7"}, "[train]: epochs: expected int, got 1.7"),
    "lr = 'fast'": ({"train": "lr = 'fast'"}, "[train]: lr: expected float, got 'fast'"),
    "lr = -1": ({"train": "lr = -1.0"}, "[train]: lr: must be positive, got -1.0"),
    "weight_decay = 'x'": ({"train": "weight_decay = 'x'"}, "[train]: weight_decay: expected float, got 'x'"),
    "batch_size = 0": ({"train": "batch_size = 0"}, "[train]: batch_size: must be at least 1, got 0"),
    "train bogus key": ({"train": "bogus = 1"}, "unexpected keyword argument 'bogus'"),
    "checkpoint_dir = 5": ({"train": "checkpoint_dir = 5"}, "checkpoint_dir: expected str or os.PathLike, got 5"),
    "seed = 'abc'": ({"train": "seed = 'abc'"}, "[train]: seed: expected int, got 'abc'"),
    "eval_ks = 'abc'": ({"train": "eval_ks = 'abc'"}, "[train]: invalid literal for int()"),
    "all + bce": ({"train": "negatives = 'all'\nloss = 'bce'"}, "negatives: 'all' (full softmax) needs loss='softmax'"),
    "grad_clip = 'x'": ({"train": "grad_clip = 'x'"}, "[train]: grad_clip: expected float, got 'x'"),
    "test_ratio = 1.5": ({"top": "test_ratio = 1.5"}, "test_ratio: expected a number in (0, 1), got 1.5"),
    "threads = 0": ({"top": "threads = 0"}, "threads: expected a positive int, got 0"),
    "out = 5": ("out = 5\n", "out: expected a path, got 5"),
    "out = ''": ("out = ''\n", "--out: where to write the model directory"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_files_are_one_line_and_exit_2(name, tmp_path, capsys):
    parts, message = BAD_CONFIGS[name]
    config = tmp_path / "train.toml"
    if parts is None:
        config.write_bytes(_config(tmp_path / "m").encode() + b"\xff = 1\n")
    else:
        config.write_text(parts if isinstance(parts, str) else _config(tmp_path / "m", **parts))
    code, _, err = run(["train", "--config", config], capsys)
    assert code == EXIT_USAGE and err.count("\n") == 1 and err.startswith("rankfast: error: "), err
    assert message in err
    assert not (tmp_path / "m").exists()


def test_valid_config_base_trains(tmp_path, capsys):
    """The base of the bad configs above is valid: each case is bad for its own reason."""
    (tmp_path / "train.toml").write_text(_config(tmp_path / "m"))
    code, _, err = run(["train", "--config", tmp_path / "train.toml"], capsys)
    assert code == 0 and Ranker.load(tmp_path / "m").model.config.dim == 4, err


def test_score_extreme_arguments(model_dir, tmp_path, capsys):
    """-k 10**12 and 10**8 were an allocator traceback: k is clamped to the items. A user id
    beyond int64 was an AttributeError: it is an unknown id."""
    (tmp_path / "users.txt").write_text("5\n7\n")
    for k in ("1000000000000", "100000000"):
        code, out, err = run(["score", model_dir, "-i", tmp_path / "users.txt", "-k", k, "--include-seen"], capsys)
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and [len(row["items"]) for row in rows] == [40, 40], err
    (tmp_path / "users.txt").write_text("5\n1180591620717411303424\n")
    code, out, err = run(["score", model_dir, "-i", tmp_path / "users.txt"], capsys)
    assert code == EXIT_FAILED and err == "rankfast: error: users: unknown user id 1180591620717411303424 " + (
        "(load the Ranker with cold_start=True to score new users)\n"
    )


def test_corrupted_model_directory(model_dir, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{")
    code, _, err = run(["score", broken], capsys)
    assert code == EXIT_FAILED and "config.json: does not match the size and sha256" in err and err.count("\n") == 1


def test_out_must_not_hold_other_files(model_dir, tmp_path, capsys, monkeypatch):
    """`--out` is replaced whole: a directory of other files (`.` included) is refused before
    any training, with exit 2 and one line; a model directory is replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, out, err = run(["train", *TINY, "--epochs", "1", "--out", mine], capsys)
    assert code == EXIT_USAGE and out == "" and err.count("\n") == 1
    assert f"out: {mine}: not empty and not a rankfast model directory" in err
    monkeypatch.chdir(mine)
    code, out, err = run(["demo", *TINY, "--epochs", "1", "--out", "."], capsys)
    assert code == EXIT_USAGE and out == "" and "not a rankfast model directory" in err and err.count("\n") == 1
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    import shutil

    previous = shutil.copytree(model_dir, tmp_path / "previous")
    code, _, _ = run(["train", *TINY, "--epochs", "1", "--out", previous], capsys)
    assert code == 0 and Ranker.load(previous).model.config.num_users == 60


def test_info(capsys):
    code, out, _ = run(["info", "--json"], capsys)
    facts = json.loads(out)
    assert code == 0
    assert facts["rankfast"] == rankfast.__version__ and facts["torch"] == torch.__version__
    assert facts["cpp_extension"] == rankfast.extension_available()
    assert facts["cuda"]["available"] == torch.cuda.is_available()
    code, out, _ = run(["info"], capsys)
    assert "C++ top-K extension: " in out and "Triton kernels: " in out


def test_info_without_triton(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    code, out, _ = run(["info", "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["triton"] is None and facts["triton_kernels"].startswith("unavailable (")
    assert facts["rankfast"] == rankfast.__version__


def test_bench_tiny(tmp_path, capfd):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "bench"
    code = main(["bench", "--suite", "topk", "-k", "uniform-N10000-k10-", "--out", str(out_dir)])
    out = capfd.readouterr().out  # the table comes from bench/report.py in a subprocess
    assert code == 0
    assert "| topk B=1024 N=10000 k=10 uniform |" in out and "speedup vs torch.topk" in out
    data = json.loads((out_dir / "bench.json").read_text())
    assert {b["extra_info"]["impl"] for b in data["benchmarks"]} == {"rankfast", "torch.topk", "numpy"}
    assert (out_dir / "bench.md").read_text().count("| topk ") == 1
    assert (out_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run(["bench", "--out", tmp_path], capsys)
    assert code == EXIT_MISSING_DEPENDENCY and "needs matplotlib" in err and err.count("\n") == 1


def test_python_dash_m_in_a_subprocess(tmp_path):
    """The real entry: exit code and a one-line error, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "rankfast", "score", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert done.returncode == EXIT_FAILED
    assert done.stderr.strip().count("\n") == 0 and "no such model directory" in done.stderr


def test_train_a_click_task_with_a_schema_and_evaluate_it(tmp_path, capsys):
    """task and [[fields]] from the TOML file; evaluate prints the click metrics of the library."""
    folder = _movielens_dir(tmp_path / "ml")
    config = tmp_path / "ctr.toml"
    fields = "".join(
        f'[[fields]]\nname = "{name}"\nside = "{side}"\nkind = "{kind}"\n'
        for name, side, kind in (
            ("genres", "item", "multi"),
            ("year", "item", "categorical"),
            ("hour", "context", "categorical"),
        )
    )
    config.write_text(
        f'out = "{tmp_path / "m"}"\ntask = "click"\nclick_threshold = 4.0\n[data]\nmovielens = "{folder}"\n'
        '[model]\ntype = "deepfm"\ndim = 4\nhidden = [8]\n[train]\nepochs = 1\nbatch_size = 64\n' + fields
    )
    code, out, err = run(["train", "--config", config], capsys)
    assert code == 0 and "DeepFM (click task)" in out, err
    ranker = Ranker.load(tmp_path / "m")
    assert [f.name for f in ranker.model.config.fields] == ["genres", "year", "hour"]
    assert ranker.meta["data"]["task"] == "click"
    code, out, err = run(["evaluate", tmp_path / "m"], capsys)
    assert code == 0, err
    header, _, row = out.splitlines()[:3]
    assert header.split()[:5] == ["model", "logloss", "auc", "gauc", "accuracy"]
    from rankfast.data import load_movielens
    from rankfast.evaluate import evaluate_pointwise

    train, test = temporal_split(load_movielens(folder, fields=ranker.model.config.fields).clicks(4.0), 0.2)
    expected = evaluate_pointwise(ranker.model, train, test, task="click")
    assert [float(v) for v in row.split()[1:5]] == pytest.approx(
        [expected[m] for m in ("logloss", "auc", "gauc", "accuracy")], abs=1e-4
    )
    config.write_text(config.read_text() + '[[fields]]\nname = "tags"\nside = "item"\nkind = "multi"\n')
    code, _, err = run(["train", "--config", config, "--out", tmp_path / "m2"], capsys)
    assert code == EXIT_USAGE and "field 'tags': not in the data" in err
