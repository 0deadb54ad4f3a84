"""The CPU kernels' vector math (eager's SLEEF where torch's AVX2/AVX512 kernels call it, else
glibc's libmvec; eager's VML where torch has MKL, for the ops eager's kernels pass to it):
accurate against float64, eager's bits where eager's functions are called, and the special
values (NaN, ±Inf, signed zeros, out-of-domain inputs) exactly as eager gives them.

Inputs are long enough that the vectorised loop, not only its scalar tail, computes them.
"""

from __future__ import annotations

import math
import platform
import re

import pytest
import torch

import torchfuse
from conftest import assert_same_bits, trace
from torchfuse import cache, ops
from torchfuse.codegen import c as c_codegen
from torchfuse.devices import cpu as cpu_backend

ULPS = 4  # libmvec's documented bound (worst seen: 3.9, erff)
X86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                         reason="outputs stream past the caches on x86 only")

# torch function -> the C function it renders to, and the inputs that exercise it.
UNARY = {
    "exp": (-110.0, 110.0), "expm1": (-20.0, 90.0), "exp2": (-150.0, 130.0),
    "log": (0.0, 1e6), "log1p": (-1.0, 1e6), "log2": (0.0, 1e6), "log10": (0.0, 1e6),
    "sin": (-100.0, 100.0), "cos": (-100.0, 100.0), "tan": (-10.0, 10.0),
    "sinh": (-90.0, 90.0), "cosh": (-90.0, 90.0), "tanh": (-12.0, 12.0),
    "asin": (-1.0, 1.0), "acos": (-1.0, 1.0), "atan": (-1e4, 1e4),
    "asinh": (-1e4, 1e4), "acosh": (1.0, 1e4), "atanh": (-1.0, 1.0),
    "erf": (-6.0, 6.0), "erfc": (-6.0, 12.0),
}
BINARY = {"atan2": torch.atan2, "hypot": torch.hypot, "pow": torch.pow}
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40,
            2.0, -2.0, 1e30, -1e30]
N = 4099  # whole vectors and a scalar tail


def inputs(low: float, high: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Uniform over the domain, log-uniform magnitudes, just outside the domain, specials."""
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(N // 3, generator=gen, dtype=torch.float64) * (high - low) + low
    sign = torch.randint(0, 2, (N // 3,), generator=gen) * 2 - 1
    magnitude = sign * 10 ** (torch.rand(N // 3, generator=gen, dtype=torch.float64) * 12 - 6)
    rest = N - 2 * (N // 3) - len(SPECIALS)
    outside = torch.linspace(low - 1, high + 1, rest, dtype=torch.float64)
    values = torch.cat([uniform, magnitude, outside, torch.tensor(SPECIALS, dtype=torch.float64)])
    return values[torch.randperm(N, generator=gen)].to(dtype)


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each (float64) reference value (subnormals included)."""
    info = torch.finfo(dtype)
    smallest_exponent = math.frexp(info.tiny)[1]
    _, exponent = torch.frexp(reference.abs())
    exponent = exponent.clamp(min=smallest_exponent)
    return torch.ldexp(torch.full_like(reference, info.eps), exponent - 1)


def assert_accurate(got: torch.Tensor, reference: torch.Tensor, eager: torch.Tensor) -> None:
    """Within ULPS of the float64 reference; NaN where eager has NaN, the reference's infinities
    and eager's signed zeros. (Eager's float32 sinh/cosh overflow early, near 89: there the
    fused kernel may be finite and accurate, or infinite as eager is.)"""
    assert torch.equal(got.isnan(), eager.isnan()), "NaN where eager has none, or the reverse"
    infinite = reference.isinf()
    assert torch.equal(got[infinite].double(), reference[infinite]), "infinities differ"
    finite = reference.isfinite()
    representable = finite & (reference.abs() <= torch.finfo(got.dtype).max)
    overflow = representable & got.isinf()
    assert eager[overflow].isinf().all(), "overflows where eager does not"
    zeros = finite & (reference == 0)
    assert torch.equal(got[zeros].signbit(), eager[zeros].signbit()), "signed zeros differ"
    check = representable & got.isfinite()
    # A float64 reference is itself computed in float64: one more ulp of slack there.
    bound = ULPS + (got.dtype == torch.float64)
    error = (got[check].double() - reference[check]).abs()
    worst = (error / (bound * ulp(reference[check], got.dtype))).max().item()
    assert worst <= 1.0, f"error {worst * bound:.1f} ulp > {bound} ulp"


SLEEF = pytest.mark.skipif(cpu_backend.sleef_functions() is None,
                           reason="eager's kernels here do not call SLEEF (not AVX2/AVX512)")


def run_fused(fn, *args, vml: bool = True, sleef: bool = True) -> torch.Tensor:
    """``fn`` through a kernel built now (with eager's VML functions where ``vml``, SLEEF's
    where ``sleef``)."""
    before = cache.STATS.fallbacks
    key = torchfuse.register_fusion(trace(fn, *args))
    cache.SPECS[key].kernels.clear()
    with torchfuse.config.override(vml=vml, sleef=sleef):
        (out,) = torchfuse.run_fusion(key, *args)
    assert cache.STATS.fallbacks == before, "ran through the fallback, not a kernel"
    return out


MATH = {"vml": {}, "sleef": {"vml": False}, "libmvec": {"vml": False, "sleef": False}}


@pytest.mark.parametrize("math_", sorted(MATH))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_accuracy(name, dtype, math_):
    if (name, dtype, math_) == ("erf", torch.float32, "sleef"):
        pytest.skip("ATen's own erf (Abramowitz and Stegun's, to 1.5e-7): test_sleef_...")
    fn = getattr(torch, name)
    x = inputs(*UNARY[name], dtype)
    got = run_fused(fn, x, **MATH[math_])
    assert_accurate(got, fn(x.double()), fn(x))


@pytest.mark.parametrize("math_", ["sleef", "libmvec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_accuracy(name, dtype, math_):
    fn = BINARY[name]
    x, y = inputs(-50.0, 50.0, dtype, seed=1), inputs(-50.0, 50.0, dtype, seed=2)
    if name == "pow":
        x = x.abs()  # the interesting range: negative bases give NaN (or ±) on both sides
    got = run_fused(fn, x, y, **MATH[math_])
    assert_accurate(got, fn(x.double(), y.double()), fn(x, y))


VML_OPS = sorted(op.name for op in ops.OPS if op.vml)


@pytest.mark.skipif(cpu_backend.vml_functions() is None, reason="this torch has no MKL VML")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", VML_OPS)
def test_vml_ops_are_cpu_eagers_bits(name, dtype):
    """The ops eager's CPU kernels pass to VML, passed to VML a block at a time: eager's bits,
    in a chain (the call between two stages of the block), on contiguous, strided and row
    operands (a block per row) and over a tail shorter than a block."""
    fn = getattr(torch, name)
    x = inputs(*UNARY.get(name, (0.0, 1e6)), dtype)
    y = inputs(-3.0, 3.0, dtype, seed=1)

    def chain(a, b):
        return fn(a * 0.5) * b + fn(b), fn(a)
    wide = torch.stack([x, y], 1)
    rows = x[:4096].view(64, 64)
    for a, b in ((x, y), (wide[:, 0], wide[:, 1]), (rows, y[:64]), (rows.t(), y[:64])):
        key = torchfuse.register_fusion(trace(chain, a, b))
        for got, want in zip(torchfuse.run_fusion(key, a, b), chain(a, b), strict=True):
            assert_same_bits(got, want, f"{name} {tuple(a.shape)} {a.stride()}")


@pytest.mark.skipif(cpu_backend.vml_functions() is None, reason="this torch has no MKL VML")
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_passes_its_quotient_to_vml(dtype, eps):
    """Eager's CPU logit passes z / (1 - z) to VML's Ln (OpDef.vml_argument): eager's bits,
    alone and in a chain (SLEEF's log differed in 0.5 %). (Contiguous: of a strided tensor
    eager's loop is scalar, the C library's log.)"""
    x = torch.rand(4099, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x * 1.2 - 0.1).to(dtype)
    x[:5] = torch.tensor([0.0, 1.0, math.nan, -0.0, 0.5])

    def fn(a):
        return torch.logit(a, eps) * 2, torch.logit(torch.sigmoid(a), eps)
    key = torchfuse.register_fusion(trace(fn, x))
    for got, want in zip(torchfuse.run_fusion(key, x), fn(x), strict=True):
        assert_same_bits(got, want, f"logit {dtype} {eps}")


def _stream_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Flat, unaligned (odd lengths, offsets), rows beside a partial output (a row's), and a
    transposed input whose layout the outputs follow."""
    x = inputs(-3.0, 3.0, torch.float32)
    wide = torch.empty(4099 + 3)[3:].copy_(x[:4099])  # 12 bytes off a 64-byte line
    rows = x[:67 * 61].view(67, 61)
    return [(x, x.flip(0)), (wide, wide * 0.5), (rows, rows[0]), (rows.t(), rows.t() + 1)]


def _assert_same_outputs(got: tuple, want: tuple, where: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        if w.is_floating_point():
            assert_same_bits(g, w, where)
        else:
            assert torch.equal(g, w)


def _streamed(a, b):
    e = torch.exp(a)
    return e * b, torch.tanh(b), e.half(), e > 1.5, torch.sqrt(a.abs()).double()


@pytest.mark.skipif(cpu_backend.vml_functions() is None, reason="this torch has no MKL VML")
def test_streamed_outputs_are_the_plain_stores_bits():
    """Kernels that run in blocks write their contiguous outputs past the caches from a
    footprint on (codegen.c.STREAM; 0 bytes here: always): the same bits as plain stores, for
    every output dtype, flat and in rows, aligned or not (odd lengths, offsets), beside a
    partial output (a row's) and outputs that follow a transposed input."""
    for a, b in _stream_cases():
        key = torchfuse.register_fusion(trace(_streamed, a, b))
        results = []
        for stream_bytes in (1 << 62, 0):
            cache.SPECS[key].kernels.clear()
            with torchfuse.config.override(stream_bytes=stream_bytes):
                results.append(torchfuse.run_fusion(key, a, b))
        source = next(iter(cache.SPECS[key].kernels.values())).source
        assert "tf_stream(out" in source and "const int stream = n >= 1;" in source
        _assert_same_outputs(results[1], results[0], f"{tuple(a.shape)} {a.stride()}")


def _plain_ops(a, b):  # no VML op: the plain loop, and a streamed entry for big calls
    s = torch.sigmoid(a) * b
    return s, (a * 2).half(), a > b, (s + 1).double(), torch.where(b > 0, b, a * 3)


@X86
def test_streamed_entry_gives_the_plain_entrys_bits():
    """A kernel without VML calls runs its plain loop, and calls from the cache's size (0 bytes
    here: every call) its second entry, built at the first such call on a thread, which writes
    its contiguous outputs past the caches: the same bits, for every output dtype, flat and in
    rows, aligned or not, beside a partial output and outputs that follow a transposed input;
    through the general path and through a plan's prepared call."""
    for a, b in _stream_cases():
        key = torchfuse.register_fusion(trace(_plain_ops, a, b))
        store = cache.SPECS[key].kernels
        store.clear()
        plain = torchfuse.run_fusion(key, a, b)
        store.clear()
        with torchfuse.config.override(stream_bytes=0):
            first = torchfuse.run_fusion(key, a, b)  # the plain entry: the other is building
            store.settle()
            launch = next(iter(store.values())).launch
            assert launch.streamed is not None and launch.stream_from == 1
            assert launch.source.startswith("// streamed entry: n >= 1\n")
            results = [first] + [torchfuse.run_fusion(key, a, b) for _ in range(3)]
        for outputs in results:
            _assert_same_outputs(outputs, plain, f"{tuple(a.shape)} {a.stride()}")


@X86
def test_streamed_entry_only_where_the_cache_size_is_known(monkeypatch):
    x = inputs(-3.0, 3.0, torch.float32)
    key = torchfuse.register_fusion(trace(_plain_ops, x, x))
    for size, streams in ((None, False), (1 << 20, True)):
        monkeypatch.setattr(cpu_backend, "last_level_cache", lambda size=size: size)
        cache.SPECS[key].kernels.clear()
        with torchfuse.config.override(stream_bytes=-1):  # the cache's size decides
            torchfuse.run_fusion(key, x, x)
        source = next(iter(cache.SPECS[key].kernels.values())).source
        assert ("#ifdef TF_STREAMED" in source) == streams
        per_element = 4 + 4 + 4 + 2 + 1 + 8 + 4  # bytes: two inputs, five outputs
        assert c_codegen.streamed_from(source) == (
            -(-(1 << 20) // per_element) if streams else None)


@X86
def test_a_streamed_entry_that_fails_to_build_leaves_the_plain_one(monkeypatch):
    x = inputs(-3.0, 3.0, torch.float32)
    key = torchfuse.register_fusion(trace(_plain_ops, x, x))
    store = cache.SPECS[key].kernels
    store.clear()
    plain = torchfuse.run_fusion(key, x, x)
    store.clear()
    build = cpu_backend.BACKEND.compile_entry

    def refuse(source, device, entry):
        if entry == "streamed":
            raise torchfuse.devices.CompileError("refused")
        return build(source, device, entry)

    monkeypatch.setattr(cpu_backend.BACKEND, "compile_entry", refuse)
    with torchfuse.config.override(stream_bytes=0, cache=False):  # (no streamed entry on disk)
        torchfuse.run_fusion(key, x, x)
        store.settle()
        launch = next(iter(store.values())).launch
        assert launch.streamed is None and launch.stream_from > 1 << 62  # no second try
        _assert_same_outputs(torchfuse.run_fusion(key, x, x), plain, "plain after a failure")


@pytest.mark.skipif(cpu_backend.vml_functions() is None, reason="this torch has no MKL VML")
def test_vml_probe_runs_on_real_tensors_under_fake_tensor_mode():
    # a first kernel may be built while torch.compile traces with fake tensors: the probe must
    # not hand VML their (null) data pointers
    from torch._subclasses.fake_tensor import FakeTensorMode

    found = cpu_backend.vml_functions()
    cpu_backend.vml_functions.cache_clear()
    try:
        with FakeTensorMode():
            assert cpu_backend.vml_functions() == found
    finally:
        cpu_backend.vml_functions.cache_clear()


def test_float16_conversions_are_eagers_for_every_value():
    """float16 loads, rounds and stores through bit arithmetic that gcc vectorises
    (codegen/c.tf_h2f, tf_f2h, tf_round_f16_native): every float16 value widens exactly, and
    float32 values on, between and one float ulp either side of every float16 value's rounding
    boundaries (ties to even, the subnormals', the overflow past 65504) round as eager's, in the
    vector loop and its scalar tail (an odd length)."""
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert_same_bits(run_fused(lambda t: t.float() * 1, every), every.float() * 1, "widened")
    values = every[~every.isnan()].double().unique()  # sorted, -inf .. inf
    mids = (values[:-1] + values[1:]) / 2  # float16's ties, exact in float32
    near = torch.cat([values, mids]).float()
    ulp = near.abs() * 2.0**-23 + 2.0**-149
    x = torch.cat([near, near + ulp, near - ulp, torch.tensor([65520.0, 65519.996, 1e30, -1e-40])])
    x = x[:-1] if x.numel() % 2 == 0 else x  # an odd length: a scalar tail too
    for fn in (lambda t: (t * 1).half(), lambda t: (t * 1).half().float() + 0.5):
        assert_same_bits(run_fused(fn, x), fn(x), "rounded")


F = torch.nn.functional
# What eager's vectorised CPU kernels compute with SLEEF's functions (ATen's Vectorized), and
# where (the log1p's and log's domains).
SLEEF_OPS = {
    "sigmoid": torch.sigmoid, "silu": F.silu, "mish": F.mish, "softplus": F.softplus,
    "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "elu": F.elu,
    "logaddexp": lambda t: torch.logaddexp(t, t * 0.75 - 0.5),
    "pow": lambda t: torch.pow(t.abs(), t * 0.75 - 0.5), "pow_2_7": lambda t: t.abs() ** 2.7,
    "atan2": lambda t: torch.atan2(t, t * 0.75 - 0.5), "atanh": lambda t: torch.atanh(t / 8),
    **{name: getattr(torch, name) for name in (
        "exp", "expm1", "exp2", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "sinh",
        "cosh", "tanh", "asin", "acos", "atan", "erf", "erfc", "lgamma")},
}


@SLEEF
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(SLEEF_OPS))
def test_sleef_ops_are_cpu_eagers_bits(name, dtype):
    """Where eager's CPU kernels are the AVX2/AVX512 ones, the composite activations and every
    math function of a float16/bfloat16 tensor (and those of float32/float64 eager does not pass
    to VML) are eager's bits with sleef_all (by default where SLEEF_CHEAP has the function, and
    for float16): the same SLEEF functions, float erf ATen's own (the GELU's, with oneDNN off),
    the tanh GELU's fma where gcc contracts eager's. (Contiguous, of whole vectors: eager's
    scalar tail calls the C library's functions.)"""
    if any(op.name == name and dtype in op.libm for op in ops.OPS):
        pytest.skip("eager's kernel here calls the C library's function (OpDef.libm)")
    fn = SLEEF_OPS[name]
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4)
    x[:8] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-40])
    x = x.to(dtype)
    if name in ("log", "log2", "log10", "log1p"):
        x = x.abs() - float(name == "log1p")
    with torch.backends.mkldnn.flags(enabled=False), torchfuse.config.override(sleef_all=True):
        assert_same_bits(run_fused(fn, x), fn(x), f"{name} {dtype}")  # (oneDNN's GELU off)


@SLEEF
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sleef_ops_are_cpu_eagers_bits_on_every_16_bit_value(dtype):
    every = ops.every_value(dtype)
    with torch.backends.mkldnn.flags(enabled=False), torchfuse.config.override(sleef_all=True):
        for name in ("sigmoid", "silu", "gelu", "gelu_tanh", "mish", "exp", "tanh", "erf",
                     "log1p", "sin"):
            fn = SLEEF_OPS[name]
            assert_same_bits(run_fused(fn, every), fn(every), name)


@SLEEF
def test_inline_expf_is_sleefs():
    """The kernels' own expf (SLEEF_INLINE, checked against SLEEF's on all 2**32 floats when
    written) inside eager's silu: a million floats across exp's range and random bit patterns.
    (A power of two long: eager's threads' shares then leave no scalar tail.)"""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1 << 19,), generator=gen, dtype=torch.int64)
    x = torch.cat([torch.linspace(-110.0, 110.0, 1 << 19),
                   bits.to(torch.int32).view(torch.float32)])
    assert_same_bits(run_fused(F.silu, x), F.silu(x), "silu")


@pytest.mark.parametrize("sleef", [True, False], ids=["sleef", "libmvec"])
def test_composite_activations_accurate(sleef):
    """sigmoid, silu, gelu (erf and tanh forms), mish and softplus go through expf/erff/tanhf."""
    x = inputs(-30.0, 30.0, torch.float32)
    x = x[x.isfinite()]  # eager's own gelu gives NaN or inf for inf, by its vector width
    for fn in (torch.sigmoid, F.silu, F.gelu, SLEEF_OPS["gelu_tanh"], F.mish, F.softplus):
        got = run_fused(fn, x, sleef=sleef)
        torch.testing.assert_close(got, fn(x), equal_nan=True)


@pytest.mark.parametrize("sleef", [True, False], ids=["sleef", "libmvec"])
def test_tanh_saturates_as_eagers(sleef):
    """Eager's CPU tanh GELU and mish take SLEEF's tanh (ATen's Vectorized), exactly ±1 past
    |y| > 8.664339742, where libmvec's tanhf still gives ±(1 - 2**-24) up to |y| ~ 10: there
    1 + tanh is 0 as eager's, so a GELU divided by itself is NaN as eager's (a random program's
    find, seed 105,460), and a float16 tanh GELU is eager's on every input (lengths of whole
    vectors: eager's scalar tail calls the C library's tanh)."""
    gelu = SLEEF_OPS["gelu_tanh"]
    x = torch.linspace(5.07, 5.45, 1024)  # 8.67 < |y| < 10.1
    x = torch.cat([-x, x])
    with torch.backends.mkldnn.flags(enabled=False):  # ATen's own kernel, as ours
        for fn in (gelu, lambda t: gelu(t) / gelu(t)):
            assert_same_bits(run_fused(fn, x, sleef=sleef), fn(x), "tanh GELU")
        a = torch.linspace(8.7, 10.0, 1024)  # mish: log1p(exp(a)) past the bound
        assert_same_bits(run_fused(F.mish, a, sleef=sleef), F.mish(a), "mish")
        every = ops.every_value(torch.float16)
        assert_same_bits(run_fused(gelu, every, sleef=sleef), gelu(every), "float16 tanh GELU")


@pytest.mark.parametrize("sleef", [True, False], ids=["sleef", "libmvec"])
def test_mish_of_the_least_subnormal_softplus_is_zero_as_eagers(sleef):
    """Eager's vector loops' mish is -0 where log1p(exp(x)) is the least subnormal (SLEEF's
    tanh of it is 0): x < -102.874 in float, x < -744.03 in double; so a pow of it by x is +inf
    as eager's, not NaN (a random program's find: pow(mish(x), x), seed 1,301,634)."""
    for dtype, lo, hi in ((torch.float32, -105.0, -100.0), (torch.float64, -746.0, -742.0)):
        x = torch.linspace(lo, hi, 4096, dtype=dtype)
        assert torch.equal(run_fused(F.mish, x, sleef=sleef) == 0, F.mish(x) == 0)
        fn = lambda t: torch.pow(F.mish(t), t)  # noqa: E731
        torch.testing.assert_close(run_fused(fn, x, sleef=sleef), fn(x), equal_nan=True)


@pytest.mark.parametrize("sleef", [True, False], ids=["sleef", "libmvec"])
def test_expm1_saturates_as_eagers(sleef):
    """Eager's CPU expm1 is SLEEF's: exactly -1 below ln(2**-24) (ln(2**-53) in double), where
    libmvec's, correctly rounded, still gives -1 + 2**-24 down to ln(2**-25): ours is -1 there
    too, so a pow of it by itself is eager's -1, not NaN (a random program's find: expm1 of an
    int8 -17, seed 1,215,556)."""
    for dtype, lo, hi in ((torch.float32, -17.4, -16.64), (torch.float64, -37.5, -36.74)):
        x = torch.linspace(lo, hi, 4096, dtype=dtype)
        for fn in (torch.expm1, lambda t: torch.pow(torch.expm1(t), torch.expm1(t))):
            assert_same_bits(run_fused(fn, x, sleef=sleef), fn(x), f"{dtype} expm1")


def test_threads_start_sooner_for_math_calls_and_16_bit_roundings():
    limit = torchfuse.config.parallel_threshold
    assert c_codegen.parallel_threshold(["float v2 = v0 * v1;"]) == limit
    assert c_codegen.parallel_threshold(["float v1 = expf(v0);"]) == limit // 2
    assert c_codegen.parallel_threshold(["float v1 = tf_sleef_expf(v0);"]) == limit // 2
    body = ["float v1 = tf_round_f16((float)(v0 * v0));",
            "float v2 = tf_round_bf16((float)((float)tanh((double)(v1))));"]
    assert c_codegen.parallel_threshold(body) == limit // 4


def test_declarations_only_for_functions_used():
    source = c_codegen.vector_math_declarations("float v = tanhf(a) + expm1(b) + fabsf(c);")
    assert "TF_SIMD float tanhf(float);" in source
    assert "TF_SIMD double expm1(double);" in source
    assert "fabs" not in source
    assert c_codegen.vector_math_declarations("float v = a * b;") == ""


def test_vml_and_sleef_off_leave_every_function_to_libmvec():
    x = torch.randn(64)
    with torchfuse.config.override(vml=False, sleef=False):
        source = torchfuse.get_fused_kernel_code(trace(torch.tanh, x), x)
    assert "tf_vml" not in source and "tf_sleef" not in source
    assert "TF_SIMD float tanhf(float);" in source


def _source(fn, t, sleef: bool, every: bool = False) -> str:
    with torchfuse.config.override(sleef=sleef, sleef_all=every):
        return torchfuse.get_fused_kernel_code(trace(fn, t), t)


@SLEEF
def test_costly_sleef_functions_only_where_asked():
    """By default kernels call SLEEF's functions where they cost about libmvec's (SLEEF_CHEAP:
    the exp of a sigmoid), libmvec's elsewhere (the tanh of a float32 tanh GELU), but SLEEF's
    every one for a float16 result (whose libmvec calls would be in double); with sleef_all
    SLEEF's every one."""
    x = torch.randn(64)
    gelu = SLEEF_OPS["gelu_tanh"]
    fn = lambda t: gelu(t) + torch.sigmoid(t)  # noqa: E731
    source = _source(fn, x, sleef=True)
    assert "tf_sleef_expf(" in source and "TF_SIMD float tanhf(float);" in source
    assert "tf_sleef_tanhf" not in source
    assert "tf_sleef_tanhf(" in _source(fn, x, sleef=True, every=True)
    assert "tf_sleef_tanhf(" in _source(fn, x.half(), sleef=True)


def test_kernel_declares_its_math_functions_simd():
    x = torch.randn(64)  # functions eager's kernels do not pass to VML
    fn = lambda t: torch.exp2(t) * torch.expm1(t) + torch.asinh(t)  # noqa: E731
    source = _source(fn, x, sleef=False)
    assert "TF_SIMD float exp2f(float);" in source
    assert "TF_SIMD float expm1f(float);" in source
    if cpu_backend.sleef_functions() is not None:
        source = _source(fn, x, sleef=True, every=True)  # asinh: the C library's (as eager's)
        assert "TF_SIMD float asinhf(float);" in source
        assert "TF_SIMD float exp2f(float);" not in source
        for name in ("tf_sleef_exp2f", "tf_sleef_expm1f"):
            assert f'simd("notinbranch"), const)) TF_SLEEF_FN float {name}(float);' in source
            assert f'__asm__("_ZGVeN16v_{name}");' in source


def test_sleef_only_where_eagers_kernels_call_it(monkeypatch):
    """Eager's kernels of another CPU capability (DEFAULT: no AVX2) call the C library's
    functions, not SLEEF's: there kernels call libmvec's."""
    x = torch.randn(64)
    cpu_backend.sleef_functions.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        assert cpu_backend.sleef_functions() is None
        source = torchfuse.get_fused_kernel_code(trace(F.silu, x), x)
        assert "tf_sleef" not in source and "TF_SIMD float expf(float);" in source
    finally:
        cpu_backend.sleef_functions.cache_clear()


def test_sleef_names_and_slots():
    """Each function's wide and narrow SLEEF functions sit at its slots of the loader's table;
    expf is inline (SLEEF_INLINE)."""
    assert len(c_codegen.SLEEF_NAMES) == len(set(c_codegen.SLEEF_NAMES))
    source = c_codegen.sleef_definitions(
        "double y = tf_sleef_atan2(a, b) + tf_aten_erff(x) + tf_sleef_log1pf(x);")
    for name, call in (("atan2d8_u10", "TF_SLEEF2(tf_f64x8, {})(a, b)"),
                       ("atan2d4_u10", "TF_SLEEF2(tf_f64x4, {})(a, b)"),
                       ("log1pf8_u10", "TF_SLEEF(tf_f32x8, {})(a)")):
        assert call.format(c_codegen.SLEEF_NAMES.index("Sleef_" + name)) in source
    assert "tf_aten_erff(float x)" in source and '"_ZGVeN8vv_tf_sleef_atan2"' in source
    assert "TF_FN float tf_sleef_expf(float d)" in source and "_tf_sleef_expf" not in source
    assert c_codegen.sleef_definitions("float y = expf(x);") == ""


@pytest.mark.skipif(not cpu_backend._has_vector_math(), reason="no glibc >= 2.35 on x86-64")
def test_kernels_call_the_vector_variants():
    """Where libmvec is there, the compiled kernel calls its vector variants (_ZGV... symbols):
    also a tanh whose argument SLEEF's bound selects (a select of its result made gcc call the
    scalar tanh in each lane), in float and, for a float16 result, in double; and where SLEEF
    is, the vector variants of its wrappers, also for a call that only one side of a select
    reads (gcc sank it into a branch, and the loop stayed scalar: -fno-tree-sink)."""
    flags = cpu_backend._flags(torchfuse.config.cc, torchfuse.config.cflags)
    assert cpu_backend.VECTOR_MATH_FLAGS[0] in flags
    x = torch.randn(64)
    gelu = SLEEF_OPS["gelu_tanh"]
    cases = [(torch.expm1, x, "expm1f", False), (F.mish, x, "tanhf", False),
             (gelu, x.half(), "tanh", False)]
    if cpu_backend.sleef_functions() is not None:
        where = lambda t: torch.where(t > 0, torch.log1p(t) * 2, t)  # noqa: E731
        cases += [(F.mish, x, "tf_sleef_tanhf", True), (gelu, x.half(), "tf_sleef_tanhf", True),
                  (torch.lgamma, x.double(), "tf_sleef_lgamma", True),
                  (where, x, "tf_sleef_log1pf", True)]  # a call only one side reads
    for fn, t, name, sleef in cases:
        binary = cpu_backend.BACKEND.compile(_source(fn, t, sleef, every=sleef),
                                             torch.device("cpu"))
        assert re.search(rb"_ZGV\w+_" + name.encode() + rb"\0", binary), name


def test_logs_keep_out_of_domain_lanes_off_the_slow_path():
    """log-like calls to libmvec go through the domain wrappers, which give the same results
    (checked above over negative inputs, -1, ±0, NaN and ±Inf); SLEEF's have no slow path."""
    x = torch.randn(64)  # float16's log and log2 are not VML's: computed in double (in_double)
    for fn, call, t in ((torch.log, "tf_log((double)(v0))", x.half()),
                        (torch.log1p, "tf_log1pf(v0)", x),
                        (torch.log2, "tf_log2((double)(v0))", x.half())):
        assert call in _source(fn, t, sleef=False)
        if cpu_backend.sleef_functions() is not None:
            assert "tf_log" not in _source(fn, t, sleef=True)
