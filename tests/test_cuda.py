"""The CUDA backend: what only a GPU shows (streams, cuda:N, mixed devices, NVRTC failures, index
width, vector loads), plus what needs no GPU (import without one, rendering, launch choices).

Everything marked ``cuda`` is skipped where torch sees no GPU; the differential suite
(test_ops.py and friends) covers values on every device through the ``device`` fixture.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import torchfuse
from conftest import (
    _tuple,
    assert_matches_eager,
    assert_same,
    assert_same_bits,
    make_input,
    trace,
)
from torchfuse import compiler, devices, executor, interface, ops
from torchfuse.cache import SPECS, STATS
from torchfuse.codegen.cuda import (
    HALVES,
    PREAMBLE,
    CUDARenderer,
    instructions,
    is_flat,
    vector_width,
)
from torchfuse.config import override
from torchfuse.devices import cuda as backend

gpu = pytest.mark.cuda


@pytest.fixture
def cuda_fusion():
    """Skip where the GPU is there but the CUDA backend is not (e.g. cuda-core missing)."""
    reason = devices.why_not("cuda")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def launches(monkeypatch):
    """The entry point of every launch: "scalar32", "scalar64" or "vector32"."""
    seen = []
    original = backend._Launcher._launch

    def spy(self, entry, *args):
        seen.append(entry)
        return original(self, entry, *args)

    monkeypatch.setattr(backend._Launcher, "_launch", spy)
    monkeypatch.setattr(backend, "_quick", False)  # every launch through _launch
    return seen


def _source(fn, *inputs, scale: int = 1, tables: bool = False) -> str:
    """The CUDA source for ``fn`` on inputs of these shapes and dtypes (CPU tensors will do), for
    a GPU of memory scale ``scale`` where ``tables`` of eager's results pay or not."""
    spec = compiler.register(trace(fn, *inputs))
    argspec, _ = interface.argspec_of(spec, inputs)
    typed = compiler.infer_types(spec.graph, argspec, cuda=True)
    return CUDARenderer(lambda device: scale, lambda device, name: tables).render(typed, argspec)


def _fused(fn, *inputs):
    """``fn``'s graph registered once; a callable running it through run_fusion, which waits
    for each kernel's background build after the call that built it (so calls after the first
    see every entry point there is).

    Pass distinct tensors: make_fx gives one tensor passed twice a single placeholder's uses.
    """
    key = torchfuse.register_fusion(trace(fn, *inputs))

    def run(*args):
        result = torchfuse.run_fusion(key, *args)
        for kernel in SPECS[key].kernels.values():
            if kernel.launch is not None and hasattr(kernel.launch, "wait"):
                kernel.launch.wait()
        return result

    return run


# ---- no GPU needed ---------------------------------------------------------------------------


def test_backend_is_registered_and_imports_without_a_gpu():
    assert devices.get("cuda") is backend.BACKEND
    if not torch.cuda.is_available():
        assert not torchfuse.can_fuse("cuda")
        assert "torch.cuda.is_available() is False" in devices.why_not("cuda")


def test_flat_source_has_scalar_and_vector_entries():
    x = torch.randn(100)
    source = _source(lambda a, b: torch.sigmoid(a) * b, x.half(), x)
    assert 'extern "C" __global__' in source
    assert "tf_scalar32(" in source and "tf_vector32(" in source
    assert "tf_scalar64(" not in source and "tf_checked_" not in source
    assert "uint2 all" in source and "uint4 all" in source  # 4 halves, 4 floats a load


def test_wide_vector_entries_wait_for_the_kernel_before_them(monkeypatch):
    """A vector entry whose threads move 16 bytes of the widest operand or more starts with the
    grid dependency (sm_90+: its launch lets it start early); scalar entries and narrower
    vectors do not (a block pays for the wait). The launcher asks for that launch where the
    kernels are compiled for sm_90 or newer."""
    x = torch.randn(1 << 12)
    wide = _source(lambda a: a * 2, x)  # 4 floats a thread
    narrow = _source(lambda a, b: a * b, x, x)  # light: 2 floats a thread
    rows = _source(lambda a, b: a * b, x.view(64, 64).half(), x[:64].half())
    for source, waiting in ((wide, "vector32"), (narrow, "-"), (rows, "vector32")):
        assert f"// waits for the kernel before: {waiting}\n" in source
        assert source.count("TF_GRID_DEPENDENCY\n  tf_vector<uint32_t>") == (waiting != "-")
        assert "TF_GRID_DEPENDENCY\n  tf_scalar" not in source
    for arch, dependent in (("sm_90", True), ("sm_90a", True), ("compute_100", True),
                            ("sm_89", False), ("sm_80", False)):
        monkeypatch.setattr(backend, "_arch", lambda index, arch=arch: (arch, "cubin"))
        backend._dependent_launch.cache_clear()
        assert backend._dependent_launch(0) == dependent
    backend._dependent_launch.cache_clear()


def test_strided_source_has_32_and_64_bit_entries():
    x = torch.randn(10, 100)
    source = _source(lambda a, b: a + b, x.t(), x.t())
    assert "tf_scalar32(" in source and "tf_scalar64(" in source and "tf_vector" not in source
    assert source.startswith("// entry points: scalar32 scalar64")


def test_rows_with_a_broadcast_bias_get_a_vector_entry_first():
    x = torch.randn(10, 100)
    source = _source(lambda a, b, c: a + b * c, x, x[0], x[:, :1])  # row bias, column scale
    assert "// entry points: scalar32 vector32 scalar64" in source
    assert "#ifdef TF_ENTRY_vector32" in source
    assert "*(const uint4*)(in1 + o1)" in source  # the row bias: vector loads
    assert "const float s = in2[o2];" in source  # the column scale: one load per vector


def test_half_vector_kernels_compute_on_pairs():
    """float16/bfloat16 add, sub and mul of halves (constants exact in the dtype included) run
    on pairs; an inexact constant computes in float and one cvt rounds both results, but a
    bfloat16 value that only float ops read is rounded in place (one cvt a float)."""
    x, y = torch.randn(4096).half(), torch.randn(4096).half()
    source = _source(lambda a, b: a * b + a * 0.044715 + 1.0, x, y)
    assert "const uint32_t h2 = tf_hmul2(h0, h1);" in source
    assert "const uint32_t h3 = tf_hpack2(r3_0, r3_1);" in source  # 0.044715 is not a half
    assert "tf_hadd2(h4, 0x3c003c00u)" in source  # 1.0 is
    assert "tf_bfsub2(h0, h1)" in _source(lambda a, b: a - b, x.bfloat16(), y.bfloat16())
    assert "pack2" not in _source(lambda a, b: a * b, x.float(), y.float())
    mixed = _source(lambda a, b: a * b, x, y.float())  # computes in float32: no pairs
    assert "= tf_hmul2(" not in mixed and "tf_hunpack2(h0, v0_0, v0_1)" in mixed
    floats = _source(_quotient_of_halves, x.bfloat16(), y.bfloat16())  # a * 0.044715: division
    assert "const float v2_0 = tf_round_bf16((float)(v0_0 * " in floats and " h2 " not in floats
    assert "const uint32_t h2 = tf_hpack2(" in _source(_quotient_of_halves, x, y)  # float16: packed


def _quotient_of_halves(a, b):
    return (a * 0.044715) / (b + 3.0) - b


def _halves_from_doubles(a, b):
    return torch.maximum(a, b).bfloat16() * 2 >= a.bfloat16(), (a / b).half() + 1


def test_halves_in_one_element_vectors_compute_alone():
    # float64 operands make a light vector one element wide: no pairs (elements k and k + 1)
    x = torch.randn(4096, dtype=torch.float64)
    source = _source(_halves_from_doubles, x, x + 1)
    assert "// vector elements: 1" in source and "k + 1" not in source and "w[0]" not in source


@gpu
def test_halves_in_one_element_vectors_are_eagers(cuda_fusion):
    x = make_input((4099,), torch.float64, "cuda")
    assert_matches_eager(_halves_from_doubles, x, make_input((4099,), torch.float64, "cuda"))


def test_sigmoid_of_halves_skips_divisions_slow_path():
    x = torch.randn(4096)
    assert "tf_sigmoid_f16(v0)" in _source(torch.sigmoid, x.half())
    assert "tf_sigmoid_bf16(v0)" in _source(torch.sigmoid, x.bfloat16())
    assert "1 / (1 + expf(-v0))" in _source(torch.sigmoid, x)  # float32: IEEE division


def test_integer_division_source_reports_errors():
    x = torch.randint(1, 5, (100,))
    source = _source(lambda a, b: a // b, x, x)
    assert "tf_checked_scalar32(" in source and "int* __restrict__ error" in source


def test_source_needs_no_headers_under_nvrtc():
    rtc = PREAMBLE.split("#else")[0]
    assert "#include" not in rtc
    assert "__CUDACC_RTC__" in PREAMBLE


def test_vector_width_is_8_or_16_bytes_of_the_widest_operand_32_in_heavy_rows_of_halves():
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    assert vector_width([f32, f32], 4) == 4  # one input: 8 bytes would load too little
    assert vector_width([f32, f32, f32], 8) == 2  # two: 8 bytes each
    assert vector_width([f16, f32, f32], 6) == 4  # 8 bytes of the widest would load 12
    assert vector_width([f16, f16, f16], 4) == 4
    assert vector_width([torch.bool, torch.uint8], 1) == 16
    assert vector_width([f64, torch.bool], 8) == 2
    assert vector_width([f64, f64, f64], 16) == 1
    assert vector_width([f16, f16, f16], 2, flat=False, work=9) == 16  # heavy rows of halves
    assert vector_width([f16, f16, f16], 2, flat=False, work=5.75) == 8  # light ones: 16 bytes
    assert vector_width([bf16, bf16, bf16, torch.bool], 4, flat=False, work=6) == 8
    assert vector_width([f32, f32, f16], 4, flat=False, work=6) == 4
    assert vector_width([f32] * 7, 20, flat=False, work=6) == 2


def test_a_heavy_flat_body_moves_16_bytes_a_thread():
    f16 = torch.float16
    assert vector_width([f16, f16, f16], 4, work=6) == 8
    assert vector_width([f16, f16, f16], 4, flat=False, work=6) == 8  # rows: as before
    assert instructions(["float v2 = v0 * v1;"]) == 1  # a statement: one
    assert instructions(["float v2 = log1pf(v0) / v1;"]) == 1 + 33 + 16
    x, y = (torch.randn(4096, dtype=f16) for _ in range(2))
    mix = _source(lambda a, b: torch.where(a > 0, torch.log1p(a) * b, a * b), x, y)
    assert "// vector elements: 8" in mix  # ~46 instructions for 6 bytes
    assert "// vector elements: 4" in _source(lambda a, b: torch.exp(a) * b, x, y)  # ~14
    rows = torch.randn(64, 256, dtype=f16)
    lstm = _source(lambda a, b: torch.sigmoid(a) * torch.tanh(b), rows[:, :128], rows[:, 128:])
    assert "// vector elements: 8" in lstm  # strided halves: 16 bytes either way


def test_gpus_with_faster_memory_per_multiprocessor_move_twice_the_bytes_a_thread():
    """An H200's memory feeds each multiprocessor 1.5x an H100's: its threads keep more bytes
    in flight (strided 16-bit rows keep the doubling they have anyway), strided kernels from
    half the work per byte."""
    f32, f16 = torch.float32, torch.float16
    assert vector_width([f32, f32, f32], 8) == 2 and vector_width([f32] * 3, 8, scale=2) == 4
    assert vector_width([f32] * 7, 16, scale=2) == 2  # a thread loads 32 bytes at 2 already
    assert vector_width([f32] * 2, 4, work=6, scale=2) == 4  # heavy float32: 16 bytes
    assert vector_width([f16] * 3, 4, work=6, scale=2) == 16
    assert vector_width([f32] * 7, 20, flat=False, work=4.8, scale=2) == 4  # an LSTM: doubled
    assert vector_width([f16] * 7, 10, flat=False, work=8) == vector_width(
        [f16] * 7, 10, flat=False, work=8, scale=2) == 8  # an LSTM
    assert vector_width([f32] * 4, 4, flat=False, work=2.5, scale=2) == 4  # tanh(x + b) * s
    assert vector_width([f32] * 4, 4, flat=False, work=3, scale=2) == 8
    rows, row = torch.randn(64, 256), torch.randn(256)
    for dtype, scale, elements in [(torch.float16, 1, 8), (torch.float16, 2, 8),
                                   (f32, 2, 4), (torch.bfloat16, 2, 8)]:
        affine = _source(lambda x, b, s: (x + b) * s, rows.to(dtype), row.to(dtype),
                         row.to(dtype), scale=scale)
        assert f"// vector elements: {elements}" in affine  # light rows: 16 bytes a thread
    gelu = _source(lambda x, b, s: F.gelu(x + b) * s, rows, row, row, scale=2)
    assert "// vector elements: 8" in gelu  # 4 instructions a byte: doubled on an H200
    x, y = (torch.randn(4096) for _ in range(2))
    spec = compiler.register(trace(lambda a, b: a * torch.sigmoid(a) * b, x, y))
    argspec, _ = interface.argspec_of(spec, [x, y])
    typed = compiler.infer_types(spec.graph, argspec, cuda=True)
    assert "// vector elements: 2" in CUDARenderer().render(typed, argspec)
    assert "// vector elements: 4" in CUDARenderer(lambda device: 2).render(typed, argspec)


@gpu
def test_the_memory_scale_of_this_gpu(cuda_fusion):
    """1 on an H100 SXM (3.35 TB/s: 25 GB/s of memory per multiprocessor), 2 on an H200 (4.8
    TB/s: 36), as the driver's memory clock, bus width and multiprocessor count give them."""
    key = backend.BACKEND.device_key(torch.device("cuda", 0))
    per_multiprocessor, scale = backend._memory_per_multiprocessor(key), backend._memory_scale(key)
    assert per_multiprocessor is not None
    assert scale == (2 if per_multiprocessor > backend.FAST_MEMORY else 1)
    name = torch.cuda.get_device_name()
    expected = {"H100 80GB HBM3": (20e9, 30e9, 1), "H200": (33e9, 40e9, 2)}
    for model, (low, high, model_scale) in expected.items():
        if model in name:
            assert low < per_multiprocessor < high and scale == model_scale


def test_inputs_reused_by_every_row_do_not_count_as_streamed():
    x = torch.randn(16, 64)
    bias = _source(lambda a, b: a + b, x, x[0])  # the row is read again by every row
    assert "// vector elements: 4" in bias
    rows = _source(lambda a, b: a + b, x[:, :60], x[:, 2:62])  # both streamed
    assert "// vector elements: 2" in rows
    spec = compiler.register(trace(lambda a, b: a + b, x, x[0]))
    argspec, _ = interface.argspec_of(spec, [x, x[0]])
    assert [d.reused for d in argspec.inputs] == [False, True]


def test_heavy_rows_of_halves_move_32_bytes_a_thread_light_ones_16():
    x = torch.randn(16, 64).half()
    source = _source(lambda a, b: F.gelu(a + b), x, x[0])  # ~9 instructions a byte
    assert "// vector elements: 16" in source
    # the streamed input by a plain ld.global, the row every row reuses by NVRTC's own load
    assert "b0.all = tf_ld((const tf_uint4x2*)(in0 + o0));" in source
    assert "b1.all = *(const tf_uint4x2*)(in1 + o1);" in source
    assert "*(tf_uint4x2*)(out0 + o2) = b2.all;" in source
    light = _source(lambda a, b: a + b, x, x[0])
    assert "// vector elements: 8" in light and "b0.all = tf_ld((const uint4*)(in0 + o0));" in light
    assert "// vector elements: 4" in _source(lambda a, b: a + b, x.flatten(), x.flatten() + 1)


def test_flat_argspec_needs_rank_1_and_contiguous_operands():
    x = torch.randn(10, 100)
    spec = compiler.register(trace(lambda a, b: a + b, x, x))
    assert is_flat(interface.argspec_of(spec, [x, x])[0])
    assert not is_flat(interface.argspec_of(spec, [x, x.t().contiguous().t()])[0])


def test_index_width_follows_numel_and_offsets():
    assert not backend.needs_64bit(1000, [1000], [1, 1])
    assert backend.needs_64bit(2**31, [2**31], [1, 1])
    assert not backend.needs_64bit(2**31 - 1, [2**31 - 1], [1, 1])
    # 3 elements, but the last sits 2**31 elements in: offsets decide
    assert backend.needs_64bit(3, [3], [2**30, 1])
    assert not backend.needs_64bit(3, [3], [2**29, 1])
    # a broadcast operand (stride 0) never widens
    assert not backend.needs_64bit(2**20, [2**10, 2**10], [0, 0, 2**10, 1])


def test_alignment_needs_every_pointer_on_16_bytes():
    assert backend.aligned([0x1000, 0x2010])
    assert not backend.aligned([0x1000, 0x2004])


# ---- on the GPU --------------------------------------------------------------------------------


@gpu
def test_can_fuse_cuda(cuda_fusion):
    assert torchfuse.can_fuse("cuda")
    assert torchfuse.can_fuse(torch.device("cuda", 0))


@gpu
def test_fused_kernel_runs_on_the_gpu(cuda_fusion):
    x = make_input((1000,), torch.float32, "cuda")
    fused = _fused(lambda a: torch.tanh(a) * 2 + 1, x)
    before = torchfuse.cache_info()
    out = fused(x)[0]
    after = torchfuse.cache_info()
    assert out.device == x.device
    assert after["fallbacks"] == before["fallbacks"]
    assert_same(out, torch.tanh(x) * 2 + 1)


@gpu
def test_launches_on_the_current_stream(cuda_fusion):
    x = make_input((1 << 20,), torch.float32, "cuda")
    fn = lambda a: torch.sigmoid(a) * a - 1  # noqa: E731
    fused = _fused(fn, x)
    for _ in range(2):  # compiled, then the plan's launch prepared (launch.c's Call)
        fused(x)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # the stream stays busy for a while
        y = x * 3  # eager, queued behind the sleep
        out = fused(y)[0]  # must read y only once it is written
        assert not stream.query()
        assert torch.cuda.default_stream().query()  # nothing of ours went there
    stream.synchronize()
    assert_same(out, fn(x * 3))


@gpu
def test_run_fusion_in_a_cuda_graph(cuda_fusion):
    """Captured into a CUDA graph (outputs from the graph's pool, the launch on the capture
    stream) by the plan's prepared call, and replayed on new values: eager's results."""
    x = make_input((4096,), torch.float32, "cuda")
    fn = lambda a: torch.sigmoid(a) * a - 1  # noqa: E731
    key = torchfuse.register_fusion(trace(fn, x))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture asks
        for _ in range(2):
            torchfuse.run_fusion(key, x)
            SPECS[key].kernels.settle()
        torchfuse.run_fusion(key, x)
    torch.cuda.current_stream().wait_stream(side)
    if SPECS[key].kernels.values()[0].launch.quick:  # the native launcher is here
        assert SPECS[key].plans[0].prepared is not None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, = torchfuse.run_fusion(key, x)
    x.copy_(make_input((4096,), torch.float32, "cuda", seed=1))
    graph.replay()
    torch.cuda.synchronize()
    assert_same(out, fn(x))


@gpu
def test_dependent_kernels_in_a_cuda_graph(cuda_fusion):
    """A chain of fused calls captured into one CUDA graph, each reading the output of the one
    before, large enough that blocks overlap (on sm_90+ the dependent launch becomes an edge of
    the graph), with an eager kernel in the middle, replayed on new values: eager's results."""
    x = make_input((1 << 22,), torch.float32, "cuda", specials=False)
    step = lambda a: a * 0.5 + 1.0  # noqa: E731
    key = torchfuse.register_fusion(trace(step, x))

    def chain(a, fused):
        for i in range(8):
            a = torchfuse.run_fusion(key, a)[0] if fused else step(a)
            a = a - 0.25 if i == 3 else a
        return a

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture asks
        chain(x, fused=True)
        SPECS[key].kernels.settle()
        chain(x, fused=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x, fused=True)
    x.copy_(make_input((1 << 22,), torch.float32, "cuda", seed=1, specials=False))
    graph.replay()
    torch.cuda.synchronize()
    assert_same(out, chain(x, fused=False))


@gpu
def test_every_gpu_and_the_current_device(cuda_fusion):
    fn = lambda a, b: a * b + 0.5  # noqa: E731
    for index in range(torch.cuda.device_count()):
        x = make_input((257,), torch.float32, f"cuda:{index}")
        y = make_input((257,), torch.float32, f"cuda:{index}")
        assert_matches_eager(fn, x, y)  # current device 0, tensors on cuda:index
        with torch.cuda.device(index):
            assert_matches_eager(fn, x, y)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_are_per_gpu(cuda_fusion):
    fn = lambda a: a * 7 - 2  # noqa: E731
    x0 = make_input((64,), torch.float32, "cuda:0")
    fused = _fused(fn, x0)
    assert_same(fused(x0)[0], fn(x0))
    x1 = x0.to("cuda:1")
    assert_same(fused(x1)[0], fn(x1))
    spec = compiler.register(trace(fn, x0))
    assert {key[0] for key in spec.kernels._kernels} >= {"cuda:0", "cuda:1"}
    add = _fused(lambda a, b: a + b, x0, x0.clone())
    with pytest.raises(RuntimeError):
        x0 + x1  # eager refuses tensors on two GPUs
    with pytest.raises(RuntimeError):
        add(x0, x1)  # so does the fallback that the fused call takes


@gpu
def test_mixed_devices_fall_back_to_eager(cuda_fusion):
    fn = lambda a, b: a + b * 2  # noqa: E731
    x = make_input((100,), torch.float32, "cuda")
    fused = _fused(fn, x, x.clone())
    on_cpu = make_input((100,), torch.float32)
    with pytest.raises(RuntimeError):
        fn(x, on_cpu)  # eager refuses
    with pytest.raises(RuntimeError):
        fused(x, on_cpu)  # so does the fallback
    scalar = torch.tensor(1.5)  # a CPU 0-d tensor: eager allows it, and so does the fallback
    assert_same(fused(x, scalar), fn(x, scalar))


@gpu
def test_nvrtc_error_warns_once_then_falls_back(cuda_fusion, monkeypatch, capsys):
    broken = PREAMBLE + "\n#error torchfuse test: broken on purpose\n"
    monkeypatch.setattr(backend.BACKEND.renderer, "preamble", broken)
    x = make_input((300,), torch.float32, "cuda")
    fn = lambda a: a * 1.25 - 0.0625  # noqa: E731
    fused = _fused(fn, x)
    torchfuse.clear_cache()
    # NVRTC compiles every entry (the PTX one does not read the C preamble)
    with override(debug=4, ptx=False), pytest.warns(RuntimeWarning, match="fallback"):
        assert_same(fused(x)[0], fn(x))
    err = capsys.readouterr().err
    assert "broken on purpose" in err  # the source (debug 4) and NVRTC's log
    assert "NVRTC failed" in err and "reproduce with" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(fused(x)[0], fn(x))  # no second warning
    assert torchfuse.cache_info()["fallbacks"] >= 2


@gpu
def test_scalar_entry_is_assembled_from_ptx_else_compiled_by_nvrtc(cuda_fusion, monkeypatch):
    x = make_input((300,), torch.float32, "cuda")
    fn = lambda a: torch.tanh(a) * 1.25  # noqa: E731
    fused = _fused(fn, x)
    backend._library(torch.cuda.current_device(), wait=True)
    with override(cache=False):
        torchfuse.clear_cache()
        assert_same(fused(x)[0], fn(x))
        assert torchfuse.cache_info()["assembled"] == 1
        # ptxas refuses the module: NVRTC compiles the C entry, no warning, same values
        monkeypatch.setattr(backend.ptx, "link", lambda entry, library: "not PTX")
        monkeypatch.setattr(backend, "_refusals", {})
        for _ in range(backend.REFUSALS_MAX):
            torchfuse.clear_cache()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert_same(fused(x)[0], fn(x))
            assert torchfuse.cache_info()["assembled"] == 0
            assert torchfuse.cache_info()["compiles"] == 1
        # then the process stops asking ptxas: the module is not even linked
        monkeypatch.setattr(backend.ptx, "link", None)
        torchfuse.clear_cache()
        assert_same(fused(x)[0], fn(x))
        assert torchfuse.cache_info()["compiles"] == 1


@gpu
def test_ptx_for_an_architecture_newer_than_nvrtc(cuda_fusion, monkeypatch):
    major, minor = torch.cuda.get_device_capability()
    monkeypatch.setattr(backend, "_arch", lambda index: (f"compute_{major}0", "ptx"))
    x = make_input((500,), torch.float32, "cuda")
    fn = lambda a: torch.exp(a) - 0.3125  # noqa: E731
    fused = _fused(fn, x)
    torchfuse.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(fused(x)[0], fn(x))


@gpu
@pytest.mark.parametrize("n", [1, 3, 4, 5, 31, 64, 1023, 4099])
def test_vector_path_and_its_tail(cuda_fusion, launches, n):
    base = make_input((n + 8,), torch.float16, "cuda")
    other = make_input((n + 8,), torch.float32, "cuda")
    fn = lambda a, b: (a * b > 0.25, a + 1)  # noqa: E731
    fused = _fused(fn, base[:n], other[:n])
    fused(base[:n], other[:n])  # builds the kernel, and waits for its vector entry
    assert_same(fused(base[:n], other[:n]), fn(base[:n], other[:n]))
    assert launches[-1] == "vector32"
    # one element in: 2 or 4 bytes off, so no 16-byte loads
    assert_same(fused(base[1 : n + 1], other[1 : n + 1]), fn(base[1 : n + 1], other[1 : n + 1]))
    assert launches[-1] == "scalar32"


@gpu
@pytest.mark.parametrize("cols", [64, 66, 1])
def test_row_vectors_where_rows_allow_them(cuda_fusion, launches, cols):
    """Rows of a multiple of the vector width run 16-byte loads; other rows, and unaligned
    operands, the scalar entry, compiled when first needed; a partial output is written once."""
    x = make_input((33, cols), torch.float32, "cuda")
    bias = make_input((cols,), torch.float32, "cuda")
    fn = lambda a, b: (torch.sigmoid(a + b) * 2, b * 3)  # noqa: E731
    torchfuse.clear_cache()
    fused = _fused(fn, x, bias)
    assert_same(fused(x, bias), fn(x, bias))  # builds, then waits for the vector entry
    assert_same(fused(x, bias), fn(x, bias))
    assert launches[-1] == ("vector32" if cols == 64 else "scalar32")
    wide = make_input((33, 2 * cols + 4), torch.float32, "cuda")
    chunk = wide[:, 4:cols + 4]  # a chunk of wider rows: 16 bytes in, so still aligned
    assert_same(fused(chunk, bias), fn(chunk, bias))
    shifted = wide[:, 1:cols + 1]  # 4 bytes off: scalar
    assert_same(fused(shifted, bias), fn(shifted, bias))
    assert launches[-1] == "scalar32"


@gpu
def test_vector_entry_builds_in_the_background(cuda_fusion, launches):
    """The first call runs as soon as the scalar entry is compiled; the vector entry follows on
    a thread, and calls take it once it is there."""
    x = make_input((1000,), torch.float32, "cuda")
    fn = lambda a: a * 3.25 + 0.125  # noqa: E731
    torchfuse.clear_cache()
    with override(cache=False):  # nothing from disk: the vector entry takes a real compile
        key = torchfuse.register_fusion(trace(fn, x))
        assert_same(torchfuse.run_fusion(key, x)[0], fn(x))
        (kernel,) = SPECS[key].kernels.values()
        assert launches == ["scalar32"]
        kernel.launch.wait()
        assert sorted(kernel.launch.kernels) == ["scalar32", "vector32"]
        assert_same(torchfuse.run_fusion(key, x)[0], fn(x))
        assert launches[-1] == "vector32"
        assert_same(torchfuse.run_fusion(key, x[1:])[0], fn(x[1:]))  # unaligned
        assert launches[-1] == "scalar32"


@gpu
def test_flat_calls_take_the_quick_path(cuda_fusion):
    """A flat kernel that cannot fail launches straight through the native launcher: its vector
    entry where every pointer is aligned, else its scalar one."""
    x = torch.randn(4096, device="cuda")
    fn = lambda t: torch.sigmoid(t) * t  # noqa: E731
    key = torchfuse.register_fusion(trace(fn, x))
    fused = _fused(fn, x)
    fused(x)  # built, vector entry included
    spec = SPECS[key]
    launch = spec.kernels.get(executor.plan(spec, [x])[0]).launch
    if not launch.quick:
        pytest.skip("no native launcher here")
    handles, native = [], launch.native

    class Spy:  # the entry is picked in C (test_executor checks how), by either launch
        def cuda_pick(self, cu_launch, pdl, scalar, vector, *rest):
            handles.append((scalar, vector))
            return native.cuda_pick(cu_launch, pdl, scalar, vector, *rest)

        def prepare_cuda(self, cu_launch, pdl, current, scalar, vector, *rest):
            handles.append((scalar, vector))
            return native.prepare_cuda(cu_launch, pdl, current, scalar, vector, *rest)

    launch.native = Spy()
    try:
        for _ in range(2):
            assert_same(fused(x)[0], fn(x))
            assert_same(fused(x[1:])[0], fn(x[1:]))  # misaligned: the scalar entry
    finally:
        launch.native = native
    assert handles and set(handles) == {(launch.scalar, launch.kernels["vector32"][1])}


@gpu
def test_strided_calls_take_the_quick_path(cuda_fusion):
    """A strided kernel that cannot fail launches natively too, offered its vector entry where
    the layout allows it (whole vectors tile the rows), its dividers for the unravelling."""
    x = make_input((64, 96), torch.float32, "cuda")
    fn = lambda a, b: torch.tanh(a + b)  # noqa: E731
    fused = _fused(fn, x, x[0])
    fused(x, x[0])
    key = torchfuse.register_fusion(trace(fn, x, x[0]))
    launch = SPECS[key].kernels.get(executor.plan(SPECS[key], [x, x[0]])[0]).launch
    if not launch.quick:
        pytest.skip("no native launcher here")
    offered, native = [], launch.native

    class Spy:  # by either launch: its own, or the one prepared for a plan (2-d: 2 sizes)
        def cuda_pick(self, cu_launch, pdl, scalar, vector, width, block, stream, numel, sizes,
                      magic, *rest):
            offered.append((vector, list(sizes), list(magic)))
            return native.cuda_pick(cu_launch, pdl, scalar, vector, width, block, stream, numel,
                                    sizes, magic, *rest)

        def prepare_cuda(self, cu_launch, pdl, current, scalar, vector, width, block, stream,
                         index, constants, *rest):
            offered.append((vector, constants[1:3], constants[3:5]))
            return native.prepare_cuda(cu_launch, pdl, current, scalar, vector, width, block,
                                       stream, index, constants, *rest)

    launch.native = Spy()
    odd = x[:, :94]  # rows of 94: no whole vectors
    try:
        for _ in range(2):
            assert_same(fused(x, x[0])[0], fn(x, x[0]))
            assert_same(fused(odd, odd[0].clone())[0], fn(odd, odd[0]))
    finally:
        launch.native = native
    assert len(offered) >= 2 and set(map(repr, offered)) == set(map(repr, [
        (launch.kernels["vector32"][1], [64, 96], backend.dividers((64, 96))),
        (0, [64, 94], backend.dividers((64, 94)))]))


@gpu
def test_strided_kernels_index_in_32_bits(cuda_fusion, launches):
    x = make_input((60, 70), torch.float32, "cuda")
    assert_matches_eager(lambda a, b: a * b - a, x.t(), x[:1, :60])
    assert launches[-1] == "scalar32"


@gpu
def test_offsets_past_2_31_use_64_bit_indexing(cuda_fusion, launches):
    if torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 6 GiB of free GPU memory")
    big = torch.ones(2**31 + 2**21, dtype=torch.int8, device="cuda")
    big[-1] = 5
    view = big[:: 2**21]  # 1025 elements, the last 2**31 elements in
    assert_matches_eager(lambda a: a * 3 + 1, view)
    assert launches[-1] == "scalar64"
    del big, view


@gpu
def test_flat_calls_past_2_31_elements_run_in_chunks(cuda_fusion, launches):
    if torch.cuda.mem_get_info()[0] < 10 * 2**30:
        pytest.skip("needs 10 GiB of free GPU memory")
    n = 2**31 + 37
    x = torch.ones(n, dtype=torch.uint8, device="cuda")
    x[-1], x[2**30] = 7, 9
    fused = _fused(lambda a: a * 2 + 1, x)
    fused(x)  # builds the kernel, and waits for its vector entry
    launches.clear()
    out = fused(x)[0]
    assert launches == ["vector32"] * 3  # 2**30, 2**30 and 37 elements
    assert torch.equal(out, x * 2 + 1)
    assert out[2**30].item() == 19 and out[-1].item() == 15


@gpu
def test_back_to_back_kernels_see_each_others_results(cuda_fusion):
    """Kernels launched with programmatic stream serialisation (sm_90+) start before the one
    before them ends; each waits for it before loading: a chain of fused calls, each reading
    the last one's output at once, large enough that blocks overlap, gives eager's values."""
    x = make_input((1 << 22,), torch.float32, "cuda", specials=False)
    step = lambda a: a * 0.5 + 1.0  # noqa: E731
    fused = _fused(step, x)
    fused(x)  # both entries built
    launch = next(iter(SPECS[torchfuse.register_fusion(trace(step, x))].kernels.values())).launch
    major = torch.cuda.get_device_capability()[0]
    assert launch.pdl == (major >= 9)
    got = want = x
    for _ in range(50):
        got, want = fused(got)[0], step(want)
    assert_same(got, want)


@gpu
def test_integer_division_by_zero_gives_eagers_result(cuda_fusion):
    x = make_input((1000,), torch.int32, "cuda")
    y = make_input((1000,), torch.int32, "cuda", low=1, high=5)
    assert_matches_eager(lambda a, b: a // b + 1, x, y)
    y[17] = 0  # CUDA eager does not raise; the flag sends the call to the fallback
    assert_matches_eager(lambda a, b: a // b + 1, x, y)


@gpu
def test_integer_division_inside_a_cuda_graph_capture(cuda_fusion):
    """A kernel that can fail (integer division) reads its error flag back after each launch,
    which a CUDA graph capture forbids: inside one the call runs eager's ops instead, which the
    graph captures, and the replay gives eager's values, by zero too (CUDA eager does not
    raise); outside, the kernel again."""
    x = make_input((1000,), torch.int32, "cuda")
    y = make_input((1000,), torch.int32, "cuda", low=1, high=5)
    fn = lambda a, b: a // b + 1  # noqa: E731
    key = torchfuse.register_fusion(trace(fn, x, y))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture asks
        torchfuse.run_fusion(key, x, y)
        SPECS[key].kernels.settle()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before = STATS.fallbacks
    with torch.cuda.graph(graph):
        out, = torchfuse.run_fusion(key, x, y)
    assert STATS.fallbacks == before + 1
    y[17] = 0
    graph.replay()
    torch.cuda.synchronize()
    assert_same(out, fn(x, y))
    y[17] = 1
    assert_same(torchfuse.run_fusion(key, x, y)[0], fn(x, y))
    assert STATS.fallbacks == before + 1


@gpu
def test_other_threads(cuda_fusion):
    x = make_input((4096,), torch.float32, "cuda")
    fn = lambda a: torch.erf(a) + a  # noqa: E731
    fused = _fused(fn, x)
    results = []
    thread = threading.Thread(target=lambda: results.append(fused(x)[0]))
    thread.start()
    thread.join()
    assert_same(results[0], fn(x))


@gpu
def test_set_fusion_enabled_cuda(cuda_fusion):
    x = make_input((100,), torch.float32, "cuda")
    fused = _fused(lambda a: a * 3 + 2, x)
    torchfuse.set_fusion_enabled("cuda", False)
    try:
        assert not torchfuse.can_fuse("cuda")
        before = torchfuse.cache_info()["fallbacks"]
        assert_same(fused(x)[0], x * 3 + 2)
        assert torchfuse.cache_info()["fallbacks"] == before + 1
    finally:
        torchfuse.set_fusion_enabled("cuda", True)
    assert torchfuse.can_fuse("cuda")


class _Cell(torch.nn.Module):
    def __init__(self, n: int, h: int) -> None:
        super().__init__()
        self.ih, self.hh = torch.nn.Linear(n, 4 * h), torch.nn.Linear(h, 4 * h)

    def forward(self, x, hx, cx):
        i, f, g, o = (self.ih(x) + self.hh(hx)).chunk(4, 1)
        cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cy), cy


@gpu
def test_compile_inference_and_training(cuda_fusion):
    torch._dynamo.reset()
    model = _Cell(16, 32).cuda()
    x, hx, cx = (torch.randn(4, n, device="cuda") for n in (16, 32, 32))
    report = torchfuse.explain(model, x, hx, cx)
    assert report.groups and "__global__" in report.groups[0].source
    compiled = torchfuse.jit(model)
    with torch.no_grad():
        assert_same(compiled(x, hx, cx), model(x, hx, cx))
    loss = sum(o.sum() for o in compiled(x, hx, cx))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(o.sum() for o in model(x, hx, cx)).backward()
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want)


@gpu
def test_disk_cache_serves_cuda_kernels(cuda_fusion, tmp_path):
    x = make_input((1000,), torch.float32, "cuda")
    fn = lambda a: torch.sin(a) * 0.75 + 0.125  # noqa: E731
    fused = _fused(fn, x)
    with override(cache=True, cache_dir=str(tmp_path)):
        torchfuse.clear_cache()
        assert_same(fused(x)[0], fn(x))
        info = torchfuse.cache_info()
        assert info["compiles"] == 1 and info["background_compiles"] == 1  # scalar, vector
        torchfuse.clear_cache()  # memory only: the next call loads both cubins from disk
        assert_same(fused(x)[0], fn(x))
        info = torchfuse.cache_info()
        assert info["disk_hits"] == 2 and info["compiles"] == info["background_compiles"] == 0


def _every_half(dtype, device, n=1 << 16):
    """Every 16-bit pattern (subnormals, NaN, ±Inf, ±0) in a shuffled order."""
    bits = torch.randperm(1 << 16)[:n].to(torch.int32) - (1 << 15)
    return bits.to(torch.int16).view(dtype).to(device)


def _bit_patterns(dtype, device):
    """Every 16-bit pattern; for wider types random ones (subnormals, NaN, ±Inf among them)."""
    if dtype.itemsize == 2:
        return _every_half(dtype, device)
    bits = {4: torch.int32, 8: torch.int64}[dtype.itemsize]
    info = torch.iinfo(bits)
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(info.min, info.max, (1 << 18,), generator=gen, dtype=bits)
    return patterns.view(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_pairs_are_eagers_bit_for_bit(device, dtype, launches):
    """Vector kernels add, subtract and multiply float16/bfloat16 two at a time in one rounding
    (exact constants included), other ops in float rounded by one packing cvt: every 16-bit
    pattern against every other, as eager gives them."""
    a, b = _every_half(dtype, device), _every_half(dtype, device)
    row = _every_half(dtype, device, 256)
    x = _every_half(dtype, device).view(256, 256)  # with a row operand: the strided vector entry
    cases = [
        (lambda a, b: (a * b, a + b, a - b, b - a * 0.5, 1.0 - a + b), a, b),  # pairs only
        (lambda a, b: a / (b + 2.0) * b + a * 0.044715, a, b),  # float ops between pairs
        (_quotient_of_halves, a, b),  # a float op's value read by a float op alone
        (lambda a, b: (a * b).float() + a, a, b),  # a float output from a pair
        (lambda x, r: x * r - r, x, row),
    ]
    for fn, *inputs in cases:
        fused = _fused(fn, *inputs)
        fused(*inputs)  # builds the kernel; its vector entry follows
        for got, want in zip(_tuple(fused(*inputs)), _tuple(fn(*inputs)), strict=True):
            assert_same_bits(got, want)
    if device.startswith("cuda"):
        assert launches.count("vector32") == len(cases)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


@pytest.mark.parametrize("fn", [torch.sigmoid, F.gelu, _gelu_tanh])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_functions_of_halves_are_eagers_bit_for_bit(device, dtype, fn, launches):
    """16-bit forms of eager's formulas: sigmoid's reciprocal without division's slow path
    (tf_sigmoid_f16), GELU's x * fma(0.5, cdf, 0.5) (CUDA): every 16-bit input, flat and in
    strided rows, through the first entry point (assembled from PTX) and the vector one, as
    eager gives it."""
    if device.startswith("cuda"):
        backend._library(torch.device(device).index or 0, wait=True)
    elif fn is not torch.sigmoid:
        pytest.skip("eager's CPU GELU of a contiguous tensor is oneDNN's (README)")
    x = _every_half(dtype, device)
    rows = torch.empty(256, 512, dtype=dtype, device=device)[:, :256]
    rows.copy_(x.view(256, 256))
    odd = torch.cat([x, x[:1]])[1:]  # every input again, 2 bytes off 16: the scalar entry
    for a in (x, rows, odd):
        fused = _fused(fn, a)
        for _ in range(2):  # the first entry, then the vector one where the pointers allow
            assert_same_bits(fused(a)[0], fn(a))
    if device.startswith("cuda"):
        assert {"scalar32", "vector32"} <= set(launches)


def test_erf_gelu_of_halves_reads_a_table_in_vector_entries():
    """Where the backend says tables pay, a 16-bit erf GELU's vector body computes eager's erff
    polynomial near 0 and reads eager's results from a table elsewhere (one array per dtype,
    named as ops.TABLES names it) at an address the vector body computes once a thread; the
    scalar entries, the tanh GELU, float32 and GPUs where tables do not pay keep the
    formula."""
    x = torch.randn(64, dtype=torch.float16)
    fn = lambda a, b: F.gelu(a) + F.gelu(b).float()  # noqa: E731
    assert "gelu2(" not in _source(fn, x, x.bfloat16(), scale=2)
    both = _source(fn, x, x.bfloat16(), tables=True)
    assert "__device__ uint16_t table[65536];" in both  # declared by the macro, for each:
    for t in ("h", "bf"):
        assert both.count(f"TF_GELU_PAIR({t}, {ops.GELU_TABLE.format(t=t)})") == 1
        name = ops.GELU_TABLE.format(t=t)
        assert name in ops.TABLES
        assert both.count(f"const uint16_t* const {name}_at = tf_table_at({name}, n_);") == 1
        assert both.count(f"tf_{t}gelu2(") == both.count(f"tf_{t}gelu2(h") == 1
        assert re.search(rf"tf_{t}gelu2\(h\d+, {name}_at\)", both)
    scalar = both[both.index("tf_scalar("):both.index("tf_vector(")]
    assert "erff(" in scalar and "gelu2(" not in scalar
    for source in (_source(lambda a: F.gelu(a, approximate="tanh"), x, tables=True),
                   _source(F.gelu, x.float(), tables=True)):
        assert "gelu2(" not in source and "_table" not in source


@gpu
@pytest.mark.parametrize("native", [True, False], ids=["native_launch", "python_launch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_erf_gelu_table_is_filled_before_any_launch(cuda_fusion, dtype, native, launches,
                                                   monkeypatch):
    """Every kernel that reads eager's GELU table (rendered to read it whatever the GPU's
    memory) gets it before its vector entry serves a call: through either launch path, on a
    side stream, in a second kernel, on every 16-bit input, in a row-broadcast program."""
    renderer = CUDARenderer(backend._memory_scale, lambda device, name: True)
    monkeypatch.setattr(backend.CUDABackend, "renderer", renderer)
    torchfuse.clear_cache()  # no kernel rendered for this GPU's own scale
    x = _every_half(dtype, "cuda")
    fns = [F.gelu, lambda a, b: F.gelu(a + b) * b]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with override(native_launch=native), torch.cuda.stream(side):
        for fn in fns:
            inputs = (x,) if fn is F.gelu else (x.view(256, 256), x[:256].flip(0))
            fused = _fused(fn, *inputs)
            for _ in range(2):
                assert_same_bits(fused(*inputs)[0], fn(*inputs))
    side.synchronize()
    assert launches.count("vector32") >= len(fns)
    table = ops.GELU_TABLE.format(t=HALVES[dtype])
    assert (table, torch.cuda.current_device()) in backend._tables
    torchfuse.clear_cache()


def _gelu_of_rows(dtype):
    """A 16-bit bias + erf GELU + scale over rows, its inputs (every 16-bit pattern, shuffled)
    and eager's function."""
    x = _every_half(dtype, "cuda").view(256, 256)
    fn = lambda a, b: F.gelu(a + b) * b  # noqa: E731
    return fn, (x, x[0].flip(0).contiguous())


def _assert_replays_eager(graph, out, fn, x, b):
    """``graph``, replayed on new values of ``x``, leaves eager's bits in ``out``."""
    x.copy_(x.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(out, fn(x, b))


@gpu
def test_erf_gelu_first_called_inside_a_cuda_graph_capture(cuda_fusion, monkeypatch):
    """A 16-bit erf GELU's first call inside a CUDA graph capture, where the GPU reads tables:
    making the table would run eager on the capturing stream (and break the capture), so the
    kernel keeps the formula: the capture holds, the replay gives eager's bits."""
    made = []

    def agree(device_key, name):  # tables pay on this GPU, whatever its memory (made once)
        made.append(name)
        return backend._table(name, torch.cuda.current_device()) is not None

    monkeypatch.setattr(backend, "_tables_agree", agree)
    torchfuse.clear_cache()
    fn, (x, b) = _gelu_of_rows(torch.bfloat16)
    key = torchfuse.register_fusion(trace(fn, x, b))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, = torchfuse.run_fusion(key, x, b)
    assert made == []
    for kernel in SPECS[key].kernels.values():
        kernel.launch.wait()
        assert kernel.launch.tables == []
    _assert_replays_eager(graph, out, fn, x, b)
    torchfuse.clear_cache()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_erf_gelu_table_filled_while_a_cuda_graph_is_captured(cuda_fusion, dtype, monkeypatch):
    """The vector entry loads (and its table is filled) on the background thread while the
    caller captures a CUDA graph: the capture holds, the entry serves the captured launches,
    and the replay gives eager's bits."""
    renderer = CUDARenderer(backend._memory_scale, lambda device, name: True)
    monkeypatch.setattr(backend.CUDABackend, "renderer", renderer)
    gate = threading.Event()
    build = backend._Launcher._build_vector

    def held(launcher):  # the background build waits for the capture to begin
        gate.wait(60)
        build(launcher)

    monkeypatch.setattr(backend._Launcher, "_build_vector", held)
    torchfuse.clear_cache()
    fn, (x, b) = _gelu_of_rows(dtype)
    backend._table(ops.GELU_TABLE.format(t=HALVES[dtype]), torch.cuda.current_device())
    key = torchfuse.register_fusion(trace(fn, x, b))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture asks
        torchfuse.run_fusion(key, x, b)
    torch.cuda.current_stream().wait_stream(side)
    launch = SPECS[key].kernels.values()[0].launch
    assert launch.tables and "vector32" not in launch.kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gate.set()
        launch.wait()
        out, = torchfuse.run_fusion(key, x, b)
    assert "vector32" in launch.kernels  # built, its table filled, during the capture
    _assert_replays_eager(graph, out, fn, x, b)
    torchfuse.clear_cache()


@gpu
@pytest.mark.parametrize("name", list(ops.TABLES))
def test_eager_tables_agree_with_the_pair_forms_here(cuda_fusion, name):
    """This GPU's eager gives, where a pair form computes instead of reading the table (the
    GELU's |x| < ops.GELU_NEAR), the results of the form's own arithmetic (ops.TABLES' agrees:
    a CPU model of it, checked against the kernel's bits by the test above); the backend reads
    tables on GPUs of memory scale 2 only. Both are made of real tensors where the first kernel
    renders under fake ones (torch.compile)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    table = ops.TABLES[name]
    key = backend.BACKEND.device_key(torch.device("cuda", 0))
    backend._tables.pop((name, 0), None)
    backend._tables_agree.cache_clear()
    with FakeTensorMode():
        pays = backend._tables_pay(key, name)
        eager = backend._table(name, 0)
    assert not isinstance(eager, FakeTensor)
    assert table.agrees(eager.cpu())
    x = ops.every_value(table.dtype).float()  # the model the pair form's polynomial fits:
    modelled = ops.erff_near(x)
    assert_same_bits(ops.eager_gelu_near0(x[modelled]).to(table.dtype), eager.cpu()[modelled])
    assert pays == (backend._memory_scale(key) == 2)


def test_fma32_rounds_once():
    """ops.fma32 (the CPU model of the GPU's fmaf that checks tables): the correctly rounded
    a * b + c, where a double sum would round twice (a product that is a float midpoint, nudged
    by a c far below double precision) and on random operands against exact fractions."""
    a = torch.tensor([4097.0, 4097.0, -4097.0, 4097.0])
    c = torch.tensor([2.0**-40, -(2.0**-40), -(2.0**-40), 0.0])
    got = ops.fma32(a, a.abs(), c).double() - torch.tensor([1, 1, -1, 1]) * 2.0**24
    assert got.tolist() == [8194, 8192, -8194, 8192]  # the last a tie: to even
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(3000, generator=g) * torch.exp2(torch.randint(-40, 40, (3000,),
               generator=g).float()) for _ in range(3))
    z[::2] = -(x[::2].double() * y[::2].double()).float()  # cancellations
    r = ops.fma32(x, y, z)
    neighbours = zip(torch.nextafter(r, torch.tensor(-math.inf)).tolist(),
                     torch.nextafter(r, torch.tensor(math.inf)).tolist())
    for a, b, c, got, (below, above) in zip(x.tolist(), y.tolist(), z.tolist(), r.tolist(),
                                            neighbours, strict=True):
        exact = Fraction(a) * Fraction(b) + Fraction(c)
        error = abs(Fraction(got) - exact)
        assert error <= abs(Fraction(below) - exact) and error <= abs(Fraction(above) - exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_near0_is_a_gelu_and_checks_tables(dtype):
    """ops.gelu_near0, the pair form's arithmetic near 0, is the GELU (float64's within an
    eighth of the dtype's epsilon, relative) and rounds as CUDA eager's arithmetic
    (ops.eager_gelu_near0) for every 16-bit input it serves where that models eager (the rest
    only a GPU's eager checks: the test above); a table that differs from it in one result it
    would compute is refused."""
    every = ops.every_value(dtype)
    x = every.float()
    near = x.abs() < ops.GELU_NEAR
    polynomial = ops.GELU_NEAR_POLYNOMIALS[dtype]
    mine = ops.gelu_near0(x[near], polynomial)
    want = x[near].double() * 0.5 * (1 + torch.special.erf(x[near].double() / math.sqrt(2)))
    tolerance = torch.finfo(dtype).eps / 8 * x[near].double().abs() + 2.0**-149
    assert ((mine.double() - want).abs() <= tolerance).all()
    modelled = ops.erff_near(x[near])
    assert 0 < (~modelled).sum() < 200
    assert_same_bits(mine[modelled].to(dtype), ops.eager_gelu_near0(x[near][modelled]).to(dtype))
    table = torch.where(near, ops.gelu_near0(x, polynomial).to(dtype), every.flip(0))
    assert ops.TABLES[ops.GELU_TABLE.format(t=HALVES[dtype])].agrees(table)
    table.view(torch.int16)[near.nonzero()[1000]] += 1
    assert not ops.TABLES[ops.GELU_TABLE.format(t=HALVES[dtype])].agrees(table)


DIVISORS = [3, 7.0, 0.1, -1e-3, 1e-45, 1e39, 0.0, -0.0, float("inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int32])
def test_division_by_a_number_is_eagers_bit_for_bit(device, dtype):
    """CUDA eager divides by a Python number as the product with its reciprocal in the compute
    type, the CPU divides: each device's fused kernel gives its eager's bits, specials too (a
    divisor of 0, ±inf, NaN, one whose float reciprocal overflows or underflows)."""
    x = make_input((4099,), dtype, device)
    for divisor in DIVISORS:
        fn = lambda a, d=divisor: a / d + 1  # noqa: E731
        assert_same_bits(_fused(fn, x)(x)[0], fn(x), f"x / {divisor}")


def test_cuda_divides_by_a_number_as_a_product_with_its_reciprocal():
    """The double's reciprocal rounded to the compute type, as eager's CUDA kernel takes it; a
    tensor divisor keeps the division (by its intrinsic: ops._div_cuda); floor and truncating
    division multiply by the float reciprocal of the float divisor (eager's
    div_floor_kernel_cuda, div_trunc_kernel_cuda)."""
    x = torch.randn(64)
    assert "v0 * 0.3333333432674408f" in _source(lambda a: a / 3, x)
    assert "v0 * 0.3333333333333333;" in _source(lambda a: a / 3, x.double())
    assert "v0 * (-1000.0f)" in _source(lambda a: a / -1e-3, x)  # 1 / -0.001f is -999.99994
    assert "v0 * 1.0000002153053333e-39f" in _source(lambda a: a / 1e39, x)  # float(1e39): inf
    assert "tf_round_f16((float)(v0 * 10.0f))" in _source(lambda a: a / 0.1, x.half())
    assert "__fdiv_rn(v0, v1)" in _source(lambda a, b: a / b, x, torch.randn(64))
    floor = _source(lambda a: torch.div(a, 7.0, rounding_mode="floor"), x)
    assert "tf_div_floor_rcpf(v0, 7.0f, 0.1428571492433548f)" in floor
    trunc = _source(lambda a: torch.div(a, 3.0, rounding_mode="trunc"), x)
    assert "truncf(v0 * 0.3333333432674408f)" in trunc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_rsqrt_is_eagers_bit_for_bit(device, dtype):
    """rsqrt is 1 / sqrt correctly rounded on the CPU and CUDA's rsqrt on the GPU, as each
    device's eager computes it: the same bits for every 16-bit input and random wider ones,
    from the first call's entry point and from the vector entry built after it."""
    x = _bit_patterns(dtype, device)
    # CUDA eager sends pow(x, -0.5) to its rsqrt (the CPU keeps float16 pow there)
    fns = (torch.rsqrt, lambda a: a**-0.5) if device.startswith("cuda") else (torch.rsqrt,)
    for fn in fns:
        run, want = _fused(fn, x), fn(x)
        for call in ("first", "vector"):
            assert_same_bits(run(x)[0], want, f"{call} call")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_rounding_is_eagers_bit_for_bit(device, dtype):
    """Every float32 class (random bit patterns: subnormals, ties, NaN, ±Inf, overflow) rounds
    to float16/bfloat16 exactly as eager rounds it, stored as such or rounded in flight and
    kept as a float; NaN stays NaN."""
    bits = torch.randint(-2**31, 2**31, (1 << 18,), dtype=torch.int64).to(torch.int32)
    ties = torch.arange(-2**15, 2**15, dtype=torch.int32) * 2**16 + 2**15  # halfway cases
    x = torch.cat([bits, ties]).view(torch.float32).to(device)
    one = torch.ones((), device=device)
    stored = lambda a, b: (a * b).to(dtype)  # noqa: E731
    in_flight = lambda a, b: (a * b).to(dtype).float()  # noqa: E731
    for fn in (stored, in_flight):
        assert_same_bits(_fused(fn, x, one)(x, one)[0], fn(x, one))
