"""An ASGI (Starlette) app serving a rankfast model directory over HTTP.

    RANKFAST_MODEL_DIR=rankfast-demo uvicorn examples.asgi_app:app --port 8000 \\
        --timeout-keep-alive 5 --limit-concurrency 256 --backlog 256
    curl -s localhost:8000/recommend -d '{"users": [0, 1], "k": 5}'

``POST /recommend`` takes a JSON object with ``users`` and optionally
``candidates``, ``k`` and ``exclude_seen`` (the arguments of
:meth:`rankfast.Ranker.score`) and answers ``{"results": [{"user", "items",
"scores"}, ...]}``. A bad request is a 400 with ``{"error": "..."}`` (one
line: a body that is not UTF-8 JSON, an unknown user, a bad argument, a
request over the limits), a body over the size limit a 413, a body not
received in time a 408; a 500 is a server fault, logged. ``GET /health``
says whether the model is loaded.

Settings (environment variables):

- ``RANKFAST_MODEL_DIR``: the model directory (required).
- ``RANKFAST_MAX_K``, ``RANKFAST_MAX_USERS``, ``RANKFAST_MAX_CANDIDATES``: the
  limits of one request (:meth:`rankfast.request.Limits.from_env`; default
  1000, 1000 and 100000; ``none`` for no limit).
- ``RANKFAST_MAX_BODY_BYTES``: the largest request body (default 1 MiB).
- ``RANKFAST_BODY_TIMEOUT_S``: seconds to receive a body (default 10).
- ``RANKFAST_SCORING_THREADS``: requests scored at once (default: the CPU
  count); the others wait their turn without holding a thread.

Parsing, scoring and rendering the answer run on those threads, never on the
event loop, so ``/health`` and new connections are served while requests are
scored. One Ranker serves every request: it is thread-safe. Replicate the
process (``uvicorn --workers N``) to serve more.

Slow clients: uvicorn closes idle keep-alive connections after
``--timeout-keep-alive`` seconds and answers 503 beyond ``--limit-concurrency``
connections, but it has no timeout for a client that never finishes sending
its request headers; in front of untrusted clients, run it behind a proxy
that has one (nginx's ``client_header_timeout`` and ``client_body_timeout``,
or a cloud load balancer). The body timeout above is the app's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rankfast import Ranker
from rankfast.request import Limits, describe
from rankfast.request import Request as RankRequest

log = logging.getLogger("rankfast.asgi")


class _BodyError(Exception):
    """A body that cannot be read: its status and one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def create_app(model_dir: str) -> Starlette:
    """The app for ``model_dir``, with the settings the environment gives (module docstring)."""
    ranker = Ranker.load(model_dir, limits=Limits.from_env())
    max_body = _setting("RANKFAST_MAX_BODY_BYTES", int, 2**20)
    body_timeout = _setting("RANKFAST_BODY_TIMEOUT_S", float, 10.0)
    threads = anyio.CapacityLimiter(_setting("RANKFAST_SCORING_THREADS", int, os.cpu_count() or 1))

    def answer(body: bytes) -> tuple[int, bytes]:
        """Status and JSON of one request body; runs on a scoring thread."""
        try:
            results = ranker.score_many([RankRequest.from_json(body)])[0]
        except (KeyError, ValueError, TypeError) as err:
            return 400, _error(err)
        except Exception as err:  # a server fault (e.g. MemoryError), not the client's
            log.exception("scoring failed")
            return 500, _error(err)
        return 200, json.dumps({"results": results}).encode()

    async def recommend(request: Request) -> Response:
        try:
            body = await asyncio.wait_for(_read_body(request, max_body), body_timeout)
        except _BodyError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"body: not received within {body_timeout:g} s"}, status_code=408)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        status, content = await anyio.to_thread.run_sync(answer, body, limiter=threads)
        return Response(content, status_code=status, media_type="application/json")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "users": len(ranker.user_ids), "items": len(ranker.item_ids)})

    return Starlette(routes=[Route("/recommend", recommend, methods=["POST"]), Route("/health", health)])


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    too_large = _BodyError(413, f"body: more than the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _error(err: Exception) -> bytes:
    return json.dumps({"error": describe(err)}).encode()


def _setting(name: str, kind, default):
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ValueError(f"{name}: expected a positive {kind.__name__}, got {text!r}")
    return value


if os.environ.get("RANKFAST_MODEL_DIR"):
    app = create_app(os.environ["RANKFAST_MODEL_DIR"])
