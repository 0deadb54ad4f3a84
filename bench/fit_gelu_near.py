"""How ops.GELU_NEAR_POLYNOMIALS were made: `python bench/fit_gelu_near.py`.

The pair form's GELU near 0 is x * fma(x, R(x * x), 0.5), R(t) a polynomial for
0.5 * erf(sqrt(t / 2)) / sqrt(t). For each degree this fits R by least squares reweighted toward
the least largest relative error of the GELU over 0 < x < ops.GELU_NEAR, rounds the coefficients
to float, and counts the 16-bit inputs |x| < GELU_NEAR whose result (ops.gelu_near0's arithmetic,
the GPU's) rounds otherwise than CUDA eager's (ops.eager_gelu_near0). A dtype takes the lowest
degree with none; the GPU checks it again against its own eager (ops.TABLES' agrees).
"""
import math

import torch

from torchfuse import ops


def fit(degree: int, points: int = 4000) -> tuple[int, ...]:
    """R's coefficients (float bits, the highest first)."""
    x = (torch.cos(torch.linspace(0, math.pi, points, dtype=torch.float64)) * 0.5 + 0.5)
    x = (x * ops.GELU_NEAR).clamp_min(1e-6)  # x > 0 (fitting x < 0 too, where the GELU is a
    t = x * x                                 # difference, took more inputs from eager's)
    r = 0.5 * torch.special.erf(x / math.sqrt(2)) / x
    y = x * (0.5 + x * r)
    a = torch.vander(t, degree + 1) * (t / y)[:, None]  # rows scaled: y's relative error
    b = r * t / y
    w = torch.ones_like(t)
    for _ in range(60):  # Lawson's reweighting toward the minimax fit
        c = torch.linalg.lstsq(a * w[:, None], b * w).solution
        err = (a @ c - b).abs()
        w = w * (err / err.max() + 1e-3).sqrt()
        w = w / w.mean()
    return tuple(c.float().view(torch.int32).to(torch.int64).bitwise_and(0xFFFFFFFF).tolist())


def differing(dtype: torch.dtype, coefficients: tuple[int, ...]) -> int:
    """How many 16-bit inputs near 0 round otherwise than eager's."""
    x = ops.every_value(dtype).float()
    x = x[x.abs() < ops.GELU_NEAR]
    mine = ops.gelu_near0(x, coefficients).to(dtype).view(torch.int16)
    return int((mine != ops.eager_gelu_near0(x).to(dtype).view(torch.int16)).sum())


def main() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        for degree in range(2, 8):
            coefficients = fit(degree)
            n = differing(dtype, coefficients)
            print(f"{dtype} degree {degree}: {n} inputs differ", flush=True)
            if n == 0:
                print("    (" + ", ".join(f"0x{c:08X}" for c in coefficients) + ")")
                break


if __name__ == "__main__":
    main()
