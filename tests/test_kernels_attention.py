"""Fused target-attention scoring (kernels/target_attention.py) against the float64 reference model.

Runs under TRITON_INTERPRET=1 on a CPU (tiny sizes) and unchanged on a GPU.
Histories are ragged: empty rows, length 1, full rows, lengths that are not
multiples of the history block.
"""

import copy

import pytest
import torch

from rankfast.kernels import target_attention as ta
from rankfast.models import AttentionConfig, AttentionModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_USERS, NUM_ITEMS, DIM, MAX_LEN = 9, 41, 12, 21


def rel_err(got, expected):
    return float((got.detach().double() - expected.detach()).norm() / expected.detach().norm())


def make(seed=0, **cfg):
    torch.manual_seed(seed)
    model = AttentionModel(AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(DEVICE).eval()


def reference(model64, users, items, history, lengths):
    """The model's own forward over expanded aligned pairs (float64)."""
    b = users.shape[0]
    if items.dim() == 1:
        items = items.expand(b, -1)
    n = items.shape[1]

    def rep(t):
        return t[:, None].expand(b, n, *t.shape[1:]).reshape(b * n, *t.shape[1:])

    with torch.no_grad():
        return model64(rep(users), items.reshape(-1), rep(history), rep(lengths)).view(b, n)


def inputs(b=5, n=37, per_user=False, lengths=(0, 21, 5, 16, 1), max_len=MAX_LEN, seed=1):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, NUM_USERS, (b,), generator=g)
    history = torch.randint(0, NUM_ITEMS, (b, max_len), generator=g)
    lengths = torch.tensor(lengths[:b])
    history[torch.arange(max_len) >= lengths[:, None]] = -7  # padding values are ignored
    if per_user:
        items = torch.randint(0, NUM_ITEMS, (b, n), generator=g)
    else:
        items = torch.randperm(NUM_ITEMS, generator=g)[:n]
    return [t.to(DEVICE) for t in (users, items, history, lengths)]


CONFIGS = [
    dict(hidden=(40, 24), unit_hidden=(20, 10)),
    dict(hidden=(40,), unit_hidden=(20,), normalize=False, activation="gelu"),
    dict(hidden=(33, 24, 20), unit_hidden=(20, 10, 9), activation="silu"),
    dict(hidden=(40, 24, 20, 17), unit_hidden=(18, 10)),
    dict(hidden=(40, 24), attention="dot"),
    dict(hidden=(24,), attention="dot", normalize=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("per_user", [False, True])
def test_matches_float64_reference(cfg, per_user):
    model = make(**cfg)
    users, items, history, lengths = inputs(n=13 if per_user else 37, per_user=per_user)
    with torch.no_grad():
        got = ta.model_scores(model, users, items, history, lengths, precision="ieee")
    expected = reference(copy.deepcopy(model).double(), users, items, history, lengths)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("b,n,lengths,max_len", [
    (1, 1, (0,), 3),  # one user, one candidate, empty history
    (2, 1, (1, 0), 1),  # length-1 history
    (3, 5, (0, 0, 0), 4),  # nobody has history: pooled = 0
    (2, 3, (0, 0), 0),  # L = 0
    (2, 20, (17, 2), 17),  # more candidates than one tile
])
def test_awkward_shapes(b, n, lengths, max_len):
    model = make(hidden=(24, 16), unit_hidden=(20,))
    users, items, history, lengths = inputs(b, n, lengths=lengths, max_len=max_len)
    with torch.no_grad():
        got = ta.model_scores(model, users, items, history, lengths, precision="ieee")
    expected = reference(copy.deepcopy(model).double(), users, items, history, lengths)
    assert rel_err(got, expected) < 1e-4


def test_every_item_and_per_user_table_path():
    model = make(hidden=(24, 16), unit_hidden=(20, 10))
    model64 = copy.deepcopy(model).double()
    users, _, history, lengths = inputs(b=3, lengths=(4, 0, 21))
    with torch.no_grad():
        got = ta.model_scores(model, users, None, history, lengths, precision="ieee")
    all_items = torch.arange(NUM_ITEMS, device=DEVICE)
    assert rel_err(got, reference(model64, users, all_items, history, lengths)) < 1e-4
    items = torch.randint(0, NUM_ITEMS, (3, 20), device=DEVICE)  # 60 >= 41: indexes the item table
    with torch.no_grad():
        got = ta.model_scores(model, users, items, history, lengths, precision="ieee")
    assert rel_err(got, reference(model64, users, items, history, lengths)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attention", ["din", "dot"])
def test_half_precision_within_design_tolerance(dtype, attention):
    model = make(hidden=(40, 24), unit_hidden=(20, 10), attention=attention)
    users, items, history, lengths = inputs()
    with torch.no_grad():
        got = ta.model_scores(copy.deepcopy(model).to(dtype), users, items, history, lengths)
    assert got.dtype == dtype
    assert rel_err(got, reference(copy.deepcopy(model).double(), users, items, history, lengths)) < 2e-2


def test_tf32_default_within_design_tolerance():
    model = make(hidden=(40, 24), unit_hidden=(20, 10))
    users, items, history, lengths = inputs()
    with torch.no_grad():
        got = ta.model_scores(model, users, items, history, lengths)
    assert rel_err(got, reference(copy.deepcopy(model).double(), users, items, history, lengths)) < 1e-3


def test_no_backward_yet_is_an_error_not_a_wrong_gradient():
    model = make(hidden=(24,), unit_hidden=(20,))
    users, items, history, lengths = inputs(b=2, n=3, lengths=(3, 0))
    scores = ta.model_scores(model, users, items, history, lengths)
    with pytest.raises(RuntimeError, match="(?i)autograd"):
        scores.sum().backward()


def test_inputs_are_checked():
    model = make(hidden=(24,), unit_hidden=(20,))
    users, items, history, lengths = inputs(b=2, n=3, lengths=(3, 0))
    with pytest.raises(ValueError, match="lengths"):
        ta.model_scores(model, users, items, history, torch.tensor([3, 99], device=DEVICE))
    with pytest.raises(ValueError, match="history"):
        ta.model_scores(model, users, items, history[:1], lengths)
    with pytest.raises(ValueError, match="items"):
        ta.model_scores(model, users, torch.tensor([0, 99], device=DEVICE), history, lengths)
    bad = history.clone()
    bad[0, 0] = NUM_ITEMS  # a valid position (length 3)
    with pytest.raises(ValueError, match="history"):
        ta.model_scores(model, users, items, bad, lengths)
    with pytest.raises(TypeError, match="AttentionModel"):
        ta.model_scores(torch.nn.Linear(2, 2), users, items, history, lengths)
    assert not ta.supports(AttentionModel(AttentionConfig(3, 3, 4, hidden=())))
    assert not ta.supports(AttentionModel(AttentionConfig(3, 3, 4, unit_hidden=())))
    assert ta.supports(AttentionModel(AttentionConfig(3, 3, 4, unit_hidden=(), attention="dot")))


def test_op_fake_and_tracing():
    model = make(hidden=(24, 16), unit_hidden=(20, 10))
    users, items, history, lengths = inputs(b=3, n=7, lengths=(4, 0, 21))
    args, kw = ta.model_inputs(model, users, items, history, lengths)
    detached = [t.detach() for t in args]
    op_args = (detached[0], kw["ht"].detach(), detached[1], detached[2], kw["qt"].detach(), detached[3], None,
               kw["wx"].detach(), [w.detach() for w in kw["unit_weights"]], [b.detach() for b in kw["unit_biases"]],
               kw["unit_w_out"].detach(), kw["unit_b_out"].detach(), detached[4], detached[5],
               [w.detach() for w in kw["weights"]], [b.detach() for b in kw["biases"]], kw["w_out"].detach(),
               kw["b_out"].detach(), "din", True, 1.0, "relu", "ieee")
    torch.library.opcheck(torch.ops.rankfast.target_attention_score.default, op_args,
                          test_utils=("test_schema", "test_faketensor"))

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, users, items, history, lengths):
            return ta.model_scores(self.model, users, items, history, lengths, precision="ieee")

    scorer = Scorer()
    with torch.no_grad():
        expected = scorer(users, items, history, lengths)
        compiled = torch.compile(scorer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(users, items, history, lengths), expected)
    exported = torch.export.export(scorer, (users, items, history, lengths))
    assert any("rankfast.target_attention_score" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(users, items, history, lengths), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compile_on_gpu(dtype):
    model = make(hidden=(64, 32), unit_hidden=(80, 40)).to(dtype)
    users, items, history, lengths = inputs()
    with torch.no_grad():
        eager = ta.model_scores(model, users, items, history, lengths)
        compiled = torch.compile(lambda *a: ta.model_scores(model, *a), fullgraph=True)
        torch.testing.assert_close(compiled(users, items, history, lengths), eager)
