"""The serving examples in examples/: the ASGI app on a real loopback server, the
Triton and Ray Serve ones against fakes of the interfaces they call."""

import asyncio
import http.client
import importlib.util
import json
import socket
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from rankfast import Ranker
from rankfast.data import synthetic_interactions
from rankfast.models import DotConfig, DotModel
from rankfast.ranker import save_model_dir

from helpers import assert_rankings_match

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    train = synthetic_interactions(30, 25, per_user=5, seed=4)
    torch.manual_seed(0)
    model = DotModel(DotConfig(num_users=30, num_items=25, dim=6))
    return str(save_model_dir(tmp_path_factory.mktemp("examples") / "model", model, train))


def load_example(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- ASGI, end to end on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def asgi_server(model_dir):
    """``(host, port)`` of the ASGI example on a loopback uvicorn, with small limits from the
    environment it documents."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "RANKFAST_MAX_K": "20",
            "RANKFAST_MAX_USERS": "5",
            "RANKFAST_MAX_BODY_BYTES": "4000",
            "RANKFAST_BODY_TIMEOUT_S": "0.5",
        }.items():
            env.setenv(name, value)
        app = load_example(EXAMPLES / "asgi_app.py", "asgi_example").create_app(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def fetch(address, method, path, body=b"", headers=None):
    """``(status, the JSON answer, or the bytes of another)`` of one request on a fresh connection."""
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes))
        response = connection.getresponse()
        data = response.read()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(data) if is_json else data
    finally:
        connection.close()


def test_asgi_app_over_http(asgi_server, model_dir):
    status, answer = fetch(asgi_server, "GET", "/health")
    assert status == 200 and answer == {"status": "ok", "users": 30, "items": 25}
    ranker = Ranker.load(model_dir)
    for body in (
        {"users": [0, 7], "k": 5},
        {"users": [3], "k": 3, "candidates": [1, 2, 4, 8], "exclude_seen": False},
    ):
        status, answer = fetch(asgi_server, "POST", "/recommend", json.dumps(body).encode())
        assert status == 200 and answer == {"results": ranker.score(**body)}
    status, answer = fetch(asgi_server, "POST", "/recommend", b'{"users": [0], "k": 20}')
    assert status == 200 and len(answer["results"][0]["items"]) <= 25  # k within max_k, clamped to the items


@pytest.mark.parametrize(
    "body, status, error",
    [
        (b'{"users": [12345]}', 400, "users: unknown user id 12345"),
        (b'{"user": [1]}', 400, "body: expected a JSON object with users"),
        (b'{"users": [null]}', 400, "users[0]: expected a raw id (an int or a string), got None"),
        (b'{"users": [1180591620717411303424]}', 400, "users: unknown user id 1180591620717411303424"),
        (b'{"users": [true]}', 400, "users[0]: expected a raw id"),
        (b'{"users": [0], "k": 5\xff}', 400, "body: not UTF-8"),
        (b"[" * 3000, 400, "body: JSON nested too deeply"),
        (b'{"users": [NaN]}', 400, "body: NaN is not JSON"),
        (b'{"users": [0], "exclude_seen": "no"}', 400, "exclude_seen: expected true or false, got 'no'"),
        (b'{"users": [0], "k": 1000000000000}', 400, "k: 1000000000000 is more than this Ranker's limit max_k=20"),
        (b'{"users": [0], "k": 0}', 400, "k: expected a positive int, got 0"),
        (b'{"users": [0, 1, 2, 3, 4, 5], "k": 2}', 400, "users: 6 ids, more than this Ranker's limit max_users=5"),
        (b'{"users": [0], "candidates": [[1]]}', 400, "candidates[0]: expected a raw id"),
        (b'{"users": [' + b"0, " * 2000 + b"0]}", 413, "body: more than the limit of 4000 bytes"),
    ],
)
def test_asgi_app_answers_bad_bodies_with_one_line_4xx(asgi_server, body, status, error):
    got, answer = fetch(asgi_server, "POST", "/recommend", body)
    assert got == status and answer["error"].startswith(error), answer
    assert "\n" not in answer["error"]
    assert fetch(asgi_server, "GET", "/health")[0] == 200


def test_asgi_app_refuses_large_and_slow_bodies(asgi_server):
    # A declared length over the limit is refused before the body is read.
    with socket.create_connection(asgi_server, timeout=10) as s:
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    # So is a chunked body (no declared length) as soon as it passes the limit.
    chunks = iter([b'{"users": [', *[b"0, " * 500] * 3, b"0]}"])
    status, answer = fetch(asgi_server, "POST", "/recommend", chunks, {"Transfer-Encoding": "chunked"})
    assert status == 413 and answer == {"error": "body: more than the limit of 4000 bytes"}
    # A body that does not arrive in time (RANKFAST_BODY_TIMEOUT_S=0.5) is a 408.
    with socket.create_connection(asgi_server, timeout=10) as s:
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"users"')
        started = time.monotonic()
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 5
    assert fetch(asgi_server, "GET", "/recommend")[0] == 405


def test_asgi_health_answers_while_requests_are_scored(asgi_server, monkeypatch):
    """Scoring runs on worker threads: /health answers at once while a slow request is in flight."""
    real = Ranker.score_many

    def slow(self, *args, **kwargs):
        time.sleep(1.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Ranker, "score_many", slow)
    pending = threading.Thread(target=fetch, args=(asgi_server, "POST", "/recommend", b'{"users": [0]}'))
    pending.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert fetch(asgi_server, "GET", "/health")[0] == 200
    assert time.monotonic() - started < 0.5
    assert pending.is_alive()  # still being scored
    pending.join()


# --- Triton Python backend, against a fake triton_python_backend_utils --------------------------


def fake_triton_utils():
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self._array = name, np.asarray(array)

        def as_numpy(self):
            return self._array

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    class TritonError(Exception):
        pass

    def get_input_tensor_by_name(request, name):
        return request.get(name)

    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, TritonError
    pb.get_input_tensor_by_name = get_input_tensor_by_name
    return pb


def test_triton_model(model_dir, monkeypatch):
    pb = fake_triton_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    example = load_example(EXAMPLES / "triton" / "rankfast" / "1" / "model.py", "triton_example")
    model = example.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": {"model_dir": {"string_value": model_dir}}})})

    requests = [
        {"USER_IDS": pb.Tensor("USER_IDS", np.array([0, 5], dtype=np.int64)), "K": pb.Tensor("K", np.array([4]))},
        {
            "USER_IDS": pb.Tensor("USER_IDS", np.array([9], dtype=np.int64)),
            "K": pb.Tensor("K", np.array([30])),
        },  # k > items
        {"USER_IDS": pb.Tensor("USER_IDS", np.array([2], dtype=np.int64))},  # default k
    ]
    responses = model.execute(requests)
    ranker = Ranker.load(model_dir)
    for response, users, k in zip(responses, ([0, 5], [9], [2]), (4, 30, 10), strict=True):
        assert response.error is None
        outputs = {t.name: t.as_numpy() for t in response.output_tensors}
        assert outputs["ITEM_IDS"].shape == outputs["SCORES"].shape == (len(users), min(k, 25))  # K clamped
        for row_ids, row_scores, want in zip(
            outputs["ITEM_IDS"], outputs["SCORES"], ranker.score(users, k=k), strict=True
        ):
            n = len(want["items"])  # batched and single-user scores may differ in the last bits
            assert_rankings_match(row_ids[:n], row_scores[:n], want["items"], want["scores"])
            assert (row_ids[n:] == -1).all() and np.isneginf(row_scores[n:]).all()
    assert (responses[1].output_tensors[0].as_numpy()[0] == -1).sum() > 0  # 25 items less the seen ones

    bad = model.execute([{"USER_IDS": pb.Tensor("USER_IDS", np.array([999]))}])
    assert "unknown user id 999" in str(bad[0].error)

    # A bad request batched with good ones fails alone, and costs only itself.
    unknown = {"USER_IDS": pb.Tensor("USER_IDS", np.array([3, 999]))}
    k_zero = {"USER_IDS": pb.Tensor("USER_IDS", np.array([1])), "K": pb.Tensor("K", np.array([0]))}
    k_huge = {"USER_IDS": pb.Tensor("USER_IDS", np.array([1])), "K": pb.Tensor("K", np.array([10**12]))}
    mixed = model.execute([requests[0], unknown, requests[2], k_zero, k_huge])
    assert [r.error is None for r in mixed] == [True, False, True, False, False]
    assert "unknown user id 999" in str(mixed[1].error) and "k: expected a positive int" in str(mixed[3].error)
    assert "k: 1000000000000 is more than this Ranker's limit max_k=1000" in str(mixed[4].error)  # the default
    for response, users, k in ((mixed[0], [0, 5], 4), (mixed[2], [2], 10)):
        outputs = {t.name: t.as_numpy() for t in response.output_tensors}
        for ids, scores, want in zip(outputs["ITEM_IDS"], outputs["SCORES"], ranker.score(users, k=k), strict=True):
            assert_rankings_match(ids[ids >= 0], scores[ids >= 0], want["items"], want["scores"])


# --- Ray Serve, against a fake ray.serve ---------------------------------------------------------


def fake_ray():
    ray, serve = types.ModuleType("ray"), types.ModuleType("ray.serve")
    ray.serve = serve

    def deployment(**options):
        def wrap(cls):
            cls.deployment_options = options
            cls.bind = classmethod(lambda c, *args: ("bound", c, args))
            return cls

        return wrap

    def batch(**options):
        """Like serve.batch: callers pass one item, the method gets a list."""

        def wrap(method):
            async def one(self, item):
                return (await method(self, [item]))[0]

            one.batched, one.options = method, options
            return one

        return wrap

    serve.deployment, serve.batch = deployment, batch
    return ray, serve


class FakeHTTPRequest:
    def __init__(self, body):
        self._body = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def body(self):
        return self._body


def test_ray_serve_deployment(model_dir, monkeypatch):
    pytest.importorskip("starlette")  # Ray Serve's own dependency, for the 400 response
    ray, serve = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", serve)
    monkeypatch.setenv("RANKFAST_MODEL_DIR", model_dir)
    example = load_example(EXAMPLES / "ray_serve_app.py", "ray_example")
    kind, cls, args = example.app
    assert kind == "bound" and cls is example.RankerDeployment and args == (model_dir,)
    assert example.RankerDeployment.recommend.options["max_batch_size"] > 1

    deployment = example.RankerDeployment(model_dir)
    ranker = Ranker.load(model_dir)
    body = {"users": [1, 4], "k": 3}
    assert asyncio.run(deployment(FakeHTTPRequest(body))) == {"results": ranker.score(**body)}
    batch = [{"users": [0], "k": 2}, {"users": [6, 7], "k": 5, "exclude_seen": False}]
    got = asyncio.run(example.RankerDeployment.recommend.batched(deployment, batch))
    assert got == ranker.score_many(batch)
    for rows, b in zip(got, batch, strict=True):  # batched and single calls may differ in the last bits
        for row, want in zip(rows, ranker.score(**b), strict=True):
            assert_rankings_match(row["items"], row["scores"], want["items"], want["scores"])

    # A bad request batched with good ones fails alone, as a 400 at the HTTP entry.
    mixed = [batch[0], {"users": [999]}, batch[1], {"users": [1], "k": 0}]
    got = asyncio.run(example.RankerDeployment.recommend.batched(deployment, mixed))
    assert got[0] == ranker.score(**batch[0]) and got[2] == ranker.score(**batch[1])
    assert isinstance(got[1], KeyError) and isinstance(got[3], ValueError)
    for body, error in (
        ({"users": [999]}, "users: unknown user id 999"),
        (b'{"users": [null]}', "users[0]: expected a raw id"),
        (b'{"users": [1], "histories": {"1": [2]}}', "body: expected a JSON object with users"),  # not over HTTP
        (b"\xff", "body: not UTF-8"),
        ({"users": [1], "k": 10**12}, "k: 1000000000000 is more than this Ranker's limit max_k=1000"),
    ):
        response = asyncio.run(deployment(FakeHTTPRequest(body)))
        assert response.status_code == 400 and json.loads(response.body)["error"].startswith(error)

    # A request whose scoring fails (a server fault, not the client's) is a 500.
    def out_of_memory(batch):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(deployment.ranker, "_score_group", out_of_memory)
    response = asyncio.run(deployment(FakeHTTPRequest({"users": [1, 4], "k": 3})))
    assert response.status_code == 500 and json.loads(response.body) == {"error": "cannot allocate"}
