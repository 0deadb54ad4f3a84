"""The fusion pass: fusible nodes of an ATen FX graph -> cycle-free groups -> fusion nodes.

torch.fx's CapabilityBasedPartitioner proposes the groups; the op table (through
:func:`node_reason`) decides what is fusible, so the partitioner and the code generator agree.
Every group becomes one ``run_fusion(key, ...)`` call in the graph; every op left out keeps the
reason it was left out, for ``explain`` and TORCHFUSE_DEBUG=3.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import torch
import torch.fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from . import devices, executor, ops
from .cache import SPECS
from .config import log
from .interface import register_fusion, run_fusion

LONE = "no fusible neighbour: one op alone runs as fast in eager"


@dataclasses.dataclass
class Group:
    name: str
    key: int
    ops: list[str]  # "name = target" of each op in the group
    inputs: list[str]
    outputs: list[str]
    graph: torch.fx.GraphModule
    example_inputs: list  # the inputs' meta values (fake tensors), for rendering source
    source: str = ""  # the kernel's source, filled in by explain


@dataclasses.dataclass
class FusionResult:
    """What the pass did to one graph: its groups and every op it left out, with the reason."""

    groups: list[Group]
    left_out: list[tuple[str, str, str]]  # (node name, target, reason)
    graph: torch.fx.GraphModule


def _target_name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(
        target, "__name__", str(target))


def node_reason(node: torch.fx.Node) -> str | None:
    """Why ``node`` cannot join a fusion group, or None when it can."""
    if node.op != "call_function" or node.target is operator.getitem:
        return f"{node.op} is not a computation"
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "does not produce a single tensor"
    if val.layout != torch.strided:
        return f"layout {val.layout}"
    if val.dtype not in ops.DTYPES:
        return f"dtype {val.dtype} is not fused"
    why = devices.why_not(val.device.type)
    if why:
        return why
    try:
        operands, attrs = ops.split_arguments(node.target, node.args, node.kwargs)
    except (TypeError, AttributeError, IndexError) as error:
        return ops.support(node.target, {}) or str(error)
    values = []
    for operand in operands:
        if isinstance(operand, torch.fx.Node):
            operand = operand.meta.get("val")
            if not isinstance(operand, torch.Tensor):
                return "an operand is a symbolic scalar, not a tensor"
            if operand.device != val.device:
                return f"operands on different devices ({operand.device}, {val.device})"
        elif operand is not None and not isinstance(operand, (bool, int, float)):
            return f"operand of type {type(operand).__name__}"
        values.append(operand)
    if not any(isinstance(v, torch.Tensor) for v in values):
        return "no tensor operand (a computation on numbers)"
    try:
        ops.select(node.target, attrs, values, val.dtype, cuda=val.device.type == "cuda")
    except ops.Unsupported as error:
        return str(error)
    return None


class _Support(OperatorSupportBase):
    def __init__(self) -> None:
        self.reasons: dict[torch.fx.Node, str] = {}

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        reason = node_reason(node)
        if reason is not None:
            self.reasons[node] = reason
        return reason is None


_PARTITIONER_OPTIONS = (
    {"skip_horizontal_fusion": True}
    if "skip_horizontal_fusion" in inspect.signature(CapabilityBasedPartitioner).parameters
    else {}
)


def fuse(gm: torch.fx.GraphModule) -> FusionResult:
    """Replace each group of fusible nodes in ``gm`` with one ``run_fusion`` call, in place."""
    support = _Support()
    partitioner = CapabilityBasedPartitioner(
        gm, support, allows_single_node_partition=False, **_PARTITIONER_OPTIONS
    )
    partitions = partitioner.propose_partitions()
    grouped = {n for p in partitions for n in p.nodes}
    left_out = [
        (n.name, _target_name(n.target), support.reasons.get(n, LONE))
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is not operator.getitem and n not in grouped
    ]
    fused = partitioner.fuse_partitions(partitions, prefix="fusion_")
    groups = [_replace(fused, node) for node in list(fused.graph.nodes)
              if node.op == "call_module" and node.target.startswith("fusion_")]
    fused.graph.eliminate_dead_code()  # views now taken inside the runners
    fused.graph.lint()
    fused.recompile()
    remaining = {n.name for n in fused.graph.nodes}
    left_out = [entry for entry in left_out if entry[0] in remaining]
    for name, target, reason in left_out:
        log(3, f"left out {name} ({target}): {reason}")
    for group in groups:
        log(1, f"{group.name} (key {group.key}): {', '.join(group.ops)}")
    return FusionResult(groups, left_out, fused)


def is_fusion_call(node: torch.fx.Node) -> bool:
    """Whether ``node`` runs a fusion group: ``run_fusion``, or a bound runner of it."""
    return node.op == "call_function" and (
        node.target is run_fusion or hasattr(node.target, "fusion_key"))


def _replace(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Group:
    """Swap one fused submodule for ``run_fusion(key, *inputs)``, or for a bound runner of it
    (``executor.bind``) where the inputs' shapes are static."""
    sub = getattr(gm, node.target)
    key = register_fusion(sub)
    result = sub.graph.output_node().args[0]
    single = not isinstance(result, (tuple, list))
    examples = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
    args, views = _view_sources(node.args)
    bound = None
    if views is not None:  # the runner takes the viewed tensors, not the views
        bound = executor.bind(SPECS[key], examples, views, [a.meta.get("val") for a in args])
    if bound is None:
        args = node.args
        bound = executor.bind(SPECS[key], examples)  # run_fusion with its plan made once
    with gm.graph.inserting_before(node):
        if bound is None:
            call = gm.graph.call_function(run_fusion, (key, *args))
        else:
            call = gm.graph.call_function(bound, tuple(args))
        value = gm.graph.call_function(operator.getitem, (call, 0)) if single else call
    value.meta = dict(node.meta)
    outputs = result if not single else (result,)
    group = Group(
        name=node.target,
        key=key,
        ops=[f"{n.name} = {_target_name(n.target)}" for n in sub.graph.nodes
             if n.op == "call_function"],
        inputs=[str(a) for a in args],
        outputs=[o.name for o in outputs],
        graph=sub,
        example_inputs=examples,
    )
    node.replace_all_uses_with(value)
    gm.graph.erase_node(node)
    gm.delete_submodule(node.target)
    return group


# View ops whose result a runner can take as a pointer into their first argument.
_SPLITS = (torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)
_VIEWS = (torch.ops.aten.slice.Tensor,)


def _viewed(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor ``node`` is a slice of (``chunk``, ``split``, ``x[:, a:b]``), or None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        split = node.args[0]
        if split.op == "call_function" and split.target in _SPLITS:
            return split.args[0] if isinstance(split.args[0], torch.fx.Node) else None
    if node.target in _VIEWS and isinstance(node.args[0], torch.fx.Node):
        return node.args[0]
    return None


def _view_sources(inputs) -> tuple[list, list | None]:
    """The arguments a bound runner takes for a group's inputs where some are slices of other
    tensors (each viewed tensor once), and per input (argument index, element offset of the
    view in it, or None). (inputs, None) where no input is such a slice."""
    args: list = []
    index: dict = {}
    views: list = []
    for node in inputs:
        if not isinstance(node, torch.fx.Node):
            return list(inputs), None
        base = _viewed(node)
        view, whole = node.meta.get("val"), None if base is None else base.meta.get("val")
        offset = None
        if (isinstance(whole, torch.Tensor) and isinstance(view, torch.Tensor)
                and whole.dtype == view.dtype and whole.device == view.device):
            offset = view.storage_offset() - whole.storage_offset()
        if not (isinstance(offset, int) and offset >= 0
                and offset + _extent(view) <= _extent(whole)):  # inside the wider tensor
            base, offset = node, None
        if base not in index:
            index[base] = len(args)
            args.append(base)
        views.append((index[base], offset))
    if all(offset is None for _, offset in views):
        return list(inputs), None
    return args, views


def _extent(t: torch.Tensor) -> int:
    """The element offset of a tensor's last element from its first (-1 when it is empty)."""
    if t.numel() == 0:
        return -1
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
