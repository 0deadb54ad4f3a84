"""The executor's shortcuts: runners bound to a compiled graph's static inputs, memoised plans.
Each must give what ``run`` gives, and step aside (to ``run``) whenever its assumption fails."""

from __future__ import annotations

import functools
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import torchfuse
from conftest import assert_same, make_input, trace
from torchfuse import capture, executor
from torchfuse.cache import SPECS


def gated(x, y):
    return x * torch.sigmoid(x) * y


def bound_for(fn, *examples):
    key = torchfuse.register_fusion(trace(fn, *examples))
    return executor.bind(SPECS[key], examples)


def test_bound_runner_matches_eager(device):
    x, y = make_input((33, 65), torch.float32, device), make_input((33, 65), torch.float32, device)
    runner = bound_for(gated, x, y)
    assert runner is not None and runner.__name__.startswith("fusion_")
    assert_same(runner(x, y), gated(x, y))  # first call: builds the kernel through run
    assert_same(runner(x, y), gated(x, y))  # then the bound path


def test_bound_runners_build_their_kernels_ahead_of_their_first_call(device):
    """A bound runner's prebuild() builds its kernel on a thread (a compiled graph's groups
    compile side by side); the first call finds the kernel built (or waits for it)."""
    torchfuse.clear_cache()
    x, y = make_input((33, 65), torch.float32, device), make_input((33, 65), torch.float32, device)
    spec = SPECS[torchfuse.register_fusion(trace(gated, x, y))]
    runner = executor.bind(spec, [x, y])
    runner.prebuild()
    key = executor.plan(spec, [x, y])[0]
    deadline = time.monotonic() + 60
    while spec.kernels.get(key) is None:  # never called, yet built
        assert time.monotonic() < deadline, "the bound runner's kernel was not built"
        time.sleep(0.005)
    kernel = spec.kernels.get(key)
    assert_same(runner(x, y), gated(x, y))
    assert spec.kernels.get(key) is kernel and torchfuse.cache_info()["misses"] == 0


def test_bound_runner_steps_aside_for_other_layouts(device):
    x, y = make_input((32, 64), torch.float32, device), make_input((32, 64), torch.float32, device)
    runner = bound_for(gated, x, y)
    runner(x, y)
    xt = make_input((64, 32), torch.float32, device).t()  # same shape, other strides
    assert_same(runner(xt, y), gated(xt, y))
    bigger = make_input((48, 64), torch.float32, device)  # same strides, other shape
    assert_same(runner(bigger, bigger), gated(bigger, bigger))


def test_bound_runner_raises_eagers_error():
    a = torch.tensor([4, 5, 6], dtype=torch.int64)
    b = torch.tensor([1, 0, 2], dtype=torch.int64)
    runner = bound_for(lambda p, q: p // q + 1, a, b.abs() + 1)  # traced without the zero
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        runner(a, b)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        runner(a, b)


def test_bind_refuses_what_cannot_run_a_kernel():
    x = torch.randn(8)
    key = torchfuse.register_fusion(trace(gated, x, x))
    assert executor.bind(SPECS[key], [x, 2.0]) is None  # not a tensor


def test_static_graphs_call_bound_runners_dynamic_ones_run_fusion():
    x, y = torch.randn(64), torch.randn(64)
    for dynamic, expected in ((False, "fusion_"), (True, "run_fusion")):
        torch._dynamo.reset()
        with capture.collect() as results:
            got = torch.compile(gated, backend="torchfuse", dynamic=dynamic)(x, y)
        assert_same(got, gated(x, y))
        assert expected in results[0].graph.code


def test_bound_runner_respects_disable_and_check():
    x, y = torch.randn(64), torch.randn(64)
    runner = bound_for(gated, x, y)
    runner(x, y)
    before = torchfuse.cache_info()["fallbacks"]
    with torchfuse.config.override(disable=True):
        assert_same(runner(x, y), gated(x, y))
    assert torchfuse.cache_info()["fallbacks"] == before + 1


def test_memoised_general_plan_follows_the_inputs(device):
    fn = lambda a, b: torch.exp(a) + b  # noqa: E731
    small = make_input((1, 7), torch.float32, device)
    big = make_input((5, 7), torch.float32, device)
    key = torchfuse.register_fusion(trace(fn, small, big))
    for _ in range(2):  # the second call takes the memoised plan
        assert_same(torchfuse.run_fusion(key, small, big), fn(small, big))
    other = make_input((5, 1), torch.float32, device)
    assert_same(torchfuse.run_fusion(key, other, big), fn(other, big))


def test_guarded_plans_follow_every_change_of_the_inputs(device, monkeypatch):
    """A call whose inputs match a recent call's in dtype, shape, strides and device reuses its
    plan (no Python planning); any change of those, made in place too, plans again."""
    fn = lambda a, b: torch.exp(a) * b + 1  # noqa: E731
    a, b = (make_input((6, 8), torch.float32, device) for _ in range(2))
    key = torchfuse.register_fusion(trace(fn, a, b))
    planned = []
    real_plan = executor.plan
    monkeypatch.setattr(executor, "plan", lambda *args: planned.append(1) or real_plan(*args))
    assert_same(torchfuse.run_fusion(key, a, b), fn(a, b))
    fresh = [make_input((6, 8), torch.float32, device) for _ in range(2)]
    assert_same(torchfuse.run_fusion(key, *fresh), fn(*fresh))  # same metadata: guarded
    assert len(planned) == 1
    cases = [
        lambda: (a.t(), b.t()),  # strides
        lambda: (a.double(), b),  # dtype
        lambda: (a[:, :4], b[:, :4]),  # shape and strides
        lambda: (a, a),  # one tensor twice: the guard refuses, the plan serves it
        lambda: (a.requires_grad_(), b),  # autograd: the fallback
        lambda: (a.detach().resize_(8, 6), b.view(8, 6)),  # resized in place
    ]
    for case in cases:
        with torch.enable_grad():
            inputs = case()
            want = fn(*inputs)
            got = torchfuse.run_fusion(key, *inputs)
        assert_same(got, want)
        assert got[0].requires_grad == want.requires_grad
        a.requires_grad_(False)
    assert len(planned) == 1 + len(cases)


def test_inputs_that_are_not_dense_memory_run_eagers_ops():
    """Sparse tensors and lazily negated views hold no plain values in memory: eager's error,
    eager's values."""
    fn = lambda a, b: a * b + 1  # noqa: E731
    x = torch.arange(4.0)
    key = torchfuse.register_fusion(trace(fn, x, x + 1))
    negated = torch._neg_view(x)
    assert_same(torchfuse.run_fusion(key, negated, x), fn(negated, x))
    sparse = x.to_sparse()
    with pytest.raises(RuntimeError) as expected:
        fn(sparse, x)
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        torchfuse.run_fusion(key, sparse, x)


def where_div(x, y, n):
    return torch.where(x > 0, x * y, torch.tanh(y)), torch.div(n, n - 3, rounding_mode="floor")


@pytest.mark.parametrize("native", [True, False], ids=["native_launch", "python_launch"])
def test_both_launch_paths_match_eager(device, native):
    """The C launcher and the Python one (TORCHFUSE_NATIVE_LAUNCH=0) pack the same arguments:
    flat, strided and broadcast operands, several outputs, and a kernel that reports an error."""
    x = make_input((40, 70), torch.float32, device)
    y = make_input((70, 40), torch.float16, device).t()
    n = make_input((70,), torch.int32, device, low=4)
    torchfuse.clear_cache()
    with torchfuse.config.override(native_launch=native):
        key = torchfuse.register_fusion(trace(where_div, x, y, n))
        assert_same(torchfuse.run_fusion(key, x, y, n), where_div(x, y, n))
        flat = (x, x * 2, torch.arange(4, 2804, device=device, dtype=torch.int32).view(40, 70))
        assert_same(torchfuse.run_fusion(key, *flat), where_div(*flat))
        kernels = [k for k in SPECS[key].kernels.values() if k.launch is not None]
        assert len(kernels) == 2
        if device == "cpu":
            launches = [getattr(k.launch, "plain", k.launch) for k in kernels]  # (_Streaming)
            assert all(isinstance(launch, functools.partial) == native for launch in launches)
        zero = torch.full((70,), 3, dtype=torch.int32, device=device)
        if device == "cpu":  # integer division by zero: eager's error through the fallback
            with pytest.raises(RuntimeError, match="ZeroDivisionError|division by zero"):
                torchfuse.run_fusion(key, x, y, zero)
    torchfuse.clear_cache()


def test_native_launcher_builds_here():
    """Python's headers and a C compiler are here, so kernels must not pay the Python launch."""
    import sysconfig

    from torchfuse.devices import launcher

    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("Python's headers are not installed")
    native = launcher.get()
    assert native is not None
    with pytest.raises(TypeError):
        native.cpu(0, 1, [], [])  # wrong arity: an error, not a crash
    with pytest.raises(ValueError, match="too many"):
        native.cpu(0, 1, [0] * 2000, [], [])
    with pytest.raises(AttributeError):  # neither a tensor nor an int: before any call
        native.cpu(0, 1, [], [], [object()])
    with pytest.raises(TypeError):
        native.cpu(0, 1, ["1"], [], [])


def test_native_cuda_launch_picks_the_entry_by_alignment():
    """The CUDA quick path's launch, checked on any machine: a stand-in for cuLaunchKernelEx
    records which entry the C code picked, its grid, its launch attribute (programmatic stream
    serialisation where asked, for the vector entry) and the packed arguments."""
    import ctypes

    from torchfuse.devices import launcher

    native = launcher.get()
    if native is None:
        pytest.skip("no native launcher here")

    class Attribute(ctypes.Structure):  # CUlaunchAttribute
        _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int),
                    ("rest", ctypes.c_char * 60)]

    class Config(ctypes.Structure):  # CUlaunchConfig
        _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                    ("shared", ctypes.c_uint), ("stream", ctypes.c_void_p),
                    ("attributes", ctypes.POINTER(Attribute)), ("n_attributes", ctypes.c_uint)]

    calls = []
    prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Config), ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)

    def cu_launch_kernel_ex(config, function, params, extra):
        c = config[0]
        args = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_int64))[0] for i in range(6)]
        attributes = [(c.attributes[i].id, c.attributes[i].value) for i in range(c.n_attributes)]
        calls.append((function, c.grid[0], c.block[0], c.stream, args, attributes))
        return 0

    stand_in = prototype(cu_launch_kernel_ex)
    address = ctypes.cast(stand_in, ctypes.c_void_p).value
    x = torch.zeros(1001)
    pointer = x.data_ptr()
    assert pointer % 16 == 0
    scalar, vector = 0x1000, 0x2000

    def pick(vector, numel, sizes, magic, strides, tensors, pdl=False):
        return native.cuda_pick(address, pdl, scalar, vector, 4, 256, 7, numel, sizes, magic,
                                strides, tensors)

    pdl = [(6, 1)]  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, allowed
    assert pick(vector, 1001, [1001], [], [1, 1], [x, x], pdl=True) == 0
    assert pick(vector, 1000, [1000], [], [1, 1], [x[1:], x], pdl=True) == 0
    assert pick(0, 1001, [1001], [], [1, 1], [x, x]) == 0
    assert pick(vector, 1000, [10, 100], [5, 9], [100, 1, 100, 1], [x, pointer + 32]) == 0
    assert calls == [
        (vector, 1, 256, 7, [1001, 1001, 1, 1, pointer, pointer], pdl),  # 251 vectors: a block
        (scalar, 4, 256, 7, [1000, 1000, 1, 1, pointer + 4, pointer], []),  # misaligned
        (scalar, 4, 256, 7, [1001, 1001, 1, 1, pointer, pointer], []),  # no vector entry yet
        (vector, 1, 256, 7, [1000, 10, 100, 5, 9, 100], []),  # rows: sizes, dividers, strides
    ]
    assert pick(vector, 0, [0], [], [1], [x]) == 0  # nothing to launch
    assert len(calls) == 4
    with pytest.raises(TypeError):
        native.cuda_pick(address, False, scalar, vector, 4, 256, 7, 10, [10], [], [1])
    with pytest.raises(ValueError):
        native.cuda_pick(address, False, scalar, vector, 0, 256, 7, 10, [10], [], [1], [x])


class Counted:
    """A prepared call that counts its calls."""

    def __init__(self, call):
        self.call, self.calls = call, 0

    def __call__(self, *operands):
        self.calls += 1
        return self.call(*operands)


def prepared_call(spec: object, key: int, *inputs) -> Counted:
    """Run the fusion until its plan has a prepared call (a CUDA kernel's vector entry builds
    first), and count that call's calls from then on."""
    for _ in range(2):
        torchfuse.run_fusion(key, *inputs)
        spec.kernels.settle()
    recent = spec.plans[0]
    if recent.prepared is None:
        pytest.skip("no native launcher here")
    kernel, call = recent.prepared
    recent.prepared = kernel, Counted(call)
    return recent.prepared[1]


def test_a_plans_later_calls_run_its_prepared_call(device):
    """Once a plan's kernel has run, its calls allocate and launch in one native call
    (devices/launch.c's Call), and match eager: a misaligned input of the same layout too (a
    CUDA kernel's scalar entry), and several outputs. A call from a thread that has not used
    the GPU yet takes the general path, which makes the GPU current there."""
    fn = lambda x, y: (gated(x, y), x - y)  # noqa: E731
    x, y = (make_input((4096,), torch.float32, device) for _ in range(2))
    key = torchfuse.register_fusion(trace(fn, x, y))
    spec = SPECS[key]
    counted = prepared_call(spec, key, x, y)
    assert_same(torchfuse.run_fusion(key, x, y), fn(x, y))
    shifted = make_input((4097,), torch.float32, device)[1:]
    assert_same(torchfuse.run_fusion(key, shifted, y), fn(shifted, y))
    assert counted.calls == 2
    with ThreadPoolExecutor(1) as pool:
        for _ in range(2):
            assert_same(pool.submit(torchfuse.run_fusion, key, y, x).result(), fn(y, x))
    assert counted.calls == 4  # on a GPU the first returns None: no context in that thread
    with pytest.raises(TypeError, match="operands"):
        counted.call(x)  # a wrong count: Python's error, not a crash


def test_prepared_calls_step_aside(device):
    """A prepared call serves only its own kernel: with the spec's kernels gone (its plan kept)
    or after clear_cache (plans gone too) the kernel is rebuilt and a new call prepared; with
    TORCHFUSE_CHECK every call is checked on the general path."""
    x, y = (make_input((64,), torch.float32, device) for _ in range(2))
    key = torchfuse.register_fusion(trace(gated, x, y))
    spec = SPECS[key]
    counted = prepared_call(spec, key, x, y)
    with torchfuse.config.override(check=True):
        assert_same(torchfuse.run_fusion(key, x, y), gated(x, y))
    assert counted.calls == 0
    recent = spec.plans[0]
    spec.kernels.clear()
    for _ in range(2):
        assert_same(torchfuse.run_fusion(key, x, y), gated(x, y))
        spec.kernels.settle()
    assert counted.calls == 0 and spec.plans[0] is recent
    assert recent.prepared is None or recent.prepared[0] is spec.kernels.values()[0]
    torchfuse.clear_cache()
    assert_same(torchfuse.run_fusion(key, x, y), gated(x, y))
    assert torchfuse.cache_info()["misses"] == 1 and counted.calls == 0


def test_a_prepared_kernels_error_gives_eagers_error():
    """A C kernel that reports an error from its prepared call (integer division by zero):
    eager's error, through the general path and the fallback."""
    fn = lambda a, b: torch.div(a, b, rounding_mode="floor") + 1  # noqa: E731
    a, b = (make_input((64,), torch.int32, low=1) for _ in range(2))
    key = torchfuse.register_fusion(trace(fn, a, b))
    counted = prepared_call(SPECS[key], key, a, b)
    with pytest.raises(RuntimeError, match="ZeroDivisionError|division by zero"):
        torchfuse.run_fusion(key, a, torch.zeros_like(b))
    assert counted.calls == 1
    assert_same(torchfuse.run_fusion(key, a, b), fn(a, b))


def test_run_fusion_under_autocast_gives_eagers_results(device):
    """Autocast casts the operands of some ops (on CUDA exp, log, pow... compute in float32):
    a fusion with one runs through the fallback there, for eager's dtypes and values; the
    others (and every fusion on the CPU, whose autocast casts none of these ops) run kernels."""
    x = make_input((64,), torch.bfloat16, device)
    cast = lambda a: torch.exp(a) * 2 + a  # noqa: E731
    kept = lambda a: torch.sigmoid(a) * a  # noqa: E731
    for fn in (cast, kept):
        key = torchfuse.register_fusion(trace(fn, x))
        torchfuse.run_fusion(key, x)  # built outside autocast
        with torch.autocast(device, dtype=torch.bfloat16):
            want = fn(x)
            before = torchfuse.cache_info()["fallbacks"]
            for _ in range(2):
                assert_same(torchfuse.run_fusion(key, x), want)
            fallbacks = torchfuse.cache_info()["fallbacks"] - before
        eagers_casts = fn is cast and device == "cuda"
        assert fallbacks == (2 if eagers_casts else 0)
        assert want.dtype == (torch.float32 if eagers_casts else torch.bfloat16)
        meta = torch.empty(64, dtype=torch.bfloat16, device="meta")  # autocast knows no meta
        with torch.autocast(device, dtype=torch.bfloat16):
            got = torchfuse.run_fusion(key, meta)[0]
        assert got.device.type == "meta" and got.shape == meta.shape


def test_a_new_default_dtype_types_a_new_kernel(device):
    """Ops that make floats of integers (true division) give torch's default dtype, which the
    tensors' guards do not see: after torch.set_default_dtype, recent plans and bound runners
    alike give eager's dtype, and the old one again once it is back."""
    fn = lambda a, b: torch.div(a, b) + 1  # noqa: E731
    a, b = (make_input((64,), torch.int32, device, low=1) for _ in range(2))
    key = torchfuse.register_fusion(trace(fn, a, b))
    runner = executor.bind(SPECS[key], [a, b])
    old = torch.get_default_dtype()
    try:
        for default in (old, torch.float64, old):
            torch.set_default_dtype(default)
            want = fn(a, b)
            assert want.dtype == default
            for _ in range(2):
                assert_same(torchfuse.run_fusion(key, a, b), want)
                assert_same(runner(a, b), want)
    finally:
        torch.set_default_dtype(old)
