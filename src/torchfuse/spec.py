"""The values stages hand each other: ArgSpec (what a kernel is specialised on), Kernel, KernelSpec.

Sizes are never part of an ArgSpec: a kernel serves every size of the same rank, layout and
dtypes, taking sizes and strides as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

from .ir import FusionGraph

# How an operand walks the innermost dimension of the (collapsed) iteration space.
CONTIG = "1"  # stride 1
BROADCAST = "0"  # stride 0
STRIDED = "x"  # any other stride, passed at run time


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    """One input: its dtype, how it walks the inner dimension, whether it is 0-d, whether it
    is *reused*: broadcast along an outer dimension, so every row reads it again (a bias),
    whether it is a *scalar*: a single element, the same at every position, and whether it is
    *expanded*: more elements, all views of one (every stride 0).

    0-d-ness matters because a 0-d tensor takes a weaker part in type promotion; reuse, because
    a reused input is read from cache, not streamed from memory (CUDA's vector width); a scalar,
    because eager's TensorIterator treats one as it treats a Python number, and some of its
    kernels compute with one differently (the CPU's 16-bit floor division: ops._div_floor). An
    expanded input is a scalar to the op that reads it (TensorIterator's ``is_scalar``: every
    stride 0), but what eager computes from it is a full tensor, where a one-element input's
    results are one element again (compiler.infer_types).
    """

    dtype: torch.dtype
    inner: str = CONTIG
    zero_dim: bool = False
    reused: bool = False
    scalar: bool = False
    expanded: bool = False


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """Everything a generated kernel is specialised on."""

    device: str  # torch.device type, plus index where devices of one type can differ
    rank: int  # of the collapsed iteration space; 1 for the flat contiguous loop
    inputs: tuple[TensorDesc, ...]
    outputs: tuple[tuple[str, bool], ...]
    """Per output: its inner code, and whether it is *partial*: smaller than the iteration space
    (it depends on only some inputs), so each element is written once, not once per repeat."""
    default_dtype: torch.dtype = torch.float32
    """torch's default dtype: what ops that make floats of integers (true division) give."""

    @property
    def partial_outputs(self) -> tuple[bool, ...]:
        return tuple(partial for _, partial in self.outputs)

    @staticmethod
    def from_key(key: tuple, n_outputs: int) -> ArgSpec:
        """Decode the executor's hot-path key (see executor.plan)."""
        device, dtypes, layout, default = key
        if layout is None:
            descs = tuple(TensorDesc(d) for d in dtypes)
            return ArgSpec(device, 1, descs, ((CONTIG, False),) * n_outputs, default)
        rank, inner, zero_dim, reused, scalar, expanded, outputs = layout
        descs = tuple(TensorDesc(*desc)
                      for desc in zip(dtypes, inner, zero_dim, reused, scalar, expanded))
        return ArgSpec(device, rank, descs, outputs, default)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A compiled, launchable kernel for one (KernelSpec, ArgSpec), or the reason there is none.

    ``launch(numel, sizes, strides, tensors) -> error`` where strides are per operand (inputs,
    then outputs), per dimension, in elements, and error is 0 or an ``ERRORS`` code.
    """

    source: str
    out_dtypes: tuple[torch.dtype, ...]
    launch: Callable[..., int] | None
    reason: str = ""  # why launch is None: this ArgSpec runs through the fallback


ERRORS = {  # a launch's error codes: the kernel's own (1), the CUDA launcher's (2, 3)
    1: "integer division by zero",
    2: "the kernel could not be launched",
    3: "a kernel that can fail, inside a CUDA graph capture (its error flag cannot be read)",
}


@dataclasses.dataclass(eq=False)
class KernelSpec:
    """The device-independent result of upfront compilation: graph, fallback, kernel store."""

    key: int
    graph: FusionGraph
    output_deps: tuple[frozenset[int], ...]
    kernels: Any  # cache.KernelStore, mapping argspec keys to Kernels
    warned: set = dataclasses.field(default_factory=set)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    plans: tuple = ()  # the executor's recent plans (executor.Recent), most recent first
    autocast: dict = dataclasses.field(default_factory=dict)  # device type -> autocast casts?

    @functools.cached_property  # asked on every call: the executor's fast path
    def full_outputs(self) -> bool:
        """Every output depends on every input, so it has the iteration space's shape."""
        every = frozenset(range(self.graph.n_inputs))
        return all(deps == every for deps in self.output_deps)
