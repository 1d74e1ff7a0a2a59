"""The field models against hand-computed references (FM terms field by field, DeepFM, DCN-v2's
cross layers, RecommenderNet's expected rating), every scoring backend with context against the
float64 forward, context checks, and saving the fields (vocabularies and tables) with a model."""

import itertools
import json

import numpy as np
import pytest
import torch

import rankfast
from rankfast.data.fields import PAD
from rankfast.models import FieldRepresentation, load_model
from rankfast.models import fields as fields_module
from rankfast.models.fields import default_context
from rankfast.scoring import BACKEND_ENV
from rankfast.scoring.backends import factorized, fused, reference

from helpers import (
    CASES,
    DIM,
    FIELDS,
    NUM_ITEMS,
    NUM_USERS,
    assert_rankings_match,
    context_rows,
    context_scores,
    make_model,
    random_features,
    random_history,
)


def field_model(name, seed=0, dtype=torch.float64):
    """``make_model(name)`` with tables from :func:`random_features` (its parameters random)."""
    base = make_model(name, seed, dtype)
    model = type(base)(base.config, features=random_features(seed))
    model.load_state_dict({k: v for k, v in base.state_dict().items() if ".tables." not in k}, strict=False)
    return model.to(dtype).eval()


def by_hand(model, embedding, field, value):
    """One field's vector computed from its table by hand: a row, the mean or sum of a bag's rows, W x."""
    if field.kind == "dense":
        return embedding.weight @ value.to(embedding.weight.dtype)
    if field.kind == "categorical":
        return embedding.weight[int(value)]
    rows = [embedding.weight[int(v)] for v in value if int(v) != PAD]
    if not rows:
        return torch.zeros(embedding.weight.shape[1], dtype=embedding.weight.dtype)
    total = sum(rows[1:], rows[0])
    return total / len(rows) if field.pooling == "mean" else total


def fields_by_hand(model, u, i, ctx):
    """Every field's vector of the pair ``(u, i)`` with context row ``ctx``, in the model's order."""
    out = [model.user_repr.embedding.weight[u]]
    for f in model.user_repr.field_list:
        out.append(
            by_hand(model, model.user_repr.fields.embeddings[f.name], f, getattr(model.user_repr.tables, f.name)[u])
        )
    for f in model.context_fields:
        out.append(by_hand(model, model.context_repr.embeddings[f.name], f, ctx[f.name]))
    out.append(model.item_repr.embedding.weight[i])
    for f in model.item_repr.field_list:
        out.append(
            by_hand(model, model.item_repr.fields.embeddings[f.name], f, getattr(model.item_repr.tables, f.name)[i])
        )
    return out


def pairs():
    users = torch.tensor([0, 3, 6, 2, 5])
    items = torch.tensor([1, 30, 7, 7, 12])
    rows = np.array([0, 5, 9, 17, 33])
    return users, items, rows


@torch.no_grad()
def test_fm_is_the_sum_of_weights_and_field_pairs():
    model = field_model("fm")
    features = random_features()
    users, items, rows = pairs()
    ctx = context_rows(features, rows)
    got = model(users, items, context=ctx)
    for b in range(len(users)):
        vectors = fields_by_hand(model, int(users[b]), int(items[b]), {k: v[b] for k, v in ctx.items()})
        assert len(vectors) == 2 + len(FIELDS)
        factors, weights = [v[:-1] for v in vectors], [v[-1] for v in vectors]
        pair_sum = sum(float(factors[f] @ factors[g]) for f, g in itertools.combinations(range(len(factors)), 2))
        expected = float(model.bias) + sum(float(w) for w in weights) + pair_sum
        assert float(got[b]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@torch.no_grad()
def test_deepfm_adds_an_mlp_over_the_concatenated_factors():
    model = field_model("deepfm")
    users, items, rows = pairs()
    ctx = context_rows(random_features(), rows)
    fm_part = rankfast.models.FMModel.forward(model, users, items, context=ctx)
    for b in range(len(users)):
        vectors = fields_by_hand(model, int(users[b]), int(items[b]), {k: v[b] for k, v in ctx.items()})
        deep = model.tower(torch.cat([v[:-1] for v in vectors]))[0]
        assert float(model(users, items, context=ctx)[b]) == pytest.approx(float(fm_part[b] + deep), rel=1e-12)


@torch.no_grad()
def test_dcn_v2_cross_layers_by_hand():
    model = field_model("dcn")
    users, items, rows = pairs()
    ctx = context_rows(random_features(), rows)
    got = model(users, items, context=ctx)
    for b in range(len(users)):
        x0 = torch.cat(fields_by_hand(model, int(users[b]), int(items[b]), {k: v[b] for k, v in ctx.items()}))
        x = x0.clone()
        for layer in model.cross:
            x = x0 * (layer.weight @ x + layer.bias) + x
        head = torch.cat([x, model.tower(x0)])
        assert float(got[b]) == pytest.approx(float(model.output.weight[0] @ head + model.output.bias[0]), rel=1e-12)


@torch.no_grad()
def test_side_fields_fold_into_the_ids_vectors():
    model = field_model("din-fields")
    assert isinstance(model.item_repr, FieldRepresentation) and isinstance(model.user_repr, FieldRepresentation)
    items = torch.tensor([0, 4, 30])
    expected = model.item_repr.embedding.weight[items] + model.item_repr.field_vectors(items).sum(-2)
    torch.testing.assert_close(model.item_repr(items), expected)
    genres = model.item_repr.fields.embeddings["genres"].weight
    bag = model.item_repr.tables.genres[4]
    valid = bag[bag != PAD]
    by_hand = genres[valid].mean(0) if len(valid) else torch.zeros(DIM, dtype=genres.dtype)
    torch.testing.assert_close(model.item_repr.field_vectors(items)[1, 0], by_hand)
    torch.testing.assert_close(model.item_repr.all()[items], model.item_repr(items))


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("multi_hot", [True, False], ids=["multi-hot", "embedding_bag"])
def test_both_bag_poolings_match_a_hand_computation_with_gradients(pooling, multi_hot, monkeypatch):
    """A small table pools by a multi-hot matmul on a CPU, a large one through embedding_bag
    (``pool_bags``): both give each bag's mean or sum, zero for an empty bag, and no gradient
    to the padding row."""
    monkeypatch.setattr(fields_module, "MULTI_HOT_MAX_ROWS", 1 << 30 if multi_hot else 0)
    torch.manual_seed(0)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)  # 5 rows, then the padding's
    bags = torch.tensor([[[0, 4, 4], [2, PAD, PAD]], [[PAD, PAD, PAD], [1, 3, 0]]])
    pooled = fields_module.pool_bags(bags, weight, pooling)
    expected = torch.zeros(2, 2, 3, dtype=torch.float64)
    for i, j in itertools.product(range(2), range(2)):
        valid = [int(v) for v in bags[i, j] if int(v) != PAD]
        if valid:
            expected[i, j] = weight.detach()[valid].sum(0) / (len(valid) if pooling == "mean" else 1)
    torch.testing.assert_close(pooled, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(2, 2, 3, dtype=torch.float64)
    (pooled * upstream).sum().backward()
    grad = torch.zeros_like(weight)
    for i, j in itertools.product(range(2), range(2)):
        valid = [int(v) for v in bags[i, j] if int(v) != PAD]
        for v in valid:
            grad[v] += upstream[i, j] / (len(valid) if pooling == "mean" else 1)
    torch.testing.assert_close(weight.grad, grad, rtol=1e-12, atol=1e-12)
    assert not weight.grad[-1].any()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # pooled in the table's dtype, as embedding_bag pools
        assert fields_module.pool_bags(bags, weight.float(), pooling).dtype == torch.float32


@torch.no_grad()
def test_recommender_net_scores_the_expected_rating():
    model = field_model("recnet")
    users, items, _ = pairs()
    logits = model.class_logits(users, items)
    assert logits.shape == (len(users), 4)
    expected = (torch.softmax(logits, -1) * torch.tensor([1.0, 2.0, 3.0, 4.5], dtype=logits.dtype)).sum(-1)
    torch.testing.assert_close(model(users, items), expected)
    assert model.class_index(torch.tensor([4.5, 1.0, 3.0])).tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match=r"train: row 1: rating 2.5 is not one of the model's rating classes"):
        model.class_index(torch.tensor([1.0, 2.5]), where="train")


@torch.no_grad()
def test_no_context_is_the_out_of_vocabulary_context():
    model = field_model("deepfm")
    users, items, _ = pairs()
    oov = default_context(model.context_fields, len(users), "cpu")
    torch.testing.assert_close(model(users, items), model(users, items, context=oov))


BACKENDS = {"reference": reference, "factorized": factorized, "fused": fused}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", ["fm", "deepfm", "dcn", "din-fields", "recnet"])
def test_every_backend_scores_field_models_with_context(backend, name, monkeypatch):
    dtype = torch.float32 if backend == "fused" else torch.float64
    model = field_model(name, dtype=dtype)
    monkeypatch.setenv(BACKEND_ENV, backend)
    assert BACKENDS[backend].scorer_for(model) is not None
    users = torch.tensor([3, 0, 6, 6, 1])
    history, lengths = random_history(len(users), 4) if model.uses_history else (None, None)
    ctx = context_rows(random_features(), np.array([4, 8, 15, 16, 23])) if model.uses_context else None
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    gen = torch.Generator().manual_seed(3)
    for items in (
        None,
        torch.tensor([4, 17, 4, 30, 0, 9]),
        torch.randint(0, NUM_ITEMS, (len(users), 7), generator=gen),
    ):
        cand = torch.arange(NUM_ITEMS) if items is None else items
        if ctx is None:
            want = _with_context_free(model, users, cand, history, lengths)
        else:
            want = context_scores(model, users, cand, ctx)
        for budget in (rankfast.scoring.DEFAULT_MEMORY_BUDGET, 3000):
            got = rankfast.score(
                model, users, items, history=history, lengths=lengths, context=ctx, memory_budget=budget
            )
            assert float((got.double() - want).norm() / want.norm()) < tolerance
        ids, values = rankfast.score(model, users, items, k=3, history=history, lengths=lengths, context=ctx)
        for row in range(len(users)):
            order = torch.argsort(-want[row], stable=True)[:3]
            assert_rankings_match(
                ids[row].tolist(),
                values[row].double().numpy(),
                cand.expand(len(users), -1)[row, order].tolist(),
                want[row, order].numpy(),
                rtol=tolerance,
                atol=1e-6,
            )


def _with_context_free(model, users, cand, history, lengths):
    from helpers import reference_scores

    return reference_scores(model, users, cand, history, lengths)


@pytest.mark.parametrize("name", ["fm", "deepfm"])
def test_fused_model_scores_cover_fm_and_deepfm(name):
    """``fused.model_scores`` (one op call, what ``training_scores`` runs on) of FM and DeepFM
    without a request context (the default context) against the float64 forward: the FM
    adapter feeds ``mlp_score``'s GMF slot, as it does for ``rankfast.score``."""
    from helpers import reference_scores

    model = field_model(name, dtype=torch.float32)
    users = torch.tensor([3, 0, 6])
    gen = torch.Generator().manual_seed(5)
    for items in (torch.tensor([4, 17, 4, 0]), torch.randint(0, NUM_ITEMS, (len(users), 5), generator=gen)):
        want = reference_scores(model, users, items)
        with torch.no_grad():
            got = fused.model_scores(model, users, items, precision="ieee")
        assert float((got.double() - want).norm() / want.norm()) < 1e-4


def test_context_is_checked_by_field_name():
    model = field_model("fm")
    ctx = context_rows(random_features(), np.arange(2))
    with pytest.raises(ValueError, match=r"context: no values for the context fields \['moods'\]"):
        rankfast.score(model, [0, 1], context={k: v for k, v in ctx.items() if k != "moods"})
    with pytest.raises(ValueError, match=r"context: \['weather'\] are not context fields of the model"):
        rankfast.score(model, [0, 1], context={**ctx, "weather": [1, 2]})
    with pytest.raises(ValueError, match=r"context: field 'hour': row 1: \[25\] outside the field's 25 rows"):
        rankfast.score(model, [0, 1], context={**ctx, "hour": torch.tensor([3, 25])})
    with pytest.raises(ValueError, match=r"context: field 'temperature': row 0: not a finite number"):
        rankfast.score(model, [0, 1], context={**ctx, "temperature": torch.tensor([[float("nan")], [1.0]])})
    with pytest.raises(
        ValueError, match=r"context: field 'moods' \(context multi\) needs int64 values of shape \(2, 2\)"
    ):
        rankfast.score(model, [0, 1], context={**ctx, "moods": torch.zeros(2, 5, dtype=torch.int64)})


def test_field_models_need_fitted_fields_and_matching_features():
    cls, config_cls, fields = CASES["deepfm"]
    with pytest.raises(ValueError, match="field 'genres' is not fitted"):
        config_cls(NUM_USERS, NUM_ITEMS, DIM, fields=[rankfast.data.Field("genres", "item", "multi")])
    other = random_features()
    with pytest.raises(ValueError, match="the model has buckets=7, the data buckets=5"):
        bigger = tuple(f if f.name != "year" else rankfast.data.Field("year", "item", buckets=7) for f in FIELDS)
        cls(config_cls(NUM_USERS, NUM_ITEMS, DIM, fields=bigger), features=other)
    with pytest.raises(ValueError, match=r"MLPModel reads no context fields, and \['hour', 'moods', 'temperature'\]"):
        CASES["mlp"][0](CASES["mlp"][1](NUM_USERS, NUM_ITEMS, DIM, fields=FIELDS))


def test_fields_are_saved_with_the_model(tmp_path):
    model = field_model("deepfm")
    model.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["config"]
    assert [f["name"] for f in config["fields"]] == [f.name for f in FIELDS]
    assert config["fields"][0]["vocab"] == ["20s", "30s", "40s"]
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded.item_repr.tables.genres, model.item_repr.tables.genres)
    users, items, rows = pairs()
    ctx = context_rows(random_features(), rows)
    torch.testing.assert_close(loaded(users, items, context=ctx), model(users, items, context=ctx), rtol=0, atol=0)


def test_a_stored_table_outside_its_vocabulary_is_an_error_naming_the_field(tmp_path):
    from safetensors.torch import load_file, save_file

    field_model("fm").save(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["item_repr.tables.year"][3] = 6  # year has 5 buckets: rows 0..5
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"item_repr.tables: field 'year': row 3: \[6\] outside the field's 6 rows"):
        load_model(tmp_path)
