"""Peak memory of one call, for benchmarks (``extra_info["peak_mem_bytes"]``).

CUDA: the allocator's peak above what was allocated before the call.
CPU (Linux): the process's peak resident set (VmHWM) above its resident set
before the call; writing "5" to /proc/self/clear_refs resets VmHWM first, and
free heap memory is handed back to the OS (malloc_trim) so that reused pages
are counted too. The CPU figure includes anything else the process touches
meanwhile, so measure with nothing else running in it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch


def peak_memory(fn, device) -> tuple[object, int]:
    """Runs ``fn()`` once; returns its result and the peak extra bytes it used on ``device``."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"device: peak memory is measured on cpu or cuda, got {device}")
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_heap():
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
