"""Test setup: Triton kernels run under the interpreter when no GPU is present,
and MovieLens is read from a local copy or the tests that need it skip.

TRITON_INTERPRET must be set before anything imports triton, so this runs at
conftest import time, before test modules are collected.
"""

import os
from pathlib import Path

import pytest
import torch

from rankfast import datasets

# Tests never download: they read MovieLens from $RANKFAST_DATA when it is set, else from
# the copy kept beside the checkout (../shared/data/<name>/ratings.csv) when there is one.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get(datasets.DATA_ENV) and SHARED_DATA.is_dir():
    os.environ[datasets.DATA_ENV] = str(SHARED_DATA)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ml_latest_small():
    """ml-latest-small from the data home, never downloaded: skips when it is not there."""
    try:
        return datasets.load("ml-latest-small", download=False)
    except FileNotFoundError as err:
        pytest.skip(f"MovieLens is not available locally: {err}")
