"""FusionGraph: the small SSA IR of one fusion group.

Values are numbered: inputs first (0 .. n_inputs-1), then one value per op in order. Operands
are :class:`Ref` (a value), :class:`Const` (a Python number) or None (a missing optional operand).
Names from the FX graph are erased, so two graphs that differ only in names are equal and share
one :class:`~torchfuse.spec.KernelSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx

from . import ops


@dataclasses.dataclass(frozen=True)
class Ref:
    id: int

    def __str__(self) -> str:
        return f"%{self.id}"


@dataclasses.dataclass(frozen=True)
class Const:
    """A Python number, compared by its exact text so that NaN equals NaN (graph keys need it)."""

    kind: str  # "f", "i" or "b"
    text: str  # float.hex / int / bool text

    @staticmethod
    def of(value: bool | int | float) -> Const:
        if isinstance(value, bool):
            return Const("b", str(value))
        if isinstance(value, int):
            return Const("i", str(value))
        return Const("f", float(value).hex())

    @property
    def value(self) -> bool | int | float:
        if self.kind == "b":
            return self.text == "True"
        return int(self.text) if self.kind == "i" else float.fromhex(self.text)

    def __str__(self) -> str:
        value = self.value
        return repr(value) if not (isinstance(value, float) and math.isinf(value)) else str(value)


Operand = Ref | Const | None


@dataclasses.dataclass(frozen=True)
class Op:
    target: Any  # the ATen OpOverload
    operands: tuple[Operand, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    @property
    def attr_dict(self) -> dict[str, Any]:
        """The attributes by name, as plain Python values."""
        return {name: attr_value(value) for name, value in self.attrs}

    @property
    def name(self) -> str:
        return ops.lookup(self.target).name


@dataclasses.dataclass(frozen=True)
class FusionGraph:
    n_inputs: int
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]

    def __str__(self) -> str:
        lines = [f"fusion({', '.join(f'%{i}' for i in range(self.n_inputs))}):"]
        for k, op in enumerate(self.ops):
            args = ", ".join(str(o) for o in op.operands)
            attrs = "".join(f", {n}={v!r}" for n, v in op.attrs)
            lines.append(f"  %{self.n_inputs + k} = {op.target}({args}{attrs})")
        lines.append(f"  return {', '.join(f'%{o}' for o in self.outputs)}")
        return "\n".join(lines)

    def input_deps(self) -> tuple[frozenset[int], ...]:
        """For each output, the inputs it depends on (its shape is their broadcast)."""
        deps: list[frozenset[int]] = [frozenset((i,)) for i in range(self.n_inputs)]
        for op in self.ops:
            deps.append(frozenset().union(*(deps[o.id] for o in op.operands if isinstance(o, Ref))))
        return tuple(deps[o] for o in self.outputs)


class NotFusible(ValueError):
    """A graph handed to register_fusion holds something torchfuse cannot fuse."""


def _operand(arg: Any, ids: dict[torch.fx.Node, int]) -> Operand:
    if isinstance(arg, torch.fx.Node):
        if arg not in ids:
            raise NotFusible(f"{arg.name} is used before it is defined")
        return Ref(ids[arg])
    if arg is None:
        return None
    if isinstance(arg, (bool, int, float)):
        return Const.of(arg)
    raise NotFusible(f"operand {arg!r} of type {type(arg).__name__} is not a tensor or number")


def _attr(value: Any) -> Any:
    # Floats inside attributes are canonicalised like constants (NaN must equal NaN).
    return Const.of(value) if isinstance(value, float) else value


def attr_value(value: Any) -> Any:
    return value.value if isinstance(value, Const) else value


def from_fx(graph: torch.fx.Graph) -> FusionGraph:
    """Canonicalise an FX graph of fusible ATen ops: placeholders are the inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ids: dict[torch.fx.Node, int] = {node: i for i, node in enumerate(placeholders)}
    fused: list[Op] = []
    outputs: tuple[int, ...] = ()
    for node in graph.nodes:
        if node.op == "call_function":
            operands, attrs = ops.split_arguments(node.target, node.args, node.kwargs)
            reason = ops.support(node.target, attrs)
            if reason:
                raise NotFusible(f"{node.name}: {reason}")
            operand_ids = tuple(_operand(a, ids) for a in operands)
            ids[node] = len(ids)
            attr_items = tuple((k, _attr(v)) for k, v in attrs.items())
            fused.append(Op(node.target, operand_ids, attr_items))
        elif node.op == "output":
            results = node.args[0]
            results = results if isinstance(results, (tuple, list)) else (results,)
            if not all(isinstance(r, torch.fx.Node) for r in results):
                raise NotFusible("every output must be a value of the graph")
            outputs = tuple(ids[r] for r in results)
        elif node.op != "placeholder":
            raise NotFusible(f"{node.name}: {node.op} nodes cannot be fused")
    n_inputs = len(placeholders)
    if n_inputs == 0:
        raise NotFusible("a fusion needs at least one tensor input")
    return FusionGraph(n_inputs, tuple(fused), outputs)
