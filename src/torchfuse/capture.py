"""Capture: the torch.compile backend and ``torchfuse.jit``.

Dynamo captures the program; AOTAutograd turns it into ATen graphs (forward, and backward when
inputs require grad), decomposing composite backward ops into pointwise ones; the fusion pass
then rewrites each graph so that its groups run through ``run_fusion``.

Dynamo and AOTAutograd are imported when torch.compile first calls the backend, not with an
installed torchfuse: ``import torchfuse`` for the fuser's own interface (``register_fusion`` /
``run_fusion``) does not pay for them (0.7-0.9 s of a 2-vCPU VM's 1.9). A checkout on the path,
without the entry point, registers the backend on import (``_register``), which imports Dynamo.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import fusion
from .config import config, log

aten = torch.ops.aten


@functools.cache
def decompositions() -> dict:
    """Backward ops whose decompositions are pointwise: fused instead of run as one eager kernel
    each. (Forward activations like gelu and silu are in the op table themselves.)"""
    from torch._decomp import get_decompositions

    return get_decompositions([
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
    """AOTAutograd's compiler for forward and backward graphs: the fused graph, boxed."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(_fused_forward(gm))


def _fused_forward(gm: torch.fx.GraphModule) -> Callable:
    """The ATen graph ``gm`` with its groups running through ``run_fusion``: its ``forward``."""
    if config.disable:
        return gm.forward
    unfused = _functional_copy(gm)
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
    if unfused is None or len(result.groups) + len(result.left_out) < 2:
        return graph.forward
    return _in_eagers_order(graph.forward, unfused)


def _functional_copy(gm: torch.fx.GraphModule) -> Callable[[], torch.fx.GraphModule] | None:
    """``gm`` as it is before fusion (a module made at its first call), where running it a second
    time changes nothing (no op of it mutates or draws random numbers): None otherwise.
    AOTAutograd's graphs are functional unless asked otherwise. (The graph's copy: ~20 µs a node;
    the module's code, as much again, waits for a failure.)"""
    if not all(map(_repeatable, gm.graph.nodes)):
        return None
    graph = copy.deepcopy(gm.graph)
    return functools.cache(lambda: torch.fx.GraphModule(gm, graph))


def _repeatable(node: torch.fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return not node.target._schema.is_mutable and (
            torch.Tag.nondeterministic_seeded not in node.target.tags)
    return getattr(node.target, "__module__", None) in ("_operator", "operator")


def _in_eagers_order(forward: Callable, unfused: Callable[[], torch.fx.GraphModule]) -> Callable:
    """``forward``, whose failures are eager's: where it raises, the unfused graph runs.

    A group runs where the partitioner placed it, after any op between its members, so of two
    ops that would raise on some input the fused graph may meet the later one first: its error
    is not eager's. Running the unfused graph, only when something raised, gives eager's first
    error (and eager's results, should the fused graph have failed where eager does not)."""

    def call(*args: Any) -> Any:
        try:
            return forward(*args)
        except Exception as error:  # noqa: BLE001 - the unfused graph's outcome is the answer
            log(2, f"the fused graph raised {error!r}: running the unfused graph")
        return unfused()(*args)

    return call


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The torch.compile backend: AOTAutograd's ATen graphs (forward, backward, inference), each
    fused (``_fused_forward``).

    AOTAutograd wraps what it compiles in runtime code that replays input mutations, rebuilds
    outputs that alias inputs or each other, and switches grad mode and autocast off around the
    call: 2–3 µs a call, a sixth of a small graph's time. An inference graph that needs none of
    it (``_unwrappable``) is handed to Dynamo as it is.

    AOTAutograd is called directly, as Dynamo's ``aot_autograd`` helper does, without that
    helper's logging context, whose import loads half of Inductor (50 ms of a 2-vCPU VM's
    0.2 s warm start).
    """
    from torch._dynamo import disable
    from torch._dynamo.utils import flatten_graph_inputs
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    if any(isinstance(x, (list, tuple, dict)) for x in example_inputs):
        return flatten_graph_inputs(gm, example_inputs, backend)  # e.g. compiled autograd's

    plain: list[Callable] = []
    # Under autocast the wrapper turns it off around the call (the graph is already cast); the
    # compilers themselves run with it off, so it is read here.
    may_unwrap = not torch._C._is_any_autocast_enabled() and all(
        type(x) in PLAIN_ARGUMENTS for x in example_inputs)

    def inference(fw: torch.fx.GraphModule, fw_inputs: Any) -> Callable:
        forward = _fused_forward(fw)
        if may_unwrap and _unwrappable(fw, len(example_inputs)):
            plain.append(forward)
        return make_boxed_func(forward)

    compiled = aot_module_simplified(gm, example_inputs, fw_compiler=compile_graph,
                                     bw_compiler=_backward_compiler,
                                     inference_compiler=inference,
                                     decompositions=decompositions())
    return plain[0] if plain else disable(compiled)


backend.__name__ = "torchfuse"


def _backward_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
    """compile_graph for the backward graph, which autograd compiles at the first backward
    pass: neither the compiling nor the compiled function is for Dynamo to trace."""
    from torch._dynamo import disable

    return disable(disable(compile_graph)(gm, example_inputs))


# What Dynamo may pass that the graph takes as it is: no tensor subclasses, no containers.
PLAIN_ARGUMENTS = (torch.Tensor, torch.nn.Parameter, int, float, bool,
                   torch.SymInt, torch.SymFloat, torch.SymBool)


def _unwrappable(fw: torch.fx.GraphModule, arguments: int) -> bool:
    """Whether AOTAutograd's runtime wrapper around the inference graph ``fw`` would only pass
    the ``arguments`` and the results through: read off the metadata AOTAutograd leaves on the
    tracing context for its compilers (Inductor reads it too). Anything unknown keeps it."""
    context = torch._guards.TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None)
    if meta is None:
        return False
    counts = ("num_mutated_inp_runtime_indices", "num_outputs_aliased", "num_intermediate_bases",
              "num_unsafe_view_outputs", "num_outputs_rng_offset")
    if any(getattr(meta, name, 1) for name in counts) or getattr(meta, "tokens", True):
        return False
    if getattr(meta, "grad_enabled_mutation", None) is not None:
        return False
    if getattr(meta, "dynamic_outputs", False):
        return False  # the wrapper marks such outputs dynamic for the graphs they go to next
    if any(type(m).__name__ == "SubclassCreationMeta"
           for m in getattr(meta, "subclass_fw_graph_out_meta", ())):
        return False
    # Each argument is a placeholder as it is: none lifted, deduplicated or a synthetic base.
    return sum(node.op == "placeholder" for node in fw.graph.nodes) == arguments


def _register() -> None:
    """Make backend="torchfuse" work where the package's entry point is not installed.

    Installed, Dynamo finds the backend through the ``torch_dynamo_backends`` entry point and
    registers it itself on first use; registering here too would be a duplicate.
    """
    from importlib.metadata import entry_points

    if "torchfuse" in entry_points(group="torch_dynamo_backends").names:
        return
    from torch._dynamo.backends import registry

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
