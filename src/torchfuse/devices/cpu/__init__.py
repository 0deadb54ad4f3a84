"""The CPU backend: the system C compiler builds a shared library; ctypes loads and calls it."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import torch

from ...codegen.c import CRenderer
from ...config import config
from .. import CompileError

BASE_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fwrapv",
              "-fno-math-errno")
OPENMP_FLAGS = ("-fopenmp",)
_PRIVATE_DIR = None


def _private_dir() -> str:
    global _PRIVATE_DIR
    if _PRIVATE_DIR is None:
        _PRIVATE_DIR = tempfile.mkdtemp(prefix="torchfuse-")
    return _PRIVATE_DIR


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


@functools.lru_cache(maxsize=8)
def _compiler_identity(cc: str) -> str | None:
    """The compiler's version line, or None when it cannot be run."""
    path = shutil.which(cc)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


@functools.lru_cache(maxsize=8)
def _flags(cc: str, extra: str) -> tuple[str, ...]:
    """The flags to build with: OpenMP only where the compiler and its runtime have it."""
    flags = BASE_FLAGS + tuple(shlex.split(extra))
    with tempfile.TemporaryDirectory(dir=_private_dir()) as work:
        with open(os.path.join(work, "probe.c"), "w") as f:
            f.write("int probe(int n) { int s = 0;\n#pragma omp parallel for reduction(+:s)\n"
                    "for (int i = 0; i < n; i++) s += i; return s; }\n")
        probe = _run([cc, *flags, *OPENMP_FLAGS, "-o", "probe.so", "probe.c"], work)
    return flags + OPENMP_FLAGS if probe.returncode == 0 else flags


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """What -march=native compiles for: the machine and its instruction-set flags."""
    features = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    features = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()} {hashlib.sha256(features.encode()).hexdigest()[:16]}"


class CPUBackend:
    renderer = CRenderer()

    def unavailable(self) -> str | None:
        if _compiler_identity(config.cc) is None:
            return f"C compiler {config.cc!r} not found or not runnable (TORCHFUSE_CC)"
        return None

    def target(self, device: torch.device) -> str:
        cc = config.cc
        return f"{_compiler_identity(cc)} | {' '.join(_flags(cc, config.cflags))} | {_cpu_identity()}"

    def device_key(self, device: torch.device) -> str:
        return "cpu"

    def compile(self, source: str, device: torch.device) -> bytes:
        reason = self.unavailable()
        if reason:
            raise CompileError(reason)
        cc = config.cc
        cmd = [cc, *_flags(cc, config.cflags), "-o", "kernel.so", "kernel.c", "-lm"]
        with tempfile.TemporaryDirectory(dir=_private_dir()) as work:
            with open(os.path.join(work, "kernel.c"), "w") as f:
                f.write(source)
            result = _run(cmd, work)
            if result.returncode != 0:
                raise CompileError(_failure_report(source, cmd, result.stderr))
            with open(os.path.join(work, "kernel.so"), "rb") as f:
                return f.read()

    def load(self, binary: bytes, device: torch.device) -> Callable[..., int]:
        # dlopen needs a file; it may go as soon as the library is mapped.
        fd, path = tempfile.mkstemp(suffix=".so", dir=_private_dir())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(binary)
            library = ctypes.CDLL(path)
        finally:
            os.unlink(path)
        function = library.tf_kernel
        function.restype = ctypes.c_int
        c_int64 = ctypes.c_int64

        def launch(numel: int, sizes: list[int], strides: list[int], tensors: list) -> int:
            args = (c_int64 * (1 + len(sizes) + len(strides) + len(tensors)))(
                numel, *sizes, *strides, *[t.data_ptr() for t in tensors]
            )
            return function(args)

        launch.library = library  # keeps the library mapped while the kernel lives
        return launch


def _failure_report(source: str, cmd: list[str], log: str) -> str:
    """What the compiler said, and a command that reproduces it from a saved copy of the source."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"torchfuse-failed-{digest}.c")
    with open(path, "w") as f:
        f.write(source)
    repro = " ".join(shlex.quote(c) for c in cmd).replace("kernel.c", shlex.quote(path))
    return f"C compiler failed:\n{log.strip()}\nreproduce with: {repro}"


BACKEND = CPUBackend()
