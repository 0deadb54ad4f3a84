"""The Kernel Specification Cache: FusionGraph -> KernelSpec, and per spec, ArgSpec -> Kernel.

Both maps are thread-safe. A kernel is compiled exactly once: the first thread to ask builds it,
threads asking meanwhile wait for that result. Reads of a present kernel take no lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future

from .ir import FusionGraph
from .spec import Kernel, KernelSpec


@dataclasses.dataclass
class Stats:
    compiles: int = 0  # runtime compilations actually performed
    compile_seconds: float = 0.0
    hits: int = 0  # kernel found in memory
    misses: int = 0  # kernel had to be built (compiled, loaded from disk, or refused)
    fallbacks: int = 0  # calls that ran through the fallback
    disk_hits: int = 0  # kernels loaded from the on-disk cache instead of compiled
    background_compiles: int = 0  # compiled on a thread while the kernel already runs (CUDA's
    background_seconds: float = 0.0  # vector entries, the CPU's streamed ones), off callers' paths
    assembled: int = 0  # CUDA scalar32 entries assembled from PTX (codegen/ptx.py), not NVRTC's

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, field.default)


STATS = Stats()
_stats_lock = threading.Lock()


def count(**increments: float) -> None:
    """Add to the statistics (from any thread)."""
    with _stats_lock:
        for name, value in increments.items():
            setattr(STATS, name, getattr(STATS, name) + value)


class KernelStore:
    """One spec's kernels, keyed by the executor's ArgSpec key."""

    def __init__(self) -> None:
        self._kernels: dict[tuple, Kernel] = {}
        self._pending: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Kernel | None:
        return self._kernels.get(key)

    def get_or_build(self, key: tuple, build: Callable[[], Kernel]) -> Kernel:
        """The kernel for ``key``, built by ``build`` in exactly one thread."""
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is not None:
                return kernel
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = Future()
        if not owner:
            return future.result()
        try:
            kernel = build()
        except BaseException as error:
            with self._lock:
                del self._pending[key]
            future.set_exception(error)
            raise
        with self._lock:
            self._kernels[key] = kernel
            del self._pending[key]
        future.set_result(kernel)
        return kernel

    def values(self) -> list[Kernel]:
        return list(self._kernels.values())

    def settle(self) -> None:
        """Wait for the kernels' background builds (see devices/cuda), where they have any."""
        for kernel in self.values():
            wait = getattr(kernel.launch, "wait", None)
            if wait is not None:
                wait()

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()

    def __len__(self) -> int:
        return len(self._kernels)


class SpecCache:
    """Registered fusions: canonical graph -> KernelSpec, and int key -> KernelSpec."""

    def __init__(self) -> None:
        self._by_graph: dict[FusionGraph, KernelSpec] = {}
        self._by_key: list[KernelSpec] = []
        self._lock = threading.Lock()

    def register(self, graph: FusionGraph) -> KernelSpec:
        spec = self._by_graph.get(graph)
        if spec is not None:
            return spec
        with self._lock:
            spec = self._by_graph.get(graph)
            if spec is None:
                spec = KernelSpec(len(self._by_key), graph, graph.input_deps(), KernelStore())
                self._by_key.append(spec)
                self._by_graph[graph] = spec
        return spec

    def __getitem__(self, key: int) -> KernelSpec:
        return self._by_key[key]

    def specs(self) -> list[KernelSpec]:
        return list(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)


SPECS = SpecCache()
