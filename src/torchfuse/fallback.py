"""The fallback: run a fusion's graph with eager ATen ops.

It is what a fused kernel must match (the tests' oracle), what runs whenever a kernel cannot,
and, on meta tensors, how the compiler learns each value's dtype exactly as eager would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import ops
from .ir import Const, FusionGraph, Ref


def operand_value(operand: Any, values: list) -> Any:
    if isinstance(operand, Ref):
        return values[operand.id]
    return operand.value if isinstance(operand, Const) else operand


def evaluate(graph: FusionGraph, inputs: Sequence[Any]) -> list:
    """Every value of the graph (inputs first, then one per op), computed eagerly."""
    values = list(inputs)
    for op in graph.ops:
        operands = [operand_value(o, values) for o in op.operands]
        args, kwargs = ops.join_arguments(op.target, operands, op.attr_dict)
        values.append(op.target(*args, **kwargs))
    return values


def run(graph: FusionGraph, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """The graph's outputs, computed eagerly: eager's results, and eager's errors."""
    values = evaluate(graph, inputs)
    return tuple(values[o] for o in graph.outputs)
