"""The GPU probe's results file: ``bench/bench_kernels.py`` JSON -> markdown, targets and decisions.

For every case: rankfast against the best PyTorch row (the fastest of eager,
eager-split and torch.compile of both, default and max-autotune), in
end-to-end call time (pytest-benchmark's median, synchronised per call) and in
GPU time (CUDA events over back-to-back calls); peak memory; the pair layers'
TFLOP/s and fraction of the measured bf16 matmul ceiling. Then issue 18's
targets (met, missed, or not measured in this run) and the decision each
measured phase supports.

    python bench/probe_report.py ROWS.jsonl|RUN.json [...] --out bench/results/<date>-<gpu>.md \\
        [--title ...] [--note "..."]

Also used by ``bench/gpu_check.sh`` after every phase, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from importlib import metadata
from pathlib import Path

#: The PyTorch rows of bench_kernels.py ("best PyTorch" is the fastest of them).
PYTORCH = (
    "eager",
    "eager-split",
    "torch.compile",
    "torch.compile-split",
    "torch.compile-max",
    "torch.compile-split-max",
)


def environment(machine_info: dict) -> list[str]:
    """The machine and versions, without importing torch (this runs after every phase)."""

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = machine_info.get("cpu", {})
    lines = [f"- CPU: {cpu.get('brand_raw', platform.machine())}, {cpu.get('count', '?')} logical cores"]
    gpu = _command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if gpu:
        lines.append(f"- GPU: {gpu.splitlines()[0]}")
    names = ("torch", "triton", "numpy", "pytest-benchmark")
    lines.append(f"- Versions: Python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names))
    commit = _command(["git", "rev-parse", "--short", "HEAD"])
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"])
    if commit:
        lines.append(f"- rankfast commit: {commit}" + (" (with uncommitted changes)" if dirty else ""))
    return lines


def _command(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load(paths) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` from pytest-benchmark JSON files or ``BENCH_ROWS`` JSON-lines files."""
    meta, rows = {}, []
    for path in paths:
        text = Path(path).read_text()
        if str(path).endswith(".jsonl"):
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
        elif text.strip():
            run = json.loads(text)
            meta = meta or run
            rows += run.get("benchmarks", [])
    if not meta:
        cpu = {"brand_raw": platform.processor() or platform.machine(), "count": os.cpu_count()}
        meta = {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(), "machine_info": {"cpu": cpu}}
    return meta, rows


def by_case(benchmarks) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        cases[b["group"]][b["extra_info"]["impl"]] = b
    return cases


def wall(b) -> float:
    return b["stats"]["median"] * 1e3


def gpu(b) -> float | None:
    return b["extra_info"].get("gpu_ms")


def mib(b):
    peak = b["extra_info"].get("peak_mem_bytes")
    return None if peak is None else peak / 2**20


def best_pytorch(rows: dict, key=wall):
    """``(impl, row)`` of the fastest PyTorch implementation measured, or None."""
    measured = [(key(rows[name]), name) for name in PYTORCH if name in rows and key(rows[name]) is not None]
    if not measured:
        return None
    name = min(measured)[1]
    return name, rows[name]


def _ms(x):
    return "-" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def _ratio(a, b):
    return "-" if a is None or b is None or not b else f"{a / b:.2f}x"


def summary(cases) -> list[str]:
    lines = [
        "| case | rankfast ms (GPU ms) | best PyTorch, wall | ms (GPU ms) | speedup wall | speedup GPU "
        "| rankfast / best-PyTorch / eager peak MiB | rankfast TFLOP/s (of ceiling) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, rows in cases.items():
        ours = rows.get("rankfast")
        best = best_pytorch(rows)
        best_gpu = best_pytorch(rows, gpu)
        if ours is None or best is None:
            continue
        name, row = best
        e = ours["extra_info"]
        frac = e.get("ceiling_fraction")
        roof = "-" if "tflops" not in e else f"{e['tflops']:.0f}" + (f" ({frac:.1%})" if frac else "")
        peaks = " / ".join(_ms(mib(r)) if r is not None else "-" for r in (ours, row, rows.get("eager")))
        lines.append(
            f"| {case} | {_ms(wall(ours))} ({_ms(gpu(ours))}) | {name} | {_ms(wall(row))} ({_ms(gpu(row))}) | "
            f"{_ratio(wall(row), wall(ours))} | {_ratio(gpu(best_gpu[1]) if best_gpu else None, gpu(ours))} | "
            f"{peaks} | {roof} |"
        )
    return lines


def details(cases) -> list[str]:
    lines = [
        "| case | impl | wall median ms | GPU ms | rankfast speedup (wall) | peak MiB | TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, rows in cases.items():
        ours = rows.get("rankfast")
        for name, b in rows.items():
            tf = b["extra_info"].get("tflops")
            speed = _ratio(wall(b), wall(ours)) if ours is not None and name != "rankfast" else "-"
            lines.append(
                f"| {case} | {name} | {_ms(wall(b))} | {_ms(gpu(b))} | {speed} | {_ms(mib(b))} | "
                + ("-" if tf is None else f"{tf:.1f}")
                + " |"
            )
    return lines


def _find(cases, prefix):
    for case, rows in cases.items():
        if case.startswith(prefix):
            return rows
    return None


def _speedup(rows, against="best"):
    """rankfast's end-to-end speedup over the best PyTorch row (or over ``against``)."""
    if rows is None or "rankfast" not in rows:
        return None
    if against == "best":
        best = best_pytorch(rows)
        return None if best is None else wall(best[1]) / wall(rows["rankfast"])
    return wall(rows[against]) / wall(rows["rankfast"]) if against in rows else None


def targets(cases) -> tuple[list[str], list[str]]:
    """Issue 18's targets as table lines, and the decisions the measured rows support."""
    lines = ["| target | measured | |", "|---|---|---|"]
    decisions = []

    def row(target, value, ok):
        verdict = "not measured in this run" if value is None else ("met" if ok else "missed")
        lines.append(f"| {target} | {'-' if value is None else value} | {verdict} |")

    mlp = _find(cases, "mlp bf16")
    s = _speedup(mlp)
    row("MLP bf16 scoring >= 2x best PyTorch", None if s is None else f"{s:.2f}x", s is not None and s >= 2)
    if s is not None:
        best = best_pytorch(mlp)[0]
        decisions.append(
            f"MLP scoring: rankfast is {s:.2f}x the best PyTorch ({best}): "
            + ("keep the fused kernel." if s > 1 else "the fused kernel loses: work on it before anything else.")
        )
    frac = mlp["rankfast"]["extra_info"].get("ceiling_fraction") if mlp and "rankfast" in mlp else None
    row(
        "MLP bf16 scoring >= 40% of the bf16 ceiling",
        None if frac is None else f"{frac:.1%}",
        bool(frac and frac >= 0.4),
    )
    if mlp and "rankfast" in mlp and "rankfast-op" in mlp:
        host = wall(mlp["rankfast"]) - (gpu(mlp["rankfast-op"]) or 0)
        decisions.append(
            f"MLP scoring: the call spends {host:.3f} ms outside the kernel (end-to-end minus the op's GPU time)"
            + ("; host work matters at this size." if host > 0.1 * wall(mlp["rankfast"]) else ".")
        )
    if mlp and "cublas-pair-layer" in mlp and "rankfast-op" in mlp:
        c, k = gpu(mlp["cublas-pair-layer"]), gpu(mlp["rankfast-op"])
        if c and k:
            decisions.append(
                f"MLP scoring: the kernel takes {k / c:.2f}x the cuBLAS pair layer on a materialised input "
                + ("(fusion is not yet paying for itself)." if k > c else "(fused beats the unfused shape ceiling).")
            )

    for label, prefix, need in (
        ("DIN bf16 scoring, repeated history items, >= 10x best PyTorch", "din bf16", 10),
        ("DIN bf16 scoring, no repeated item, >= 3x best PyTorch", "din bf16", 3),
    ):
        kind = "no repeated item" if "no repeated" in label else "repeated items"
        rows = next((r for c, r in cases.items() if c.startswith(prefix) and c.endswith(kind)), None)
        s = _speedup(rows)
        row(label, None if s is None else f"{s:.2f}x", s is not None and s >= need)
        if rows and "rankfast" in rows and "rankfast-factorized" in rows and kind == "repeated items":
            f = wall(rows["rankfast-factorized"]) / wall(rows["rankfast"])
            decisions.append(
                f"DIN with repeated items: the fused kernel is {f:.2f}x the factorized (unit-table) path; "
                + (
                    "keep the GPU dispatch on the kernel (raise GPU_UNIT_TABLE_MIN_REUSE above this case's reuse)."
                    if f >= 1
                    else "the unit table wins: keep dispatching to it by reuse (GPU_UNIT_TABLE_MIN_REUSE)."
                )
            )
    din = next((r for c, r in cases.items() if c.startswith("din bf16")), None)
    if din and "rankfast" in din:
        best = best_pytorch(din, lambda b: mib(b))
        ratio = None if best is None or not mib(din["rankfast"]) else mib(best[1]) / mib(din["rankfast"])
        row(
            "DIN peak memory >= 10x less than best PyTorch",
            None if ratio is None else f"{ratio:.0f}x",
            bool(ratio and ratio >= 10),
        )
    else:
        row("DIN peak memory >= 10x less than best PyTorch", None, False)

    trained = []
    for kind in ("mlp", "neumf", "din"):
        rows = _find(cases, f"train {kind}")
        s, e = _speedup(rows), _speedup(rows, "eager")
        trained.append(s)
        value = (
            None if s is None else f"{s:.2f}x best PyTorch, " + ("eager not run" if e is None else f"{e:.2f}x eager")
        )
        ok = s is not None and s >= 1.5 and (e is None or e >= 3)
        row(f"training step {kind} >= 1.5x best PyTorch (>= 3x eager)", value, ok)
    if all(s is not None for s in trained):
        if all(s > 1 for s in trained):
            decisions.append("Training: the kernels beat the best PyTorch on all three models: make them the default.")
        else:
            decisions.append("Training: the kernels do not beat the best PyTorch everywhere: training stays opt-in.")
    elif any(s is not None for s in trained):
        decisions.append("Training: not every model was measured: training stays opt-in.")

    topk = _find(cases, "score+topk")
    s = _speedup(topk, "rankfast-unfused")
    row(
        "fused score + top-K faster than fused score then torch.topk",
        None if s is None else f"{s:.2f}x",
        s is not None and s > 1,
    )
    if s is not None:
        decisions.append(
            f"Top-K: the fused score + top-K is {s:.2f}x scoring then torch.topk: "
            + ("keep it fused." if s > 1 else "rankfast.score should score, then select.")
        )
    return lines, decisions


def markdown(meta: dict, benchmarks: list[dict], title: str, note: str = "") -> str:
    lines = [f"# {title}", ""]
    if meta:
        lines += [f"- Date: {meta['datetime'][:10]}", *environment(meta["machine_info"])]
    ceiling = next((b["extra_info"].get("ceiling_tflops") for b in benchmarks), None)
    if ceiling == ceiling and ceiling is not None:
        lines.append(f"- Measured bf16 dense matmul ceiling (8192^3 torch.matmul, median of 10): {ceiling:.0f} TFLOP/s")
    lines.append("")
    if note:
        lines += [note.strip(), ""]
    cases = by_case(benchmarks)
    if not cases:
        return "\n".join(lines + ["No benchmark results."]) + "\n"
    rounds = sorted({b["stats"]["rounds"] for b in benchmarks})
    lines += [
        f"End-to-end: median of {', '.join(map(str, rounds))} synchronised calls after a warm-up call. "
        "GPU: CUDA events around back-to-back calls. Speedups: best PyTorch row / rankfast, same run.",
        "",
        "## rankfast against the best PyTorch",
        "",
        *summary(cases),
        "",
        "## Targets (issue 18)",
        "",
    ]
    target_lines, decisions = targets(cases)
    lines += target_lines + ["", "## Decisions", ""]
    lines += [f"- {d}" for d in decisions] or ["- None: no phase that supports one was measured."]
    lines += ["", "## Every row", "", *details(cases)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Fused Triton kernels against the best PyTorch")
    parser.add_argument("--note", default="", help="a paragraph under the header (phases run, timeouts)")
    args = parser.parse_args(argv)
    meta, benchmarks = load([p for p in args.json if p.exists()])
    text = markdown(meta, benchmarks, args.title, args.note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    _, decisions = targets(by_case(benchmarks))
    for d in decisions:
        print(f"DECISION: {d}")


if __name__ == "__main__":
    main()
