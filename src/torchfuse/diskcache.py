"""The on-disk tier of the kernel cache: compiled binaries kept between processes.

Layout of ``config.cache_dir`` (TORCHFUSE_CACHE_DIR; created 0700)::

    kernels/<key>.bin   one entry: MAGIC, sha256(key + binary), binary
    locks/<key>.lock    held by the one process compiling that entry; the others wait, then load
    hits                one byte appended per kernel loaded from disk: its size is the hit count

The key is a sha256 over everything that changes a binary: the source, the backend's
``target(device)`` (compiler identity and version, flags, architecture: a backend must put every
compile option there), torchfuse's version and this file's format. It holds no paths, user names
or process ids, so a directory copied to an identical machine is reused.

Entries are written to a temporary file and renamed into place, so a reader sees a whole entry or
none, and are verified before they are returned, so a torn, truncated or altered entry is
recompiled, never loaded (this is also why nothing is fsync'd: a file a crash tore fails the
check). The check catches corruption, not a forger who can write the directory: that is what the
permissions are for. A directory another user can write to is refused with a warning, and
kernels then stay in memory.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator

import filelock
import torch

from .config import config, log

FORMAT = 1  # bump when the entry layout or the meaning of a key changes
MAGIC = b"TFK1"
KERNELS, LOCKS, HITS = "kernels", "locks", "hits"
LOCK_TIMEOUT = 600.0  # seconds to wait for another process's compile before compiling alone
_HEADER = len(MAGIC) + hashlib.sha256().digest_size
_warned: set[str] = set()
_accepted: set[str] = set()  # roots whose folders this process made or found private


def load_or_compile(backend, source: str, device: torch.device) -> tuple[bytes, bool]:
    """The binary for ``source`` on ``device``, and whether it was compiled (False: from disk).

    A verified entry on disk is used when there is one; else ``backend`` compiles it, once among
    all the processes asking at the same time, and the result is stored for the next process.
    Problems with the disk (full, read-only, refused) only cost the disk tier, never the kernel.

    Raises:
        devices.CompileError: the backend's compiler rejected the source.
    """
    root = cache_root()
    if root is None:
        return backend.compile(source, device), True
    key = entry_key(backend, source, device)
    binary = _load(root, key)
    if binary is not None:
        return binary, False
    with _locked(root, key):
        binary = _load(root, key)  # another process may have stored it while we waited
        if binary is not None:
            return binary, False
        binary = backend.compile(source, device)
        _store(root, key, binary)
    return binary, True


def load(backend, source: str, device: torch.device) -> bytes | None:
    """The binary on disk for ``source`` (see :func:`load_or_compile`), or None: not compiled."""
    root = cache_root()
    return None if root is None else _load(root, entry_key(backend, source, device))


def entry_key(backend, source: str, device: torch.device) -> str:
    """The sha256 (hex) naming the entry of ``source`` compiled by ``backend`` for ``device``."""
    from . import __version__  # here, not at import time: the package imports this module

    version = f"torchfuse {__version__} format {FORMAT}"
    parts = (version, device.type, backend.target(device), source)
    digest = hashlib.sha256()
    for part in parts:  # length-prefixed, so no two different tuples hash the same bytes
        data = part.encode()
        digest.update(b"%d:" % len(data) + data)
    return digest.hexdigest()


def cache_root() -> str | None:
    """The cache directory, created private if new; None when the disk tier is off or refused."""
    if not config.cache:
        return None
    root = _root()
    if root in _accepted:  # checked once: the check's nine system calls each let go of the GIL,
        return root  # and a build on a thread beside torch.compile's tracing waits to get it back
    problem = _refusal(root)
    if problem:
        _warn_once(f"torchfuse: kernel cache {root} refused: {problem}; kernels stay in memory")
        return None
    _accepted.add(root)
    return root


def _root() -> str:
    return os.path.abspath(os.path.expanduser(config.cache_dir))


def _refusal(root: str) -> str | None:
    """Why ``root`` cannot hold the cache, or None; creates it and its folders (0700) if missing."""
    try:
        for folder in (root, os.path.join(root, KERNELS), os.path.join(root, LOCKS)):
            os.makedirs(folder, mode=0o700, exist_ok=True)
            problem = _unsafe(folder)
            if problem:
                return problem
    except OSError as error:
        return str(error)
    return None


def _unsafe(folder: str) -> str | None:
    """Why another user could plant entries in ``folder``, or None when only we can write it."""
    if not hasattr(os, "getuid"):  # Windows: access is ACLs, not mode bits
        return None
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a directory"
    if st.st_uid != os.getuid():
        return f"{folder} belongs to another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users can write to {folder} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _entry_path(root: str, key: str) -> str:
    return os.path.join(root, KERNELS, f"{key}.bin")


def _digest(key: str, binary: bytes) -> bytes:
    # The key is hashed too, so an entry copied under another entry's name fails the check.
    return hashlib.sha256(key.encode() + binary).digest()


def _load(root: str, key: str) -> bytes | None:
    """The verified binary of an entry, or None: missing, unreadable or corrupt (a miss)."""
    path = _entry_path(root, key)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        log(1, f"kernel cache: cannot read {path}: {error}")
        return None
    binary = data[_HEADER:]
    if not data.startswith(MAGIC) or data[len(MAGIC) : _HEADER] != _digest(key, binary):
        _warn_once(f"torchfuse: kernel cache entry {path} is corrupt; it is recompiled")
        return None
    _count_hit(root)
    return binary


def _store(root: str, key: str, binary: bytes) -> None:
    """Publish an entry atomically (temporary file, then rename): readers see all of it or none."""
    temporary = None
    try:
        folder = os.path.join(root, KERNELS)
        fd, temporary = tempfile.mkstemp(prefix=f"{key}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _digest(key, binary) + binary)
        os.replace(temporary, _entry_path(root, key))
    except OSError as error:
        log(1, f"kernel cache: cannot store {key}: {error}")
        _accepted.discard(root)  # checked again next time (the folders may be gone)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


@contextlib.contextmanager
def _locked(root: str, key: str) -> Iterator[None]:
    """Hold the entry's lock; without it (unlockable file system, timeout) go on unlocked.

    The lock only saves duplicate compiles: atomic renames keep the entry whole either way.
    """
    lock = filelock.FileLock(os.path.join(root, LOCKS, f"{key}.lock"), timeout=LOCK_TIMEOUT)
    try:
        lock.acquire()
    except (OSError, filelock.Timeout) as error:
        log(1, f"kernel cache: compiling {key} without its lock: {error}")
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _count_hit(root: str) -> None:
    # O_APPEND makes each one-byte write atomic, so concurrent processes need no lock to count.
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(root, HITS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)


def _warn_once(message: str) -> None:
    log(1, message)
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def info() -> dict[str, object]:
    """What the cache directory holds: ``directory``, ``enabled``, ``entries``, ``bytes``, ``hits``.

    Reads only; a missing directory reads as empty.
    """
    root = _root()
    sizes = [_size(path) for path in _files(root, KERNELS, "*.bin")]
    return {
        "directory": root,
        "enabled": config.cache,
        "entries": len(sizes),
        "bytes": sum(sizes),
        "hits": _size(os.path.join(root, HITS)),
    }


def clear() -> int:
    """Remove every entry, lock and the hit count; returns how many entries were removed.

    Only torchfuse's own files go, so a cache directory pointed at a shared folder loses nothing
    else. Processes running meanwhile just miss and recompile.
    """
    root = _root()
    removed = 0
    for pattern in ((KERNELS, "*.bin"), (KERNELS, "*.tmp"), (LOCKS, "*.lock"), ("", HITS)):
        for path in _files(root, *pattern):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += path.endswith(".bin")
    return removed


def _files(root: str, folder: str, pattern: str) -> list[str]:
    return glob.glob(os.path.join(glob.escape(os.path.join(root, folder)), pattern))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
