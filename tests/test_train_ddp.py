"""A real 2-process DistributedDataParallel run on the CPU (gloo), under torchrun."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rankfast.data import Interactions
from rankfast.models import DotConfig, DotModel
from rankfast.train import TrainConfig, fit, load_checkpoint

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_train_ddp import CONFIG, data, model
    from rankfast.train import TrainConfig, fit

    out, rank = sys.argv[1], int(os.environ["RANK"])
    torch.manual_seed(rank)  # different replicas before DDP: it must broadcast rank 0's weights
    net = model(seed=rank)
    config = {**CONFIG, **json.loads(os.environ["EXTRA_CONFIG"])}
    history = fit(net, data(), TrainConfig(checkpoint_dir=os.path.join(out, "ckpt"), **config), valid=data())
    torch.save(net.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"history{rank}.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "seconds"} for r in history], f)
    """
)

# MSE and the full softmax draw no negatives, so 2 ranks x 16 per micro-batch see
# exactly the examples of one 32-example batch, and plain SGD must then give the same weights.
CONFIG = {"epochs": 2, "batch_size": 16, "loss": "mse", "optimizer": "sgd", "lr": 0.05, "progress": False}


def data():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, size=256)
    items = rng.integers(0, 20, size=256)
    return Interactions.from_raw(users, items, (users % 3 + items % 2).astype(float), np.arange(256))


def model(seed):
    torch.manual_seed(seed)
    d = data()
    return DotModel(DotConfig(num_users=d.num_users, num_items=d.num_items, dim=8))


@pytest.mark.parametrize("extra", [{}, {"loss": "softmax", "negatives": "all"}], ids=["mse", "full_softmax"])
def test_two_process_ddp_keeps_replicas_identical(tmp_path, extra):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "TEST_DIR": str(Path(__file__).parent),
        "OMP_NUM_THREADS": "1",
        "EXTRA_CONFIG": json.dumps(extra),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    histories = [json.loads((tmp_path / f"history{r}.json").read_text()) for r in (0, 1)]
    metric = "ndcg@20" if extra else "rmse"
    assert histories[0] == histories[1] and len(histories[0]) == 2 and metric in histories[0][-1]

    # Rank 0 wrote the checkpoint, holding both ranks' RNG states.
    state = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["torch_rng"]) == 2
    assert (tmp_path / "ckpt" / "model" / "model.safetensors").exists()

    # Same as one process on 32-example batches from rank 0's initial weights.
    single = model(seed=0)
    fit(single, data(), TrainConfig(**{**CONFIG, **extra, "batch_size": 32}), valid=data())  # same best-epoch restore
    for name, value in single.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        rank0["user_repr.embedding.weight"], model(seed=0).state_dict()["user_repr.embedding.weight"]
    )
