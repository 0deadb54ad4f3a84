"""Every knob of torchfuse, in one typed place.

Each field is read once from its ``TORCHFUSE_*`` environment variable when torchfuse is imported,
and can be changed in code for a block with :func:`override`::

    with torchfuse.config.override(debug=4):
        fn(x)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "torchfuse")


@dataclasses.dataclass
class Config:
    disable: bool = dataclasses.field(default_factory=lambda: _flag("TORCHFUSE_DISABLE"))
    """TORCHFUSE_DISABLE=1: fuse nothing; every fusion runs through the fallback."""

    debug: int = dataclasses.field(default_factory=lambda: _int("TORCHFUSE_DEBUG", 0))
    """TORCHFUSE_DEBUG: 1 groups and fallbacks, 2 timings, 3 fusion decisions, 4 kernel source."""

    cc: str = dataclasses.field(default_factory=lambda: os.environ.get("TORCHFUSE_CC", "cc"))
    """TORCHFUSE_CC: the C compiler for CPU kernels (a name on PATH or a path)."""

    cflags: str = dataclasses.field(default_factory=lambda: os.environ.get("TORCHFUSE_CFLAGS", ""))
    """TORCHFUSE_CFLAGS: extra flags appended to the C compiler's command line."""

    check: bool = dataclasses.field(default_factory=lambda: _flag("TORCHFUSE_CHECK"))
    """TORCHFUSE_CHECK=1: run the fallback beside every fused kernel and compare the results."""

    cache: bool = dataclasses.field(default_factory=lambda: _flag("TORCHFUSE_CACHE", True))
    """TORCHFUSE_CACHE=0: keep compiled kernels in memory only (no disk tier)."""

    cache_dir: str = dataclasses.field(
        default_factory=lambda: os.environ.get("TORCHFUSE_CACHE_DIR") or _default_cache_dir()
    )
    """TORCHFUSE_CACHE_DIR: where compiled kernels are kept between processes."""

    parallel_threshold: int = dataclasses.field(
        default_factory=lambda: _int("TORCHFUSE_PARALLEL_THRESHOLD", 16384)
    )
    """TORCHFUSE_PARALLEL_THRESHOLD: CPU kernels use OpenMP threads from this many elements
    (divided by 1 + the number of math function calls and 16-bit roundings per element)."""

    native_launch: bool = dataclasses.field(
        default_factory=lambda: _flag("TORCHFUSE_NATIVE_LAUNCH", True)
    )
    """TORCHFUSE_NATIVE_LAUNCH=0: launch kernels from Python (ctypes, cuda.core) instead of the
    small C launcher built once per machine (devices/launch.c)."""

    vml: bool = dataclasses.field(default_factory=lambda: _flag("TORCHFUSE_VML", True))
    """TORCHFUSE_VML=0: CPU kernels compute exp, log, tanh, erf... of float32/float64 with
    glibc's libmvec (within 4 ulp), not with the VML functions eager's kernels call (eager's
    bits; up to a quarter slower in kernels that are mostly such calls, e.g. an LSTM cell)."""

    sleef: bool = dataclasses.field(default_factory=lambda: _flag("TORCHFUSE_SLEEF", True))
    """TORCHFUSE_SLEEF=0: CPU kernels call glibc's libmvec for every math function that eager's
    vectorised kernels take from SLEEF, not SLEEF's own, which torch's AVX2/AVX512 builds
    export (eager's bits; libmvec differs in the last bits). By default they call SLEEF's where
    it costs about what libmvec's does (exp inside sigmoid, silu and the erf GELU, log, log1p,
    sin, lgamma...; codegen.c.SLEEF_CHEAP) and for float16 results."""

    sleef_all: bool = dataclasses.field(
        default_factory=lambda: _flag("TORCHFUSE_SLEEF_ALL", False))
    """TORCHFUSE_SLEEF_ALL=1: CPU kernels call every SLEEF function eager's do (also tanh,
    expm1, sinh, cosh, atan2, pow..., 2-6x libmvec's cost): eager's bits for the tanh GELU,
    mish, elu... at about eager's speed for their arithmetic."""

    stream_bytes: int = dataclasses.field(
        default_factory=lambda: _int("TORCHFUSE_STREAM_BYTES", -1))
    """TORCHFUSE_STREAM_BYTES: CPU kernels write their contiguous outputs past the caches
    (non-temporal stores) in calls that move this many bytes or more (those calling VML in
    their loop in blocks, the others through a second entry built at the first such call);
    -1 (the default): the size of the last-level cache, where the machine tells it (x86-64)."""

    ptx: bool = dataclasses.field(default_factory=lambda: _flag("TORCHFUSE_PTX", True))
    """TORCHFUSE_PTX=0: NVRTC compiles every CUDA entry point from C, scalar32 included, which
    is otherwise assembled from the PTX the code generator writes (codegen/ptx.py)."""

    def override(self, **changes: object) -> contextlib.AbstractContextManager[Config]:
        """``with torchfuse.config.override(debug=4): ...`` (see :func:`override`)."""
        return override(**changes)


config = Config()


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Config]:
    """Change config fields for the duration of a ``with`` block, then restore them."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise AttributeError(f"torchfuse.config has no field(s) {sorted(unknown)}")
    saved = {name: getattr(config, name) for name in changes}
    for name, value in changes.items():
        setattr(config, name, value)
    try:
        yield config
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def log(level: int, message: str) -> None:
    """Print ``message`` to stderr when TORCHFUSE_DEBUG is at least ``level``."""
    if config.debug >= level:
        print(f"[torchfuse] {message}", file=sys.stderr, flush=True)
