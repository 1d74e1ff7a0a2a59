"""rankfast.datasets: names, the data home, and the download path against a loopback server.

No test reaches the network: the data set table is patched to point at a zip
built here and served by ``http.server`` on 127.0.0.1.
"""

import hashlib
import http.server
import re
import socket
import threading
import zipfile

import numpy as np
import pytest

from rankfast import datasets
from rankfast.data import load_movielens

RATINGS = "userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,3.5,101\n2,10,5.0,102\n3,30,1.0,103\n"
MOVIES = (
    "movieId,title,genres\n10,Heat (1995),Action|Crime\n"
    '20,"Life, Animated (2016)",Documentary\n30,Up (2009),Animation\n'
)


@pytest.fixture
def source(tmp_path):
    """A tiny MovieLens directory and its zip (one top folder, as GroupLens ships them)."""
    folder = tmp_path / "src" / "ml-tiny"
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text(RATINGS)
    (folder / "movies.csv").write_text(MOVIES)
    archive = tmp_path / "served" / "ml-tiny.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("ratings.csv", "movies.csv"):
            zf.write(folder / name, f"ml-tiny/{name}")
    return folder, archive


@pytest.fixture
def server(source):
    """Serves the zip's folder on a loopback port; ``requests`` lists the paths asked for."""
    _, archive = source
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(archive.parent), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def _register(monkeypatch, url, sha256):
    monkeypatch.setitem(datasets.MOVIELENS, "ml-tiny", datasets.Dataset(url, sha256))


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_data(a, b):
    for field in ("users", "items", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.item_text == b.item_text and a.user_ids == b.user_ids and a.item_ids == b.item_ids


def test_downloads_checks_extracts_once(source, server, tmp_path, monkeypatch):
    folder, archive = source
    url, requests = server
    _register(monkeypatch, f"{url}/ml-tiny.zip", _sha256(archive))
    home = tmp_path / "home"
    data = datasets.load("ml-tiny", root=home)
    _same_data(data, load_movielens(folder))
    assert requests == ["/ml-tiny.zip"]
    # The data folder sits at <home>/<name>, and no temporary file or folder is left.
    assert [p.name for p in home.iterdir()] == ["ml-tiny"]
    assert sorted(p.name for p in (home / "ml-tiny").iterdir()) == ["movies.csv", "ratings.csv"]
    # Cached: the second call reads the folder and asks the server for nothing.
    _same_data(datasets.load("ml-tiny", root=home), data)
    assert datasets.fetch("ml-tiny", root=home) == home / "ml-tiny"
    assert requests == ["/ml-tiny.zip"]


def test_checksum_mismatch_keeps_nothing(source, server, tmp_path, monkeypatch):
    _, archive = source
    url, requests = server
    wrong = "0" * 64
    _register(monkeypatch, f"{url}/ml-tiny.zip", wrong)
    home = tmp_path / "home"
    with pytest.raises(datasets.DownloadError, match=f"has SHA-256 {_sha256(archive)}, expected {wrong}"):
        datasets.fetch("ml-tiny", root=home)
    assert requests == ["/ml-tiny.zip"] and list(home.iterdir()) == []


def test_no_network_is_a_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a loopback port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-tiny.zip"
    _register(monkeypatch, url, "0" * 64)
    home = tmp_path / "home"
    with pytest.raises(datasets.DownloadError, match=re.escape(f"ml-tiny: cannot download {url} (")) as info:
        datasets.load("ml-tiny", root=home)
    assert isinstance(info.value, OSError)  # the command line reports it on one line, exit 1
    assert str(home / "ml-tiny") in str(info.value)  # where to put a copy by hand
    assert list(home.iterdir()) == []


def test_http_error(server, tmp_path, monkeypatch):
    url, _ = server
    _register(monkeypatch, f"{url}/missing.zip", "0" * 64)
    with pytest.raises(datasets.DownloadError, match="HTTP Error 404"):
        datasets.fetch("ml-tiny", root=tmp_path)


def test_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKFAST_DATA", str(tmp_path / "data"))
    assert datasets.data_home() == tmp_path / "data"
    monkeypatch.delenv("RANKFAST_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.data_home() == tmp_path / "xdg" / "rankfast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert datasets.data_home() == tmp_path / "user" / ".cache" / "rankfast"


def test_a_copy_in_the_data_home_is_used_as_is(source, tmp_path, monkeypatch):
    """A folder put there by hand is read without any download (the table's URL is unreachable)."""
    folder, _ = source
    _register(monkeypatch, "http://127.0.0.1:9/never-asked.zip", "0" * 64)
    monkeypatch.setenv("RANKFAST_DATA", str(folder.parent))
    _same_data(datasets.load("ml-tiny"), load_movielens(folder))


def test_paths_and_bad_names(source, tmp_path, monkeypatch):
    folder, _ = source
    _same_data(datasets.load(folder), load_movielens(folder))
    _same_data(datasets.load(str(folder)), load_movielens(folder))
    with pytest.raises(
        FileNotFoundError, match=r"'ml-nope' is neither a data set name \(ml-100k, .*\) nor a directory"
    ):
        datasets.load("ml-nope")
    with pytest.raises(ValueError, match="name: unknown data set 'ml-nope'"):
        datasets.fetch("ml-nope")
    monkeypatch.setenv("RANKFAST_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="ml-latest-small: not found in .*empty .*RANKFAST_DATA"):
        datasets.load("ml-latest-small", download=False)


def test_the_table_names_official_grouplens_zips():
    assert set(datasets.MOVIELENS) >= {"ml-100k", "ml-1m", "ml-latest-small", "ml-25m"}
    for name, dataset in datasets.MOVIELENS.items():
        assert dataset.url == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert re.fullmatch("[0-9a-f]{64}", dataset.sha256), name
