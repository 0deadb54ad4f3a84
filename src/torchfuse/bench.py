"""The benchmark: torchfuse against eager, Inductor and the bandwidth floor, in one run.

    python -m torchfuse.bench [--device cpu|cuda] [--quick] [--json PATH] [--only NAME ...]
        [--large N] [--half]

Every workload runs at a large size (memory bound) and a small size (overhead bound). Columns:
eager; ``torch.compile`` with Inductor; torchfuse through ``torch.compile``; torchfuse's
``run_fusion`` (fresh outputs, as callers get them); the same kernel launched into preallocated
outputs (no allocation, no page faults); the floor (bytes the workload must move / copy
bandwidth measured here); compile seconds of both compilers, each on a fresh cache, and a
program's first call in a fresh process on cold and on warm caches. It prints
progress to stderr, Markdown tables with ratios to stdout, and optionally writes JSON. It is a
benchmark, not a test: it reports, it never fails.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import torchfuse
from torchfuse import compiler, executor, interface
from torchfuse.cache import SPECS
from torchfuse.config import override

# ---- workloads: the pointwise parts of real programs -----------------------------------------


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def gated(x, y):
    return x * torch.sigmoid(x) * y


def bias_act_scale(x, bias, scale):
    return F.gelu(x + bias) * scale


def affine(x, weight, bias):
    return x * weight + bias


def lstm_gates(gates, cx):
    return (*gates.chunk(4, 1), cx)


def lstm_cell(i, f, g, o, cx):
    cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy


LR, BETA1, BETA2, EPS, STEP = 1e-3, 0.9, 0.999, 1e-8, 10


def adam_step(param, grad, exp_avg, exp_avg_sq):
    exp_avg = BETA1 * exp_avg + (1 - BETA1) * grad
    exp_avg_sq = BETA2 * exp_avg_sq + (1 - BETA2) * grad * grad
    denom = torch.sqrt(exp_avg_sq / (1 - BETA2**STEP)) + EPS
    return param - (LR / (1 - BETA1**STEP)) * exp_avg / denom, exp_avg, exp_avg_sq


def where_mix(x, y):
    return torch.where(x > 0, torch.log1p(x) * y, torch.clamp(x * y, -1.0, 1.0))


def four_groups(x, w):
    """Four pointwise groups between two matrix products and a sum: a whole program's compile."""
    a = F.gelu(x * 2 + 1)
    b = a @ w
    c = torch.sigmoid(b) * b + 3
    e = torch.tanh(c - c.sum(-1, keepdim=True)) * 0.5
    g = e @ w
    return torch.relu(g) + g.exp()


COLS = 1024  # the inner dimension of the 2-d workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    body: Callable[..., Any]  # the pointwise part: one fusion group, what run_fusion runs
    shapes: Callable[[int], list[tuple[int, ...]]]  # input shapes for n elements of output
    views: Callable[..., tuple] | None = None  # views taken before the pointwise part
    nonnegative: tuple[int, ...] = ()  # inputs that must not be negative
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        return f"{self.name} {str(self.dtype).removeprefix('torch.')}"

    def program(self) -> Callable[..., Any]:
        """The whole program, as eager and torch.compile see it."""
        if self.views is None:
            return self.body
        body, views = self.body, self.views
        return lambda *inputs: body(*views(*inputs))

    def inputs(self, n: int, device: torch.device) -> list[torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(0)
        tensors = [torch.randn(s, generator=gen, device=device) for s in self.shapes(n)]
        for i in self.nonnegative:
            tensors[i].abs_()
        return [t.to(self.dtype) for t in tensors]


def _rows(n: int) -> int:
    return max(1, n // COLS)


WORKLOADS = [
    Workload("gelu_tanh", gelu_tanh, lambda n: [(n,)]),
    Workload("gated", gated, lambda n: [(n,), (n,)]),
    Workload("bias_act_scale", bias_act_scale, lambda n: [(_rows(n), COLS), (COLS,), (COLS,)]),
    Workload("affine", affine, lambda n: [(_rows(n), COLS), (COLS,), (COLS,)]),
    Workload(
        "lstm_cell", lstm_cell, lambda n: [(_rows(n), 4 * COLS), (_rows(n), COLS)], views=lstm_gates
    ),
    Workload("adam_step", adam_step, lambda n: [(n,)] * 4, nonnegative=(3,)),
    Workload("where_mix", where_mix, lambda n: [(n,), (n,)]),
]
HALF_VARIANTS = ("gelu_tanh", "gated", "bias_act_scale", "affine", "lstm_cell")


def workloads_for(device: torch.device, only: Sequence[str], half: bool = False) -> list[Workload]:
    """Every workload in float32; on a GPU (on the CPU where ``half``) also float16 and bfloat16
    variants."""
    chosen = list(WORKLOADS)
    if device.type != "cpu" or half:
        chosen += [
            dataclasses.replace(w, dtype=d)
            for d in (torch.float16, torch.bfloat16)
            for w in WORKLOADS
            if w.name in HALF_VARIANTS
        ]
    return [w for w in chosen if not only or any(o in w.label for o in only)]


# ---- timing ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """How hard to measure: sizes, and how many repetitions each measurement gets."""

    large: int
    small: int = 4096
    budget_s: float = 1.0  # per measurement at the large size
    min_reps: int = 3
    max_reps: int = 25
    large_block: int = 1  # calls per timed block at the large size
    small_block: int = 50  # calls per timed block at the small size
    small_blocks: int = 21  # rounds at the small size, at least
    small_budget_s: float = 1.5  # and at least this long: past a slow phase of the host
    small_max_blocks: int = 400


def plan_for(device: torch.device, quick: bool) -> Plan:
    if device.type == "cpu":
        return (Plan(1 << 20, budget_s=0.2, max_reps=5, small_budget_s=0.2) if quick
                else Plan(1 << 24))
    # A GPU queues calls: a block of them times the device (the host's work on the next call
    # overlaps the kernel of this one, as in any program that queues more than one).
    gpu = (Plan(1 << 22, budget_s=0.2, max_reps=10, small_budget_s=0.2) if quick
           else Plan(1 << 26))
    return dataclasses.replace(gpu, large_block=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block_seconds(call: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls: device time on a GPU, from the end of
    one call queued first (so that the first timed call's host work overlaps it, as every later
    one's does)."""
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        call()
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start_s) / calls


def time_columns(
    calls: dict[str, Callable[[], Any]], device: torch.device, plan: Plan, large: bool
) -> dict[str, float]:
    """Seconds per call of each column: the best of several rounds, each round running every
    column in turn (a block of back-to-back calls; one call at the large size on a CPU), so that a
    burst of load from elsewhere hits all columns alike. The best, not the median: on a shared
    machine other processes only ever add time. Small rows take rounds for small_budget_s at
    least: one took all its 21 rounds (0.3 s) in a slow phase of an H100 host, every column
    1.6-1.9x its time in other runs."""
    block = plan.large_block if large else plan.small_block
    for call in calls.values():
        for _ in range(block):
            call()
    _sync(device)
    best = dict.fromkeys(calls, math.inf)
    most, least = ((plan.max_reps, plan.min_reps) if large
                   else (plan.small_max_blocks, plan.small_blocks))
    budget = plan.budget_s * len(calls) if large else plan.small_budget_s
    rounds, start = 0, time.perf_counter()
    while rounds < most and (rounds < least or time.perf_counter() - start < budget):
        for name, call in calls.items():
            best[name] = min(best[name], _block_seconds(call, device, block))
        rounds += 1
    return best


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
HEAP_LIMIT = 128 * 1024  # glibc's default mmap threshold, fixed


def steady_heap() -> None:
    """Every allocation of HEAP_LIMIT or more a fresh mapping of its own (glibc), so that each
    column's outputs cost it the same page faults in every round. By default glibc moves its
    threshold up to 32 MB as such blocks are freed, keeps up to 64 MB of freed memory at the top
    of its heap, and serves even a larger allocation from there when it fits: a column that
    follows one that freed large temporaries (eager's) then found its output already paged in,
    in some rounds and not in others (Inductor's where_mix: 8 ms in those rounds, 22 ms in the
    rest; torchfuse's, which runs after it, 11 ms in all)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    for parameter, value in ((M_MMAP_THRESHOLD, HEAP_LIMIT), (M_TRIM_THRESHOLD, HEAP_LIMIT),
                             (M_TOP_PAD, 0)):
        mallopt(parameter, value)


def copy_bandwidth(device: torch.device, numel: int, plan: Plan) -> float:
    """Bytes per second that ``copy_`` moves (read + write) between two preallocated tensors of
    ``numel`` floats."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_columns({"copy": lambda: dst.copy_(src)}, device, plan, large=True)["copy"]
    return 2 * src.nbytes / seconds


def bytes_moved(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> int:
    """What any implementation must read and write: each input storage once, each output."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
    return sum(storages.values()) + sum(t.nbytes for t in outputs)


# ---- the columns -------------------------------------------------------------------------------


def _as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


# (rtol, atol) of the sanity check against eager: loose enough for Inductor, which computes
# half floats in float32 without rounding each op's result, and for vector math.
TOLERANCES = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}


def _matches(got: Any, want: Sequence[torch.Tensor]) -> bool:
    try:
        for g, w in zip(_as_tuple(got), want, strict=True):
            rtol, atol = TOLERANCES.get(w.dtype, (1e-3, 1e-4))
            torch.testing.assert_close(g, w, equal_nan=True, rtol=rtol, atol=atol)
    except (AssertionError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        _progress(f"    results differ from eager: {'; '.join(lines[:4])}")
        return False
    return True


@contextlib.contextmanager
def fresh_caches(root: str) -> Iterator[None]:
    """Empty on-disk caches (Inductor's and torchfuse's) and no Dynamo state: cold compiles."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    torch._dynamo.reset()
    with fresh(dir=root, delete=False), override(cache_dir=tempfile.mkdtemp(dir=root)):
        yield


def compile_and_time(program, inputs, backend: str, root: str) -> tuple[Callable, float, Any]:
    """torch.compile ``program`` on cold caches: (compiled, seconds of the first call, result)."""
    with fresh_caches(root):
        compiled = torch.compile(program, backend=backend)
        device = inputs[0].device
        start = time.perf_counter()
        result = compiled(*inputs)
        _sync(device)
        return compiled, time.perf_counter() - start, result


def register(workload: Workload, args: Sequence[torch.Tensor]) -> int | None:
    """The run_fusion key of the workload's pointwise part, or None if it does not fuse whole."""
    graph = make_fx(workload.body, tracing_mode="fake")(*args)
    try:
        return torchfuse.register_fusion(graph)
    except torchfuse.NotFusible as error:
        _progress(f"    {workload.name} does not register as one fusion: {error}")
        return None


def preallocated_launch(key: int, args: Sequence[torch.Tensor]) -> Callable[[], int] | None:
    """The kernel run_fusion would launch, bound to outputs allocated once: no allocation and no
    page faults per call. Reaches into the executor on purpose, to keep run_fusion lean."""
    spec = SPECS[key]
    argspec_key, device, numel, sizes, strides, outs = executor.plan(spec, args)
    kernel = spec.kernels.get(argspec_key)
    if kernel is None or kernel.launch is None:
        return None
    outputs = [
        torch.empty_strided(s, st or executor._contiguous_strides(s), dtype=d, device=device)
        for (s, st), d in zip(outs, kernel.out_dtypes, strict=True)
    ]
    operands = [*args, *outputs]
    return lambda: kernel.launch(numel, sizes, strides, operands)


BUILD_ROUNDS = 3


def build_seconds(key: int, args: Sequence[torch.Tensor]) -> float:
    """Seconds to build the kernel of a fusion for these inputs (render, compile, load), alone:
    the median of BUILD_ROUNDS builds, each on an empty disk cache. Inside torch.compile the
    same build runs on a thread beside Dynamo's tracing, and waits for the interpreter while
    the tracing holds it (the column ``in torch.compile``)."""
    spec = SPECS[key]
    argspec, device = interface.argspec_of(spec, args)
    times = []
    for _ in range(BUILD_ROUNDS):
        with tempfile.TemporaryDirectory(prefix="torchfuse-build-") as cache, \
                override(cache_dir=cache):
            start = time.perf_counter()
            kernel = compiler.build(spec, argspec, device)
            times.append(time.perf_counter() - start)
            wait = getattr(kernel.launch, "wait", None)
            if wait is not None:  # its background build writes into this cache: let it finish
                wait()
    return sorted(times)[len(times) // 2]


def _group_compile_seconds(before: dict, after: dict, compiles: str = "compiles",
                           seconds: str = "compile_seconds") -> float | None:
    count = after[compiles] - before[compiles]
    return (after[seconds] - before[seconds]) / count if count else None


def _settle() -> None:
    for spec in SPECS.specs():
        spec.kernels.settle()


def measure(workload: Workload, n: int, device: torch.device, plan: Plan, root: str) -> dict:
    """One row: every column for one workload at one size."""
    program = workload.program()
    inputs = workload.inputs(n, device)
    want = _as_tuple(program(*inputs))
    row: dict[str, Any] = {
        "workload": workload.name,
        "dtype": str(workload.dtype),
        "n": n,
        "bytes": bytes_moved(inputs, want),
    }
    step = lambda what: _progress(f"  {workload.label} n={n:,}: {what}")  # noqa: E731
    calls = {"eager": lambda: program(*inputs)}
    step("inductor compile")
    calls["inductor"] = _compiled_column(row, "inductor", program, inputs, want, root)
    step("torchfuse compile")
    before = torchfuse.cache_info()
    calls["torchfuse"] = _compiled_column(row, "torchfuse", program, inputs, want, root)
    row["torchfuse_group_compile_s"] = _group_compile_seconds(before, torchfuse.cache_info())
    _settle()  # second entries build on a thread (devices/*): time the kernels calls will use
    row["torchfuse_background_compile_s"] = _group_compile_seconds(
        before, torchfuse.cache_info(), "background_compiles", "background_seconds")
    args = workload.views(*inputs) if workload.views else tuple(inputs)
    calls.update(_run_fusion_columns(row, workload, args, want, build=n == plan.large))
    _settle()
    step(f"timing {', '.join(calls)}")
    times = time_columns(calls, device, plan, large=n == plan.large)
    row.update({f"{name}_s": seconds for name, seconds in times.items()})
    if n == plan.large:
        step("copy_ of as many bytes")
        row["copy_bandwidth"] = copy_bandwidth(device, max(1, row["bytes"] // 8), plan)
    torch._dynamo.reset()
    gc.collect()
    return row


def _compiled_column(row: dict, backend: str, program, inputs, want, root) -> Callable[[], Any]:
    """Compile with one torch.compile backend on cold caches; check its result against eager's."""
    compiled, row[f"{backend}_compile_s"], got = compile_and_time(program, inputs, backend, root)
    row[f"{backend}_ok"] = _matches(got, want)
    return lambda: compiled(*inputs)


def _run_fusion_columns(row: dict, workload: Workload, args, want,
                        build: bool = False) -> dict[str, Callable]:
    """run_fusion with fresh outputs, and its kernel launched into preallocated outputs; with
    ``build``, the seconds its kernel takes to build alone."""
    key = register(workload, args)
    if key is None:
        return {}
    if build:
        row["torchfuse_build_s"] = build_seconds(key, args)
    row["run_fusion_ok"] = _matches(torchfuse.run_fusion(key, *args), want)
    calls = {"run_fusion": lambda: torchfuse.run_fusion(key, *args)}
    launch = preallocated_launch(key, args)
    if launch is not None:
        calls["preallocated"] = launch
    return calls


# ---- the report --------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "torchfuse": torchfuse.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": _load(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load() -> float | None:
    """The 1-minute load average: other processes on a shared machine show up here."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _ms(seconds: float | None) -> str:
    """Milliseconds to 0.01, or to three significant digits below 1 ms (GPU kernels)."""
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _us(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e6:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def _s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def large_table(rows: list[dict], bandwidth: float) -> str:
    header = [
        "workload",
        "dtype",
        "n",
        "eager ms",
        "inductor ms",
        "tf ms",
        "run_fusion ms",
        "prealloc ms",
        "floor ms",
        "tf/ind",
        "prealloc/floor",
        "prealloc/copy",
        "alloc share",
        "ok",
    ]
    body = []
    for r in rows:
        fresh, pre = r.get("run_fusion_s"), r.get("preallocated_s")
        floor, copy = r["bytes"] / bandwidth, r["bytes"] / r["copy_bandwidth"]
        share = None if fresh is None or pre is None else max(0.0, 1 - pre / fresh)
        body.append(
            [
                *_names(r),
                *(_ms(r[k]) for k in ("eager_s", "inductor_s", "torchfuse_s")),
                _ms(fresh),
                _ms(pre),
                _ms(floor),
                _ratio(r["torchfuse_s"], r["inductor_s"]),
                _ratio(pre, floor),
                _ratio(pre, copy),
                "—" if share is None else f"{share:.0%}",
                _ok(r),
            ]
        )
    return _table(header, body)


def small_table(rows: list[dict]) -> str:
    header = [
        "workload",
        "dtype",
        "n",
        "eager µs",
        "inductor µs",
        "tf µs",
        "run_fusion µs",
        "prealloc µs",
        "tf/ind",
        "ok",
    ]
    body = [
        [
            *_names(r),
            _us(r["eager_s"]),
            _us(r["inductor_s"]),
            _us(r["torchfuse_s"]),
            _us(r.get("run_fusion_s")),
            _us(r.get("preallocated_s")),
            _ratio(r["torchfuse_s"], r["inductor_s"]),
            _ok(r),
        ]
        for r in rows
    ]
    return _table(header, body)


def _names(row: dict) -> list[str]:
    return [row["workload"], row["dtype"].removeprefix("torch."), f"{row['n']:,}"]


def compile_table(rows: list[dict]) -> str:
    header = [
        "workload",
        "dtype",
        "tf build s",
        "in torch.compile s",
        "then on a thread s",
        "tf first call s",
        "inductor first call s",
        "tf/ind",
    ]
    body = [
        [
            *_names(r)[:2],
            _s(r.get("torchfuse_build_s")),
            _s(r["torchfuse_group_compile_s"]),
            _s(r.get("torchfuse_background_compile_s")),
            _s(r["torchfuse_compile_s"]),
            _s(r["inductor_compile_s"]),
            _ratio(r["torchfuse_compile_s"], r["inductor_compile_s"]),
        ]
        for r in rows
    ]
    return _table(header, body)


CHECKS = ("inductor_ok", "torchfuse_ok", "run_fusion_ok")  # each path's result against eager's


def _ok(row: dict) -> str:
    checks = [row.get(k) for k in CHECKS]
    return "yes" if all(c is not False for c in checks) else "NO"


def report(result: dict) -> str:
    m, rows = result["machine"], result["rows"]
    large = [r for r in rows if r["n"] != result["small"]]
    small = [r for r in rows if r["n"] == result["small"]]
    bandwidth = result["copy_bandwidth"]
    return "\n\n".join(
        [
            f"torchfuse bench on {m['device']} ({m.get('gpu') or m['cpu']}, {m['cpu_threads']} CPU "
            f"threads), {m['date']}, commit {m['commit']}, torch {m['torch']}; copy bandwidth "
            f"{bandwidth / 1e9:.1f} GB/s; load average {m['load_average']} at the start, "
            f"{result['load_average_end']} at the end",
            "Large size (ms per call, best of several). tf = torchfuse through torch.compile; "
            "prealloc = run_fusion's kernel into preallocated outputs; floor = bytes moved / "
            "copy bandwidth; copy = copy_ of as many bytes (same footprint in the caches); "
            "alloc share = the part of run_fusion's time spent on fresh outputs (page faults).",
            large_table(large, bandwidth),
            "Small size (µs per call, calls back to back, best of many blocks"
            + (" in each of two passes, one in the run's order and one at its end):"
               if any(r.get("passes") == 2 for r in small) else "):"),
            small_table(small),
            "Compile (large size, cold caches). build = one fusion group's kernel built alone "
            "(median of 3); in torch.compile = the same build on a thread beside Dynamo's "
            "tracing, which holds the interpreter meanwhile (per group); then on a thread = the "
            "background build of a second entry (CUDA's vector entry; the CPU's streamed one, for "
            "calls past the last-level cache); first call = trace + compile + run.",
            compile_table(large),
            *([program_line(result["program_compile_s"])] if "program_compile_s" in result else []),
            *([start_line(result["process_start_s"])] if "process_start_s" in result else []),
        ]
    )


_START = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---- the run -----------------------------------------------------------------------------------


def warm_up(device: torch.device, root: str) -> dict[str, float]:
    """Compile a throwaway program with each backend: one-time start-up is not compile time."""
    x = torch.randn(64, device=device)
    seconds = {}
    for backend in ("inductor", "torchfuse"):
        _, seconds[backend], _ = compile_and_time(
            lambda t: torch.relu(t) * 2 + 1, [x], backend, root
        )
    _settle()  # and what builds in the background once per process (CUDA's PTX library)
    return seconds


PROGRAM_ROUNDS = 3


def _four_groups_inputs(device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 256, generator=gen, device=device)
    w = torch.randn(256, 256, generator=gen, device=device) / 16
    return [x, w]


WARM_ROUNDS = 2
START_TIMEOUT = 600  # seconds a fresh process may take (Inductor's cold one: 3-10 s here)


def process_start(device: torch.device, root: str,
                  backends: Sequence[str] = ("torchfuse", "inductor")) -> dict[str, dict]:
    """The first call of ``four_groups`` in a fresh process, per compiler: on empty caches
    ("cold"), then in later processes that find the on-disk caches the one before left
    ("warm": a program's second run; best of WARM_ROUNDS). Each process's imports (Dynamo's
    and AOTAutograd's too), CUDA's start and an eager run of the program are not counted
    (``first_call``); from torch.compile to the result everything is. The warm processes also
    say how many kernels torchfuse compiled in them (none: its disk cache has them)."""
    found: dict[str, dict] = {}
    for backend in backends:
        caches = tempfile.mkdtemp(prefix=f"start-{backend}-", dir=root)
        env = {**os.environ, "TORCHFUSE_CACHE_DIR": os.path.join(caches, "torchfuse"),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(caches, "triton")}
        command = [sys.executable, "-m", "torchfuse.bench", "--device", str(device),
                   "--first-call", backend]
        runs = []
        for _ in range(1 + WARM_ROUNDS):
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True,
                                      check=True, timeout=START_TIMEOUT)
            except subprocess.SubprocessError as error:
                _progress(f"    a fresh process's first call failed: {error}\n"
                          f"{getattr(error, 'stderr', '') or ''}"[-1000:])
                break
            runs.append(json.loads(done.stdout.splitlines()[-1]))
        if len(runs) == 1 + WARM_ROUNDS:
            found[backend] = {"cold": runs[0]["seconds"],
                              "warm": min(r["seconds"] for r in runs[1:]),
                              "warm_compiles": max(r["compiles"] for r in runs[1:])}
    return found


def first_call(backend: str, device: torch.device) -> dict[str, float]:
    """In this process (``--first-call``): the seconds from torch.compile of ``four_groups`` to
    its first result, and the kernels torchfuse compiled meanwhile. The program runs eagerly
    first: what any process pays at its first matrix product (cuBLAS's start, CUDA's loading
    of eager's kernels), whichever compiler it uses, is not the compiler's."""
    import torch._dynamo  # noqa: F401  (what torch.compile's first call imports for both)
    import torch._functorch.aot_autograd  # noqa: F401

    inputs = _four_groups_inputs(device)
    four_groups(*inputs)
    _sync(device)
    start = time.perf_counter()
    torch.compile(four_groups, backend=backend)(*inputs)
    _sync(device)
    seconds = time.perf_counter() - start
    _settle()  # background builds (second entries) count as compiles too
    info = torchfuse.cache_info()
    return {"seconds": seconds, "compiles": info["compiles"] + info["background_compiles"]}


def start_line(found: dict[str, dict]) -> str:
    if set(found) != {"torchfuse", "inductor"}:
        return "A fresh process's first call of `four_groups`: not measured (a process failed)."
    tf, ind = found["torchfuse"], found["inductor"]
    return (f"The same program's first call in a fresh process (after its imports and one eager "
            f"run): on cold caches torchfuse {_s(tf['cold'])} s, Inductor "
            f"{_s(ind['cold'])} s; on the caches "
            f"the process before left (a program's second run, best of {WARM_ROUNDS}) "
            f"torchfuse {_s(tf['warm'])} s ({tf['warm_compiles']:.0f} kernels compiled), "
            f"Inductor {_s(ind['warm'])} s.")


def program_compile(device: torch.device, root: str) -> dict[str, float]:
    """First call of ``four_groups`` on cold caches, best of PROGRAM_ROUNDS rounds (the first
    round in a process also pays Dynamo's first trace of its matrix products and sum, whichever
    compiler goes first): torchfuse (its groups built side by side, from the moment
    torch.compile binds them), torchfuse with each group built at its first call (one after
    another, as before session 3), and Inductor."""
    x, w = _four_groups_inputs(device)
    seconds: dict[str, float] = {}
    for _ in range(PROGRAM_ROUNDS):
        for name, backend, prebuild in (("torchfuse", "torchfuse", executor.prebuild),
                                        ("torchfuse_one_by_one", "torchfuse", lambda *_: None),
                                        ("inductor", "inductor", None)):
            _settle()
            torchfuse.clear_cache()  # no kernel of the last round in memory either
            with mock.patch.object(executor, "prebuild", prebuild or executor.prebuild):
                _, took, _ = compile_and_time(four_groups, [x, w], backend, root)
            seconds[name] = min(seconds.get(name, took), took)
    _settle()
    return seconds


def program_line(seconds: dict[str, float]) -> str:
    return (f"A program of four fusion groups between two matrix products and a sum "
            f"(`four_groups`), first call on cold caches (best of {PROGRAM_ROUNDS}): torchfuse "
            f"{_s(seconds['torchfuse'])} s "
            f"(each group built at its first call instead: "
            f"{_s(seconds['torchfuse_one_by_one'])} s), Inductor {_s(seconds['inductor'])} s.")


TIMED = ("eager_s", "inductor_s", "torchfuse_s", "run_fusion_s", "preallocated_s")


def merge_pass(row: dict, again: dict) -> None:
    """A small row measured a second time, at the end of the run and in the reverse order: each
    timed column keeps its best of the two, each check must hold in both. A small row's time is
    the host's: slow phases of an H100 host lasted seconds, longer than a row (every column of
    some rows at 1.4x their time in other runs, others between them unaffected), and the best of
    two passes far apart misses them where one pass cannot."""
    for column in TIMED:
        if column in row and column in again:
            row[column] = min(row[column], again[column])
    for check in CHECKS:
        if check in again:
            row[check] = row.get(check, True) and again[check]
    row["passes"] = 2


def run(device: torch.device, plan: Plan, only: Sequence[str] = (), half: bool = False) -> dict:
    chosen = workloads_for(device, only, half)
    info = machine(device)
    with tempfile.TemporaryDirectory(prefix="torchfuse-bench-") as root:
        _progress(f"warming up both compilers on {device} ...")
        first = warm_up(device, root)
        _progress("measuring copy bandwidth ...")
        bandwidth = copy_bandwidth(device, 4 * plan.large, plan)
        _progress("compiling a program of four groups ...")
        program = program_compile(device, root)
        _progress("the same program's first call in fresh processes ...")
        start = process_start(device, root)
        rows = []
        cases = [(w, n) for w in chosen for n in (plan.large, plan.small)]
        for k, (workload, n) in enumerate(cases, 1):
            _progress(f"[{k}/{len(cases)}] {workload.label} n={n:,}")
            rows.append(measure(workload, n, device, plan, root))
        small = [(w, row) for (w, n), row in zip(cases, rows, strict=True) if n == plan.small]
        for k, (workload, row) in enumerate(reversed(small), 1):
            _progress(f"[again {k}/{len(small)}] {workload.label} n={plan.small:,}")
            merge_pass(row, measure(workload, plan.small, device, plan, root))
    return {
        "machine": info,
        "first_compile_s": first,
        "program_compile_s": program,
        "process_start_s": start,
        "copy_bandwidth": bandwidth,
        "load_average_end": _load(),
        "large": plan.large,
        "small": plan.small,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchfuse.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--only",
        nargs="*",
        default=(),
        metavar="NAME",
        help="run only workloads whose label contains one of these",
    )
    parser.add_argument("--half", action="store_true",
                        help="float16 and bfloat16 variants on the CPU too (always on a GPU)")
    parser.add_argument("--large", type=int, metavar="N",
                        help="elements at the large size (default: 16M on CPU, 64M on a GPU)")
    parser.add_argument("--first-call", metavar="BACKEND", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    device = torch.device(options.device)
    if options.first_call:  # a process of process_start's
        print(json.dumps(first_call(options.first_call, device)))
        return 0
    if device.type == "cuda":
        # NVRTC keeps machine code in CUDA's compute cache (~/.nv/ComputeCache), keyed by the
        # PTX: a kernel compiled by an earlier run would load from there, not compile cold.
        os.environ["CUDA_CACHE_DISABLE"] = "1"
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if device.type == "cpu":
        steady_heap()
    plan = plan_for(device, options.quick)
    if options.large:
        plan = dataclasses.replace(plan, large=options.large)
    result = run(device, plan, options.only, options.half)
    print(report(result))
    if options.json:
        with open(options.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
