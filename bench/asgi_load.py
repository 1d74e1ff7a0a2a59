"""Load test of the ASGI example (examples/asgi_app.py) under uvicorn, on loopback.

    python bench/asgi_load.py                      # ~3 minutes; writes bench/results/<date>-asgi-load.md
    python bench/asgi_load.py --seconds 5 --out /tmp   # a quick look

Makes a model directory with ``rankfast demo --users 500 --items 300 --epochs 1``,
starts ``uvicorn examples.asgi_app:app`` as a subprocess with the settings the
README gives, and drives it with closed-loop clients (threads, one persistent
``http.client`` connection each; every request 1-4 random users, k=10) at each
concurrency for ``--seconds``, while one more client polls ``GET /health``
every 50 ms and the server's RSS is read from ``/proc`` every half second.
Then it sends the hostile bodies of the reliability probe one by one (checking
``/health`` after each), a body that never finishes, and connections that
never finish their headers. The targets: no errors and no 5xx, ``/health``
p99 under 50 ms at concurrency 64, server memory growth under 50 MiB.

The clients run on the same machine as the server, so the figures are lower
bounds for the server alone.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USERS, ITEMS = 500, 300
SERVER_ENV = {"RANKFAST_BODY_TIMEOUT_S": "5"}  # the rest at the example's defaults
UVICORN_FLAGS = ["--timeout-keep-alive", "5", "--limit-concurrency", "256", "--backlog", "256"]
TARGETS = {"health_p99_ms": 50.0, "rss_growth_mib": 50.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per concurrency (default 60)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the results file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        subprocess.run(
            [sys.executable, "-m", "rankfast", "demo", "--users", str(USERS), "--items", str(ITEMS)]
            + ["--epochs", "1", "--out", str(model_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with Server(model_dir) as server:
            report = run(server, args.seconds, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.date.today().isoformat()}-asgi-load.md"
    path.write_text(render(report, args))
    print(path.read_text())
    print(f"written: {path}")


# --- the server ---------------------------------------------------------------------------


class Server:
    """uvicorn serving the example on a free loopback port, stopped by its pid."""

    def __init__(self, model_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        env = {**os.environ, **SERVER_ENV, "RANKFAST_MODEL_DIR": str(model_dir), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "uvicorn", "examples.asgi_app:app", "--host", "127.0.0.1"]
        self.command = [*command, "--port", str(self.port), *UVICORN_FLAGS, "--log-level", "warning"]
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env)

    def __enter__(self):
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(self.address, "GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def memory_mib(self) -> tuple[float, float]:
        """``(RSS, peak RSS)`` in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def request(address, method, path, body=b"", connection=None, headers=None):
    """``(status, body bytes)``; on a fresh connection unless one is given."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if own:
            connection.close()


# --- load ---------------------------------------------------------------------------------


def run(server: Server, seconds: float, concurrencies: list[int]) -> dict:
    for _ in range(200):  # warm-up
        request(server.address, "POST", "/recommend", json.dumps({"users": [0, 1], "k": 10}).encode())
    load_start = os.getloadavg()[0]
    rss_start, _ = server.memory_mib()
    phases = [load_phase(server, c, seconds) for c in concurrencies]
    hostile = hostile_bodies(server)
    slow = slow_clients(server)
    rss_end, rss_peak = server.memory_mib()
    return {
        "load_average": (load_start, os.getloadavg()[0]),
        "phases": phases,
        "hostile": hostile,
        "slow": slow,
        "rss": {"start": rss_start, "end": rss_end, "peak": rss_peak, "growth": rss_end - rss_start},
    }


def load_phase(server: Server, concurrency: int, seconds: float) -> dict:
    stop = threading.Event()
    latencies, statuses, errors, health, rss = [], {}, [], [], []
    lock = threading.Lock()

    def client(seed):
        rng = random.Random(seed)
        connection = http.client.HTTPConnection(*server.address, timeout=60)
        while not stop.is_set():
            body = json.dumps({"users": rng.sample(range(USERS), rng.randint(1, 4)), "k": 10}).encode()
            started = time.perf_counter()
            try:
                status, _ = request(server.address, "POST", "/recommend", body, connection)
            except (OSError, http.client.HTTPException) as err:
                with lock:
                    errors.append(repr(err))
                connection.close()
                connection = http.client.HTTPConnection(*server.address, timeout=60)
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1
        connection.close()

    def poll_health():
        connection = http.client.HTTPConnection(*server.address, timeout=60)
        while not stop.is_set():
            started = time.perf_counter()
            status, _ = request(server.address, "GET", "/health", connection=connection)
            health.append((time.perf_counter() - started, status))
            time.sleep(0.05)
        connection.close()

    def sample_memory():
        while not stop.wait(0.5):
            rss.append(server.memory_mib()[0])

    rss_before = server.memory_mib()[0]
    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    threads += [threading.Thread(target=poll_health), threading.Thread(target=sample_memory)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": len(latencies),
        "rate": len(latencies) / elapsed,
        "latency_ms": percentiles(latencies),
        "statuses": statuses,
        "errors": errors,
        "health_ms": percentiles([t for t, _ in health]),
        "health_bad": sum(status != 200 for _, status in health),
        "rss": {"before": rss_before, "after": server.memory_mib()[0], "peak": max(rss, default=rss_before)},
    }


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(seconds)

    def at(q):
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": 1000 * ordered[-1]}


# --- hostile input ------------------------------------------------------------------------


def hostile_cases() -> list[tuple[str, str, str, bytes]]:
    """``(name, method, path, body)`` of the reliability probe's bad and abusive requests."""
    post = []

    def body(name, value):
        post.append((name, "POST", "/recommend", value if isinstance(value, bytes) else json.dumps(value).encode()))

    body("not JSON", b"hello world")
    body("empty body", b"")
    body("JSON array", [0])
    body("JSON string", "users")
    body("missing users", {"k": 3})
    body("unknown field", {"users": [0], "colour": 1})
    body("histories field", {"users": [0], "histories": {"0": [1]}})
    for name, users in (
        ("users null", None),
        ("users string", "0"),
        ("users number", 0),
        ("users object", {"0": 1}),
        ("users [] (empty)", []),
        ("users ['0']", ["0"]),
        ("users [1.5]", [1.5]),
        ("users [1.0]", [1.0]),
        ("users [true]", [True]),
        ("users [null]", [None]),
        ("users [99999] unknown", [99999]),
        ("users [-1]", [-1]),
        ("users [2**70]", [2**70]),
        ("users [2**63]", [2**63]),
        ("users [[0, 1]]", [[0, 1]]),
        ("users [0, 'a']", [0, "a"]),
    ):
        body(name, {"users": users})
    body("users [1e400]", b'{"users": [1e400]}')
    body("users [NaN]", b'{"users": [NaN]}')
    for name, k in (
        ("k '10'", "10"),
        ("k 0", 0),
        ("k -1", -1),
        ("k 2.5", 2.5),
        ("k true", True),
        ("k null", None),
        ("k 10**30", 10**30),
        ("k 10**12", 10**12),
        ("k 10**8", 10**8),
        ("k 3*10**8", 3 * 10**8),
        ("k 1000 (max_k)", 1000),
    ):
        body(name, {"users": [0], "k": k})
    body("k NaN", b'{"users": [0], "k": NaN}')
    for name, candidates in (
        ("candidates string", "a"),
        ("candidates number", 5),
        ("candidates []", []),
        ("candidates [99999] unknown", [99999]),
        ("candidates [[1]]", [[1]]),
        ("candidates [1.5]", [1.5]),
        ("candidates [null]", [None]),
        ("candidates repeated ids", [38] * 5 + [5]),
        ("candidates 200k repeated ids (1 MB)", [38] * 200_000),
    ):
        body(name, {"users": [0], "candidates": candidates})
    body("exclude_seen 'no'", {"users": [0], "exclude_seen": "no"})
    body("exclude_seen null", {"users": [0], "exclude_seen": None})
    body("deeply nested JSON", b"[" * 100_000)
    body("invalid UTF-8", b'{"users": [0], "k": 5\xff}')
    body("UTF-16 body", '{"users": [0]}'.encode("utf-16"))
    body("1001 users (max_users)", {"users": list(range(USERS)) * 2 + [0]})
    body("10 MB of valid user ids", {"users": [0] * 3_300_000})
    body("10 MB invalid JSON", b"x" * 10_000_000)
    body("50 MB invalid JSON", b"x" * 50_000_000)
    return [
        *post,
        ("GET /recommend", "GET", "/recommend", b""),
        ("POST /health", "POST", "/health", b""),
        ("unknown path", "GET", "/nope", b""),
    ]


def hostile_bodies(server: Server) -> list[dict]:
    rows = []
    for name, method, path, body in hostile_cases():
        started = time.perf_counter()
        try:
            status, answer = request(server.address, method, path, body)
        except (OSError, http.client.HTTPException) as err:  # e.g. the server closed a 50 MB upload early
            status, answer = None, repr(err).encode()
        took = time.perf_counter() - started
        healthy = request(server.address, "GET", "/health")[0] == 200
        rows.append(
            {
                "name": name,
                "bytes": len(body),
                "status": status,
                "seconds": took,
                "answer": answer[:90].decode("utf-8", "replace"),
                "healthy": healthy,
                "rss": server.memory_mib()[0],
            }
        )
    return rows


def slow_clients(server: Server, connections: int = 100, hold: float = 10.0) -> dict:
    """A body that never finishes (408 expected), and connections that never finish their
    headers while ``/health`` is polled."""
    with socket.create_connection(server.address, timeout=30) as s:
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"users"')
        started = time.perf_counter()
        first = s.recv(4096).split(b"\r\n", 1)[0].decode()
        body_timeout = (first, time.perf_counter() - started)
    sockets = []
    for _ in range(connections):
        s = socket.create_connection(server.address, timeout=30)
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        sockets.append(s)
    health = []
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        started = time.perf_counter()
        request(server.address, "GET", "/health")
        health.append(time.perf_counter() - started)
        time.sleep(0.05)
    still_open = 0
    for s in sockets:
        s.setblocking(False)
        try:
            still_open += s.recv(1) != b""  # b"": closed by the server
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        s.close()
    return {"body_timeout": body_timeout, "connections": connections, "hold": hold, "still_open": still_open,
            "health_ms": percentiles(health)}  # fmt: skip


# --- the results file ---------------------------------------------------------------------


def render(report: dict, args) -> str:
    phases, rss = report["phases"], report["rss"]
    five_xx = sum(n for p in phases for s, n in p["statuses"].items() if s >= 500)
    five_xx += sum(1 for row in report["hostile"] if row["status"] and row["status"] >= 500)
    errors = sum(len(p["errors"]) + sum(n for s, n in p["statuses"].items() if s != 200) for p in phases)
    top = max(phases, key=lambda p: p["concurrency"])
    health_p99 = top["health_ms"]["p99"]
    checks = [
        ("errors (valid requests that failed or were not 200)", errors, errors == 0),
        ("5xx responses (load and hostile bodies)", five_xx, five_xx == 0),
        (
            f"/health p99 at concurrency {top['concurrency']} (target < {TARGETS['health_p99_ms']:.0f} ms)",
            f"{health_p99:.1f} ms",
            health_p99 < TARGETS["health_p99_ms"],
        ),
        (
            f"server RSS growth over the run (target < {TARGETS['rss_growth_mib']:.0f} MiB)",
            f"{rss['growth']:+.1f} MiB",
            rss["growth"] < TARGETS["rss_growth_mib"],
        ),
        ("server up after every hostile request", all(r["healthy"] for r in report["hostile"]), None),
    ]
    lines = [
        f"# ASGI example under load ({datetime.date.today().isoformat()})",
        "",
        f"`python bench/asgi_load.py --seconds {args.seconds:g} --concurrency "
        f"{' '.join(map(str, args.concurrency))}`: {__doc__.splitlines()[0]}",
        "",
        *machine(),
        "",
        f"Model: `rankfast demo --users {USERS} --items {ITEMS} --epochs 1` (DotModel). Server: "
        f"`uvicorn examples.asgi_app:app {' '.join(UVICORN_FLAGS)}`, one worker, the example's default limits "
        f"and threads, {', '.join(f'{k}={v}' for k, v in SERVER_ENV.items())}. Clients: closed loop, one "
        "persistent connection per thread, each request 1-4 random users with k=10, plus one client polling "
        "`GET /health` every 50 ms. The clients share the machine (and its cores) with the server, and so did "
        "other people's jobs while this ran (the machine's 1-minute load average: "
        f"{report['load_average'][0]:.1f} at the start, {report['load_average'][1]:.1f} at the end, on "
        f"{os.cpu_count()} CPUs): the throughput and latencies are lower bounds.",
        "",
        "## Targets",
        "",
        "| check | measured | met |",
        "| --- | --- | --- |",
        *(f"| {name} | {value} | {'-' if ok is None else 'yes' if ok else '**no**'} |" for name, value, ok in checks),
        "",
        "## Load",
        "",
        "| concurrency | s | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | statuses "
        "| /health p50 ms | /health p99 ms | /health max ms | RSS MiB before / peak / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in phases:
        lat, health, r = p["latency_ms"], p["health_ms"], p["rss"]
        statuses = ", ".join(f"{s}: {n:,}" for s, n in sorted(p["statuses"].items()))
        lines.append(
            f"| {p['concurrency']} | {p['seconds']:.1f} | {p['requests']:,} | {p['rate']:.1f} | {lat['p50']:.1f} "
            f"| {lat['p90']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {len(p['errors'])} | {statuses} "
            f"| {health['p50']:.1f} | {health['p99']:.1f} | {health['max']:.1f} "
            f"| {r['before']:.0f} / {r['peak']:.0f} / {r['after']:.0f} |"
        )
    lines += [
        "",
        f"Server RSS: {rss['start']:.1f} MiB after the warm-up, {rss['end']:.1f} MiB at the end "
        f"(growth {rss['growth']:+.1f} MiB), peak {rss['peak']:.1f} MiB.",
        "",
        "## Hostile requests",
        "",
        "One at a time on a fresh connection, `/health` checked after each.",
        "",
        "| request | bytes | status | s | RSS MiB after | answer (first 90 bytes) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["hostile"]:
        answer = row["answer"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {row['name']} | {row['bytes']:,} | {row['status']} | {row['seconds']:.3f} | {row['rss']:.0f} "
            f"| `{answer}` |"
        )
    slow = report["slow"]
    first, took = slow["body_timeout"]
    lines += [
        "",
        "## Slow clients",
        "",
        f"- A body declared as 100 bytes of which 8 arrive: `{first}` after {took:.1f} s "
        f"(`RANKFAST_BODY_TIMEOUT_S={SERVER_ENV['RANKFAST_BODY_TIMEOUT_S']}`).",
        f"- {slow['connections']} connections that never finish their headers, held {slow['hold']:.0f} s: "
        f"`/health` p50 {slow['health_ms']['p50']:.1f} ms, p99 {slow['health_ms']['p99']:.1f} ms; "
        f"{slow['still_open']} still open at the end. uvicorn has no timeout for unfinished headers "
        "(`--limit-concurrency` answers 503 once that many connections are open); the README says to put "
        "a proxy with one in front of untrusted clients.",
        "",
    ]
    return "\n".join(lines)


def machine() -> list[str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    memory = next(
        int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )  # fmt: skip
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("rankfast", "torch", "numpy", "starlette", "uvicorn")
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return [
        f"Machine: {cpu}, {os.cpu_count()} CPUs visible, {memory:.0f} GiB RAM; {platform.platform()}.",
        f"Versions: Python {platform.python_version()}, {versions}; commit {commit.stdout.strip() or '?'}.",
    ]


if __name__ == "__main__":
    main()
