"""Capture: the torch.compile backend and ``torchfuse.jit``.

Dynamo captures the program; AOTAutograd turns it into ATen graphs (forward, and backward when
inputs require grad), decomposing composite backward ops into pointwise ones; the fusion pass
then rewrites each graph so that its groups run through ``run_fusion``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._decomp import get_decompositions
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from . import fusion
from .config import config, log

aten = torch.ops.aten

# Backward ops whose decompositions are pointwise: fused instead of run as one eager kernel each.
# (Forward activations like gelu and silu are in the op table themselves.)
DECOMPOSITIONS = get_decompositions([
    aten.gelu_backward,
    aten.silu_backward,
    aten.mish_backward,
    aten.hardswish_backward,
    aten.hardsigmoid_backward,
    aten.hardtanh_backward,
    aten.softplus_backward,
    aten.elu_backward,
    aten.leaky_relu_backward,
    aten.logit_backward,
])

# Not thread-local: autograd compiles a CUDA backward graph on its own thread.
_collectors: list[list] = []
_collectors_lock = threading.Lock()


@contextlib.contextmanager
def collect() -> Iterator[list[fusion.FusionResult]]:
    """Gather the FusionResult of every graph compiled while the block runs (for ``explain``)."""
    results: list[fusion.FusionResult] = []
    with _collectors_lock:
        _collectors.append(results)
    try:
        yield results
    finally:
        with _collectors_lock:
            _collectors.remove(results)


def compile_graph(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
    """AOTAutograd's compiler for forward, backward and inference graphs."""
    if config.disable:
        return make_boxed_func(gm.forward)
    result = fusion.fuse(gm)
    with _collectors_lock:
        for results in _collectors:
            results.append(result)
    log(2, f"graph with {len(result.groups)} fusion group(s), {len(result.left_out)} op(s) left")
    graph = result.graph
    # Several groups build their kernels side by side, now. A lone group builds at its first
    # call, which comes next anyway: building it here would only contend for the GIL with the
    # rest of torch.compile.
    runners = [node.target for node in graph.graph.nodes
               if node.op == "call_function" and hasattr(node.target, "prebuild")]
    if len(runners) > 1:
        for runner in runners:
            runner.prebuild()
    if hasattr(graph, "real_recompile"):
        # A lazy GraphModule's forward goes through Module.__call__ on every call (µs each).
        graph.real_recompile()
    return make_boxed_func(graph.forward)


backend = aot_autograd(
    fw_compiler=compile_graph,
    bw_compiler=compile_graph,
    decompositions=DECOMPOSITIONS,
)
backend.__name__ = "torchfuse"


def _register() -> None:
    """Make backend="torchfuse" work where the package's entry point is not installed.

    Installed, Dynamo finds the backend through the ``torch_dynamo_backends`` entry point and
    registers it itself on first use; registering here too would be a duplicate.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "torchfuse" in entry_points(group="torch_dynamo_backends").names:
        return
    if "torchfuse" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=backend, name="torchfuse")


def jit(fn: Callable | torch.nn.Module | None = None, *, dynamic: bool | None = None,
        fullgraph: bool = False) -> Any:
    """Compile ``fn`` (a function or nn.Module) with torchfuse: ``torch.compile`` with our backend.

    Usable as ``torchfuse.jit(fn)`` or as a decorator, ``@torchfuse.jit``.
    """
    if fn is None:
        return lambda f: jit(f, dynamic=dynamic, fullgraph=fullgraph)
    return torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
