"""Whole fusion graphs through the fuser's own interface: keys, several outputs, broadcasting."""

from __future__ import annotations

import pytest
import torch

import torchfuse
from conftest import assert_matches_eager, assert_same, make_input, run_registered, trace
from torchfuse import cache


def gelu_mlp(x, bias, residual):
    h = x + bias
    g = 0.5 * h * (1 + torch.tanh(0.7978845608 * (h + 0.044715 * h * h * h)))
    return g + residual


def test_same_graph_other_names_same_key():
    x, y = torch.randn(8), torch.randn(8)
    g1 = trace(lambda a, b: torch.sigmoid(a) * b, x, y)
    g2 = trace(lambda p, q: torch.sigmoid(p) * q, x, y)
    for node in g2.graph.nodes:
        node.name = node.name + "_renamed"
    assert torchfuse.register_fusion(g1) == torchfuse.register_fusion(g2)
    assert torchfuse.register_fusion(g1.graph) == torchfuse.register_fusion(g1)
    g3 = trace(lambda a, b: torch.sigmoid(a) + b, x, y)
    assert torchfuse.register_fusion(g3) != torchfuse.register_fusion(g1)


def test_register_refuses_non_pointwise_ops():
    x = torch.randn(4, 4)
    with pytest.raises(torchfuse.NotFusible, match="mm"):
        torchfuse.register_fusion(trace(lambda a: torch.mm(a, a).relu(), x))


def test_run_fusion_unknown_key():
    with pytest.raises(KeyError):
        torchfuse.run_fusion(10**9, torch.randn(2))


def test_several_outputs_and_intermediates(device):
    def fn(x, y):
        a = torch.sigmoid(x)
        b = a * y
        return b, a, b + 1, (b > 0)
    x, y = make_input((33, 17), torch.float32, device), make_input((33, 17), torch.float32, device)
    assert_matches_eager(fn, x, y)


def test_outputs_of_different_shapes(device):
    # ``a`` depends only on the small input: written once, not once per broadcast repeat.
    def fn(small, big):
        a = small * 2 + 1
        return a, a * big, torch.exp(small)
    small = make_input((1, 7), torch.float32, device)
    big = make_input((5, 7), torch.float32, device)
    assert_matches_eager(fn, small, big)
    assert_matches_eager(fn, make_input((5, 1), torch.float32, device), big[:, :1].expand(5, 7))
    assert_matches_eager(fn, make_input((), torch.float32, device), big)
    # an empty input: the small input's outputs still have elements (eager's values, not
    # uninitialised memory)
    assert_matches_eager(fn, small, big[:0])
    assert_matches_eager(fn, make_input((), torch.float32, device), big[:, :0])


def test_output_that_is_an_input(device):
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    graph.output((a, graph.call_function(torch.ops.aten.add.Tensor, (a, b))))
    key = torchfuse.register_fusion(graph)
    x, y = make_input((6,), torch.float32, device), make_input((2, 6), torch.float32, device)
    assert_same(torchfuse.run_fusion(key, x, y), (x, x + y))


def test_new_shape_of_same_layout_compiles_nothing(device):
    fn = lambda x, y: torch.tanh(x) * y + x  # noqa: E731
    x = make_input((100,), torch.float32, device)
    key = torchfuse.register_fusion(trace(fn, x, x.clone()))
    torchfuse.run_fusion(key, x, x)
    before = cache.STATS.compiles
    for n in (1, 7, 1000, 4097):
        a = make_input((n,), torch.float32, device)
        assert_same(torchfuse.run_fusion(key, a, a), fn(a, a))
    for shape in ((3, 5), (2, 3, 4)):  # contiguous: flattened into the same kernel
        a = make_input(shape, torch.float32, device)
        assert_same(torchfuse.run_fusion(key, a, a), fn(a, a))
    assert cache.STATS.compiles == before


def test_gelu_mlp_block(device):
    x = make_input((64, 256), torch.float32, device, specials=False)
    bias = make_input((256,), torch.float32, device)
    residual = make_input((64, 256), torch.float32, device)
    assert_matches_eager(gelu_mlp, x, bias, residual)
    assert_matches_eager(gelu_mlp, x.t().contiguous().t(), bias, residual)


def test_large_parallel_input(device):
    fn = lambda x, y: torch.where(x > y, torch.log1p(x.abs()), y.clamp(-1, 1))  # noqa: E731
    x = make_input((1 << 20,), torch.float32, device)
    y = make_input((1 << 20,), torch.float32, device)
    assert_matches_eager(fn, x, y)
    assert_matches_eager(fn, x.view(1024, 1024).t(), y.view(1024, 1024))


def test_mixed_dtypes_promote_like_eager(device):
    fn = lambda a, b, c: (a + b) * c  # noqa: E731
    cases = [
        (torch.float16, torch.float32, torch.int64),
        (torch.int32, torch.int64, torch.bool),
        (torch.bfloat16, torch.float16, torch.float64),
        (torch.uint8, torch.int8, torch.int16),
    ]
    for dtypes in cases:
        inputs = [make_input((9, 4), d, device) for d in dtypes]
        assert_matches_eager(fn, *inputs)
        inputs[1] = make_input((), dtypes[1], device)  # a 0-d operand promotes more weakly
        assert_matches_eager(fn, *inputs)


def test_device_without_backend_falls_back():
    x = torch.randn(5)
    key = torchfuse.register_fusion(trace(lambda a, b: a + b, x, x.clone()))
    meta = torch.empty(5, device="meta")
    before = cache.STATS.fallbacks
    out, = torchfuse.run_fusion(key, meta, meta)  # no backend for "meta": eager runs it
    assert out.device.type == "meta" and out.shape == (5,)
    assert cache.STATS.fallbacks == before + 1


def test_shapes_that_do_not_broadcast_raise_like_eager():
    x = torch.randn(5)
    key = torchfuse.register_fusion(trace(lambda a, b: a * b + 1, x, x.clone()))
    with pytest.raises(RuntimeError, match="size of tensor"):
        torchfuse.run_fusion(key, torch.randn(5), torch.randn(4))


def test_inputs_requiring_grad_keep_autograd():
    x = torch.randn(6, requires_grad=True)
    key = torchfuse.register_fusion(trace(lambda a: torch.sigmoid(a) * 2, x.detach()))
    out, = torchfuse.run_fusion(key, x)
    assert out.requires_grad
    out.sum().backward()
    expected = torch.sigmoid(x.detach()) * (1 - torch.sigmoid(x.detach())) * 2
    torch.testing.assert_close(x.grad, expected)


def test_get_fused_kernel_code_is_c_source():
    x = torch.randn(10)
    gm = trace(lambda a: torch.sigmoid(a) * a, x)
    source = torchfuse.get_fused_kernel_code(gm, x)
    assert "tf_kernel" in source and "expf" in source
    half = torchfuse.get_fused_kernel_code(gm, x.half())
    assert "tf_round_f16" in half


def test_outputs_follow_the_inputs_memory_layout(device):
    # Eager gives a transposed input's result transposed strides; code after the fusion may
    # depend on them (a view that only fits that layout).
    def fn(x):
        y = torch.sigmoid(x.t()) * 2
        return y.t().view(-1)
    x = make_input((4, 6), torch.float32, device)
    assert_same(torch.compile(fn, backend="torchfuse")(x), fn(x))
    for t in (x.t(), make_input((3, 4, 5), torch.float32, device).permute(2, 0, 1)):
        out, = run_registered(lambda a: torch.exp(a) + 1, t)
        assert out.stride() == (torch.exp(t) + 1).stride()
