"""The fuser's own interface: register and run fusions, ask what fuses, debug, statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import compiler, devices, executor
from .cache import SPECS, STATS
from .ir import FusionGraph
from .spec import ArgSpec, KernelSpec


def register_fusion(graph: torch.fx.GraphModule | torch.fx.Graph | FusionGraph) -> int:
    """Register a graph of fusible ATen ops; placeholders are its inputs.

    Args:
        graph: a GraphModule or Graph whose call_function nodes are ATen overloads from the
            op table (e.g. ``torch.ops.aten.mul.Tensor``), as ``make_fx`` or AOTAutograd
            produce them.
    Returns:
        An int key for :func:`run_fusion`. Graphs that differ only in value names share a key.
    Raises:
        torchfuse.NotFusible: a node is not a fusible op; the message says which and why.
    """
    return compiler.register(graph).key


def _spec(key: int):
    if not isinstance(key, int) or not 0 <= key < len(SPECS):
        raise KeyError(f"no fusion registered under key {key!r}")
    return SPECS[key]


def run_fusion(key: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run a registered fusion: one fused kernel, or the fallback with eager's results and errors.

    Returns:
        The graph's outputs, as a tuple of new tensors.
    """
    return executor.run(_spec(key), inputs)


def can_fuse(device: str | torch.device) -> bool:
    """Whether kernels can be fused for this device type here (backend, compiler, enabled)."""
    return devices.why_not(torch.device(device).type) is None


def set_fusion_enabled(device: str | torch.device, enabled: bool) -> None:
    """Turn fusion on or off for a device type; while off, fusions run through the fallback."""
    devices.set_enabled(torch.device(device).type, enabled)
    for spec in SPECS.specs():
        spec.plans = ()  # a recent plan would launch its kernel without asking


def argspec_of(spec: KernelSpec, inputs: Sequence[torch.Tensor]) -> tuple[ArgSpec, torch.device]:
    """The ArgSpec the executor would use for these inputs (tensors, fake or real)."""
    with torch.no_grad():
        key, device, *_ = executor.plan(spec, inputs)
    return ArgSpec.from_key(key, len(spec.graph.outputs)), device


def get_fused_kernel_code(graph: torch.fx.GraphModule | torch.fx.Graph, *inputs) -> str:
    """The kernel source the runtime compiler would build for these inputs."""
    spec = compiler.register(graph)
    argspec, device = argspec_of(spec, inputs)
    source, _ = compiler.render(spec, argspec, device)
    return source


def cache_info() -> dict[str, float]:
    """Statistics: specs, kernels, compiles, hits, misses, fallbacks, compile_seconds, ..."""
    specs = SPECS.specs()
    kernels = sum(1 for s in specs for k in s.kernels.values() if k.launch is not None)
    return {"specs": len(specs), "kernels": kernels, **vars(STATS)}


def clear_cache() -> None:
    """Forget compiled kernels and statistics. Registered keys stay valid."""
    for spec in SPECS.specs():
        spec.kernels.clear()
        spec.plans = ()  # their prepared calls hold kernels too
        spec.warned.clear()
    STATS.reset()
