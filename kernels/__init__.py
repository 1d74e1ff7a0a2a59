"""Triton kernels, installed as ``rankfast.kernels``: pure ops, tensors in and tensors out.

One module per fused operation (kernels, launcher, custom-op registration and
autograd): :mod:`~rankfast.kernels.mlp_score` (``torch.ops.rankfast.mlp_score``,
``mlp_score_topk``), :mod:`~rankfast.kernels.target_attention`
(``target_attention_score``, ``target_attention_topk``), :mod:`~rankfast.kernels.cross_score`
(``cross_score``, DCN-v2, scoring only), :mod:`~rankfast.kernels.rating_score`
(``rating_score``, RecommenderNet's expected rating, scoring only) and the running top-K
they share (:mod:`~rankfast.kernels.topk`). Nothing here knows the models:
``rankfast.scoring.backends.fused`` turns a model into an op's arguments.
"""
