"""The compiler, in two steps.

Upfront (once per graph): an FX graph becomes a canonical FusionGraph and its KernelSpec.
Runtime (once per KernelSpec and ArgSpec): type the graph for the ArgSpec's dtypes, render
source for the device, compile it and load it into a Kernel. Each step is a small function of
immutable values, so each can be run, cached and printed on its own.
"""

from __future__ import annotations

import time
import warnings

import torch

from . import devices, diskcache, fallback, ops
from .cache import SPECS, count
from .codegen import TypedGraph
from .config import log
from .ir import FusionGraph, Ref, from_fx
from .spec import ArgSpec, Kernel, KernelSpec


def register(graph: torch.fx.Graph | torch.fx.GraphModule | FusionGraph) -> KernelSpec:
    """Upfront compilation: canonicalise the graph and find or make its KernelSpec."""
    if isinstance(graph, torch.fx.GraphModule):
        graph = graph.graph
    if isinstance(graph, torch.fx.Graph):
        graph = from_fx(graph)
    return SPECS.register(graph)


def infer_types(graph: FusionGraph, argspec: ArgSpec, cuda: bool = False) -> TypedGraph:
    """Every value's dtype, found by running the graph on meta tensors (eager's own rules).

    Raises:
        Exception: whatever eager raises for these dtypes (e.g. bool - bool).
        ops.Unsupported: an op is not rendered for these dtypes.
    """
    metas = [
        torch.empty(() if d.zero_dim else (1,), dtype=d.dtype, device="meta")
        for d in argspec.inputs
    ]
    values = fallback.evaluate(graph, metas)
    if torch.get_default_dtype() != argspec.default_dtype:  # set on another thread meanwhile
        raise ops.Unsupported(f"typed under default dtype {torch.get_default_dtype()}, "
                              f"not {argspec.default_dtype}")
    selected = []
    for k, op in enumerate(graph.ops):
        operands = [fallback.operand_value(o, values) for o in op.operands]
        out = values[graph.n_inputs + k].dtype
        selected.append(ops.select(op.target, op.attr_dict, operands, out, cuda=cuda))
    for value in values:
        if value.dtype not in ops.DTYPES:
            raise ops.Unsupported(f"dtype {value.dtype}")
    one = [d.scalar for d in argspec.inputs]  # one element: so is what is computed from such alone
    for op in graph.ops:
        one.append(all(one[o.id] for o in op.operands if isinstance(o, Ref)))
    scalar = [d.scalar or d.expanded for d in argspec.inputs] + one[graph.n_inputs:]
    return TypedGraph(graph, tuple(v.dtype for v in values), tuple(selected), tuple(scalar))


def render(spec: KernelSpec, argspec: ArgSpec, device: torch.device) -> tuple[str, TypedGraph]:
    """The source the device's compiler would build for this ArgSpec."""
    backend = devices.get(device.type)
    if backend is None:
        raise ops.Unsupported(devices.why_not(device.type) or f"no backend for {device.type}")
    typed = infer_types(spec.graph, argspec, cuda=backend.renderer.cuda)
    return backend.renderer.render(typed, argspec), typed


def build(spec: KernelSpec, argspec: ArgSpec, device: torch.device) -> Kernel:
    """Runtime compilation of one kernel; on failure a Kernel that says why (the fallback runs)."""
    try:
        source, typed = render(spec, argspec, device)
    except Exception as error:  # eager's own error for these dtypes, or an unrendered op
        log(3, f"fusion {spec.key}: {argspec} runs through the fallback: {error}")
        return Kernel("", (), None, f"not rendered: {error}")
    out_dtypes = tuple(typed.dtypes[o] for o in spec.graph.outputs)
    log(4, f"fusion {spec.key} for {argspec}:\n{source}")
    backend = devices.get(device.type)
    start = time.perf_counter()
    try:
        binary, compiled = diskcache.load_or_compile(backend, source, device)
        launch = backend.load(binary, device, source)
    except Exception as error:
        _warn_once(spec, f"torchfuse: fusion {spec.key} runs through the fallback: {error}")
        return Kernel(source, out_dtypes, None, f"compile failed: {error}")
    seconds = time.perf_counter() - start
    if compiled:
        count(compiles=1, compile_seconds=seconds)
    else:
        count(disk_hits=1)
    verb = "compiled" if compiled else "loaded from disk"
    log(2, f"fusion {spec.key}: {verb} for {argspec.device} in {seconds * 1000:.1f} ms")
    return Kernel(source, out_dtypes, launch)


def _warn_once(spec: KernelSpec, message: str) -> None:
    """Warn the first time a spec falls back; later reasons only reach the debug log."""
    with spec.lock:
        first = not spec.warned
        spec.warned.add(message)
    log(1, message)
    if first:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
