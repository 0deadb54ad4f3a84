"""The on-disk kernel cache: reuse across processes, races, corruption, permissions, the CLI.

End-to-end tests run a real CPU kernel through register_fusion/run_fusion, each test with its own
cache directory; unit tests drive diskcache.load_or_compile with a fake backend that counts
compiles and needs no compiler.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

import torchfuse
from conftest import trace
from torchfuse import diskcache
from torchfuse.config import Config, override
from torchfuse.devices import launcher

needs_cc = pytest.mark.skipif(not torchfuse.can_fuse("cpu"), reason="no C compiler")
CPU = torch.device("cpu")

# A process that runs one fusion, optionally after a start barrier (a folder in argv[1]: it
# announces itself there, then waits for a "go" file), and prints its compile statistics.
WORKER = """
import json, os, sys, time
import torch, torchfuse
from torch.fx.experimental.proxy_tensor import make_fx

def fn(x, y):
    return torch.sigmoid(x) * torch.tanh(y) + 1

x, y = torch.randn(100), torch.randn(100)
key = torchfuse.register_fusion(make_fx(fn)(x, y))
if len(sys.argv) > 1:
    open(os.path.join(sys.argv[1], f"ready-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(sys.argv[1], "go")):
        time.sleep(0.001)
(out,) = torchfuse.run_fusion(key, x, y)
torch.testing.assert_close(out, fn(x, y))
info = torchfuse.cache_info()
print(json.dumps({"compiles": info["compiles"], "disk_hits": info["disk_hits"]}))
"""


def fn(x, y):  # tanh: a VML call where torch has MKL (a table the loader fills)
    return torch.sigmoid(x) * torch.tanh(y) + 1


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache directory (not yet created) in use, and an empty in-memory cache."""
    path = tmp_path / "cache"
    torchfuse.clear_cache()
    with override(cache_dir=str(path), cache=True):
        yield path
    torchfuse.clear_cache()


def run_kernel() -> dict:
    """Run ``fn`` fused from an empty in-memory cache; check it; return the statistics."""
    torchfuse.clear_cache()
    x, y = torch.randn(100), torch.randn(100)
    key = torchfuse.register_fusion(trace(fn, x, y))
    (out,) = torchfuse.run_fusion(key, x, y)
    torch.testing.assert_close(out, fn(x, y))
    return torchfuse.cache_info()


def entries(path) -> list:
    """The kernels' entries (not the native launcher's, which is one entry too)."""
    launcher_entry = f"{launcher.entry_key()}.bin"
    return sorted(p for p in (path / diskcache.KERNELS).glob("*.bin") if p.name != launcher_entry)


def spawn(cache_dir, *args) -> subprocess.Popen:
    env = {**os.environ, "TORCHFUSE_CACHE_DIR": str(cache_dir), "TORCHFUSE_CACHE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *map(str, args)], env=env, stdout=subprocess.PIPE, text=True
    )


def result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


class FakeBackend:
    """Compiles by encoding the source, slowly enough for threads to meet; counts compiles."""

    def __init__(self, target: str = "fake-target") -> None:
        self._target = target
        self.compiles = 0

    def target(self, device: torch.device) -> str:
        return self._target

    def compile(self, source: str, device: torch.device) -> bytes:
        self.compiles += 1
        time.sleep(0.05)
        return source.encode()


# reuse across processes


@needs_cc
def test_second_process_compiles_nothing(cache_dir, tmp_path):
    assert run_kernel()["compiles"] == 1
    copy = tmp_path / "copied"  # portable: a copied directory serves just as well
    shutil.copytree(cache_dir, copy)
    assert result(spawn(copy)) == {"compiles": 0, "disk_hits": 1}


@needs_cc
def test_in_process_reload_is_a_disk_hit(cache_dir):
    run_kernel()
    info = run_kernel()
    assert (info["compiles"], info["disk_hits"]) == (0, 1)
    assert diskcache.info()["hits"] == 1


@needs_cc
def test_racing_processes_compile_once(cache_dir, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    workers = [spawn(cache_dir, barrier) for _ in range(4)]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(workers) and time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), "a worker died before the start"
        time.sleep(0.01)
    (barrier / "go").touch()
    stats = [result(w) for w in workers]
    assert sum(s["compiles"] for s in stats) == 1  # the others waited on the lock, then loaded
    assert sum(s["disk_hits"] for s in stats) == len(workers) - 1
    assert len(entries(cache_dir)) == 1
    assert not list((cache_dir / diskcache.KERNELS).glob("*.tmp"))
    assert run_kernel()["disk_hits"] == 1  # the entry left behind is valid


def test_load_reads_without_compiling(cache_dir):
    backend = FakeBackend()
    assert diskcache.load(backend, "a source", CPU) is None
    assert backend.compiles == 0
    diskcache.load_or_compile(backend, "a source", CPU)
    assert diskcache.load(backend, "a source", CPU) == b"a source"
    assert backend.compiles == 1
    with override(cache=False):
        assert diskcache.load(backend, "a source", CPU) is None


def test_racing_threads_compile_once(cache_dir):
    backend = FakeBackend()
    results = []

    def ask():
        results.append(diskcache.load_or_compile(backend, "same source", CPU))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.compiles == 1
    assert sorted(compiled for _, compiled in results) == [False] * 7 + [True]
    assert {binary for binary, _ in results} == {b"same source"}
    assert len(entries(cache_dir)) == 1


# keys


def test_key_covers_source_target_and_version(monkeypatch):
    key = diskcache.entry_key(FakeBackend(), "source", CPU)
    assert diskcache.entry_key(FakeBackend(), "source", CPU) == key
    assert diskcache.entry_key(FakeBackend(), "other source", CPU) != key
    assert diskcache.entry_key(FakeBackend("other target"), "source", CPU) != key
    monkeypatch.setattr(torchfuse, "__version__", "0.0.0-other")
    assert diskcache.entry_key(FakeBackend(), "source", CPU) != key


def test_key_holds_no_path_user_or_process(cache_dir):
    key = diskcache.entry_key(FakeBackend(), "source", CPU)
    with override(cache_dir="/elsewhere"):
        assert diskcache.entry_key(FakeBackend(), "source", CPU) == key


# corruption


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def flip_header_byte(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 0x80]) + data[11:]


@needs_cc
@pytest.mark.parametrize("damage", [truncate, flip_last_byte, flip_header_byte, lambda d: b""])
def test_corrupt_entry_is_recompiled_not_loaded(cache_dir, damage):
    run_kernel()
    (entry,) = entries(cache_dir)
    entry.write_bytes(damage(entry.read_bytes()))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        info = run_kernel()
    assert (info["compiles"], info["disk_hits"]) == (1, 0)
    assert run_kernel()["disk_hits"] == 1  # the recompiled entry replaced the damaged one


def test_entry_under_another_key_is_refused(cache_dir):
    backend = FakeBackend()
    diskcache.load_or_compile(backend, "kernel a", CPU)
    diskcache.load_or_compile(backend, "kernel b", CPU)
    a, b = (diskcache.entry_key(backend, s, CPU) for s in ("kernel a", "kernel b"))
    kernels = cache_dir / diskcache.KERNELS
    shutil.copy(kernels / f"{a}.bin", kernels / f"{b}.bin")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert diskcache.load_or_compile(backend, "kernel b", CPU) == (b"kernel b", True)


# permissions and switching off


@needs_cc
def test_directory_is_created_private(cache_dir):
    run_kernel()
    for folder in (cache_dir, cache_dir / diskcache.KERNELS, cache_dir / diskcache.LOCKS):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (entry,) = entries(cache_dir)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_directory_others_can_write_is_refused(cache_dir, mode):
    cache_dir.mkdir()
    cache_dir.chmod(mode)
    backend = FakeBackend()
    with pytest.warns(RuntimeWarning, match="other users can write"):
        assert diskcache.load_or_compile(backend, "source", CPU) == (b"source", True)
    assert diskcache.load_or_compile(backend, "source", CPU) == (b"source", True)
    assert list(cache_dir.iterdir()) == []  # nothing written: the cache stayed in memory


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_directory_of_another_user_is_refused(cache_dir):
    cache_dir.mkdir(mode=0o700)
    os.chown(cache_dir, 12345, 12345)
    with pytest.warns(RuntimeWarning, match="another user"):
        assert diskcache.load_or_compile(FakeBackend(), "source", CPU) == (b"source", True)
    assert list(cache_dir.iterdir()) == []


@needs_cc
def test_cache_off_writes_nothing(cache_dir):
    with override(cache=False):
        assert run_kernel()["compiles"] == 1
        assert run_kernel()["compiles"] == 1
    assert not cache_dir.exists()


def test_cache_env_switch(monkeypatch):
    monkeypatch.setenv("TORCHFUSE_CACHE", "0")
    assert Config().cache is False
    monkeypatch.setenv("TORCHFUSE_CACHE", "1")
    assert Config().cache is True


# command line


def cli(monkeypatch, capsys, *args: str) -> dict[str, str]:
    """Run ``python -m torchfuse *args`` in this process; its output as {label: value}."""
    monkeypatch.setattr(sys, "argv", ["python -m torchfuse", *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("torchfuse", run_name="__main__")
    assert exit.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.rsplit(maxsplit=1) for line in lines if not line.startswith("removed"))


def test_cli_info_and_clear(cache_dir, monkeypatch, capsys):
    backend = FakeBackend()
    for source in ("a", "b", "c"):
        diskcache.load_or_compile(backend, source, CPU)
    diskcache.load_or_compile(backend, "a", CPU)
    (cache_dir / "unrelated.txt").write_text("not ours")
    info = cli(monkeypatch, capsys, "cache", "info")
    size = sum(p.stat().st_size for p in entries(cache_dir))
    assert (info["entries"], info["bytes"], info["hits"]) == ("3", str(size), "1")
    cli(monkeypatch, capsys, "cache", "clear")
    assert cli(monkeypatch, capsys, "cache", "info")["entries"] == "0"
    assert entries(cache_dir) == []
    assert (cache_dir / "unrelated.txt").exists()  # clear removes torchfuse's files only
