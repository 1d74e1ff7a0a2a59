"""What the Triton kernels compile to on a GPU, without a GPU.

Runs rankfast's real dispatch (models -> fused backend -> ops -> launchers) at
the benchmark shapes of ``bench/bench_kernels.py`` (and the deepest DCN-v2 cross
network the dispatch takes) on CPU tensors, records
every kernel launch instead of running it, and compiles each launch's autotune
configurations ahead of time for a GPU target (default sm_90a, the H200:
``triton.compile(..., target=GPUTarget("cuda", 90, 32))``). For every config
it reads, from Triton's own artifacts and the ``ptxas`` / ``nvdisasm`` that
ship with Triton:

- registers, spill stores / loads (bytes, from ``ptxas -v``), shared memory;
- wgmma (HGMMA) and mma.sync (HMMA) instruction counts in the SASS;
- every dot of the TTGIR with its shape (M x N x K), source line and
  function, what it lowered to (wgmma, mma.sync or FMA) and, for wgmma,
  whether its A operand comes from registers or shared memory;
- the atomics in the PTX with their memory semantics, and the fences
  (``MEMBAR``) in the SASS.

"Dispatchable" configs are those the autotuner can pick for the case's shapes
(after its pruning); ``--all`` compiles every config of every autotuner.

The rules (``--check``; ``tests/test_bench_scripts.py`` runs them in CI) for
every dispatchable config: no spills, shared memory within the target's
limit, and every dot of a pair layer (a layer applied to (user, candidate)
pair rows or (pair, history item) rows; ``PAIR_LAYERS`` names their
functions) on wgmma.

    python bench/kernel_report.py [--cases NAME ...] [--all] [--jobs N] \\
        [--out bench/results/<date>-kernel-report-sm90a.md] [--json out.json] [--check]

Runs in its own process: Triton's interpreter must be off (this script turns
it off before importing Triton).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, whatever the caller's setting
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated (no warning)
os.environ.setdefault("RANKFAST_AUTOTUNE", "1")

import torch  # noqa: E402
import triton  # noqa: E402

# fp32 cases as the benchmarks run them: TF32 dots (bench/bench_kernels.py sets the same).
torch.set_float32_matmul_precision("high")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
#: Largest dynamic shared memory a block may use, by compute capability (bytes).
SMEM_LIMIT = {90: 232448, 100: 232448, 80: 166912, 89: 101376, 86: 101376}

#: Functions whose dots are pair layers: they multiply (user, candidate) pair rows, or
#: (pair, history item) rows, by a weight (the hot loops; rule 3).
PAIR_LAYERS = frozenset(
    {"_h2", "_mlp_pairs", "_out", "_cross_pairs", "_tail_bwd", "_unit_logits", "_unit_bwd", "_unit_chunk"}
)


# --- the cases: rankfast's own dispatch at the benchmark shapes ----------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    run: str  # name of the function below that drives the dispatch


def _mlp_model(kind, b, n, dtype, d=64, hidden=(256, 128)):
    from rankfast.models import MLPConfig, MLPModel, NeuMF, NeuMFConfig

    torch.manual_seed(0)
    if kind == "mlp":
        return MLPModel(MLPConfig(b, n, d, hidden=hidden)).to(dtype)
    return NeuMF(NeuMFConfig(b, n, d, hidden=hidden)).to(dtype)


def _din_model(b, n, dtype, d=64):
    from rankfast.models import AttentionConfig, AttentionModel

    torch.manual_seed(0)
    return AttentionModel(AttentionConfig(b, n, d, hidden=(256, 128), unit_hidden=(80, 40))).to(dtype)


def _history(b, n, length):
    return torch.randint(0, n, (b, length)), torch.full((b,), length)


def run_mlp_fwd(dtype):
    from rankfast.scoring.backends.fused import model_scores

    model = _mlp_model("mlp", 1024, 4096, dtype).eval()
    with torch.inference_mode():
        model_scores(model, torch.arange(1024), torch.arange(4096))


def run_mlp_topk():
    from rankfast.scoring.backends.fused import model_topk

    model = _mlp_model("mlp", 1024, 4096, torch.bfloat16).eval()
    model_topk(model, torch.arange(1024), torch.arange(4096), k=100)


def run_train(kind):
    from rankfast.scoring.backends.fused import training_scores

    if kind == "din":
        b, n = 256, 128
        model = _din_model(b, 4 * n, torch.bfloat16).train()
        args = (torch.arange(b), torch.arange(n), *_history(b, 4 * n, 100))
    else:
        b, n = 1024, 512
        model = _mlp_model(kind, b, 4 * n, torch.bfloat16).train()
        args = (torch.arange(b), torch.arange(n))
    training_scores(model, *args).float().sum().backward()


def run_din_fwd():
    from rankfast.scoring.backends.fused import model_scores

    model = _din_model(256, 512, torch.bfloat16).eval()
    with torch.inference_mode():
        model_scores(model, torch.arange(256), torch.arange(512), *_history(256, 512, 100))


def run_din_topk():
    from rankfast.scoring.backends.fused import model_topk

    model = _din_model(256, 512, torch.bfloat16).eval()
    model_topk(model, torch.arange(256), torch.arange(512), *_history(256, 512, 100), k=100)


def run_dcn_fwd(layers=2, dim=16):
    """DCN-v2 at a CTR shape: 5 fields (2 user, 1 context, 2 item) of dim 16, so
    ``D = 7 x 16 = 112`` (a 128-wide tile), 2 cross layers, deep 256-128; or ``layers`` and
    ``dim`` (the deepest cross network the dispatch takes: 4 layers at dim 8, ``D = 56``)."""
    from rankfast.data import Field
    from rankfast.models import DCNConfig, DCNv2
    from rankfast.scoring.backends.fused import model_scores

    torch.manual_seed(0)
    fields = (
        Field("segment", "user", buckets=64),
        Field("region", "user", buckets=64),
        Field("hour", "context", buckets=24),
        Field("category", "item", buckets=64),
        Field("brand", "item", buckets=64),
    )
    config = DCNConfig(1024, 4096, dim, fields=fields, cross_layers=layers, hidden=(256, 128))
    model = DCNv2(config).to(torch.bfloat16).eval()
    with torch.inference_mode():
        model_scores(model, torch.arange(1024), torch.arange(4096))


def run_recnet_fwd():
    """RecommenderNet with a user and an item field, dim 32, hidden 256-128, 10 rating classes
    (MovieLens' half stars: the class head is a 16-wide dot)."""
    from rankfast.data import Field
    from rankfast.models import RecommenderNet, RecommenderNetConfig
    from rankfast.scoring.backends.fused import model_scores

    torch.manual_seed(0)
    fields = (Field("segment", "user", buckets=64), Field("category", "item", buckets=64))
    classes = tuple(0.5 * c for c in range(1, 11))
    config = RecommenderNetConfig(1024, 4096, 32, fields=fields, classes=classes, hidden=(256, 128))
    model = RecommenderNet(config).to(torch.bfloat16).eval()
    with torch.inference_mode():
        model_scores(model, torch.arange(1024), torch.arange(4096))


CASES = {
    "mlp bf16 B1024xN4096": lambda: run_mlp_fwd(torch.bfloat16),
    "mlp fp32(tf32) B1024xN4096": lambda: run_mlp_fwd(torch.float32),
    "mlp topk bf16 B1024xN4096 k100": run_mlp_topk,
    "dcn bf16 B1024xN4096 D112": run_dcn_fwd,
    "dcn bf16 B1024xN4096 D56 L4": lambda: run_dcn_fwd(layers=4, dim=8),
    "recnet bf16 B1024xN4096 C10": run_recnet_fwd,
    "din bf16 B256xN512 L100": run_din_fwd,
    "din topk bf16 B256xN512 L100 k100": run_din_topk,
    "train mlp bf16 B1024xN512": lambda: run_train("mlp"),
    "train neumf bf16 B1024xN512": lambda: run_train("neumf"),
    "train din bf16 B256xN128 L100": lambda: run_train("din"),
}


# --- recording launches, compiling them for a target ---------------------------------------------


@dataclass
class Launch:
    kernel: object  # the Autotuner, Heuristics or JITFunction that was launched
    args: tuple
    kwargs: dict

    @property
    def jit(self) -> JITFunction:
        fn = self.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.jit.fn.__name__

    def configs(self, every: bool):
        """``[(label, launch kwargs)]``: the configs the dispatch can pick (``every``: all of them)."""
        if not isinstance(self.kernel, Autotuner):
            return [("-", {})]
        at = self.kernel
        at.nargs = dict(zip(at.arg_names, self.args, strict=False))
        chosen = at.configs if every else at.prune_configs(dict(self.kwargs))
        return [(_config_label(c), c.all_kwargs()) for c in chosen]


def _config_label(config) -> str:
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps}s{config.num_stages}"


def record(case: str) -> list[Launch]:
    """Every kernel launch of case ``case``, not run (outputs stay uninitialised)."""
    launches = []

    def fake_autotune(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        launches.append(Launch(self, args, kwargs))

    def fake_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = fake_autotune, fake_jit
    try:
        CASES[case]()
    finally:
        Autotuner.run, JITFunction.run = saved
    seen, out = set(), []
    for launch in launches:  # one entry per kernel (a case may launch one several times)
        if launch.name not in seen:
            seen.add(launch.name)
            out.append(launch)
    return out


def compile_launch(launch: Launch, config_kwargs: dict, target: GPUTarget):
    """The launch compiled for ``target`` with ``config_kwargs``, exactly as the JIT would
    specialise it (argument types, alignment, constexprs, heuristics); ``(kernel, ptxas log, s)``."""
    backend = make_backend(target)
    out = {}

    def compile_for_target(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        out["kernel"] = triton.compile(
            ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__
        )

    fn = launch.kernel.fn if isinstance(launch.kernel, Autotuner) else launch.kernel
    saved = JITFunction.run
    JITFunction.run = compile_for_target
    start = time.perf_counter()
    try:
        kwargs = dict(launch.kwargs, **config_kwargs)
        if isinstance(fn, Heuristics):
            fn.run(*launch.args, grid=None, warmup=True, **kwargs)
        else:
            compile_for_target(fn, *launch.args, grid=None, warmup=True, **kwargs)
    finally:
        JITFunction.run = saved
    return out["kernel"], time.perf_counter() - start


# --- reading the artifacts -----------------------------------------------------------------------


def ptxas_stats(ptx: str, capability: int, log: str = "") -> dict:
    """Registers, spill stores/loads and stack frame from ``ptxas -v``: the log of Triton's own
    compile when it ran ptxas (``log``), else ptxas run again with Triton's flags (a cache hit)."""
    if "registers" not in log:
        ptxas = get_ptxas(capability).path
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            arch = sm_arch_from_capability(capability)
            cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src)]
            log = subprocess.run(cmd + ["-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
            log = log.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "stack": int(stack.group(1)) if stack else 0,
    }


def sass_counts(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = Counter(
        m.group(1) for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    )
    return {name: ops.get(name, 0) for name in ("HGMMA", "HMMA", "STL", "LDL", "ATOMG", "RED", "MEMBAR")}


_LOC_DEF = re.compile(r"^#(loc\d*) = loc\((.*)\)\s*$", re.M)
_FILE_LOC = re.compile(r'^"([^"]+)":(\d+):\d+$')


def _locations(ttgir: str) -> dict:
    return {m.group(1): m.group(2) for m in _LOC_DEF.finditer(ttgir)}


def _frames(loc: str, defs: dict, depth=0) -> list:
    """The source ``(file, line)`` frames of an MLIR location, innermost (callee) first."""
    if depth > 100:
        return []
    loc = loc.strip()
    if loc.startswith("#"):
        return _frames(defs.get(loc[1:], ""), defs, depth + 1)
    m = _FILE_LOC.match(loc)
    if m:
        return [(m.group(1), int(m.group(2)))]
    m = re.match(r"^callsite\((#\w+) at (#\w+)\)$", loc)
    if m:
        return _frames(m.group(1), defs, depth + 1) + _frames(m.group(2), defs, depth + 1)
    m = re.match(r'^"[^"]*"\((#\w+)\)$', loc)  # a named location
    if m:
        return _frames(m.group(1), defs, depth + 1)
    return []


#: Helpers whose caller is the interesting frame of a dot (``_common.dot`` wraps ``tl.dot``).
WRAPPERS = frozenset({"dot"})


def _source(loc: str, defs: dict):
    """``(file, line, function)`` of the innermost frame outside the wrappers."""
    frames = [(f, line, _function_at(f, line)) for f, line in _frames(loc, defs)]
    for frame in frames:
        if frame[2] not in WRAPPERS:
            return frame
    return frames[0] if frames else None


@cache
def _functions(path: str):
    """``[(first line, last line, name)]`` of every function in a source file. A kernel compiled
    in another checkout (Triton's cache is keyed by source, not path) names files that may be
    gone: those are read from this checkout's ``kernels/``."""
    source = Path(path)
    if not source.exists():
        source = ROOT / "kernels" / source.name
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return []
    return [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def _function_at(path: str, line: int) -> str:
    best = None
    for first, last, name in _functions(path):
        if first <= line <= last and (best is None or first >= best[0]):
            best = (first, name)
    return best[1] if best else "?"


def _shape(type_text: str):
    m = re.search(r"<(\d+)x(\d+)x", type_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def dots(ttgir: str) -> list[dict]:
    """Every dot of the lowered TTGIR: shape, source, lowering, A operand."""
    defs = _locations(ttgir)
    encodings = dict(re.findall(r"^#(\w+) = (#ttg\.[a-z_]+)<", ttgir, re.M))
    mma_version = dict(re.findall(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", ttgir, re.M))
    out = []
    for line in ttgir.splitlines():
        wgmma = "ttng.warp_group_dot " in line
        if not wgmma and " tt.dot " not in line:
            continue
        types = line.rsplit(" : ", 1)[1]
        a_type, rest = types.split(" * ", 1)
        b_type, res_type = rest.split(" -> ", 1)
        a, b = _shape(a_type), _shape(b_type)
        if wgmma:
            kind = "wgmma"
            operand = "smem" if a_type.strip().startswith("!ttg.memdesc") else "reg"
        else:
            enc = re.search(r"#(\w+)>", res_type)
            enc = enc.group(1) if enc else ""
            if enc in mma_version:
                kind = "wgmma" if mma_version[enc] == "3" else "mma.sync"
            else:
                kind = "fma" if encodings.get(enc, "").startswith("#ttg.blocked") else f"tt.dot[{enc}]"
            operand = "reg"
        loc = re.search(r"loc\((#\w+)\)\s*$", line)
        src = _source(loc.group(1), defs) if loc else None
        where = f"{Path(src[0]).name}:{src[1]}" if src else "?"
        func = src[2] if src else "?"
        shape = f"{a[0]}x{b[1]}x{a[1]}" if a and b else "?"
        out.append({"kind": kind, "a": operand, "shape": shape, "where": where, "function": func})
    return out


def atomics(ptx: str) -> dict:
    """PTX atomic and reduction instructions by opcode (semantics and scope included)."""
    ops = re.findall(r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, re.M)
    return dict(sorted(Counter(ops).items()))


def analyse(kernel, target: GPUTarget, ptxas_log: str = "") -> dict:
    ttgir = kernel.asm["ttgir"]
    stats = ptxas_stats(kernel.asm["ptx"], target.arch, ptxas_log)
    return dict(
        stats,
        smem=kernel.metadata.shared,
        warps=kernel.metadata.num_warps,
        sass=sass_counts(kernel.asm["cubin"]),
        dots=dots(ttgir),
        atomics=atomics(kernel.asm["ptx"]),
        convert_layout=ttgir.count("ttg.convert_layout"),
    )


# --- the run -------------------------------------------------------------------------------------

_RECORDED: dict = {}


def _task(case: str, kernel: str, index: int, every: bool, arch: int) -> dict:
    """One config of one kernel of one case, compiled and analysed (runs in a worker process)."""
    if case not in _RECORDED:
        _RECORDED[case] = {launch.name: launch for launch in record(case)}
    launch = _RECORDED[case][kernel]
    label, config = launch.configs(every)[index]
    target = GPUTarget("cuda", arch, 32)
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's log when it runs ptxas
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled, seconds = compile_launch(launch, config, target)
    stats = analyse(compiled, target, log.getvalue())
    return dict(case=case, kernel=kernel, config=label, compile_s=round(seconds, 1), **stats)


def plan(cases, every: bool):
    """``[(case, kernel, config index)]`` of every config to compile."""
    out = []
    for case in cases:
        for launch in record(case):
            out += [(case, launch.name, i) for i in range(len(launch.configs(every)))]
    return out


def run(cases, every=False, jobs=2, arch=90) -> list[dict]:
    tasks = plan(cases, every)
    if jobs <= 1:
        return [_task(*t, every, arch) for t in tasks]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_task, *t, every, arch) for t in tasks]
        return [f.result() for f in futures]


def violations(rows: list[dict], arch: int = 90) -> list[str]:
    """The rules of the dispatchable configs: no spills, shared memory within the limit, pair-layer dots on wgmma."""
    out = []
    limit = SMEM_LIMIT.get(arch, 232448)
    for r in rows:
        name = f"{r['case']} / {r['kernel']} [{r['config']}]"
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{name}: spills {r['spill_stores']}/{r['spill_loads']} B (stores/loads)")
        if r["smem"] > limit:
            out.append(f"{name}: {r['smem']} B of shared memory > {limit} (cannot launch)")
        for d in r["dots"]:
            if d["function"] in PAIR_LAYERS and d["kind"] != "wgmma":
                out.append(f"{name}: pair-layer dot {d['shape']} at {d['where']} ({d['function']}) is {d['kind']}")
    return out


def _atomics_text(atoms: dict, sass: dict) -> str:
    if not atoms:
        return "-"
    text = "; ".join(f"{op} x{n}" for op, n in atoms.items())
    return f"{text} (SASS MEMBAR {sass['MEMBAR']})"


def _dots_text(ds: list[dict]) -> str:
    counts = Counter(f"{d['kind']}" + (f"[A={d['a']}]" if d["kind"] == "wgmma" else "") for d in ds)
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "-"


def markdown(rows: list[dict], arch: int, every: bool, elapsed: float, note: str = "") -> str:
    lines = [
        f"# Triton kernels compiled for sm_{arch}a: static report",
        "",
        f"- Date: {datetime.date.today().isoformat()}; generated by `bench/kernel_report.py`"
        + (" --all" if every else "")
        + f" in {elapsed:.0f} s",
        f"- Target: GPUTarget('cuda', {arch}, 32), compiled on {platform.machine()} without a GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}",
        f"- rankfast commit: {_git('rev-parse', '--short', 'HEAD') or '?'}"
        + (" (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""),
        f"- Configs: {'every autotune config' if every else 'those the dispatch can pick for the case'}"
        " (the benchmark shapes of bench/bench_kernels.py, and the deepest DCN-v2 cross network the dispatch takes).",
        "- Regs and spill bytes from `ptxas -v` (Triton's flags), smem = the kernel's shared memory, "
        "HGMMA/HMMA = SASS wgmma / mma.sync instructions, dots from the TTGIR (A = where wgmma's A "
        "operand comes from), atomics = PTX opcodes with their semantics.",
        "",
        "| case | kernel | config | regs | spill st/ld B | smem B | HGMMA/HMMA | dots | atomics | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['kernel']} | {r['config']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
            f"{r['smem']} | {r['sass']['HGMMA']}/{r['sass']['HMMA']} | {_dots_text(r['dots'])} | "
            f"{_atomics_text(r['atomics'], r['sass'])} | {r['compile_s']} |"
        )
    bad = violations(rows, arch)
    lines += ["", "## Rules (no spills, shared memory within the limit, pair-layer dots on wgmma)", ""]
    lines += [f"- {v}" for v in bad] if bad else ["Every config above meets them."]
    lines += ["", "## Dots", "", "| case | kernel | config | dot (MxNxK) | source | function | lowering | A |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for d in r["dots"]:
            lines.append(
                f"| {r['case']} | {r['kernel']} | {r['config']} | {d['shape']} | {d['where']} | {d['function']} | "
                f"{d['kind']} | {d['a'] if d['kind'] == 'wgmma' else '-'} |"
            )
    if note:
        lines += ["", "## Notes", "", note.strip()]
    return "\n".join(lines) + "\n"


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE")
    parser.add_argument("--all", action="store_true", help="every autotune config, not only the dispatchable ones")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--out", type=Path, help="markdown report to write")
    parser.add_argument("--json", type=Path, help="raw rows to write")
    parser.add_argument("--note", type=Path, help="a markdown file to append as the report's notes")
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.cases, every=args.all, jobs=args.jobs, arch=args.arch)
    note = args.note.read_text() if args.note else ""
    text = markdown(rows, args.arch, args.all, time.perf_counter() - start, note)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(text)
    bad = violations(rows, args.arch)
    if args.check and bad:
        print(f"kernel_report: {len(bad)} rule violation(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
