"""The model directory: what :func:`save_model_dir` writes, ``fit(checkpoint_dir=...)``
writes as ``checkpoint_dir/model``, and :meth:`rankfast.Ranker.load` reads.

A model directory holds:

- ``config.json`` + ``model.safetensors``: the model (:meth:`RankingModel.save`);
- ``mappings.json``: raw user and item ids in contiguous order
  (:meth:`Interactions.save_mappings`);
- ``users.safetensors``: each user's training items (int64 CSR
  ``seen_indptr`` / ``seen_items``, for ``exclude_seen``) and, for models
  that read histories, their last items (int64 ``history [users, L]`` /
  ``lengths``);
- ``ranker.json``: the format version (``format``), the size and sha256 of
  each of the four files above (``files``), ``max_history``, the text
  encoder's directory (``encoder``, relative, if the model was trained
  through one) and where the training data came from (``data``; ``rankfast
  evaluate`` reads it back);
- ``encoder/``: the text encoder, if any.

All but ``encoder/`` are required. A read checks every file against
``ranker.json``'s sizes and hashes, so it sees one save's files even while
another save replaces the directory (it then reads again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from rankfast._io import atomic_dir
from rankfast._version import __version__
from rankfast.data import MAPPINGS_FILE, IdMap, Interactions, user_histories
from rankfast.encoders import TextEncoder
from rankfast.encoders.transfer import save_encoder
from rankfast.models import RankingModel
from rankfast.models.base import CONFIG_FILE, WEIGHTS_FILE, model_from_bytes

__all__ = [
    "ModelDirError",
    "ModelDir",
    "save_model_dir",
    "read_model_dir",
    "check_target",
    "RANKER_FILE",
    "USERS_FILE",
    "FORMAT_VERSION",
]

RANKER_FILE = "ranker.json"
USERS_FILE = "users.safetensors"
#: 2: ``ranker.json`` lists each file's size and sha256. 1 (read, unchecked): without.
FORMAT_VERSION = 2
_FORMATS = (1, 2)
#: The files ``ranker.json`` vouches for.
_FILES = (CONFIG_FILE, WEIGHTS_FILE, MAPPINGS_FILE, USERS_FILE)
_MAX_RANKER_BYTES = 1 << 20
_ATTEMPTS = 5


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or corrupted; the message says which file and why."""


class _Changed(ModelDirError):
    """A file does not match ``ranker.json``: a concurrent save, or corruption."""


@dataclass(frozen=True)
class ModelDir:
    """The contents of a model directory, checked."""

    model: RankingModel
    user_ids: IdMap
    item_ids: IdMap
    users: dict
    meta: dict


# --- writing --------------------------------------------------------------------------------


def check_target(directory) -> None:
    """Raises ``FileExistsError`` unless ``directory`` is absent, an empty
    directory or a model directory (its ``ranker.json`` has a format version):
    :func:`save_model_dir` replaces it whole, and must not delete anything else."""
    directory = os.fspath(directory)
    if os.path.islink(directory):
        raise FileExistsError(f"{directory}: is a symbolic link; give the directory itself")
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(f"{directory}: exists and is not a directory; refusing to replace it")
    if os.listdir(directory) and _format_of(directory) is None:
        raise FileExistsError(
            f"{directory}: not empty and not a rankfast model directory (no {RANKER_FILE}); refusing to replace it"
        )


def _format_of(directory: str) -> int | None:
    """The format version in ``directory``'s ``ranker.json``, any rankfast's; None without one."""
    path = os.path.join(directory, RANKER_FILE)
    try:
        meta = _json(_read(path, _MAX_RANKER_BYTES), path)
    except ModelDirError:
        return None
    version = meta.get("format") if isinstance(meta, dict) else None
    return version if type(version) is int else None


def save_model_dir(
    directory,
    model: RankingModel,
    train: Interactions,
    *,
    max_history: int = 50,
    encoder: TextEncoder | str | os.PathLike | None = None,
    data: Mapping | None = None,
) -> str:
    """Writes the model directory :meth:`Ranker.load` reads (see the module
    docstring), atomically (:func:`rankfast._io.atomic_dir`): a failure leaves
    the old directory or none, and on Linux the path always holds a complete
    one. ``directory`` must be absent, empty or a model directory
    (:func:`check_target`). ``train`` supplies the id mappings, each user's seen
    items and histories. ``encoder``: a :class:`TextEncoder`, saved as
    ``encoder/``, or a saved encoder directory, copied in. ``data``: a
    JSON-able description of the training data (e.g. ``{"movielens": path}``).
    Returns the directory (absolute).
    """
    if (model.config.num_users, model.config.num_items) != (train.num_users, train.num_items):
        raise ValueError(
            f"train: has {train.num_users} users and {train.num_items} items, the model "
            f"{model.config.num_users} and {model.config.num_items}"
        )
    if isinstance(max_history, bool) or not isinstance(max_history, (int, np.integer)) or max_history < 1:
        raise ValueError(f"max_history: expected a positive int, got {max_history!r}")
    directory = os.path.abspath(directory)
    check_target(directory)
    with atomic_dir(directory) as tmp:
        model.save(tmp)
        train.save_mappings(tmp)
        indptr, items = train.user_items()
        tensors = {"seen_indptr": torch.from_numpy(indptr), "seen_items": torch.from_numpy(items)}
        if model.uses_history:
            history, lengths = user_histories(train, max_history)
            tensors.update(history=torch.from_numpy(history), lengths=torch.from_numpy(lengths))
        safetensors.torch.save_file(tensors, os.path.join(tmp, USERS_FILE))
        if isinstance(encoder, TextEncoder):
            save_encoder(encoder, os.path.join(tmp, "encoder"))
        elif encoder is not None:
            shutil.copytree(encoder, os.path.join(tmp, "encoder"))
        meta = {
            "format": FORMAT_VERSION,
            "rankfast_version": __version__,
            "files": {name: _file_fingerprint(os.path.join(tmp, name)) for name in _FILES},
            "max_history": int(max_history),
            "encoder": None if encoder is None else "encoder",
            "data": None if data is None else dict(data),
        }
        with open(os.path.join(tmp, RANKER_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    return directory


def _fingerprint(chunks) -> dict:
    """``{"size", "sha256"}`` of the bytes in ``chunks``."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _file_fingerprint(path: str) -> dict:
    with open(path, "rb") as f:
        return _fingerprint(iter(lambda: f.read(1 << 20), b""))


# --- reading --------------------------------------------------------------------------------


def read_model_dir(directory, device: str | torch.device = "cpu") -> ModelDir:
    """Reads and checks a model directory. Each file is read once and checked
    against ``ranker.json`` before it is parsed; when one does not match (a
    save replaced the directory meanwhile) the whole read starts again, a few
    times. Raises :class:`ModelDirError` naming the file and the problem."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ModelDirError(f"{directory}: no such model directory")
    for attempt in range(_ATTEMPTS):
        try:
            return _read_once(directory, device)
        except _Changed as err:
            if attempt == _ATTEMPTS - 1:
                raise ModelDirError(f"{err}; read {_ATTEMPTS} times") from err
            time.sleep(0.01 * 2**attempt)


def _read_once(directory: str, device) -> ModelDir:
    ranker_path = os.path.join(directory, RANKER_FILE)
    meta = _check_meta(_json(_read(ranker_path, _MAX_RANKER_BYTES), ranker_path), ranker_path)
    contents = {}
    for name in _FILES:
        path = os.path.join(directory, name)
        contents[name] = _read(path)
        if "files" in meta and _fingerprint([contents[name]]) != meta["files"][name]:
            raise _Changed(
                f"{path}: does not match the size and sha256 in {RANKER_FILE} (the directory changed while it was "
                "read, or the file is corrupted)"
            )
    try:
        model = model_from_bytes(contents[CONFIG_FILE], contents[WEIGHTS_FILE], device, directory=directory)
    except ValueError as err:
        raise ModelDirError(f"{directory}: cannot load the model: {err}") from err
    path = os.path.join(directory, MAPPINGS_FILE)
    try:
        user_ids, item_ids = Interactions.mappings_from_json(contents[MAPPINGS_FILE])
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        raise ModelDirError(f"{path}: not readable mappings ({err})") from err
    cfg = model.config
    if (len(user_ids), len(item_ids)) != (cfg.num_users, cfg.num_items):
        raise ModelDirError(
            f"{path}: maps {len(user_ids)} users and {len(item_ids)} items, the model has {cfg.num_users} and "
            f"{cfg.num_items}"
        )
    users = _check_users(contents[USERS_FILE], os.path.join(directory, USERS_FILE), model)
    return ModelDir(model, user_ids, item_ids, users, meta)


def _read(path: str, limit: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            content = f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing (a model directory has {', '.join((*_FILES, RANKER_FILE))})") from None
    except OSError as err:
        raise ModelDirError(f"{path}: cannot read it ({err.strerror})") from err
    if limit is not None and len(content) > limit:
        raise ModelDirError(f"{path}: larger than {limit} bytes")
    return content


def _json(content: bytes, path: str):
    try:
        return json.loads(content.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise ModelDirError(f"{path}: not readable JSON ({err})") from err


def _check_meta(meta, path: str) -> dict:
    """``ranker.json``'s fields, checked (format 1 has no ``files``)."""
    if not isinstance(meta, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    version = meta.get("format")
    if type(version) is not int or version not in _FORMATS:
        raise ModelDirError(
            f"{path}: unknown format {version!r}; this rankfast reads formats {list(_FORMATS)} (a newer rankfast "
            "wrote it?)"
        )
    if version >= 2:
        files = meta.get("files")
        if not (isinstance(files, dict) and all(isinstance(files.get(name), dict) for name in _FILES)):
            raise ModelDirError(f"{path}: files: expected the size and sha256 of each of {list(_FILES)}")
    elif "files" in meta:
        raise ModelDirError(f"{path}: files: not part of format 1")
    max_history = meta.get("max_history")
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ModelDirError(f"{path}: max_history: expected a positive int, got {max_history!r}")
    encoder = meta.get("encoder")
    if encoder is not None and not _inside(encoder):
        raise ModelDirError(f"{path}: encoder: expected a relative path inside the model directory, got {encoder!r}")
    if meta.get("data") is not None and not isinstance(meta["data"], dict):
        raise ModelDirError(f"{path}: data: expected a JSON object or null, got {meta['data']!r}")
    return meta


def _inside(name) -> bool:
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    parts = os.path.normpath(name).split(os.sep)
    return parts[0] not in (os.curdir, os.pardir)


def _check_users(content: bytes, path: str, model: RankingModel) -> dict:
    """The tensors of ``users.safetensors``, checked against the model, so that
    a corrupted file fails here and not in every later request."""
    try:
        users = safetensors.torch.load(content)
    except SafetensorError as err:
        raise ModelDirError(f"{path}: not a readable safetensors file ({err})") from err
    num_users, num_items = model.config.num_users, model.config.num_items

    def fail(problem: str):
        raise ModelDirError(f"{path}: {problem} (the model has {num_users} users and {num_items} items)")

    names = {"seen_indptr", "seen_items"} | ({"history", "lengths"} if model.uses_history else set())
    if set(users) != names:
        fail(f"expected the tensors {sorted(names)}, found {sorted(users)}")
    for name, tensor in users.items():
        if tensor.dtype != torch.int64:
            fail(f"{name}: expected int64, got {tensor.dtype}")
    indptr, items = users["seen_indptr"], users["seen_items"]
    if indptr.shape != (num_users + 1,) or items.dim() != 1:
        fail(
            f"seen_indptr: expected shape ({num_users + 1},) and seen_items one dimension, got {tuple(indptr.shape)} "
            f"and {tuple(items.shape)}"
        )
    if int(indptr[0]) != 0 or int(indptr[-1]) != len(items) or bool((indptr[1:] < indptr[:-1]).any()):
        fail("seen_indptr: not a row pointer into seen_items (from 0, non-decreasing, to its length)")
    if not _in_range(items, num_items):
        fail("seen_items: item ids out of range")
    if model.uses_history:
        history, lengths = users["history"], users["lengths"]
        if history.dim() != 2 or history.shape[0] != num_users or history.shape[1] < 1 or lengths.shape != (num_users,):
            fail(
                f"history, lengths: expected shapes ({num_users}, L) and ({num_users},), got {tuple(history.shape)} "
                f"and {tuple(lengths.shape)}"
            )
        if not _in_range(history, num_items):
            fail("history: item ids out of range")
        if not _in_range(lengths, history.shape[1] + 1):
            fail(f"lengths: expected values in [0, {history.shape[1]}]")
    return users


def _in_range(ids: torch.Tensor, end: int) -> bool:
    return not ids.numel() or (int(ids.min()) >= 0 and int(ids.max()) < end)
