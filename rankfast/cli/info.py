"""``rankfast info``: versions, devices and which backends are active."""

from __future__ import annotations

import importlib
import json
import os
import platform

import rankfast
from rankfast.cli import add_command


def collect() -> dict:
    import numpy
    import torch

    from rankfast.scoring import BACKEND_ENV

    triton_version, kernels = None, "inactive (no CUDA device; CPU tensors use the factorized path)"
    try:
        import triton

        triton_version = triton.__version__
        # Not `import rankfast.kernels...`: that would make `rankfast` a local name here,
        # unbound below whenever triton is missing.
        importlib.import_module("rankfast.scoring.backends.fused")
    except ImportError as err:
        kernels = f"unavailable ({err})"
    else:
        if torch.cuda.is_available():
            kernels = "active for CUDA tensors"
    cuda = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "rankfast": rankfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "cuda": {"available": bool(cuda), "version": torch.version.cuda, "devices": cuda},
        "cpp_extension": rankfast.extension_available(),
        "triton_kernels": kernels,
        "backend": os.environ.get(BACKEND_ENV) or "auto",
    }


def run_info(args):
    from rankfast.scoring import BACKEND_ENV

    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    cuda = facts["cuda"]
    lines = [
        f"rankfast {facts['rankfast']} (python {facts['python']}, torch {facts['torch']}, numpy {facts['numpy']}, "
        f"triton {facts['triton'] or 'not installed'})",
        f"CPU: {facts['cpu_threads']} torch threads",
        f"CUDA: {', '.join(cuda['devices']) if cuda['available'] else 'no device'}"
        + (f" (CUDA {cuda['version']})" if cuda["version"] else ""),
        "C++ top-K extension: " + ("active" if facts["cpp_extension"] else "missing (torch fallback, slower)"),
        f"Triton kernels: {facts['triton_kernels']}",
        f"scoring backend ({BACKEND_ENV}): {facts['backend']}",
    ]
    print("\n".join(lines))


def add_parsers(sub):
    p = add_command(sub, "info")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(run=run_info)
