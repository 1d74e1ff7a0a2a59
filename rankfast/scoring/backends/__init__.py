"""Scoring backends: modules of :class:`~rankfast.scoring.protocol.Scorer` classes, each with
``scorer_for(model)``; :mod:`rankfast.scoring.registry` picks among them."""
