"""The fallback: compiler missing or failing, fusion disabled, TORCHFUSE_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import torchfuse
from conftest import assert_same, make_input, trace
from torchfuse import cache, config, executor


def _fresh_key(fn, *inputs):
    key = torchfuse.register_fusion(trace(fn, *inputs))
    spec = cache.SPECS[key]
    spec.kernels.clear()
    spec.warned.clear()
    return key


def test_missing_compiler_warns_once_and_falls_back():
    fn = lambda x: torch.cos(x) * 3 + x  # noqa: E731
    x = torch.randn(50)
    key = _fresh_key(fn, x)
    with config.override(cc="/nonexistent/cc", cache=False), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not torchfuse.can_fuse("cpu")
        for dtype in (torch.float32, torch.float64, torch.float32):
            a = x.to(dtype)
            assert_same(torchfuse.run_fusion(key, a), fn(a))
    messages = [str(w.message) for w in caught if "torchfuse" in str(w.message)]
    assert len(messages) == 1 and "not found" in messages[0]
    assert torchfuse.can_fuse("cpu")


def test_compile_error_falls_back_with_reproducer():
    fn = lambda x: torch.sin(x) + 2  # noqa: E731
    x = torch.randn(5)
    key = _fresh_key(fn, x)
    with config.override(cflags="-include /nonexistent/torchfuse.h", cache=False), \
            pytest.warns(RuntimeWarning) as caught:
        assert_same(torchfuse.run_fusion(key, x), fn(x))
    message = str(caught[0].message)
    assert "reproduce with:" in message and "error" in message


def test_device_disabled():
    fn = lambda x: torch.exp(x) - 1  # noqa: E731
    x = torch.randn(20)
    key = _fresh_key(fn, x)
    torchfuse.set_fusion_enabled("cpu", False)
    try:
        assert not torchfuse.can_fuse("cpu")
        before = cache.STATS.fallbacks
        assert_same(torchfuse.run_fusion(key, x), fn(x))
        assert cache.STATS.fallbacks == before + 1
        assert len(cache.SPECS[key].kernels) == 0
    finally:
        torchfuse.set_fusion_enabled("cpu", True)
    assert torchfuse.can_fuse("cpu")


def test_disabling_a_device_stops_its_recent_plans_and_bound_runners(device):
    """Calls that a recent plan or a bound runner would launch directly run through the
    fallback while their device's fusion is off, and launch again once it is back on."""
    fn = lambda x: torch.exp(x) - 1  # noqa: E731
    x = make_input((64,), torch.float32, device)
    key = _fresh_key(fn, x)
    runner = executor.bind(cache.SPECS[key], [x])
    for _ in range(2):  # the kernel built, the plan recalled, the launch prepared
        assert_same(torchfuse.run_fusion(key, x), fn(x))
        assert_same(runner(x), fn(x))
    torchfuse.set_fusion_enabled(device, False)
    try:
        before = cache.STATS.fallbacks
        assert_same(torchfuse.run_fusion(key, x), fn(x))
        assert_same(runner(x), fn(x))
        assert cache.STATS.fallbacks == before + 2
    finally:
        torchfuse.set_fusion_enabled(device, True)
    before = cache.STATS.fallbacks
    assert_same(torchfuse.run_fusion(key, x), fn(x))
    assert_same(runner(x), fn(x))
    assert cache.STATS.fallbacks == before


def test_disable_setting():
    fn = lambda x: torch.exp(x) * 2  # noqa: E731
    x = torch.randn(20)
    key = _fresh_key(fn, x)
    with config.override(disable=True):
        assert_same(torchfuse.run_fusion(key, x), fn(x))
    assert len(cache.SPECS[key].kernels) == 0


def test_check_setting_compares_with_eager():
    fn = lambda x: torch.sigmoid(x) * x  # noqa: E731
    x = make_input((100,), torch.float32)
    with config.override(check=True):
        assert_same(torchfuse.run_fusion(_fresh_key(fn, x), x), fn(x))


def test_cache_info_and_clear():
    fn = lambda x: torch.atan(x) * x  # noqa: E731
    x = torch.randn(10)
    key = _fresh_key(fn, x)
    torchfuse.run_fusion(key, x)
    torchfuse.run_fusion(key, x)
    info = torchfuse.cache_info()
    for field in ("specs", "kernels", "compiles", "hits", "misses", "fallbacks",
                  "compile_seconds"):
        assert field in info
    assert info["kernels"] >= 1 and info["hits"] >= 1
    torchfuse.clear_cache()
    assert torchfuse.cache_info()["kernels"] == 0
    assert_same(torchfuse.run_fusion(key, x), fn(x))  # keys survive clear_cache


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env}, check=True)


SCRIPT = (
    "import torch, torchfuse\n"
    "f = torchfuse.jit(lambda x: torch.tanh(x) * 2 + x)\n"
    "x = torch.randn(64)\n"
    "torch.testing.assert_close(f(x), torch.tanh(x) * 2 + x)\n"
    "print(torchfuse.cache_info()['compiles'], torchfuse.cache_info()['fallbacks'])\n"
)


def test_environment_debug_levels(tmp_path):
    out = _run(SCRIPT, TORCHFUSE_DEBUG="4", TORCHFUSE_CACHE_DIR=str(tmp_path))
    assert "fusion_0" in out.stderr  # level 1: groups
    assert "tf_kernel" in out.stderr  # level 4: kernel source
    quiet = _run(SCRIPT, TORCHFUSE_DEBUG="0", TORCHFUSE_CACHE_DIR=str(tmp_path))
    assert "[torchfuse]" not in quiet.stderr


def test_environment_disable_and_cc():
    disabled = _run(SCRIPT, TORCHFUSE_DISABLE="1")
    assert disabled.stdout.split() == ["0", "0"]  # nothing compiled, Dynamo graph runs eagerly
    # Without a compiler the fusion pass leaves every op to eager, so nothing falls back either.
    no_cc = _run(SCRIPT, TORCHFUSE_CC="no-such-compiler", TORCHFUSE_CACHE="0")
    assert no_cc.stdout.split() == ["0", "0"]


class _Logged(torch.Tensor):
    """A subclass whose ops go through its own __torch_function__ (and return its type)."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_run_their_own_ops(device):
    """A tensor subclass's ops are its own: a wrapper subclass (no memory of its own: its data
    pointer is 0, which a kernel would read) and a __torch_function__ subclass get eager's
    results and types through the fallback, also after plain tensors of the same layout made
    a recent plan; parameters fuse."""
    from torch.testing._internal.two_tensor import TwoTensor

    fn = lambda x: torch.exp(x) * 2  # noqa: E731
    x, y = (make_input((16,), torch.float32, device) for _ in range(2))
    key = torchfuse.register_fusion(trace(fn, x))
    for _ in range(2):
        assert_same(torchfuse.run_fusion(key, x), fn(x))
    wrapped = TwoTensor(x, y)
    got, want = torchfuse.run_fusion(key, wrapped)[0], fn(wrapped)
    assert type(got) is TwoTensor
    assert_same((got.a, got.b), (want.a, want.b))
    logged = x.as_subclass(_Logged)
    got = torchfuse.run_fusion(key, logged)[0]
    assert type(got) is _Logged and _Logged.seen
    assert_same(got.as_subclass(torch.Tensor), fn(x))
    before = cache.STATS.fallbacks
    parameter = torch.nn.Parameter(x, requires_grad=False)
    assert_same(torchfuse.run_fusion(key, parameter), fn(parameter))
    assert cache.STATS.fallbacks == before
