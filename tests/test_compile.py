"""torch.compile(backend="torchfuse"), torchfuse.jit and explain: groups, modules, training."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import torchfuse
from conftest import assert_fused, assert_same, make_input
from torchfuse import executor
from torchfuse.demo import LSTMCell


class MLP(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x), approximate="tanh"))


def test_function_one_group(device):
    def f(x, y):
        return torch.sigmoid(x) * torch.tanh(y) + 1.0
    x, y = make_input((1000,), torch.float32, device), make_input((1000,), torch.float32, device)
    assert_fused(f, x, y, groups=1)


def test_two_groups_around_a_matmul(device):
    def f(x, w):
        h = torch.relu(x * 2 + 1)
        return torch.tanh(h @ w) * 0.5 - 1
    x = make_input((16, 8), torch.float32, device, specials=False)
    w = make_input((8, 4), torch.float32, device, specials=False)
    results = assert_fused(f, x, w, groups=2)
    reasons = [reason for r in results for _, target, reason in r.left_out if "mm" in target]
    assert reasons and "not a pointwise op" in reasons[0]


def test_lone_op_is_left_to_eager(device):
    x = make_input((10,), torch.float32, device)
    results = assert_fused(torch.sigmoid, x, groups=0)
    assert any("no fusible neighbour" in reason for _, _, reason in results[0].left_out)


def test_scalar_constants_and_broadcast(device):
    def f(x, b):
        return torch.where(x > 0, x * float("inf"), x + b).clamp(max=3.0) / 7 + float("nan") * 0
    x = make_input((5, 6), torch.float32, device)
    b = make_input((6,), torch.float32, device)
    assert_fused(f, x, b, groups=1)


def test_module_under_no_grad(device):
    model = LSTMCell(16, 32).to(device)
    shapes = ((4, 16), (4, 32), (4, 32))
    inputs = [make_input(s, torch.float32, device, specials=False) for s in shapes]
    with torch.no_grad():
        assert_fused(model, *inputs, groups=1)


def test_jit_function_module_and_decorator(device):
    model = MLP(8).to(device)
    x = make_input((4, 8), torch.float32, device, specials=False)
    assert_same(torchfuse.jit(model)(x), model(x))

    @torchfuse.jit
    def gated(a, b):
        return a * torch.sigmoid(a) * b
    assert_same(gated(x, x + 1), x * torch.sigmoid(x) * (x + 1))


def test_dynamic_shapes_reuse_kernels(device):
    f = torchfuse.jit(lambda x: F.silu(x) * 2 + x)
    for n in (8, 9, 10, 100, 1000):
        x = make_input((n,), torch.float32, device)
        assert_same(f(x), F.silu(x) * 2 + x)


def test_training_gradients_match_eager(device):
    torch.manual_seed(0)
    model = LSTMCell(8, 16).to(device)
    reference = LSTMCell(8, 16).to(device)
    reference.load_state_dict(model.state_dict())
    shapes = ((4, 8), (4, 16), (4, 16))
    inputs = [make_input(s, torch.float32, device, specials=False) for s in shapes]
    leaf = [t.clone().requires_grad_() for t in inputs]
    leaf_ref = [t.clone().requires_grad_() for t in inputs]
    with torchfuse.capture.collect() as results:
        hy, cy = torchfuse.jit(model)(*leaf)
        (hy.square().sum() + cy.sum()).backward()
    hy_ref, cy_ref = reference(*leaf_ref)
    (hy_ref.square().sum() + cy_ref.sum()).backward()
    assert_same((hy, cy), (hy_ref, cy_ref))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for a, b in zip(leaf, leaf_ref):
        torch.testing.assert_close(a.grad, b.grad)
    assert len(results) == 2  # forward and backward graphs
    assert all(r.groups for r in results), "the backward graph's pointwise ops are fused too"


def test_compiled_autograd_fuses_the_backward_graph(device):
    """Under compiled autograd the backend also gets the backward graph, its inputs a list:
    flattened, fused, and the gradients eager's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(device)
    reference = torch.nn.Linear(8, 8).to(device)
    reference.load_state_dict(model.state_dict())
    x = make_input((4, 8), torch.float32, device, specials=False)

    def step(m, x):
        return (F.gelu(m(x)) * torch.sigmoid(x)).sum()

    step(reference, x).backward()
    with torch._dynamo.config.patch(compiled_autograd=True), \
            torchfuse.capture.collect() as results:
        torch.compile(lambda x: step(model, x), backend="torchfuse")(x).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert len(results) == 2 and all(r.groups for r in results)


def test_training_activations_backward(device):
    x = make_input((64,), torch.float32, device, specials=False)
    for act in (F.gelu, F.silu, F.mish, F.hardswish, F.softplus, F.elu, F.leaky_relu, torch.tanh,
                torch.sigmoid, torch.relu, F.hardsigmoid):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        torchfuse.jit(lambda t, act=act: act(t * 1.5 + 0.1).sum())(a).backward()
        act(b * 1.5 + 0.1).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, act=act: f"{act}: {m}")


def test_explain_report():
    def f(x, y):
        return torch.relu(x @ y) * 2 + 1
    x = torch.randn(4, 4)
    report = torchfuse.explain(f, x, x)
    text = str(report)
    assert "fusion_0" in text and "mm" in text and "not a pointwise op" in text
    assert "tf_kernel" in text  # each group's kernel source
    assert len(report.groups) == 1 and "#include <stdint.h>" in report.groups[0].source
    mermaid = report.to_mermaid()
    assert mermaid.startswith("graph TD") and "fusion_0" in mermaid and "-->" in mermaid


def test_explain_covers_backward():
    x = torch.randn(8, requires_grad=True)
    report = torchfuse.explain(lambda t: torch.tanh(t * 2) * t, x)
    assert len(report.results) == 2
    assert x.grad is None  # explain leaves the caller's gradients alone


@pytest.mark.skipif("torchfuse" not in entry_points(group="torch_dynamo_backends").names,
                    reason="torchfuse is not pip-installed (no entry point)")
def test_backend_entry_point_without_import():
    # The string "torchfuse" resolves through the torch_dynamo_backends entry point.
    code = ("import torch\n"
            "f = torch.compile(lambda x: torch.sigmoid(x) * x + 1, backend='torchfuse')\n"
            "x = torch.randn(100)\n"
            "torch.testing.assert_close(f(x), torch.sigmoid(x) * x + 1)\n"
            "import sys; assert 'torchfuse' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_importing_torchfuse_leaves_dynamo_to_torch_compile():
    """The fuser's own interface needs no Dynamo (0.7 s to import): an installed torchfuse does
    not import it (a checkout on the path registers its backend with Dynamo on import, which
    needs it), and torch.compile with the backend works after it either way."""
    installed = "torchfuse" in entry_points(group="torch_dynamo_backends").names
    code = ("import sys, torch, torchfuse\n"
            f"assert {not installed} or 'torch._dynamo' not in sys.modules\n"
            "x = torch.randn(100)\n"
            "f = torch.compile(lambda a: torch.sigmoid(a) * a + 1, backend='torchfuse')\n"
            "torch.testing.assert_close(f(x), torch.sigmoid(x) * x + 1)\n"
            # nor Inductor's debug module (what Dynamo's aot_autograd helper imports: 50 ms)
            "assert 'torch._inductor.debug' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _view_ops(results) -> list[str]:
    """The split/slice nodes left in the compiled graphs."""
    return [n.name for r in results for n in r.graph.graph.nodes
            if n.op == "call_function" and ("split" in str(n.target) or "slice" in str(n.target))]


@pytest.mark.parametrize("dim", [0, 1])
def test_chunks_enter_the_group_as_pointers(device, dim, monkeypatch):
    """A chunk of a wider tensor is not a view op per call: the runner takes the wide tensor and
    hands the kernel pointers into it (rows of 4 chunks along dim 1, blocks along dim 0)."""
    def lstm(gates, c):
        i, f, g, o = gates.chunk(4, dim)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    gates = make_input((8, 24) if dim == 1 else (32, 6), torch.float32, device)
    c = make_input((8, 6), torch.float32, device)
    results = assert_fused(lstm, gates, c, groups=1)
    assert _view_ops(results) == []
    group = results[0].groups[0]
    assert len(group.inputs) == 2  # the gates tensor itself, and c
    assert not any("split" in target for _, target, _ in results[0].left_out)
    compiled = torch.compile(lstm, backend="torchfuse")
    compiled(gates, c)  # the first call builds the kernel through run, with real views
    runs = []
    original = executor.run
    monkeypatch.setattr(executor, "run", lambda *a: runs.append(a) or original(*a))
    for _ in range(2):  # then the runner passes pointers into gates itself
        gates = make_input(tuple(gates.shape), torch.float32, device)
        assert_same(compiled(gates, c), lstm(gates, c))
    assert runs == []


def test_slices_and_a_chunk_used_elsewhere(device):
    def f(x, y):
        a, b = x.split([3, 5], dim=1)
        return torch.tanh(x[:, 1:4]) * y + torch.sigmoid(a), b.sum()
    x = make_input((6, 8), torch.float32, device)
    y = make_input((6, 3), torch.float32, device)
    results = assert_fused(f, x, y, groups=1)
    assert results[0].groups[0].inputs.count("arg0_1") == 1  # x, once, for both views


def test_chunked_integer_division_by_zero_raises_eagers_error():
    def f(x):
        a, b = x.chunk(2, 1)
        return a // b + 1, a * b
    x = torch.randint(1, 9, (4, 6), dtype=torch.int32)
    compiled = torch.compile(f, backend="torchfuse")
    assert_same(compiled(x), f(x))
    x[2, 4] = 0  # in the second chunk: the kernel flags it, the fallback raises eager's error
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        compiled(x)


def test_of_two_errors_eagers_first_comes_first(device):
    # The group {remainder, div} runs after the shift the partitioner left between its members,
    # which raises too: eager's error is the remainder's (CPU: ZeroDivisionError).
    def f(x, y):
        r = torch.remainder(y, x)
        s = torch.bitwise_right_shift(x, 10000.0)
        return s, r / -0.0
    x = torch.zeros(5, 17, 8, dtype=torch.int32, device=device)
    y = torch.ones(5, 17, 1, dtype=torch.int32, device=device)
    torch._dynamo.reset()
    with pytest.raises(Exception) as eager:
        torch.compile(f, backend="aot_eager")(x, y)
    torch._dynamo.reset()
    with pytest.raises(eager.type, match=re.escape(str(eager.value)[:40])):
        torch.compile(f, backend="torchfuse")(x, y)


def test_a_graph_that_mutates_is_not_run_twice():
    graph = torch.fx.symbolic_trace(lambda x: x.add_(1).exp() * 2)
    traced = make_fx(graph)(torch.ones(3))
    assert torchfuse.capture._functional_copy(traced) is None
    traced = make_fx(lambda x: x.exp() * 2 + torch.rand_like(x))(torch.ones(3))
    assert torchfuse.capture._functional_copy(traced) is None
    traced = make_fx(lambda x: x.exp() * 2 + x.sum())(torch.ones(3))
    assert torchfuse.capture._functional_copy(traced)() is not None


@pytest.mark.parametrize("fn", [
    lambda x: torch.sub(x > 0, 1.5, alpha=0.5) * x,
    lambda x: torch.rsub(x.exp() > 1, 2.0) + x,
    lambda x: (torch.sub(x, True) * 2).exp(),
    lambda x: torch.pow(x > 0, x < 1) + x,
    lambda x: torch.floor(x > 0) * x,
    lambda x: torch.abs(x > 0).logical_not() * x,
    lambda x: torch.addcdiv(x, x > 0, x < 1) * 2,
])
def test_dtypes_eager_refuses_raise_its_error(fn):
    # Fake tensors let these through (Inductor computes them); eager refuses the dtypes.
    x = make_input((5, 4), torch.float32)
    with pytest.raises((RuntimeError, NotImplementedError)) as eager:
        fn(x)
    torch._dynamo.reset()
    with pytest.raises(eager.type):
        torch.compile(fn, backend="torchfuse")(x)


def test_ops_on_numbers_alone_stay_eager():
    # Dynamo decomposes addcdiv of two numbers into div(-1, 3.0) and a mul: no tensor operand.
    # Beside a complex x (not fused) they made a group of their own with no input, which failed.
    def f(x):
        return torch.addcdiv(x, -1, 3.0, value=2) * 2
    x = torch.randn(4, dtype=torch.complex64)
    torch._dynamo.reset()
    want = torch.compile(f, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert_same(torch.compile(f, backend="torchfuse")(x), want)


def _compile_spying_unwrap(fn, monkeypatch, **options):
    """fn compiled with torchfuse, and a list of what ``_unwrappable`` answered meanwhile."""
    answers = []
    real = torchfuse.capture._unwrappable

    def spy(fw, arguments):
        answers.append(real(fw, arguments))
        return answers[-1]
    monkeypatch.setattr(torchfuse.capture, "_unwrappable", spy)
    torch._dynamo.reset()
    return torch.compile(fn, backend="torchfuse", **options), answers


def _aliasing_outputs(x, y):
    z = x * y + 1
    return z.view(-1), z.t(), torch.sigmoid(z)


@pytest.mark.parametrize("fn, unwrapped", [
    (lambda x, y: torch.sigmoid(x) * y + 1, True),
    (_aliasing_outputs, True),  # views of an intermediate: the graph's own views, as eager's
    (lambda x, y: (x.t(), torch.tanh(x) * y), False),  # a view of an input: rebuilt by AOT
    (lambda x, y: x.mul_(2).add(y).exp(), False),  # an input mutated: written back by AOT
])
def test_inference_graph_runs_without_aots_wrapper_when_it_has_nothing_to_do(
        device, fn, unwrapped, monkeypatch):
    x, y = (make_input((8, 16), torch.float32, device) for _ in range(2))
    compiled, answers = _compile_spying_unwrap(fn, monkeypatch)
    x_eager = x.clone()
    want = fn(x_eager, y)
    for _ in range(2):  # the first call compiles, the second runs what was compiled
        x_got = x.clone()
        got = compiled(x_got, y)
        assert_same(got, want)
        assert_same(x_got, x_eager)
    assert answers == [unwrapped]
    if fn is _aliasing_outputs:
        assert got[0]._base is not None and got[0]._base is got[1]._base  # views, as eager's
        assert got[2]._base is None


def test_aots_wrapper_stays_for_training_autocast_and_dynamic_shapes(device, monkeypatch):
    def f(x, y):
        return torch.tanh(x) * y - 1
    x, y = (make_input((8, 16), torch.float32, device) for _ in range(2))
    compiled, answers = _compile_spying_unwrap(f, monkeypatch)
    a = x.clone().requires_grad_()
    compiled(a, y).sum().backward()  # a training graph: forward and backward compilers
    assert a.grad is not None and answers == []
    compiled, answers = _compile_spying_unwrap(f, monkeypatch)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert_same(compiled(x, y), f(x, y))
    assert answers == []  # under autocast it is not even asked
    compiled, answers = _compile_spying_unwrap(f, monkeypatch, dynamic=True)
    assert_same(compiled(x, y), f(x, y))
    assert answers == [False]  # symbolic outputs: AOT marks them dynamic for the next graph
