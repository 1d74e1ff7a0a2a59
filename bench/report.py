"""Turns a pytest-benchmark JSON file into a markdown results table.

Benchmarks follow one convention: `benchmark.group` names the case, and
`benchmark.extra_info["impl"]` names the implementation ("rankfast" and its
baselines); `extra_info["peak_mem_bytes"]` is optional. Each case becomes a
row: the median time of every implementation, rankfast's speedup over each
baseline (baseline median / rankfast median, measured in the same run), and
peak memory where recorded.

    python bench/report.py RESULTS.json [MORE.json ...] --title "CPU top-K" --out bench/results/DATE-cpu-topk.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

OURS = "rankfast"


def environment(machine_info: dict) -> list[str]:
    import numpy
    import torch

    lines = [
        f"- CPU: {machine_info.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine_info.get('cpu', {}).get('count', '?')} logical cores"
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, driver {driver or 'unknown'}, CUDA "
            f"{torch.version.cuda}"
        )
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    lines.append(f"- Versions: {versions}")
    commit = _command(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        lines.append(f"- rankfast commit: {commit}")
    return lines


def _command(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def table(benchmarks: list[dict]) -> list[str]:
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    impls: list[str] = []
    for bench in benchmarks:
        impl = bench["extra_info"].get("impl", bench["name"])
        cases[bench["group"] or bench["name"]][impl] = bench
        if impl not in impls:
            impls.append(impl)
    impls.sort(key=lambda name: name != OURS)  # rankfast first, others in run order
    baselines = [name for name in impls if name != OURS]
    has_memory = any("peak_mem_bytes" in b["extra_info"] for b in benchmarks)

    header = ["case"] + [f"{name} median (ms)" for name in impls]
    header += [f"speedup vs {name}" for name in baselines if OURS in impls]
    if has_memory:
        header += [f"{name} peak MiB" for name in impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, by_impl in cases.items():
        medians = {name: b["stats"]["median"] for name, b in by_impl.items()}
        row = [case] + [f"{medians[name] * 1e3:.2f}" if name in medians else "-" for name in impls]
        if OURS in impls:
            for name in baselines:
                ok = OURS in medians and name in medians
                row.append(f"{medians[name] / medians[OURS]:.2f}x" if ok else "-")
        if has_memory:
            for name in impls:
                peak = by_impl.get(name, {}).get("extra_info", {}).get("peak_mem_bytes")
                row.append(f"{peak / 2**20:.1f}" if peak is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "json", type=Path, nargs="+", help="file(s) written by pytest --benchmark-json (several: one table, in order)"
    )
    parser.add_argument("--title", required=True)
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--note", default="", help="a paragraph to put under the table")
    args = parser.parse_args()

    runs = [json.loads(path.read_text()) for path in args.json]
    data = dict(runs[0], benchmarks=[b for run in runs for b in run["benchmarks"]])
    date = data["datetime"][:10]
    lines = [f"# {args.title}", "", f"- Date: {date}", *environment(data["machine_info"]), ""]
    rounds = sorted({b["stats"]["rounds"] for b in data["benchmarks"]})
    lines.append(
        f"Medians of {', '.join(map(str, rounds))} rounds after a warm-up round; "
        "speedup = baseline median / rankfast median, same run."
    )
    lines += ["", *table(data["benchmarks"])]
    if args.note:
        lines += ["", args.note]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
