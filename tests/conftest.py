"""Shared fixtures and helpers: the eager oracle, devices, random inputs with special values."""

from __future__ import annotations

import os
import tempfile

# Keep the tests' compiled kernels away from the user's cache directory.
os.environ.setdefault("TORCHFUSE_CACHE_DIR", tempfile.mkdtemp(prefix="torchfuse-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import torchfuse  # noqa: E402
from torchfuse import capture  # noqa: E402
from torchfuse.cache import SPECS  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


FLOAT_SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 0.5, -2.0]


def make_input(shape, dtype, device="cpu", low=None, high=None, specials=True, seed=None):
    """Fresh random values of ``dtype``; floats include NaN, ±Inf and signed zeros."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool().to(device)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        low = max(info.min, -20 if low is None else low)
        high = min(info.max, 20 if high is None else high)
        return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.int64).to(
            dtype).to(device)
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if low is not None or high is not None:
        lo = -3.0 if low is None else low
        hi = 3.0 if high is None else high
        values = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    flat = values.view(-1)
    if specials and flat.numel() >= 2 * len(FLOAT_SPECIALS):
        flat[: len(FLOAT_SPECIALS)] = torch.tensor(FLOAT_SPECIALS, dtype=torch.float64)
    return values.to(dtype).to(device)


def trace(fn, *inputs) -> torch.fx.GraphModule:
    """An ATen graph of ``fn`` (placeholders = inputs), as register_fusion takes it."""
    return make_fx(lambda *args: fn(*args))(*inputs)


REDUCED = (torch.float16, torch.bfloat16)


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_same(got, want, exact=None) -> None:
    """Fused results equal eager's: dtype, shape, values (exact for integers and bools).

    For float16/bfloat16 results, eager's own rounding differs between ops (some compute in
    float, some step by step in reduced precision, some scale by a reciprocal), so there the
    fused result may instead be as close as eager's to ``exact``, the float64 reference.
    """
    got, want = _tuple(got), _tuple(want)
    exact = _tuple(exact) if exact is not None else (None,) * len(want)
    assert len(got) == len(want)
    for g, w, e in zip(got, want, exact):
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert g.shape == w.shape, (g.shape, w.shape)
        try:
            torch.testing.assert_close(g, w, equal_nan=True)
        except AssertionError:
            if g.dtype not in REDUCED or e is None:
                raise
            _assert_as_accurate(g, w, e)


def _assert_as_accurate(got, want, exact) -> None:
    got, want, exact = (t.double().cpu() for t in (got, want, exact))
    rtol, atol = (1e-3, 1e-5) if got.dtype == torch.float16 else (1.6e-2, 1e-5)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN where eager has none, or the reverse"
    err_got = torch.where(nan, 0.0, (got - exact).abs())
    err_want = torch.where(nan, 0.0, (want - exact).abs())
    tol = atol + rtol * torch.where(exact.isfinite(), exact.abs(), 0.0)
    bad = (err_got > err_want + tol) & ~(got == want)
    assert not bad.any(), (
        f"{int(bad.sum())} element(s) further from the float64 result than eager's: "
        f"got {got[bad][:5].tolist()}, eager {want[bad][:5].tolist()}, "
        f"exact {exact[bad][:5].tolist()}")


def assert_same_bits(got, want, what="") -> None:
    """The same bits, NaN for NaN (whatever its payload)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), what
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.dtype.itemsize]
    differ = got[~nan].view(bits) != want[~nan].view(bits)
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} of {want.numel()} differ, e.g. got "
        f"{got[~nan][differ][:3].tolist()}, eager {want[~nan][differ][:3].tolist()}")


def reference(fn, *inputs):
    """``fn`` on float64 copies of floating inputs (None where that fails)."""
    wide = [t.double() if t.dtype in REDUCED else t for t in inputs]
    try:
        return fn(*wide)
    except Exception:
        return None


def run_registered(fn, *inputs):
    """Trace ``fn``, register the graph, run it through run_fusion.

    Skips the test when ``fn`` traces to ATen ops outside the op table for these inputs (e.g.
    isfinite on integers becomes ones_like): there is nothing to fuse.
    """
    graph = trace(fn, *inputs)
    try:
        key = torchfuse.register_fusion(graph)
    except torchfuse.NotFusible as error:
        pytest.skip(f"traces to ops outside the table: {error}")
    first = torchfuse.run_fusion(key, *inputs)
    # A kernel's later entry points (CUDA's vector one, built on a thread after the first call)
    # must compute what its first did: run again once they are there, and compare.
    SPECS[key].kernels.settle()
    last = torchfuse.run_fusion(key, *inputs)
    for a, b in zip(first, last, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return last


def assert_matches_eager(fn, *inputs) -> None:
    """run_fusion of ``fn``'s graph gives eager's result, or raises eager's exception type."""
    try:
        want = fn(*inputs)
    except Exception as error:  # eager refuses: so must we, with the same exception type
        with pytest.raises(type(error)):
            run_registered(fn, *inputs)
        return
    assert_same(run_registered(fn, *inputs), want, reference(fn, *inputs))


def assert_fused(fn, *inputs, groups: int = 1):
    """``torch.compile(fn, backend="torchfuse")`` matches eager and makes ``groups`` groups."""
    torch._dynamo.reset()
    with capture.collect() as results:
        got = torch.compile(fn, backend="torchfuse")(*inputs)
    assert_same(got, fn(*inputs))
    found = sum(len(r.groups) for r in results)
    assert found == groups, f"expected {groups} fusion group(s), found {found}: {results}"
    return results
