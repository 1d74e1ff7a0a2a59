"""Triton Inference Server Python backend serving a rankfast model directory.

Lay out a model repository as in ``examples/triton/`` (this file as
``rankfast/1/model.py`` beside ``rankfast/config.pbtxt``), set the
``model_dir`` parameter in config.pbtxt, and start ``tritonserver
--model-repository examples/triton`` in an image that has rankfast installed.

For models whose raw ids are integers. Inputs: ``USER_IDS`` (int64 ``[B]``) and optionally ``K`` (int64 ``[1]``,
default 10). Outputs: ``ITEM_IDS`` (int64 ``[B, K]``) and ``SCORES`` (fp32
``[B, K]``), best first; a user with fewer than K eligible items gets id -1
and score -inf in the remaining places. The requests that reach one
``execute`` call go to :meth:`Ranker.score_many` together, which scores them
in one call; if that fails, they are scored one by one, so only a bad request
(an unknown user id, K < 1) gets an error response.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from rankfast import Ranker


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.ranker = Ranker.load(config["parameters"]["model_dir"]["string_value"])

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for n, request in enumerate(requests):
            users = pb_utils.get_input_tensor_by_name(request, "USER_IDS").as_numpy().reshape(-1)
            k_tensor = pb_utils.get_input_tensor_by_name(request, "K")
            k = 10 if k_tensor is None else int(k_tensor.as_numpy().reshape(-1)[0])
            parsed.append((n, {"users": users.tolist(), "k": k}))
        try:
            results = self.ranker.score_many([request for _, request in parsed])
        except (KeyError, ValueError, TypeError):
            # One bad request (an unknown user, k < 1) must not fail the others batched with it:
            # score them one by one, and only the bad ones get an error.
            results = [self._score_one(request) for _, request in parsed]
        for (n, request), rows in zip(parsed, results, strict=True):
            if isinstance(rows, Exception):
                error = pb_utils.TritonError(rows.args[0] if rows.args else str(rows))
                responses[n] = pb_utils.InferenceResponse(output_tensors=[], error=error)
            else:
                responses[n] = pb_utils.InferenceResponse(output_tensors=_outputs(rows, request["k"]))
        return responses

    def _score_one(self, request):
        try:
            return self.ranker.score(**request)
        except (KeyError, ValueError, TypeError) as err:
            return err


def _outputs(rows, k):
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for j, row in enumerate(rows):
        ids[j, : len(row["items"])] = row["items"]
        scores[j, : len(row["scores"])] = row["scores"]
    return [pb_utils.Tensor("ITEM_IDS", ids), pb_utils.Tensor("SCORES", scores)]
