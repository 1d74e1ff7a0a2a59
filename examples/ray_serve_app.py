"""A Ray Serve deployment of a rankfast model directory, with request micro-batching.

    RANKFAST_MODEL_DIR=$PWD/rankfast-demo serve run examples.ray_serve_app:app
    curl -s localhost:8000/ -d '{"users": [0, 1], "k": 5}'

Each replica loads one :class:`rankfast.Ranker`, with the request limits of
``RANKFAST_MAX_K``, ``RANKFAST_MAX_USERS`` and ``RANKFAST_MAX_CANDIDATES``
(:meth:`rankfast.request.Limits.from_env`; default 1000, 1000 and 100000).
A request body is a JSON object with ``users`` and optionally ``candidates``,
``k`` and ``exclude_seen`` (the arguments of :meth:`Ranker.score`).
``serve.batch`` gathers concurrent requests (up to 64, waiting at most 5 ms)
and hands them to :meth:`Ranker.score_many`, which checks each before scoring
any and scores requests with the same candidates and ``k`` together; a bad
request fails alone (a 400 with ``{"error": "..."}``; a 500 for a server
fault such as ``MemoryError``) and costs only itself.
"""

from __future__ import annotations

import asyncio
import os

from ray import serve
from starlette.responses import JSONResponse  # a dependency of Ray Serve

from rankfast import Ranker
from rankfast.request import Limits, Request, describe


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
class RankerDeployment:
    def __init__(self, model_dir: str):
        self.ranker = Ranker.load(model_dir, limits=Limits.from_env())

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def recommend(self, requests: list[Request]) -> list:
        """Each request's rows, or the exception it raised. Scoring blocks: in a worker
        thread, so the replica keeps accepting requests meanwhile."""
        return await asyncio.to_thread(self.ranker.score_many, requests, return_errors=True)

    async def __call__(self, http_request):
        try:
            rows = await self.recommend(Request.from_json(await http_request.body()))
        except ValueError as err:  # a body that is not a JSON request
            rows = err
        if isinstance(rows, Exception):
            client = isinstance(rows, (KeyError, ValueError, TypeError))
            return JSONResponse({"error": describe(rows)}, status_code=400 if client else 500)
        return {"results": rows}


app = RankerDeployment.bind(os.environ.get("RANKFAST_MODEL_DIR", "rankfast-demo"))
