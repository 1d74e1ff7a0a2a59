"""The GPU tooling, checked on a CPU so that it cannot rot: the static kernel report's rules
(bench/kernel_report.py compiles the kernels for an H200, sm_90a, without a GPU) and the GPU
probe (bench/gpu_check.sh) at toy sizes under Triton's interpreter."""

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"

KERNELS = {
    "_mlp_fwd_kernel",
    "_mlp_topk_kernel",
    "_mlp_bwd_kernel",
    "_cross_fwd_kernel",
    "_rating_fwd_kernel",
    "_attn_fwd_kernel",
    "_attn_topk_kernel",
    "_attn_bwd_tail_kernel",
    "_attn_bwd_hist_kernel",
}


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled NVIDIA tools are not installed")
def test_dispatchable_configs_compile_for_sm90a_without_spills_atomics_or_non_wgmma_pair_layers(tmp_path):
    """Every config the autotuners can pick for the benchmark shapes (bench/bench_kernels.py),
    compiled for sm_90a: no spills, shared memory within the H200's, pair-layer dots on wgmma
    (``--check``), and no atomics at all (the backward kernels accumulate into owned slots)."""
    out = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run(
        [sys.executable, "bench/kernel_report.py", "--check", "--jobs", "2", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-6000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        name = f"{r['case']} / {r['kernel']} [{r['config']}]"
        assert r["spill_stores"] == r["spill_loads"] == 0, name
        assert not r["atomics"] and r["sass"]["ATOMG"] == r["sass"]["RED"] == 0, name
        assert r["dots"] and all(d["kind"] == "wgmma" for d in r["dots"]), name


def test_gpu_check_runs_every_phase_at_toy_sizes(tmp_path):
    """bash bench/gpu_check.sh with BENCH_SMALL=1: every timed phase runs (interpreter, toy sizes,
    one case and one implementation of each kind), its rows are kept and the results file lists
    them, the targets and the decisions."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = dict(os.environ, BENCH_SMALL="1", RESULTS_DIR=str(tmp_path), BUDGET="1800", PYTHON=sys.executable)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if torch.cuda.is_available():
        pytest.skip("the toy run is the CPU check; on a GPU run bench/gpu_check.sh itself")
    run = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    report = (tmp_path / f"{date}-cpu-interpreter.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / f"{date}-cpu-interpreter.jsonl").read_text().splitlines()]
    groups = {r["group"].split(" B=")[0] for r in rows}
    assert groups == {"mlp bf16", "mlp fp32", "din bf16", "score+topk mlp bf16", "train mlp bf16", "train din bf16"}
    assert {r["extra_info"]["impl"] for r in rows} >= {"rankfast", "eager-split", "torch.compile-split-max"}
    assert all(r["extra_info"]["gpu_ms"] > 0 for r in rows)
    for heading in ("## rankfast against the best PyTorch", "## Targets (issue 18)", "## Decisions", "## Every row"):
        assert heading in report
    assert "no repeated item" in report
    assert "DECISION:" in run.stdout
