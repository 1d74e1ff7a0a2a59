"""Triton Inference Server Python backend serving a rankfast model directory.

Lay out a model repository as in ``examples/triton/`` (this file as
``rankfast/1/model.py`` beside ``rankfast/config.pbtxt``), set the
``model_dir`` parameter in config.pbtxt, and start ``tritonserver
--model-repository examples/triton`` in an image that has rankfast installed.

For models whose raw ids are integers. Inputs: ``USER_IDS`` (int64 ``[B]``) and
optionally ``K`` (int64 ``[1]``, default 10). Outputs: ``ITEM_IDS`` (int64
``[B, min(K, items)]``, ``items`` the catalogue size) and ``SCORES`` (fp32, the
same shape), best first; a user with fewer eligible items gets id -1 and score
-inf in the remaining places. The requests of one ``execute`` call go to
:meth:`Ranker.score_many` together, which checks each before scoring any and
scores requests with the same ``K`` together: a bad request (an unknown user
id, ``K`` < 1, over the limits) gets its own error response and costs only
itself; the others are answered. The limits come from ``RANKFAST_MAX_K``,
``RANKFAST_MAX_USERS`` and ``RANKFAST_MAX_CANDIDATES`` in the server's
environment (:meth:`rankfast.request.Limits.from_env`; default 1000, 1000 and
100000).
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from rankfast import Ranker
from rankfast.request import Limits, describe


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        model_dir = config["parameters"]["model_dir"]["string_value"]
        self.ranker = Ranker.load(model_dir, limits=Limits.from_env())

    def execute(self, requests):
        parsed = []
        for request in requests:
            users = pb_utils.get_input_tensor_by_name(request, "USER_IDS").as_numpy().reshape(-1)
            k_tensor = pb_utils.get_input_tensor_by_name(request, "K")
            k = 10 if k_tensor is None else int(k_tensor.as_numpy().reshape(-1)[0])
            parsed.append({"users": users.tolist(), "k": k})
        results = self.ranker.score_many(parsed, return_errors=True)
        width = len(self.ranker.item_ids)
        return [
            pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(describe(rows)))
            if isinstance(rows, Exception)
            else pb_utils.InferenceResponse(output_tensors=_outputs(rows, min(request["k"], width)))
            for request, rows in zip(parsed, results, strict=True)
        ]


def _outputs(rows, k):
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for j, row in enumerate(rows):
        ids[j, : len(row["items"])] = row["items"]
        scores[j, : len(row["scores"])] = row["scores"]
    return [pb_utils.Tensor("ITEM_IDS", ids), pb_utils.Tensor("SCORES", scores)]
