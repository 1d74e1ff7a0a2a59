"""A Ray Serve deployment of a rankfast model directory, with request micro-batching.

    RANKFAST_MODEL_DIR=$PWD/rankfast-demo serve run examples.ray_serve_app:app
    curl -s localhost:8000/ -d '{"users": [0, 1], "k": 5}'

Each replica loads one :class:`rankfast.Ranker`. ``serve.batch`` gathers
concurrent HTTP requests (up to 64, waiting at most 5 ms) and hands them to
:meth:`Ranker.score_many`, which scores requests with the same candidates in
one call (if that fails, one by one, so only a bad request fails: a 400 with
``{"error": "..."}``). A request body holds the arguments of :meth:`Ranker.score`.
"""

from __future__ import annotations

import asyncio
import os

from ray import serve
from starlette.responses import JSONResponse  # a dependency of Ray Serve

from rankfast import Ranker


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
class RankerDeployment:
    def __init__(self, model_dir: str):
        self.ranker = Ranker.load(model_dir)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def recommend(self, requests: list[dict]) -> list:
        # Scoring blocks: in a worker thread, so the replica keeps accepting requests meanwhile.
        return await asyncio.to_thread(self._score_batch, requests)

    def _score_batch(self, requests: list[dict]) -> list:
        """Each request's rows, or the exception of a bad request: one bad request (an
        unknown user, k < 1) must not fail the others batched with it."""
        try:
            return self.ranker.score_many(requests)
        except (KeyError, ValueError, TypeError):
            return [self._score_one(request) for request in requests]

    def _score_one(self, request):
        try:
            return self.ranker.score_many([request])[0]
        except (KeyError, ValueError, TypeError) as err:
            return err

    async def __call__(self, http_request):
        rows = await self.recommend(await http_request.json())
        if isinstance(rows, Exception):
            return JSONResponse({"error": rows.args[0] if rows.args else str(rows)}, status_code=400)
        return {"results": rows}


app = RankerDeployment.bind(os.environ.get("RANKFAST_MODEL_DIR", "rankfast-demo"))
