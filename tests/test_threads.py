"""Thread safety: many threads, mixed shapes and dtypes, every kernel compiled exactly once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

import torchfuse
from conftest import assert_same, make_input, reference, trace
from torchfuse import cache


def test_many_threads_compile_each_kernel_once(device):
    fn = lambda x, y: torch.tanh(x) * torch.sigmoid(y) - x / 3  # noqa: E731
    key = torchfuse.register_fusion(trace(fn, torch.randn(4), torch.randn(4)))
    spec = cache.SPECS[key]
    spec.kernels.clear()
    dtypes = [torch.float32, torch.float64, torch.int32]
    shapes = [(1000,), (7, 9), (33,)]
    barrier = threading.Barrier(16)
    before = cache.STATS.compiles

    def work(i: int) -> None:
        barrier.wait()  # all threads ask for the same kernels at the same moment
        for j in range(12):
            dtype, shape = dtypes[(i + j) % 3], shapes[(i * j) % 3]
            x, y = make_input(shape, dtype, device), make_input(shape, dtype, device)
            assert_same(torchfuse.run_fusion(key, x, y), fn(x, y), reference(fn, x, y))

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(work, i) for i in range(16)]:
            future.result()
    # contiguous inputs of any shape share one kernel per dtype
    assert len(spec.kernels) == 3
    assert cache.STATS.compiles - before == 3


def test_threads_register_the_same_graph():
    graphs = [trace(lambda a: a * 2 + 1, torch.randn(3)) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(torchfuse.register_fusion, graphs))
    assert len(set(keys)) == 1


def test_compiled_function_called_from_threads(device):
    f = torchfuse.jit(lambda x: torch.relu(x) * torch.exp(-x) + 1)
    x = make_input((256,), torch.float32, device)
    expected = torch.relu(x) * torch.exp(-x) + 1
    f(x)  # compile once up front; Dynamo's own compile is not what this tests
    with ThreadPoolExecutor(8) as pool:
        for out in pool.map(lambda _: f(x), range(64)):
            assert_same(out, expected)
