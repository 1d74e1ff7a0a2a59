"""Requests to a :class:`rankfast.Ranker`: their arguments, a deployment's limits on them,
and the JSON form the serving examples receive.

Everything here is checked before any scoring, so a bad or oversized request costs
nothing but its own check, and the errors name the argument (or the limit) on one line.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["Request", "Limits", "SERVING_LIMITS", "JSON_FIELDS", "describe"]

#: The fields of a request body in JSON (cold-start ``histories`` are for Python callers).
JSON_FIELDS = ("users", "candidates", "k", "exclude_seen", "context")


@dataclass(frozen=True)
class Request:
    """One call's worth of :meth:`Ranker.score` arguments, for :meth:`Ranker.score_many`."""

    users: Sequence
    candidates: Sequence | None = None
    k: int = 10
    exclude_seen: bool = True
    histories: Mapping | None = None
    context: Mapping | None = None

    @classmethod
    def of(cls, value) -> Request:
        """``value`` if it is a Request, else a Request of the mapping ``value``'s arguments."""
        if isinstance(value, Request):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"request: expected a Request or a mapping of its fields, got {type(value).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(name) for name in set(value) - set(names))
        if unknown or "users" not in value:
            problem = f"unknown fields {unknown}" if unknown else "no users"
            raise TypeError(f"request: {problem} (fields: {', '.join(names)}; users is required)")
        return cls(**value)

    @classmethod
    def from_json(cls, data: bytes | str) -> Request:
        """A request from a JSON object with ``users`` and optionally ``candidates``,
        ``k``, ``exclude_seen`` and ``context`` (:data:`JSON_FIELDS`), as the serving examples
        receive it.

        Raises ``ValueError`` with a one-line reason for bytes that are not UTF-8,
        text that is not JSON (or holds NaN or Infinity), nesting too deep for the
        parser, or anything but an object with those fields. The values are
        checked when the request is scored.
        """
        try:
            text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
            body = json.loads(text, parse_constant=_reject_constant)
        except UnicodeDecodeError as err:
            raise ValueError(f"body: not UTF-8 (byte {err.start}: {err.reason})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"body: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        except RecursionError:
            raise ValueError("body: JSON nested too deeply") from None
        if not isinstance(body, dict) or "users" not in body or set(body) - set(JSON_FIELDS):
            raise ValueError(f"body: expected a JSON object with users and optionally {', '.join(JSON_FIELDS[1:])}")
        return cls(**body)


def _reject_constant(name: str):
    raise ValueError(f"body: {name} is not JSON")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a :class:`Ranker` (``None``: no limit).

    ``max_k``: items per user; ``max_users``: user ids; ``max_candidates``:
    candidate ids. A request over a limit raises ``ValueError`` naming it,
    before anything is scored. Whatever the limits, ``k`` is clamped to the
    number of candidates, so it never sizes more than they do.
    """

    max_k: int | None = None
    max_users: int | None = None
    max_candidates: int | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Limits.{f.name}: expected a positive int or None, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, defaults: Limits | None = None) -> Limits:
        """Limits from ``RANKFAST_MAX_K``, ``RANKFAST_MAX_USERS`` and
        ``RANKFAST_MAX_CANDIDATES`` (a positive int, or ``none`` for no limit);
        an unset variable keeps ``defaults`` (:data:`SERVING_LIMITS`)."""
        environ = os.environ if environ is None else environ
        defaults = SERVING_LIMITS if defaults is None else defaults
        values = {}
        for f in fields(cls):
            variable = f"RANKFAST_{f.name.upper()}"
            text = environ.get(variable)
            if text is None:
                values[f.name] = getattr(defaults, f.name)
            elif text.strip().lower() == "none":
                values[f.name] = None
            else:
                try:
                    values[f.name] = int(text)
                except ValueError:
                    raise ValueError(f"{variable}: expected a positive int or 'none', got {text!r}") from None
                if values[f.name] < 1:
                    raise ValueError(f"{variable}: expected a positive int or 'none', got {text!r}")
        return cls(**values)

    def check_k(self, k) -> int:
        """A request's ``k``: a positive int within ``max_k``."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k: expected a positive int, got {shown(k)}")
        if self.max_k is not None and k > self.max_k:
            raise ValueError(f"k: {shown(k)} is more than this Ranker's limit max_k={self.max_k}")
        return int(k)

    def check_ids(self, name: str, values) -> list:
        """A request's raw ``users`` or ``candidates`` as a list: a sequence (not a
        string or a mapping) of numbers or of strings (not bools, None or
        containers), no more than ``max_users`` or ``max_candidates`` of them."""
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise TypeError(f"{name}: expected a sequence of ids, got {type(values).__name__}")
        values = list(values.tolist() if hasattr(values, "tolist") else values)  # numpy or torch: Python scalars
        limit = {"users": self.max_users, "candidates": self.max_candidates}[name]
        if limit is not None and len(values) > limit:
            raise ValueError(f"{name}: {len(values)} ids, more than this Ranker's limit max_{name}={limit}")
        strings = 0
        for n, value in enumerate(values):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, str)):
                raise TypeError(f"{name}[{n}]: expected a raw id (an int or a string), got {shown(value)}")
            strings += isinstance(value, str)
        if 0 < strings < len(values):
            raise TypeError(f"{name}: ids must be all numbers or all strings")
        return values


#: Limits for a service that answers untrusted clients; the serving examples start
#: from these (:meth:`Limits.from_env`).
SERVING_LIMITS = Limits(max_k=1000, max_users=1000, max_candidates=100_000)


def check_flag(name: str, value) -> bool:
    """A request's boolean argument: ``True`` or ``False`` only (``"no"`` is not false)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected true or false, got {shown(value)}")
    return bool(value)


def shown(value) -> str:
    """``repr(value)``, cut short: error messages echo what a client sent."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def describe(err: BaseException) -> str:
    """An exception as one line, for an error response (a ``KeyError``'s message
    without the quotes ``str`` adds; the class name when there is no message)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(message).split()) or type(err).__name__
