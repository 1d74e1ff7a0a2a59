"""Atomic writes of files and directories: the one way rankfast puts anything on disk.

What appears at a path is complete and flushed to disk, or the old content
stays: the new content is written into a scratch directory beside the path,
``.NAME.<12 hex digits>.tmp``, then renamed into place. The scratch directory
is removed on failure, and a later write of the same path removes those left
by killed writers (a live writer holds a lock on its own, so it is never
touched). One permissions policy: what is written gets the modes of a fresh
directory and file under the process umask (0755 and 0644 under the usual
022), whatever the writing library chose (safetensors writes 0600), so a
server running as another user can read it. POSIX only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_file", "atomic_dir"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields the path to write the new file at (a scratch directory's entry
    with ``path``'s file name, so suffix-sensitive writers work); when the block
    ends without an error, that file replaces ``path`` in one step. Missing
    parent directories are created."""
    path = os.path.abspath(path)
    with _scratch(path) as (scratch, dir_mode):
        new = os.path.join(scratch, os.path.basename(path))
        yield new
        os.chmod(new, dir_mode & 0o666)
        _fsync(new)
        os.replace(new, path)
        _fsync(os.path.dirname(path))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yields an empty directory to fill; when the block ends without an error,
    it replaces ``path`` (absent, or a directory: it is removed after). On
    Linux an existing directory is swapped with the new one atomically
    (``renameat2(RENAME_EXCHANGE)``), so the path always holds one of the two;
    elsewhere it is moved aside first, a moment without a directory there."""
    path = os.path.abspath(path)
    with _scratch(path) as (scratch, dir_mode):
        yield scratch
        for root, _, files in os.walk(scratch):
            os.chmod(root, dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), dir_mode & 0o666)
        _fsync_tree(scratch)
        _replace_dir(scratch, path)
        _fsync(os.path.dirname(path))


# --- scratch directories ----------------------------------------------------------------


@contextlib.contextmanager
def _scratch(path: str):
    """``(directory, its mode)``: a new empty scratch directory for ``path``,
    locked while it lives and removed on leaving (after a swap it holds the old
    directory). Its mode is 0777 less the umask: the policy's directory mode,
    and with the execute bits cleared, its file mode."""
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, name)
    scratch, fd = _locked_dir(parent, name)
    try:
        yield scratch, os.fstat(fd).st_mode & 0o777
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(fd)


def _locked_dir(parent: str, name: str) -> tuple[str, int]:
    for _ in range(100):
        scratch = os.path.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            os.mkdir(scratch)  # mode 0777 less the umask (mkdtemp would make it 0700)
            fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        except (FileExistsError, FileNotFoundError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(scratch).st_ino == os.fstat(fd).st_ino:
                return scratch, fd
        except (BlockingIOError, FileNotFoundError):
            pass  # another write's clean-up took it between mkdir and flock: make another
        os.close(fd)
    raise FileExistsError(f"{parent}: cannot create a scratch directory for {name}")


def _remove_leftovers(parent: str, name: str):
    """Removes the scratch directories of earlier writes of ``parent/name``
    whose writer is gone (their lock is free); nothing else."""
    pattern = re.compile(re.escape(f".{name}.") + r"[0-9a-f]{12}\.tmp")
    for entry in os.listdir(parent):
        if not pattern.fullmatch(entry):
            continue
        leftover = os.path.join(parent, entry)
        try:
            fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(leftover, ignore_errors=True)
        except BlockingIOError:
            pass  # a write in progress
        finally:
            os.close(fd)


# --- flushing and renaming --------------------------------------------------------------


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str):
    """Flushes every file and directory below ``path``, files before the
    directories that list them: without it a crash soon after the rename can
    leave the renamed directory holding empty or partial files."""
    paths = [path]
    for root, dirs, files in os.walk(path):
        paths += [os.path.join(root, name) for name in (*files, *dirs)]
    for name in reversed(paths):
        _fsync(name)


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), b)


def _replace_dir(src: str, dst: str):
    """Renames ``src`` to ``dst``. An existing ``dst`` is swapped with ``src``
    atomically where :func:`_exchange` can (``src`` then holds the old directory,
    for the caller to remove), else moved aside first and removed."""
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
    if _exchange(src, dst):
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".old", dir=os.path.dirname(dst))
    os.rename(dst, os.path.join(old, "previous"))
    try:
        os.rename(src, dst)
    except BaseException:
        # Put the old directory back; if even that fails it stays in ``old``, never deleted.
        os.rename(os.path.join(old, "previous"), dst)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
