"""Device backends, one per ``torch.device.type``, in a registry: the only place devices differ.

A backend renders source (its renderer), compiles source to a binary, loads a binary into a
launch function, and describes its target (compiler, version, architecture) for cache keys.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Protocol

import torch

from ..codegen import CStyleRenderer

# no_dispatch_modes(): real tensors inside, for a backend's own eager work at a build, which may
# run under torch.compile's fake tensors or a user's dispatch mode (torch's own context; where
# torch has none, no dispatch mode is expected at a build).
try:
    from torch.utils._python_dispatch import _disable_current_modes as no_dispatch_modes
except ImportError:  # pragma: no cover
    no_dispatch_modes = contextlib.nullcontext


class CompileError(RuntimeError):
    """The device compiler rejected generated source; the message says how to reproduce it."""


class EntryBuild:
    """The disk cache's view of compiling one more entry point of a source (a backend's
    ``compile_entry``, which the first build did not compile): its key names the entry."""

    def __init__(self, backend: Backend, entry: str) -> None:
        self.backend, self.entry = backend, entry

    def target(self, device: torch.device) -> str:
        return f"{self.backend.target(device)} | entry {self.entry}"

    def compile(self, source: str, device: torch.device) -> bytes:
        return self.backend.compile_entry(source, device, self.entry)


class Backend(Protocol):
    renderer: CStyleRenderer

    def unavailable(self) -> str | None:
        """Why this backend cannot compile here (no compiler, no driver), or None."""

    def target(self, device: torch.device) -> str:
        """Everything about the target that changes a binary: goes into every cache key."""

    def compile(self, source: str, device: torch.device) -> bytes:
        """Source to a loadable binary. Raises CompileError."""

    def compile_entry(self, source: str, device: torch.device, entry: str) -> bytes:
        """One more entry point of a source (named in it), which ``compile`` leaves out."""

    def load(self, binary: bytes, device: torch.device, source: str) -> Callable[..., int]:
        """A binary (of ``source``) to ``launch(numel, sizes, strides, tensors) -> error code``;
        an int in place of a tensor is its data pointer. The launch may also offer
        ``prepare(numel, sizes, strides, outs, n_operands) -> call | None``: the kernel bound to
        one plan, ``call(*operands)`` returning the outputs (``outs``: (shape, strides, dtype)
        each) it allocated and computed, or anything else where the general path must run."""

    def device_key(self, device: torch.device) -> str:
        """The part of an ArgSpec naming the device: kernels are shared between equal keys."""

    def allocator(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """The fastest ``empty(shape: tuple, strides: tuple, dtype)`` for outputs on device."""


# device type -> module path of its backend; imported on first use so that a missing optional
# dependency (the CUDA bindings) costs nothing until a tensor of that device type shows up.
_MODULES = {"cpu": "torchfuse.devices.cpu", "cuda": "torchfuse.devices.cuda"}
_backends: dict[str, Backend | None] = {}
_enabled: dict[str, bool] = {}
_keys: dict[torch.device, str | None] = {}  # device_key's memo
_allocators: dict[torch.device, Callable[..., torch.Tensor]] = {}


def register(device_type: str, module: str) -> None:
    """Make ``module`` (which defines ``BACKEND``) the backend of ``device_type``."""
    _MODULES[device_type] = module
    _backends.pop(device_type, None)
    _keys.clear()


def get(device_type: str) -> Backend | None:
    """The backend of a device type, or None when there is none or it is disabled."""
    if not enabled(device_type):
        return None
    if device_type not in _backends:
        module = _MODULES.get(device_type)
        _backends[device_type] = importlib.import_module(module).BACKEND if module else None
    return _backends[device_type]


def device_key(device: torch.device) -> str | None:
    """The backend's key of a tensor's device (which names its index), None where no backend
    runs. Asked on every call, so memoised: ``device.type`` alone costs a string."""
    key = _keys.get(device, "")
    if key == "":
        backend = get(device.type)
        key = _keys[device] = None if backend is None else backend.device_key(device)
    return key


def allocator(device: torch.device) -> Callable[..., torch.Tensor]:
    """The backend's ``empty(shape, strides, dtype)`` for a device that has a backend (memoised:
    asked on every call)."""
    empty = _allocators.get(device)
    if empty is None:
        empty = _allocators[device] = get(device.type).allocator(device)
    return empty


def why_not(device_type: str) -> str | None:
    """Why kernels cannot be fused for this device type, or None if they can."""
    if not enabled(device_type):
        return f"fusion is disabled for {device_type}"
    if device_type not in _MODULES:
        return f"torchfuse has no backend for {device_type}"
    try:
        backend = get(device_type)
    except ImportError as error:
        return f"the {device_type} backend cannot be imported: {error}"
    return backend.unavailable()


def set_enabled(device_type: str, enabled: bool) -> None:
    _enabled[device_type] = bool(enabled)
    _keys.clear()


def enabled(device_type: str) -> bool:
    """Whether fusion is on for a device type (``set_enabled``)."""
    return _enabled.get(device_type, True)
