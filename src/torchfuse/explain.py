"""``torchfuse.explain``: what the fuser does to a program, as a printable report."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from . import capture, fusion
from .interface import get_fused_kernel_code


@dataclasses.dataclass
class Report:
    """The fusion groups of every captured graph, the ops left out and why, each kernel's source."""

    results: list[fusion.FusionResult]

    @property
    def groups(self) -> list[fusion.Group]:
        return [g for r in self.results for g in r.groups]

    @property
    def left_out(self) -> list[tuple[str, str, str]]:
        return [entry for r in self.results for entry in r.left_out]

    def __str__(self) -> str:
        lines = [f"torchfuse: {len(self.results)} graph(s), {len(self.groups)} fusion group(s)"]
        for index, result in enumerate(self.results):
            lines.append(f"\n== graph {index}: {len(result.groups)} group(s)")
            for group in result.groups:
                lines.append(f"  {group.name} (key {group.key}): "
                             f"{', '.join(group.inputs)} -> {', '.join(group.outputs)}")
                lines += [f"      {op}" for op in group.ops]
            if result.left_out:
                lines.append("  left out:")
                lines += [f"    {name} ({target}): {reason}"
                          for name, target, reason in result.left_out]
            for group in result.groups:
                lines.append(f"\n-- kernel source of graph {index} {group.name}\n{group.source}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        groups, left = len(self.groups), len(self.left_out)
        return f"<torchfuse.Report: {groups} group(s), {left} op(s) left out>"

    def to_mermaid(self) -> str:
        """The group structure of every graph as a Mermaid flowchart."""
        lines = ["graph TD"]
        for index, result in enumerate(self.results):
            lines += _mermaid_graph(index, result)
        return "\n".join(lines)


def _mermaid_graph(index: int, result: fusion.FusionResult) -> list[str]:
    groups = iter(result.groups)
    names: dict[torch.fx.Node, str] = {}
    lines = [f"  subgraph g{index}[graph {index}]"]
    for node in result.graph.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            names[node] = names.get(node.args[0], f"g{index}_{node.name}")
            continue
        ident = f"g{index}_{node.name}"
        names[node] = ident
        if node.op == "placeholder":
            lines.append(f'    {ident}(["{node.name}"])')
        elif node.op == "output":
            lines.append(f'    {ident}(["output"])')
        elif fusion.is_fusion_call(node):
            group = next(groups)
            ops = ", ".join(op.split(" = ")[1].split(".")[-2] for op in group.ops)
            lines.append(f'    {ident}["{group.name}: {ops}"]')
            lines.append(f"    style {ident} fill:#d5f5d5")
        else:
            lines.append(f'    {ident}("{node.name}: {fusion._target_name(node.target)}")')
        for source in node.all_input_nodes:
            if names.get(source) and names[source] != ident:
                lines.append(f"    {names[source]} --> {ident}")
    lines.append("  end")
    return _dedupe(lines)


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def explain(fn: Callable, *args, **kwargs) -> Report:
    """Compile ``fn`` with torchfuse, run it once on ``args``, and report what was fused.

    When an output requires grad, backward runs too, so the backward graph is reported as well.
    """
    # A backend object of its own: Dynamo compiles fn anew instead of reusing code it compiled
    # for ``capture.backend``, so this call's graphs reach ``collect``.
    def fresh(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        return capture.backend(gm, example_inputs)

    with capture.collect() as results:
        out = torch.compile(fn, backend=fresh)(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if isinstance(fn, torch.nn.Module):
            leaves += [p for p in fn.parameters() if p.requires_grad]
        if outs and leaves:  # autograd.grad, not backward: the caller's .grad stays untouched
            torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs],
                                allow_unused=True)
    for result in results:
        for group in result.groups:
            try:
                group.source = get_fused_kernel_code(group.graph, *group.example_inputs)
            except Exception as error:  # e.g. symbolic shapes; the report still stands
                group.source = f"(no source: {error})"
    return Report(results)
