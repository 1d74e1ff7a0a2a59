"""The ranking models: configs, forward semantics, and save/load."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankfast.models import (
    GMF,
    AttentionConfig,
    DotConfig,
    DotModel,
    GMFConfig,
    MLPConfig,
    MLPModel,
    NeuMF,
    NeuMFConfig,
    Representation,
    load_model,
)

from helpers import CASES, DIM, NUM_ITEMS, NUM_USERS, make_model, random_history

# --- configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: DotConfig(0, 5, 4), "num_users"),
        (lambda: DotConfig(3, 5, 2.5), "dim"),
        (lambda: DotConfig(3, 5, 4, item_feature_dim=0), "item_feature_dim"),
        (lambda: MLPConfig(3, 5, 4, hidden=(8, 0)), "hidden"),
        (lambda: MLPConfig(3, 5, 4, hidden="8"), "hidden"),
        (lambda: MLPConfig(3, 5, 4, activation="tanh"), "activation"),
        (lambda: MLPConfig(3, 5, 4, dropout=1.0), "dropout"),
        (lambda: NeuMFConfig(3, 5, 4, hidden=()), "hidden"),
        (lambda: NeuMFConfig(3, 5, 4, gmf_dim=0), "gmf_dim"),
        (lambda: NeuMFConfig(3, 5, 4, mlp_dim=2.0), "mlp_dim"),
        (lambda: AttentionConfig(3, 5, 4, attention="mha"), "attention"),
        (lambda: AttentionConfig(3, 5, 4, unit_hidden=(-1,)), "unit_hidden"),
        (lambda: AttentionConfig(3, 5, 4, normalize="yes"), "normalize"),
        (lambda: DotConfig(3, 5, 4, item_hybrid=True), "item_hybrid"),
        (lambda: MLPConfig(3, 5, 4, user_feature_dim=2, user_hybrid=1), "user_hybrid"),
    ],
)
def test_bad_config_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_config_lists_become_tuples():
    assert MLPConfig(3, 5, 4, hidden=[8, 2]).hidden == (8, 2)


def test_model_rejects_another_models_config():
    with pytest.raises(TypeError, match="config"):
        MLPModel(DotConfig(3, 5, 4))


def test_feature_matrices_are_checked():
    config = MLPConfig(3, 5, 4, item_feature_dim=2)
    with pytest.raises(ValueError, match="item_features"):
        MLPModel(config)
    with pytest.raises(ValueError, match="item_features"):
        MLPModel(config, item_features=torch.randn(5, 3))
    with pytest.raises(ValueError, match="user_features"):
        MLPModel(config, item_features=torch.randn(5, 2), user_features=torch.randn(3, 2))
    with pytest.raises(TypeError, match="item_features"):
        MLPModel(config, item_features=torch.ones(5, 2, dtype=torch.int64))


# --- forward semantics -----------------------------------------------------------------


@pytest.mark.parametrize("features", [None, torch.randn(9, 3)])
def test_representation_rows_match_all(features):
    rep = Representation(9, 4, features)
    ids = torch.tensor([[0, 8], [3, 3]])
    assert rep(ids).shape == (2, 2, 4)
    torch.testing.assert_close(rep(ids), rep.all()[ids])
    assert rep.uses_features == (features is not None)


@pytest.mark.parametrize("hybrid", [False, True])
def test_set_features_equals_a_model_built_with_them(hybrid):
    config = DotConfig(NUM_USERS, NUM_ITEMS, DIM, user_feature_dim=5, user_hybrid=hybrid)
    old, new = torch.randn(NUM_USERS, 5), torch.randn(NUM_USERS, 5)
    given = old.clone()
    model = DotModel(config, user_features=old)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    reference = DotModel(config, user_features=new)
    reference.load_state_dict({**model.state_dict(), "user_repr.features": new})
    model.user_repr.set_features(new)
    users, items = torch.tensor([0, 6, 3]), torch.tensor([30, 0, 7])
    assert torch.equal(model.user_repr.features, new)
    assert torch.equal(old, given), "the model holds a copy: the caller's features are untouched"
    torch.testing.assert_close(model(users, items), reference(users, items), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected shape"):
        model.user_repr.set_features(torch.randn(NUM_USERS, 4))
    with pytest.raises(TypeError, match="floating-point"):
        model.user_repr.set_features(torch.ones(NUM_USERS, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="ID embedding table"):
        model.item_repr.set_features(torch.randn(NUM_ITEMS, 5))
    assert torch.equal(model.user_repr.features, new), "a rejected call changes nothing"


def test_hybrid_representation_against_float64_reference():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(9, 5, generator=gen)
    rep = Representation(9, 4, features, hybrid=True)
    assert rep.hybrid and rep.uses_features
    assert torch.equal(rep.embedding.weight, torch.zeros(9, 4)), "the ID part starts at zero"
    with torch.no_grad():
        rep.embedding.weight.normal_(generator=gen)
    ids = torch.tensor([[0, 8], [3, 3], [5, 1]])
    w, b, e = (t.detach().double() for t in (rep.projection.weight, rep.projection.bias, rep.embedding.weight))
    expected = features.double() @ w.T + b + e  # every row, in float64
    torch.testing.assert_close(rep.all().double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rep(ids).double(), expected[ids], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="hybrid"):
        Representation(9, 4, hybrid=True)


def test_dot_model_formula():
    model = make_model("dot")
    u, i = torch.tensor([0, 6, 2]), torch.tensor([30, 0, 2])
    e_u, e_i = model.user_repr.embedding.weight[u], model.item_repr.embedding.weight[i]
    expected = (e_u * e_i).sum(1) + model.user_bias[u] + model.item_bias[i] + model.bias
    torch.testing.assert_close(model(u, i), expected)


def test_neumf_branch_widths_by_hand():
    model = make_model("neumf-sizes")  # gmf_dim 3, mlp_dim 5
    assert model.user_repr.dim == 8 and model.branch.linears[0].in_features == 10
    u, i = torch.tensor([0, 6, 2]), torch.tensor([30, 0, 2])
    e_u, e_i = model.user_repr.embedding.weight[u], model.item_repr.embedding.weight[i]
    mlp = model.branch(torch.cat([e_u[:, 3:], e_i[:, 3:]], dim=1))
    expected = model.output(torch.cat([e_u[:, :3] * e_i[:, :3], mlp], dim=1))[:, 0]
    torch.testing.assert_close(model(u, i), expected)
    assert NeuMFConfig(3, 5, 4).gmf_dim == NeuMFConfig(3, 5, 4).mlp_dim == 4  # default: dim each


def test_neumf_from_pretrained_scores_the_alpha_mix():
    torch.manual_seed(0)
    gmf = GMF(GMFConfig(NUM_USERS, NUM_ITEMS, 3)).double()
    mlp = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, 5, hidden=(6, 4), activation="gelu")).double()
    for p in (*gmf.parameters(), *mlp.parameters()):
        torch.nn.init.normal_(p)
    u, i = torch.randint(0, NUM_USERS, (20,)), torch.randint(0, NUM_ITEMS, (20,))
    model = NeuMF.from_pretrained(gmf, mlp, alpha=0.3)
    assert (model.config.gmf_dim, model.config.mlp_dim, model.config.hidden) == (3, 5, (6, 4))
    assert model.output.weight.dtype == torch.float64
    torch.testing.assert_close(model(u, i), 0.3 * gmf(u, i) + 0.7 * mlp(u, i))
    with pytest.raises(TypeError, match="gmf: expected a rankfast.models.GMF"):
        NeuMF.from_pretrained(make_model("dot"), mlp)
    with pytest.raises(ValueError, match="alpha: expected a weight in"):
        NeuMF.from_pretrained(gmf, mlp, alpha=1.5)
    with pytest.raises(ValueError, match="mlp: has 7 users and 9 items"):
        NeuMF.from_pretrained(gmf, MLPModel(MLPConfig(NUM_USERS, 9, 5, hidden=(4,))))
    with pytest.raises(ValueError, match="mlp: from_pretrained takes models with ID embeddings"):
        NeuMF.from_pretrained(gmf, make_model("mlp-features"))


@pytest.mark.parametrize("name", ["din", "din-raw", "dot-attention", "dot-attention-raw"])
def test_attention_pooling_by_hand(name):
    """The reference forward against attention written out one history item at a time."""
    model = make_model(name).eval()
    cfg = model.config
    history, lengths = random_history(NUM_USERS, 4)
    users = torch.arange(NUM_USERS)
    items = torch.randint(0, NUM_ITEMS, (NUM_USERS,))
    got = model(users, items, history, lengths)
    for b in range(NUM_USERS):
        q = model.item_repr(items[b])
        hs = [model.item_repr(history[b, j]) for j in range(int(lengths[b]))]
        if cfg.attention == "din":
            logits = [model.unit(torch.cat([h, q, h - q, h * q]))[0] for h in hs]
        else:
            logits = [h @ q / math.sqrt(DIM) for h in hs]
        weights = torch.softmax(torch.stack(logits), 0) if (cfg.normalize and hs) else logits
        pooled = sum((w * h for w, h in zip(weights, hs, strict=True)), torch.zeros(DIM, dtype=torch.float64))
        expected = model.tower(torch.cat([model.user_repr(users[b]), pooled, q]))[0]
        torch.testing.assert_close(got[b], expected)


def test_attention_ignores_padding_values():
    model = make_model("din").eval()
    history, lengths = random_history(NUM_USERS, 5)
    users, items = torch.arange(NUM_USERS), torch.arange(NUM_USERS)
    other = history.clone()
    other[torch.arange(5) >= lengths[:, None]] = 3
    torch.testing.assert_close(model(users, items, history, lengths), model(users, items, other, lengths))


def test_attention_needs_history():
    model = make_model("din")
    with pytest.raises(ValueError, match="history"):
        model(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="history"):
        model(torch.tensor([0]), torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([1]))


@pytest.mark.parametrize("name", ["din", "dot-attention"])
def test_empty_histories_train_with_finite_gradients(name):
    model = make_model(name, dtype=torch.float32).train()
    history, lengths = random_history(NUM_USERS, 3)
    model(torch.arange(NUM_USERS), torch.arange(NUM_USERS), history, lengths).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


def test_dropout_is_active_in_training_only():
    model = make_model("mlp")
    u, i = torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long)
    trained = model.train()(u, i)
    assert (trained - trained[0]).abs().max() > 1e-3
    evaluated = model.eval()(u, i)
    torch.testing.assert_close(evaluated, evaluated[:1].expand(64))


# --- save / load -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_round_trip(tmp_path, name):
    model = make_model(name).eval()
    (tmp_path / "ids.json").write_text("keep me")
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    assert (tmp_path / "ids.json").read_text() == "keep me"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == type(model).__name__
    history, lengths = random_history(NUM_USERS, 4)
    users, items = torch.arange(NUM_USERS), torch.randint(0, NUM_ITEMS, (NUM_USERS,))
    assert torch.equal(loaded(users, items, history, lengths), model(users, items, history, lengths))
    assert torch.equal(
        type(model).load(tmp_path)(users, items, history, lengths), model(users, items, history, lengths)
    )


def test_load_wrong_model_type(tmp_path):
    make_model("dot").save(tmp_path)
    with pytest.raises(ValueError, match="DotModel"):
        MLPModel.load(tmp_path)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_load_missing_file(tmp_path, missing):
    make_model("mlp").save(tmp_path)
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        load_model(tmp_path)


def _edit_config(path, edit):
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00garbage" * 10), "safetensors"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json"),
        (lambda p: _edit_config(p, lambda m: m.update(model_type="Transformer")), "Transformer"),
        (lambda p: _edit_config(p, lambda m: m["config"].update(dim=7)), "shape"),
        (lambda p: _edit_config(p, lambda m: m["config"].update(hidden=[9])), "missing"),
        (lambda p: _edit_config(p, lambda m: m["config"].update(colour="red")), "colour"),
        (lambda p: _edit_config(p, lambda m: m["config"].update(activation="tanh")), "activation"),
        (lambda p: _edit_config(p, lambda m: m["config"].update(item_feature_dim=3)), "item_features"),
    ],
)
def test_load_corrupted(tmp_path, corrupt, match):
    make_model("mlp").save(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


@pytest.mark.parametrize("edit", ["drop", "reshape"])
def test_load_tensor_mismatch_names_the_tensor(tmp_path, edit):
    make_model("neumf").save(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if edit == "drop":
        del tensors["output.bias"]
    else:
        tensors["output.bias"] = torch.zeros(2, dtype=torch.float64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="output.bias"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "name, hybrid, match", [("dot-hybrid", False, "unexpected"), ("mlp-features", True, "missing")]
)
def test_load_checks_the_hybrid_flag_against_the_tensors(tmp_path, name, hybrid, match):
    make_model(name).save(tmp_path)
    _edit_config(tmp_path, lambda m: m["config"].update(item_hybrid=hybrid))
    with pytest.raises(ValueError, match=f"{match}.*item_repr.embedding.weight"):
        load_model(tmp_path)


def test_load_to_float32_and_feature_models(tmp_path):
    model = make_model("mlp-features", dtype=torch.float32)
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.user_repr.features.dtype == torch.float32
    assert torch.equal(loaded.item_repr.features, model.item_repr.features)
    x = torch.arange(3)
    assert torch.equal(loaded(x, x), model(x, x))
