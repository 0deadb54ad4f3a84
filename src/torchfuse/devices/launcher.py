"""The native launcher: ``launch.c``, a small CPython extension both backends call kernels through.

A call from Python through ctypes or cuda.core costs several µs of argument conversion, which
is most of a small kernel's time. The launcher packs the arguments and makes the call in C (as
Triton's launchers do). It is built with the system C compiler and Python's headers the first
time a kernel is loaded, once per machine and Python version: the binary goes into the on-disk
cache beside the kernels, verified like them. Where it cannot be built (no headers, no compiler,
``TORCHFUSE_NATIVE_LAUNCH=0``), the backends launch from Python, with the same results.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import platform
import sys
import sysconfig
import tempfile
import threading
from types import ModuleType

import torch

from ..config import config, log
from . import CompileError

NAME = "torchfuse_launch"
FLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared")
_SOURCE = os.path.join(os.path.dirname(__file__), "launch.c")
_lock = threading.Lock()
_built: list[ModuleType | None] = []  # empty until the first build was tried


def get() -> ModuleType | None:
    """The launcher module, or None where kernels launch from Python (the reason is logged)."""
    if not config.native_launch:
        return None
    if not _built:
        with _lock:
            if not _built:
                _built.append(_build())
    return _built[0]


def entry_key() -> str:
    """The launcher's key in the on-disk cache (where it is one entry beside the kernels)."""
    from .. import diskcache

    return diskcache.entry_key(_Builder(), _source(), torch.device("cpu"))


def _source() -> str:
    with open(_SOURCE) as f:
        return f.read()


def _build() -> ModuleType | None:
    from .. import diskcache

    try:
        binary, _ = diskcache.load_or_compile(_Builder(), _source(), torch.device("cpu"))
        return _load(binary)
    except Exception as error:
        log(1, f"the native launcher is not available, kernels launch from Python: {error}")
        return None


class _Builder:
    """What the disk cache needs of a compiler: the target (every input to the binary but the
    source) and the compile."""

    def target(self, device: torch.device) -> str:
        from .cpu import _compiler_identity

        abi = f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}"
        return f"{_compiler_identity(config.cc)} | {' '.join(FLAGS)} | {abi} | {platform.machine()}"

    def compile(self, source: str, device: torch.device) -> bytes:
        from .cpu import BACKEND, _private_dir, _run

        include = sysconfig.get_paths()["include"]
        if not os.path.exists(os.path.join(include, "Python.h")):
            raise CompileError(f"Python's headers are not installed (no Python.h in {include})")
        reason = BACKEND.unavailable()  # the same compiler as CPU kernels
        if reason:
            raise CompileError(reason)
        with tempfile.TemporaryDirectory(dir=_private_dir()) as work:
            with open(os.path.join(work, "launch.c"), "w") as f:
                f.write(source)
            cmd = [config.cc, *FLAGS, f"-I{include}", "-o", "launch.so", "launch.c"]
            result = _run(cmd, work)
            if result.returncode != 0:
                raise CompileError(f"building the launcher failed:\n{result.stderr.strip()}")
            with open(os.path.join(work, "launch.so"), "rb") as f:
                return f.read()


def _load(binary: bytes) -> ModuleType:
    from .cpu import _private_dir

    # An extension module loads from a file; it may go once the library is mapped.
    with tempfile.TemporaryDirectory(dir=_private_dir()) as work:
        path = os.path.join(work, NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        with open(path, "wb") as f:
            f.write(binary)
        loader = importlib.machinery.ExtensionFileLoader(NAME, path)
        spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    return module
