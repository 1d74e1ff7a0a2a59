"""rankfast.request: requests in JSON and a deployment's limits, checked before any scoring."""

import json

import pytest

from rankfast.request import JSON_FIELDS, SERVING_LIMITS, Limits, Request


def test_from_json_takes_the_fields_of_score():
    body = {"users": [0, "a"], "candidates": None, "k": 5, "exclude_seen": False}
    assert Request.from_json(json.dumps(body).encode()) == Request(**body)
    assert Request.from_json('{"users": []}') == Request([])
    assert set(JSON_FIELDS) == {"users", "candidates", "k", "exclude_seen", "context"}


@pytest.mark.parametrize(
    "data, match",
    [
        (b'{"users": [0], "k": 5\xff}', r"body: not UTF-8 \(byte 21: invalid start byte\)"),
        ('{"users": [0]'.encode("utf-16"), "body: not UTF-8"),  # JSON travels as UTF-8 (RFC 8259)
        (b"", r"body: not JSON \(Expecting value at line 1, column 1\)"),
        (b'{"users": [0],}', "body: not JSON"),
        (b"[" * 100_000, "body: JSON nested too deeply"),
        (b'{"users": [NaN]}', "body: NaN is not JSON"),
        (b'{"users": [0], "k": Infinity}', "body: Infinity is not JSON"),
        (b"[0]", "body: expected a JSON object with users and optionally candidates, k, exclude_seen, context"),
        (b'"users"', "body: expected a JSON object"),
        (b'{"k": 3}', "body: expected a JSON object"),
        (b'{"users": [0], "histories": {"0": [1]}}', "body: expected a JSON object"),
    ],
)
def test_from_json_rejects_with_one_line(data, match):
    with pytest.raises(ValueError, match=match) as info:
        Request.from_json(data)
    assert "\n" not in str(info.value)


def test_of_names_unknown_and_missing_fields():
    assert Request.of({"users": [1], "k": 2}) == Request([1], k=2)
    request = Request([1])
    assert Request.of(request) is request
    with pytest.raises(TypeError, match=r"request: unknown fields \['user'\]"):
        Request.of({"user": [1]})
    with pytest.raises(TypeError, match="request: no users"):
        Request.of({"k": 2})
    with pytest.raises(TypeError, match="request: expected a Request or a mapping"):
        Request.of([1, 2])


def test_limits_check_k_and_ids():
    limits = Limits(max_k=10, max_users=3, max_candidates=4)
    assert limits.check_k(10) == 10
    for k, error in ((11, "k: 11 is more than this Ranker's limit max_k=10"), (0, "positive"), (True, "positive")):
        with pytest.raises(ValueError, match=error):
            limits.check_k(k)
    assert limits.check_ids("users", (1, 2, 3)) == [1, 2, 3]
    with pytest.raises(ValueError, match="users: 4 ids, more than this Ranker's limit max_users=3"):
        limits.check_ids("users", range(4))
    with pytest.raises(ValueError, match="candidates: 5 ids, more than this Ranker's limit max_candidates=4"):
        limits.check_ids("candidates", ["a"] * 5)
    assert Limits().check_ids("users", range(10_000)) == list(range(10_000))  # no limit by default


def test_limits_from_env():
    assert Limits.from_env({}) == SERVING_LIMITS
    env = {"RANKFAST_MAX_K": "50", "RANKFAST_MAX_USERS": "none", "RANKFAST_MAX_CANDIDATES": " 7 "}
    assert Limits.from_env(env) == Limits(max_k=50, max_users=None, max_candidates=7)
    assert Limits.from_env({"RANKFAST_MAX_K": "3"}, defaults=Limits()) == Limits(max_k=3)
    for value in ("0", "-2", "ten", "1.5", ""):
        with pytest.raises(ValueError, match=f"RANKFAST_MAX_USERS: expected a positive int or 'none', got '{value}'"):
            Limits.from_env({"RANKFAST_MAX_USERS": value})
    with pytest.raises(ValueError, match="Limits.max_k: expected a positive int or None, got 0"):
        Limits(max_k=0)
