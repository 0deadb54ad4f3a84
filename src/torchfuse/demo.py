"""The demo: torchfuse on real model code, checked against eager, timed against eager.

    python -m torchfuse.demo [--device cpu|cuda]

Three pieces of model code that are mostly pointwise work: an LSTM cell (the gates after the
matmuls), a GPT-style MLP block's bias + GELU + residual, and one Adam update step. For each it
prints what torchfuse fused (the explain report), checks the results against eager PyTorch, and
prints the time per call of eager and of torchfuse.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F

import torchfuse
from torchfuse import bench


class LSTMCell(torch.nn.Module):
    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.ih = torch.nn.Linear(n_in, 4 * n_hidden)
        self.hh = torch.nn.Linear(n_hidden, 4 * n_hidden)

    def forward(self, x, hx, cx):
        gates = self.ih(x) + self.hh(hx)
        i, f, g, o = gates.chunk(4, 1)
        cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cy), cy


def mlp_epilogue(h, bias, residual):
    """What follows the up-projection matmul in a GPT MLP block: bias, GELU, residual add."""
    return F.gelu(h + bias, approximate="tanh") + residual


def adam_step(param, grad, exp_avg, exp_avg_sq, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              step=10):
    exp_avg = exp_avg * beta1 + grad * (1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    return param - lr / (1 - beta1**step) * exp_avg / denom, exp_avg, exp_avg_sq


def _time(fns, *args, repeat: int) -> list[float]:
    """Seconds per call of each of ``fns``: the best of ``repeat`` rounds, each round calling
    every one in turn (the bench's timing: timed one after the other by medians, the LSTM cell's
    speed-up on a 2-vCPU VM ranged from 0.83x to 2.5x between runs)."""
    plan = bench.Plan(large=0, budget_s=0.0, min_reps=repeat, max_reps=repeat)
    calls = {k: functools.partial(fn, *args) for k, fn in enumerate(fns)}
    best = bench.time_columns(calls, args[0].device, plan, large=True)
    return [best[k] for k in calls]


def _check(got, want) -> float:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    return max((g - w).abs().max().item() for g, w in zip(got, want))


def workloads(device: str, n: int):
    torch.manual_seed(0)
    rows = max(1, n // 1024)

    def rand(*shape):
        return torch.randn(*shape, device=device)

    lstm = LSTMCell(32, 256).to(device)  # small matmuls: the gates' pointwise work dominates
    batch = max(1, n // 1024)
    yield "LSTM cell", lstm, (rand(batch, 32), rand(batch, 256), rand(batch, 256))
    yield "MLP bias+GELU+residual", mlp_epilogue, (rand(rows, 1024), rand(1024),
                                                   rand(rows, 1024))
    yield "Adam step", adam_step, (rand(n), rand(n), rand(n), rand(n).abs())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    device = args.device
    print(f"torchfuse {torchfuse.__version__} | torch {torch.__version__} | device {device} | "
          f"can fuse: {torchfuse.can_fuse(device)}")
    rows = []
    for name, fn, inputs in workloads(device, args.elements):
        print(f"\n===== {name} =====")
        with torch.no_grad():
            report = torchfuse.explain(fn, *inputs)
            text = str(report)
            print(text[: text.find("\n-- kernel source")] if "-- kernel source" in text else text)
            print("\nMermaid:\n" + report.to_mermaid())
            if report.groups:
                print(f"\nkernel of {report.groups[0].name} (inner loop):")
                source = report.groups[0].source
                print(source[source.find("int tf_kernel"):] if "tf_kernel" in source else source)
            fused = torchfuse.jit(fn)
            error = _check(fused(*inputs), fn(*inputs))
            eager_s, fused_s = _time([fn, fused], *inputs, repeat=args.repeat)
        print(f"\nmatches eager (max abs difference {error:.2e}); "
              f"eager {eager_s * 1e3:.3f} ms, torchfuse {fused_s * 1e3:.3f} ms, "
              f"speed-up {eager_s / fused_s:.2f}x")
        rows.append((name, eager_s, fused_s))
    info = torchfuse.cache_info()
    print("\n===== summary =====")
    print(f"{'workload':<26}{'eager ms':>10}{'torchfuse ms':>14}{'speed-up':>10}")
    for name, eager_s, fused_s in rows:
        print(f"{name:<26}{eager_s * 1e3:>10.3f}{fused_s * 1e3:>14.3f}{eager_s / fused_s:>9.2f}x")
    geo = math.exp(sum(math.log(e / f) for _, e, f in rows) / len(rows))
    print(f"geometric mean speed-up {geo:.2f}x | kernels compiled {info['compiles']} "
          f"({info['compile_seconds']:.2f} s), loaded from disk {info['disk_hits']}, "
          f"fallbacks {info['fallbacks']}")


if __name__ == "__main__":
    main()
