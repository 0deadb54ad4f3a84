"""The executor: the hot path of ``run_fusion``.

Devices agree? Broadcast shape, per-operand strides with broadcast dimensions at stride 0, the
dimensions every operand walks contiguously merged into one; the ArgSpec key; the kernel from
the spec's store (compiled on a miss); outputs allocated; launch; outputs returned. Anything a
kernel cannot do goes to the fallback, which gives eager's result or raises eager's error.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import devices, fallback
from .cache import STATS, count
from .compiler import build
from .config import config, log
from .spec import BROADCAST, CONTIG, ERRORS, STRIDED, ArgSpec, KernelSpec

_Tensor = torch.Tensor


class NoKernel(Exception):
    """This call cannot run a fused kernel; the message says why."""


def run(spec: KernelSpec, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run one fusion: a fused kernel where possible, else the fallback."""
    if _autocast_on() and _autocast_casts(spec, inputs):
        return _fallback(spec, inputs, "autocast casts the operands of one of its ops")
    recent = _recall(spec, inputs)
    if recent is not None:
        planned = recent.plan
    else:
        try:
            if config.disable:
                raise NoKernel("TORCHFUSE_DISABLE is set")
            if any(type(t) not in _PLAIN and isinstance(t, _Tensor) for t in inputs):
                # (the guards of recent plans refuse any other type of tensor)
                raise NoKernel("a tensor subclass: its ops are its own (__torch_function__, "
                               "__torch_dispatch__), and a wrapper may hold no memory at all")
            planned = plan(spec, inputs)
        except NoKernel as why:
            return _fallback(spec, inputs, str(why))
        recent = _remember(spec, inputs, planned)
    key, device, numel, sizes, strides, outs = planned
    kernel = spec.kernels.get(key)
    if recent is not None and not config.check:
        outputs = _quick(kernel, recent.prepared, inputs)
        if outputs is not None:
            return outputs
    if kernel is None:
        count(misses=1)
        argspec = ArgSpec.from_key(key, len(outs))
        kernel = spec.kernels.get_or_build(key, lambda: build(spec, argspec, device))
    else:
        STATS.hits += 1  # racy but cheap: statistics, not correctness
    if kernel.launch is None:
        return _fallback(spec, inputs, kernel.reason)
    empty = devices.allocator(device)
    outputs = [empty(shape, st, dtype) for (shape, st), dtype in zip(outs, kernel.out_dtypes)]
    if numel:
        error = kernel.launch(numel, sizes, strides, [*inputs, *outputs])
        if error:
            # Eager raises here; the fallback raises eager's own exception.
            return _fallback(spec, inputs, ERRORS.get(error, f"kernel error {error}"))
    if config.check:
        _check(spec, inputs, outputs)
    elif recent is not None:
        recent.prepared = _prepare(recent.prepared, kernel, planned, len(inputs))
    return tuple(outputs)


_PLAIN = {torch.Tensor, torch.nn.Parameter}  # the tensors whose ops are eager's own
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", lambda: False)
_default_dtype = torch.get_default_dtype


def _autocast_casts(spec: KernelSpec, inputs: Sequence) -> bool:
    """Whether autocast, on for the inputs' device, casts the operands of one of the graph's ops
    (on CUDA exp, log, pow... compute in float32): eager's casts then decide the results, which a
    kernel typed without autocast would not give. A compiled graph has its casts in the graph."""
    first = inputs[0] if len(inputs) else None
    if not isinstance(first, _Tensor):
        return False
    kind = first.device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return False
    except RuntimeError:  # a device type autocast does not know (meta): it casts nothing there
        return False
    casts = spec.autocast.get(kind)
    if casts is None:
        key = getattr(torch._C.DispatchKey, "Autocast" + kind.upper(), None)
        casts = spec.autocast[kind] = key is None or any(
            _has_kernel(op.target, key) for op in spec.graph.ops)
    return casts


def _has_kernel(op, key) -> bool:
    try:
        return op.has_kernel_for_dispatch_key(key)
    except Exception:  # not an operator the dispatcher knows: assume the worst
        return True


def _quick(kernel, prepared: tuple | None, operands: Sequence) -> tuple[torch.Tensor, ...] | None:
    """The outputs of a plan's prepared call, where it was prepared for this kernel and it ran;
    else None: the general path runs (and reports any error)."""
    if prepared is None or prepared[0] is not kernel:
        return None
    outputs = prepared[1](*operands)
    if outputs.__class__ is not tuple:  # None (not from this thread as it is) or an error code
        return None
    STATS.hits += 1
    return outputs


def _prepare(prepared: tuple | None, kernel, planned: tuple, n_operands: int) -> tuple | None:
    """``prepared`` where it is this kernel's; else (kernel, its launch prepared for this plan:
    devices/launch.c's Call, which allocates the outputs and launches in one call from Python),
    or None where the launch offers none yet."""
    if prepared is not None and prepared[0] is kernel:
        return prepared
    prepare = getattr(kernel.launch, "prepare", None)
    if prepare is None:
        return None
    _, _, numel, sizes, strides, outs = planned
    outs = tuple((shape, st, dtype) for (shape, st), dtype in zip(outs, kernel.out_dtypes))
    call = prepare(numel, sizes, strides, outs, n_operands)
    return None if call is None else (kernel, call)


def bind(spec: KernelSpec, examples: Sequence, views: Sequence | None = None,
         arguments: Sequence | None = None) -> Callable[..., tuple] | None:
    """``run`` for one fusion node of a compiled graph, its plan made once from the node's
    example inputs (fake tensors); None where their shapes are symbolic or no kernel can run.

    torch.compile's guards fix the shapes, strides, dtypes and device that every call brings,
    and a plan costs more than a small kernel. A call that brings others anyway takes ``run``.

    ``views``, where some inputs are views of other tensors (a ``chunk`` of a wider tensor): per
    input, the index of the runner's argument it is, and the element offset of the view in that
    argument or None where it is the argument itself; ``arguments`` are the arguments' examples.
    The runner then takes the wider tensor and passes the kernel a pointer into it: no view op
    per call.
    """
    arguments = examples if views is None else arguments
    if not all(isinstance(t, _Tensor) and _static(t) for t in (*examples, *arguments)):
        return None
    try:
        with torch.no_grad():
            planned = plan(spec, examples)
    except NoKernel:
        return None
    key, device, numel, sizes, strides, outs = planned
    shapes = [tuple(t.shape) for t in arguments]
    layouts = [t.stride() for t in arguments]
    empty, device_type = devices.allocator(device), device.type
    table = None if views is None else [
        (i, None if offset is None else offset * t.element_size(), t.shape, t.stride(), offset)
        for (i, offset), t in zip(views, examples, strict=True)]

    def inputs_of(args: tuple) -> Sequence:
        """The fusion's inputs: each argument, or the view of it."""
        if table is None:
            return args
        return [args[i] if offset is None
                else args[i].as_strided(shape, stride, args[i].storage_offset() + offset)
                for i, _, shape, stride, offset in table]

    guard = None  # the guard of the first call's arguments, once they fit the plan
    prepared = None  # the kernel's launch prepared for the plan, once it has run (_prepare)

    def fusion(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal guard, prepared
        kernel = spec.kernels.get(key)
        if (kernel is None or kernel.launch is None or config.disable or config.check
                or not devices.enabled(device_type) or _default_dtype() is not key[3]):
            return run(spec, inputs_of(args))
        if guard is None or not guard.check(*args):  # in C++: 0.3 µs where this takes 1
            if [t.stride() for t in args] != layouts or [t.shape for t in args] != shapes:
                return run(spec, inputs_of(args))
            if guard is None:
                guard = _guard_of(args)
        operands = args if table is None else [
            args[i] if nbytes is None else args[i].data_ptr() + nbytes
            for i, nbytes, *_ in table]
        outputs = _quick(kernel, prepared, operands)
        if outputs is not None:
            return outputs
        STATS.hits += 1
        outputs = [empty(shape, st, dtype) for (shape, st), dtype in zip(outs, kernel.out_dtypes)]
        if numel and kernel.launch(numel, sizes, strides, [*operands, *outputs]):
            # the kernel refused (division by zero): eager's error
            return run(spec, inputs_of(args))
        prepared = _prepare(prepared, kernel, planned, len(operands))
        return tuple(outputs)

    fusion.__name__ = f"fusion_{spec.key}"  # how the compiled graph's code names it
    fusion.fusion_key = spec.key  # what fusion.is_fusion_call looks for
    fusion.prebuild = functools.partial(prebuild, spec, key, len(outs), device)
    return fusion


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def prebuild(spec: KernelSpec, key: tuple, n_outputs: int, device: torch.device) -> None:
    """Start building a bound runner's kernel on a thread, ahead of its first call (a bound
    runner's ``prebuild()``): the groups of a compiled graph compile side by side (NVRTC and
    the C compiler run outside the GIL). A first call that comes sooner waits for it."""
    global _pool
    if config.disable or spec.kernels.get(key) is not None:
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="torchfuse-build")
    argspec = ArgSpec.from_key(key, n_outputs)
    _pool.submit(spec.kernels.get_or_build, key, lambda: build(spec, argspec, device))


# torch's own check of tensors against examples, in C++ (what Dynamo's tensor guards run):
# type, dtype, device, dispatch keys, requires_grad, sizes and strides of each tensor, and no
# tensor passed twice. None where this torch has no such class.
_Guards = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
_Guards = getattr(_Guards, "TensorGuards", None)
RECENT = 4  # plans remembered per spec, with their guards


class Recent:
    """A recent call's plan and the guard its inputs passed; once its kernel has run, the
    kernel's launch prepared for the plan (``_prepare``)."""

    __slots__ = ("guard", "plan", "prepared")

    def __init__(self, guard, planned: tuple) -> None:
        self.guard, self.plan, self.prepared = guard, planned, None


def _recall(spec: KernelSpec, inputs: Sequence) -> Recent | None:
    """The recent plan whose inputs these match in everything a plan reads (one guard check in
    C++, ~0.1 µs a tensor, where planning in Python takes 1.5-5 µs); else None."""
    if len(inputs) == spec.graph.n_inputs and not config.disable:
        default = _default_dtype()  # which the guard does not see
        for recent in spec.plans:
            if recent.guard.check(*inputs) and recent.plan[0][3] is default:
                return recent
    return None


def _remember(spec: KernelSpec, inputs: Sequence, planned: tuple) -> Recent | None:
    """Keep a plan with the guard of its inputs, most recent first. Not where an input requires
    grad (the plan then depends on grad mode, which the guard does not see), or is passed twice
    (the guard refuses repeated tensors)."""
    if any(t.requires_grad for t in inputs) or len({id(t) for t in inputs}) != len(inputs):
        return None
    guard = _guard_of(inputs)
    if guard is _NO_GUARD:
        return None
    recent = Recent(guard, planned)
    spec.plans = (recent, *spec.plans[:RECENT - 1])  # one assignment: thread-safe
    return recent


class _NoGuard:
    @staticmethod
    def check(*inputs) -> bool:
        return False


_NO_GUARD = _NoGuard()


def _guard_of(inputs: Sequence[torch.Tensor]):
    """The guard that these tensors, and tensors like them, pass; one that none pass where this
    torch has no guards (or takes other arguments)."""
    if _Guards is None:
        return _NO_GUARD
    try:
        return _Guards(*inputs, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except Exception as error:
        log(2, f"no tensor guards, plans are made in Python: {error}")
        return _NO_GUARD


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(n, int) for n in (*t.shape, *t.stride()))


def plan(spec: KernelSpec, inputs: Sequence[torch.Tensor]) -> tuple:
    """(argspec key, device, numel, sizes, strides, outputs' (shape, strides) as tuples).

    The key, what the kernel is specialised on: (device key, input dtypes, layout or None where
    every operand is contiguous and of one shape, torch's default dtype); ``ArgSpec.from_key``.

    Raises:
        NoKernel: the call must run through the fallback.
    """
    if len(inputs) != spec.graph.n_inputs:
        raise NoKernel(f"expected {spec.graph.n_inputs} inputs, got {len(inputs)}")
    first = inputs[0]
    if not isinstance(first, _Tensor):
        raise NoKernel("inputs must be tensors")
    device, shape = first.device, first.shape
    grad = torch.is_grad_enabled()
    flat = spec.full_outputs
    for t in inputs:
        if not isinstance(t, _Tensor):
            raise NoKernel("inputs must be tensors")
        if t.device != device:
            raise NoKernel(f"inputs on different devices ({device} and {t.device})")
        if grad and t.requires_grad:
            raise NoKernel("an input requires grad (autograd needs eager ops)")
        if t.layout != torch.strided or t.is_neg():
            # sparse, or a lazily negated view: its memory is not its values
            raise NoKernel(f"an input is not a plain dense tensor ({t.layout}, neg={t.is_neg()})")
        if flat and (t.shape != shape or not t.is_contiguous()):
            flat = False
    device_key = devices.device_key(device)
    if device_key is None:
        raise NoKernel(devices.why_not(device.type) or f"no backend for {device.type}")
    dtypes = tuple([t.dtype for t in inputs])
    default = torch.get_default_dtype()
    numel = first.numel() if flat else 1
    if numel != 1:  # one flat loop over contiguous operands of one shape (one element: scalars)
        n_out = len(spec.output_deps)
        strides = _UNIT_STRIDES.get((len(inputs), n_out))
        if strides is None:
            strides = _UNIT_STRIDES[len(inputs), n_out] = [1] * (len(inputs) + n_out)
        layout = _CONTIGUOUS.get(shape)
        if layout is None:
            if len(_CONTIGUOUS) >= _PLANS_MAX:
                _CONTIGUOUS.clear()
            layout = _CONTIGUOUS[shape] = (tuple(shape), tuple(_contiguous_strides(shape)))
        outs = [layout] * n_out  # contiguous, like the inputs
        return (device_key, dtypes, None, default), device, numel, [numel], strides, outs
    return _general_plan(spec, inputs, device, device_key, dtypes, default)


_UNIT_STRIDES: dict[tuple[int, int], list[int]] = {}  # (inputs, outputs) -> flat strides: read-only
_CONTIGUOUS: dict[torch.Size, tuple] = {}  # shape -> (shape, contiguous strides), bounded


def _broadcast(shapes: Sequence[Sequence[int]]) -> list[int]:
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for s in shapes:
        offset = rank - len(s)
        for d, n in enumerate(s):
            m = out[offset + d]
            if n != m:
                if m == 1:
                    out[offset + d] = n
                elif n != 1:
                    raise NoKernel(f"shapes {[list(s) for s in shapes]} do not broadcast")
    return out


def _aligned(shape: Sequence[int], strides: Sequence[int], rank: int) -> list[int]:
    """Strides over the iteration space of ``rank`` dims: 0 where the operand is broadcast."""
    pad = rank - len(shape)
    return [0] * pad + [s if n != 1 else 0 for n, s in zip(shape, strides)]


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


# The general plan costs tens of µs of Python; a call with the same shapes, strides and dtypes
# as an earlier one reuses its result. Bounded: cleared when full.
_PLANS: dict[tuple, tuple] = {}
_PLANS_MAX = 4096


def _general_plan(spec, inputs, device, device_key, dtypes, default) -> tuple:
    shapes = tuple([t.shape for t in inputs])
    strides = tuple([t.stride() for t in inputs])
    memo = (spec.key, device_key, dtypes, default, shapes, strides)
    found = _PLANS.get(memo)
    if found is None:
        found = _layout(spec, shapes, strides, device_key, dtypes, default)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[memo] = found
    key, numel, sizes, flat_strides, outs = found
    return key, device, numel, sizes, flat_strides, outs


def _layout(spec, shapes, input_strides, device_key, dtypes, default) -> tuple:
    """(argspec key, numel, sizes, strides, outputs' (shape, strides)) for these inputs."""
    shape = _broadcast(shapes)
    every = frozenset(range(len(shapes)))
    rank = len(shape)
    strides = [_aligned(s, t, rank) for s, t in zip(shapes, input_strides, strict=True)]
    # Full outputs take the inputs' memory layout as eager's would (a transposed input gives a
    # transposed output); partial ones are contiguous in their own shape.
    full = output_strides(shape, strides) or _contiguous_strides(shape)
    partial = [_broadcast([shapes[i] for i in sorted(deps)]) for deps in spec.output_deps]
    if 0 in shape and any(math.prod(s) for s in partial):
        # the kernel walks the (empty) iteration space, so it would write none of them
        raise NoKernel("an output has elements where the inputs' broadcast shape has none")
    outs = [
        (tuple(shape), tuple(full)) if deps == every else (tuple(s), tuple(_contiguous_strides(s)))
        for deps, s in zip(spec.output_deps, partial)
    ]
    strides += [_aligned(s, st, rank) for s, st in outs]
    sizes, merged = _merge(shape, strides)
    n_in = len(shapes)
    inner = tuple(_code(m[-1]) for m in merged[:n_in])
    outputs = tuple((_code(m[-1]), 0 in m) for m in merged[n_in:])
    zero_dim = tuple(len(s) == 0 for s in shapes)
    if all(zero_dim):
        zero_dim = (False,) * n_in  # only a mix of 0-d and n-d changes type promotion
    scalar = tuple(math.prod(s) == 1 for s in shapes)
    expanded = tuple(not one and not any(s) for one, s in zip(scalar, strides[:n_in]))
    flat = (len(sizes) == 1 and all(c == CONTIG for c in inner) and not any(scalar)
            and all(o == (CONTIG, False) for o in outputs))
    reused = tuple(0 in m[:-1] for m in merged[:n_in])
    layout = None if flat else (len(sizes), inner, zero_dim, reused, scalar, expanded, outputs)
    flat_strides = [s for m in merged for s in m]
    return (device_key, dtypes, layout, default), math.prod(shape), sizes, flat_strides, outs


def output_strides(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int] | None:
    """The strides eager's TensorIterator gives an output of ``shape`` computed from inputs of
    these (broadcast-aligned) strides; None when that is the contiguous layout.

    Dimensions are ordered from fastest to slowest by the first input whose strides tell them
    apart (TensorIterator::reorder_dimensions), and the output is dense in that order.
    """
    rank = len(shape)
    order = list(range(rank - 1, -1, -1))  # fastest-moving dimension first

    def should_swap(d0: int, d1: int) -> int:
        for s in strides:
            a, b = s[d0], s[d1]
            if a == 0 or b == 0:  # broadcast in one of them: the next input decides
                continue
            if a != b:
                return 1 if a > b else -1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    for i in range(1, rank):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            comparison = should_swap(order[d0], order[d1])
            if comparison > 0:
                order[d0], order[d1] = order[d1], order[d0]
                d1 = d0
            elif comparison < 0:
                break
    if order == list(range(rank - 1, -1, -1)):
        return None
    result, step = [0] * rank, 1
    for d in order:
        result[d] = step
        step *= shape[d]
    return result


def _merge(shape: Sequence[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge each dimension into the previous one wherever every operand allows it."""
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for d, n in enumerate(shape):
        if n == 1:
            continue
        if sizes and all(m[-1] == s[d] * n for m, s in zip(merged, strides, strict=True)):
            sizes[-1] *= n
            for m, s in zip(merged, strides, strict=True):
                m[-1] = s[d]
        else:
            sizes.append(n)
            for m, s in zip(merged, strides, strict=True):
                m.append(s[d])
    if not sizes:  # a single element
        return [1], [[1] for _ in strides]
    return sizes, merged


def _code(stride: int) -> str:
    return CONTIG if stride == 1 else BROADCAST if stride == 0 else STRIDED


def _fallback(spec: KernelSpec, inputs: Sequence, why: str) -> tuple[torch.Tensor, ...]:
    count(fallbacks=1)
    if config.debug >= 1:
        with spec.lock:
            first = why not in spec.warned
            spec.warned.add(why)
        if first:
            log(1, f"fusion {spec.key} runs through the fallback: {why}")
    return fallback.run(spec.graph, inputs)


def _check(spec: KernelSpec, inputs: Sequence, outputs: Sequence[torch.Tensor]) -> None:
    """TORCHFUSE_CHECK: compare the kernel's results with the fallback's."""
    expected = fallback.run(spec.graph, inputs)
    for k, (got, want) in enumerate(zip(outputs, expected)):
        try:
            torch.testing.assert_close(got, want, equal_nan=True)
        except AssertionError as error:
            raise AssertionError(
                f"fusion {spec.key} output {k} differs from eager:\n{error}") from None
