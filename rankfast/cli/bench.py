"""``rankfast bench``: run the pytest-benchmark suites of ``bench/``, print the
comparison table (``bench/report.py``) and draw a PNG chart of the medians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import rankfast
from rankfast.cli import EXIT_MISSING_DEPENDENCY, EXIT_USAGE, CLIError, add_command

SUITES = ("topk", "score", "kernels")


def find_bench_dir(given: str | None) -> Path:
    """``--bench-dir``, else ``bench/`` of the source checkout rankfast runs from, else ``./bench``."""
    candidates = (
        [Path(given)] if given else [Path(rankfast.__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    )
    for path in candidates:
        if (path / "report.py").is_file():
            return path
    where = given or " or ".join(str(p) for p in candidates)
    raise CLIError(
        f"--bench-dir: no benchmark suites (bench/report.py) at {where}; they come with a source checkout", EXIT_USAGE
    )


def run_bench(args):
    if not args.no_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError(
                "bench: the chart needs matplotlib (pip install matplotlib, or pass --no-chart)",
                EXIT_MISSING_DEPENDENCY,
            ) from None
    bench_dir = find_bench_dir(args.bench_dir)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "bench.json"
    command = [sys.executable, "-m", "pytest", *(str(bench_dir / f"bench_{s}.py") for s in args.suite)]
    command += [f"--benchmark-json={results}", "-q", "-p", "no:cacheprovider", "--rootdir", str(bench_dir)]
    if args.k:
        command += ["-k", args.k]
    env = dict(os.environ, **({"BENCH_SMALL": "1"} if args.quick else {}))
    code = subprocess.run(command, cwd=bench_dir.parent, env=env).returncode
    if code != 0 or not results.exists():
        raise CLIError(f"bench: the benchmark run failed (pytest exit code {code})")
    data = json.loads(results.read_text())
    if not data["benchmarks"]:
        raise CLIError("bench: no benchmark matched (check --suite and -k)")
    report = [
        sys.executable,
        str(bench_dir / "report.py"),
        str(results),
        "--title",
        args.title,
        "--out",
        str(out / "bench.md"),
    ]
    subprocess.run(report, cwd=bench_dir.parent, check=True)  # prints the markdown table
    if not args.no_chart:
        print(f"chart: {draw_chart(data['benchmarks'], out / 'bench.png', args.title)}")


def draw_chart(benchmarks: list[dict], path: Path, title: str) -> Path:
    """Horizontal bars: each case's median time per implementation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for b in benchmarks:
        medians[b["group"] or b["name"]][b["extra_info"].get("impl", b["name"])] = b["stats"]["median"] * 1e3
    impls = sorted({impl for row in medians.values() for impl in row}, key=lambda name: name != "rankfast")
    cases = list(medians)
    height = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(9, 1 + 0.5 * len(cases) * max(1, len(impls) / 2)))
    for n, impl in enumerate(impls):
        ys = [c + n * height for c in range(len(cases))]
        ax.barh(ys, [medians[case].get(impl, 0.0) for case in cases], height=height, label=impl)
    ax.set_yticks([c + 0.4 - height / 2 for c in range(len(cases))], cases, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale; shorter is faster)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_parsers(sub):
    p = add_command(sub, "bench")
    p.add_argument(
        "--suite",
        nargs="+",
        choices=SUITES,
        default=["topk", "score"],
        help="bench/bench_<suite>.py to run (default topk score)",
    )
    p.add_argument("-k", metavar="EXPR", help="pytest -k filter on the benchmark cases")
    p.add_argument("--quick", action="store_true", help="small cases (BENCH_SMALL=1, where a suite supports it)")
    p.add_argument(
        "--out", default="bench-out", help="folder for bench.json, bench.md and bench.png (default ./bench-out)"
    )
    p.add_argument("--title", default="rankfast benchmarks")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart (no matplotlib needed)")
    p.add_argument("--bench-dir", help="the benchmark suites' folder (default: bench/ of the source checkout)")
    p.set_defaults(run=run_bench)
