"""A built-in interaction log with planted structure, for demos and tests (no download)."""

from __future__ import annotations

import numpy as np

from rankfast.data.interactions import IdMap, Interactions

__all__ = ["synthetic_interactions"]


def synthetic_interactions(
    num_users: int = 3000,
    num_items: int = 1500,
    *,
    per_user: int | None = None,
    topics: int = 20,
    seed: int = 0,
) -> Interactions:
    """Users who like a few topics pick popular items of those topics.

    Every item belongs to one of ``topics`` topics and has a Zipf-like
    popularity; every user has a sparse taste over topics (Dirichlet with
    concentration 0.1, so mostly one or two topics). A user picks about
    ``per_user`` (default 40, at most a quarter of the items) distinct items (uniformly between half and one and a half
    times that), each with probability proportional to
    ``taste[topic] * popularity``. So popularity alone is a fair baseline and
    a personalized model that learns the tastes beats it clearly.

    Interactions get ratings 1-5 (higher for the user's favourite topics),
    timestamps in a random order per user, and item text
    ``"item <id>: topic <t>"``. Raw ids are ``0..num_users-1`` and
    ``0..num_items-1``. The result depends on the arguments only.
    """
    if per_user is None:
        per_user = max(1, min(40, num_items // 4))
    for name, value in (("num_users", num_users), ("num_items", num_items), ("per_user", per_user), ("topics", topics)):
        if int(value) < 1:
            raise ValueError(f"{name}: must be at least 1, got {value}")
    if per_user > num_items:
        raise ValueError(f"per_user: {per_user} distinct items per user, but only {num_items} items")
    rng = np.random.default_rng(seed)
    item_topic = rng.integers(topics, size=num_items)
    popularity = rng.permutation(np.arange(1, num_items + 1) ** -0.8)
    taste = rng.dirichlet(np.full(topics, 0.1), size=num_users)
    counts = rng.integers(max(1, per_user // 2), min(num_items, per_user * 3 // 2) + 1, size=num_users)

    users, items, ratings = [], [], []
    for start in range(0, num_users, 1024):  # bounded [block, num_items] working set
        block = slice(start, min(start + 1024, num_users))
        weights = taste[block][:, item_topic] * popularity
        # Gumbel top-n draws n distinct items with probability proportional to the weights.
        keys = np.log(weights + 1e-30) + rng.gumbel(size=weights.shape)
        for row, (user, n) in enumerate(zip(range(block.start, block.stop), counts[block], strict=True)):
            picked = np.argpartition(-keys[row], n - 1)[:n]
            liking = taste[user, item_topic[picked]] / taste[user].max()
            users.append(np.full(n, user))
            items.append(picked)
            ratings.append(np.clip(np.round(1 + 4 * liking + rng.normal(0, 0.5, n)), 1, 5))
    users, items = np.concatenate(users), np.concatenate(items)
    timestamps = np.concatenate([rng.permutation(n) for n in counts]) + 1_000_000_000
    text = {i: f"item {i}: topic {t}" for i, t in enumerate(item_topic.tolist())}
    return Interactions.from_raw(
        users,
        items,
        np.concatenate(ratings),
        timestamps,
        item_text=text,
        user_ids=IdMap(np.arange(num_users)),
        item_ids=IdMap(np.arange(num_items)),
    )
