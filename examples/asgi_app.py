"""An ASGI (Starlette) app serving a rankfast model directory over HTTP.

    RANKFAST_MODEL_DIR=rankfast-demo uvicorn examples.asgi_app:app --port 8000
    curl -s localhost:8000/recommend -d '{"users": [0, 1], "k": 5}'

``POST /recommend`` takes ``{"users": [...], "k": 10, "candidates": null,
"exclude_seen": true}`` (the arguments of :meth:`rankfast.Ranker.score`) and
answers ``{"results": [{"user", "items", "scores"}, ...]}``; an unknown user
or a bad argument is a 400 with ``{"error": "..."}``. ``GET /health`` says
whether the model is loaded. One Ranker serves every request: it is
thread-safe, and each request runs in Starlette's thread pool so scoring
never blocks the event loop. Replicate the process (e.g. ``uvicorn
--workers N``) to serve more.
"""

from __future__ import annotations

import json
import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rankfast import Ranker

FIELDS = ("users", "candidates", "k", "exclude_seen")


def create_app(model_dir: str) -> Starlette:
    ranker = Ranker.load(model_dir)

    async def recommend(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return JSONResponse({"error": "body: expected JSON"}, status_code=400)
        if not isinstance(body, dict) or "users" not in body or set(body) - set(FIELDS):
            return JSONResponse(
                {"error": f"body: expected an object with users and optionally {FIELDS[1:]}"}, status_code=400
            )
        try:
            results = await run_in_threadpool(ranker.score, **body)
        except (KeyError, ValueError, TypeError) as err:
            return JSONResponse({"error": err.args[0] if err.args else str(err)}, status_code=400)
        return JSONResponse({"results": results})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "users": len(ranker.user_ids), "items": len(ranker.item_ids)})

    return Starlette(routes=[Route("/recommend", recommend, methods=["POST"]), Route("/health", health)])


if os.environ.get("RANKFAST_MODEL_DIR"):
    app = create_app(os.environ["RANKFAST_MODEL_DIR"])
