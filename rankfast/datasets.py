"""MovieLens by name: downloaded once from GroupLens, checked, and cached.

``load("ml-latest-small")`` returns what :func:`rankfast.data.load_movielens`
returns for that data set. The first call downloads the official zip, checks
its SHA-256, and extracts it to ``<data home>/ml-latest-small/``; later calls
read that directory. The data home is ``$RANKFAST_DATA``, else
``$XDG_CACHE_HOME/rankfast``, else ``~/.cache/rankfast``. A directory already
there (a copy made by hand: ``<data home>/ml-latest-small/ratings.csv``) is
used as it is. Any argument that is not a known name is a path to a MovieLens
directory (write ``./ml-latest-small`` for a local folder of that name).

Importing this module is cheap (no torch): the command line checks ``--data``
with it before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rankfast._io import atomic_dir

__all__ = ["DATA_ENV", "MOVIELENS", "Dataset", "DownloadError", "data_home", "fetch", "load", "resolve"]

#: Environment variable naming the data home.
DATA_ENV = "RANKFAST_DATA"

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Dataset:
    """Where a data set's zip comes from and the SHA-256 it must have."""

    url: str
    sha256: str


# The SHA-256 of each official zip as TensorFlow Datasets records it
# (github.com/tensorflow/datasets, tensorflow_datasets/url_checksums/movielens.txt).
# ml-latest-small's agrees with the pins of other public projects; it is the
# 2018-09-26 release. ml-latest and ml-10m are left out: no published checksum.
MOVIELENS = {
    "ml-100k": Dataset(f"{_GROUPLENS}/ml-100k.zip", "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"),
    "ml-1m": Dataset(f"{_GROUPLENS}/ml-1m.zip", "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"),
    "ml-20m": Dataset(f"{_GROUPLENS}/ml-20m.zip", "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3"),
    "ml-25m": Dataset(f"{_GROUPLENS}/ml-25m.zip", "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"),
    "ml-latest-small": Dataset(
        f"{_GROUPLENS}/ml-latest-small.zip", "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436"
    ),
}


class DownloadError(OSError):
    """A data set could not be downloaded, or the download was not the expected file."""


def data_home() -> Path:
    """``$RANKFAST_DATA``, else ``$XDG_CACHE_HOME/rankfast``, else ``~/.cache/rankfast``."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "rankfast"


def fetch(name: str, *, root=None, download: bool = True) -> Path:
    """The local directory of data set ``name`` under ``root`` (default
    :func:`data_home`), downloaded and extracted there first if it is missing.

    Raises ``FileNotFoundError`` when it is missing and ``download`` is false,
    and :class:`DownloadError` when it cannot be downloaded or its checksum
    is wrong (nothing is then left behind).
    """
    if name not in MOVIELENS:
        raise ValueError(f"name: unknown data set {name!r} (known: {', '.join(MOVIELENS)})")
    home = Path(root) if root is not None else data_home()
    target = home / name
    if target.is_dir():
        return target
    if not download:
        raise FileNotFoundError(f"{name}: not found in {home} (set {DATA_ENV} to a folder holding {name}/)")
    home.mkdir(parents=True, exist_ok=True)
    _download(name, MOVIELENS[name], target)
    return target


def resolve(name_or_path, *, root=None, download: bool = True) -> Path:
    """The directory of a data set: :func:`fetch` for a known name, else the path itself."""
    if str(name_or_path) in MOVIELENS:
        return fetch(str(name_or_path), root=root, download=download)
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"name_or_path: {str(name_or_path)!r} is neither a data set name ({', '.join(MOVIELENS)}) nor a directory"
        )
    return path


def load(name_or_path, *, root=None, download: bool = True):
    """A MovieLens data set by name (see :data:`MOVIELENS`) or directory, as an
    :class:`rankfast.data.Interactions` (:func:`rankfast.data.load_movielens`)."""
    from rankfast.data import load_movielens  # imports torch: only when data is actually read

    return load_movielens(resolve(name_or_path, root=root, download=download))


def _download(name: str, dataset: Dataset, target: Path) -> None:
    """Downloads and checks the zip, and extracts its data folder as ``target``, through
    :func:`rankfast._io.atomic_dir`: ``target`` is either absent or complete."""
    with atomic_dir(target) as tmp:
        archive = Path(tmp) / ".download.zip"
        try:
            digest = _copy_url(dataset.url, archive, f"downloading {name}")
        except (OSError, http.client.HTTPException) as err:  # no network, HTTP errors, timeouts, resets
            reason = err.reason if type(err) is urllib.error.URLError else err
            raise DownloadError(
                f"{name}: cannot download {dataset.url} ({reason}); without a network, "
                f"put the extracted data set at {target} or pass its directory"
            ) from err
        if digest != dataset.sha256:
            raise DownloadError(
                f"{name}: {dataset.url} has SHA-256 {digest}, expected {dataset.sha256} "
                "(a corrupted download, or the file changed upstream); nothing was kept"
            )
        extracted = Path(tmp) / ".extracted"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(extracted)  # zipfile drops absolute paths and ".." from member names
        archive.unlink()
        entries = list(extracted.iterdir())
        # GroupLens zips hold one folder named after the data set (ml-1m/...).
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
        for entry in source.iterdir():
            entry.rename(Path(tmp) / entry.name)
        shutil.rmtree(extracted)


def _copy_url(url: str, dest: Path, desc: str) -> str:
    """Streams ``url`` into ``dest`` under a progress bar; returns its SHA-256."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()
