"""rankfast._io: atomic file and directory writes, their permissions, and the clean-up of
what killed writers leave behind."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from rankfast._io import atomic_dir, atomic_file
from rankfast.encoders import EmbeddingCache
from rankfast.models import DotConfig, DotModel
from rankfast.train import load_checkpoint, save_checkpoint


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"  # missing parents are made
    with atomic_file(path) as tmp:
        assert os.path.basename(tmp) == "out.txt" and not os.path.exists(path)
        with open(tmp, "w") as f:
            f.write("one")
    assert path.read_text() == "one"
    with pytest.raises(OSError, match="disk full"), atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("tw")
        raise OSError("disk full")
    assert path.read_text() == "one" and os.listdir(path.parent) == ["out.txt"]


def test_atomic_dir_replaces_or_leaves_the_old_directory(tmp_path):
    path = tmp_path / "d"
    for content in ("one", "two"):
        with atomic_dir(path) as tmp:
            (tmp_path / tmp / "f").write_text(content)
        assert (path / "f").read_text() == content and os.listdir(tmp_path) == ["d"]
    with pytest.raises(ValueError, match="broken"), atomic_dir(path) as tmp:
        (tmp_path / tmp / "f").write_text("three")
        raise ValueError("broken")
    assert (path / "f").read_text() == "two" and os.listdir(tmp_path) == ["d"]


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_one_permissions_policy_whatever_the_writer(tmp_path, umask, file_mode, dir_mode):
    """Every writer's output gets the umask's modes: safetensors (0600 by itself),
    torch.save, torch.export, the JSON writers."""
    old = os.umask(umask)
    try:
        model = DotModel(DotConfig(num_users=3, num_items=4, dim=2))
        model.save(tmp_path / "model")
        save_checkpoint({"epoch": 1}, tmp_path / "ck.pt")
        with atomic_dir(tmp_path / "tree") as tmp:
            os.makedirs(os.path.join(tmp, "sub"), mode=0o700)
            with open(os.path.join(tmp, "sub", "x"), "w") as f:
                f.write("x")
            os.chmod(os.path.join(tmp, "sub", "x"), 0o400)
    finally:
        os.umask(old)
    files = ["model/config.json", "model/model.safetensors", "ck.pt", "tree/sub/x"]
    assert {name: os.stat(tmp_path / name).st_mode & 0o777 for name in files} == dict.fromkeys(files, file_mode)
    assert {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("tree", "tree/sub")} == dict.fromkeys(
        ("tree", "tree/sub"), dir_mode
    )
    assert load_checkpoint(tmp_path / "ck.pt") == {"epoch": 1}


def test_embedding_cache_writes_through_atomic_file(tmp_path, monkeypatch, umask_022):
    class Encoder:
        dim = 2

        def identity(self):
            return "e" * 64

        def encode(self, texts, **kwargs):
            return torch.ones(len(texts), 2)

    cache = EmbeddingCache(tmp_path / "cache")
    cache.encode(Encoder(), ["a", "b"], progress=False)
    (name,) = os.listdir(tmp_path / "cache")
    assert os.stat(tmp_path / "cache" / name).st_mode & 0o777 == 0o644
    assert EmbeddingCache(tmp_path / "cache").encode(Encoder(), ["b"], progress=False).tolist() == [[1.0, 1.0]]


WRITER = """
import sys, time
from rankfast._io import atomic_dir, atomic_file
with (atomic_dir if sys.argv[1] == "dir" else atomic_file)(sys.argv[2]) as tmp:
    if sys.argv[1] == "dir":
        open(tmp + "/big", "wb").write(b"x" * 100000)
    else:
        open(tmp, "wb").write(b"x" * 100000)
    print("writing", flush=True)
    time.sleep(120)
"""


def write(kind, target):
    if kind == "dir":
        with atomic_dir(target):
            pass
    else:
        with atomic_file(target) as tmp:
            open(tmp, "w").close()


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_writers_scratch_is_removed_by_the_next_write_only(tmp_path, kind):
    """While a writer lives, other writes of the same path leave its scratch directory
    alone; once it is SIGKILLed, the next write removes it."""
    target = tmp_path / "target"
    child = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
        (scratch,) = [name for name in os.listdir(tmp_path) if name.startswith(".target.")]
        write(kind, target)
        assert sorted(os.listdir(tmp_path)) == sorted([scratch, "target"])  # a live write's scratch stays
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert scratch in os.listdir(tmp_path)
    write(kind, target)
    assert os.listdir(tmp_path) == ["target"]
