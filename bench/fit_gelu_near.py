"""How ops.GELU_NEAR_POLYNOMIALS were made: `python bench/fit_gelu_near.py` on a GPU (needs scipy).

The pair form's GELU near 0 is x * fma(x, R(x * x), 0.5), R(t) a polynomial for
0.5 * erf(sqrt(t / 2)) / sqrt(t). For each degree this tries two fits of R, each rounded to
float: the widest margin, in float ulps of the result, between the GELU and the nearest rounding
boundary of eager's 16-bit result at every input (a linear program), and least squares
reweighted toward the least largest relative error over 0 < x < ops.GELU_NEAR. It counts the
16-bit inputs |x| < GELU_NEAR whose result (ops.gelu_near0's arithmetic, the GPU's) rounds
otherwise than eager's and, where a few do, searches coefficients a few float ulps away (seeded:
the same run gives the same numbers). A dtype takes the lowest degree that gets none.

Eager's results: the GPU's own where there is one; on the CPU only the model of its erff's near
polynomial (ops.eager_gelu_near0, |x| < 1.4195), past which erff's exp2 (ex2.approx) has no CPU
model. The kernels' GPU checks the result against its own eager anyway (ops.TABLES' agrees).
"""
import math
import random

import numpy as np
import torch

from torchfuse import ops


def eager(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16-bit inputs |x| < GELU_NEAR whose eager results are known here, and those."""
    every = ops.every_value(dtype)
    if torch.cuda.is_available():
        known = every.float().abs() < ops.GELU_NEAR
        results = torch.nn.functional.gelu(every.cuda()).cpu()[known]
    else:
        known = (every.float().abs() < ops.GELU_NEAR) & ops.erff_near(every.float())
        results = ops.eager_gelu_near0(every.float()[known]).to(dtype)
    return every.float()[known], results


def least_squares(degree: int, points: int = 4000) -> np.ndarray:
    """R's coefficients (the highest first) by Lawson's reweighted least squares."""
    x = (torch.cos(torch.linspace(0, math.pi, points, dtype=torch.float64)) * 0.5 + 0.5)
    x = (x * ops.GELU_NEAR).clamp_min(1e-6)  # x > 0 (fitting x < 0 too, where the GELU is a
    t = x * x                                 # difference, took more inputs from eager's)
    r = 0.5 * torch.special.erf(x / math.sqrt(2)) / x
    y = x * (0.5 + x * r)
    a = torch.vander(t, degree + 1) * (t / y)[:, None]  # rows scaled: y's relative error
    b = r * t / y
    w = torch.ones_like(t)
    for _ in range(60):  # toward the minimax fit
        c = torch.linalg.lstsq(a * w[:, None], b * w).solution
        err = (a @ c - b).abs()
        w = w * (err / err.max() + 1e-3).sqrt()
        w = w / w.mean()
    return c.numpy()


def widest_margin(degree: int, x: torch.Tensor, results: torch.Tensor) -> np.ndarray:
    """R's coefficients whose GELU, computed exactly, keeps the widest margin inside the interval
    of reals that round to eager's result at every input (|x| > 1e-3: below, 0.5 * x decides)."""
    from scipy.optimize import linprog

    keep = x.abs() > 1e-3
    x, h = x[keep].double(), results[keep]
    bits = h.view(torch.int16).to(torch.int32)
    up, down = ((bits + d).to(torch.int16).view(h.dtype).double() for d in (1, -1))
    value = h.double()
    lo, hi = (f(value + up, value + down) / 2 for f in (torch.minimum, torch.maximum))
    ulp = value.abs().numpy() * 2.0**-24
    t = x * x
    a = torch.stack([t * t**k for k in range(degree, -1, -1)], 1).numpy() / ulp[:, None]
    low, high = (lo - 0.5 * x).numpy() / ulp, (hi - 0.5 * x).numpy() / ulp
    one = np.ones((len(ulp), 1))
    objective = np.zeros(degree + 2)
    objective[-1] = -1  # maximise the margin m: a c - m >= low, a c + m <= high
    solution = linprog(objective, A_ub=np.vstack([np.hstack([-a, one]), np.hstack([a, one])]),
                       b_ub=np.concatenate([-low, high]), bounds=[(None, None)] * (degree + 2))
    return solution.x[:-1]


def as_bits(coefficients) -> tuple[int, ...]:
    floats = np.asarray(coefficients, dtype=np.float32)
    return tuple(int(b) for b in floats.view(np.uint32))


def differing(coefficients: tuple[int, ...], x: torch.Tensor, results: torch.Tensor) -> int:
    """How many inputs round otherwise than eager's."""
    mine = ops.gelu_near0(x, coefficients).to(results.dtype).view(torch.int16)
    return int((mine != results.view(torch.int16)).sum())


def search(coefficients: tuple[int, ...], x: torch.Tensor, results: torch.Tensor,
           tries: int = 3000) -> tuple[tuple[int, ...], int]:
    """Coefficients a few float ulps away from these, as few inputs differing as found (where a
    few differ to start with: many are no near miss)."""
    rng = random.Random(1)
    best, n = list(coefficients), differing(coefficients, x, results)
    for _ in range(tries if n <= 8 else 0):
        if n == 0:
            break
        candidate = list(best)
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(candidate))
            candidate[i] = (candidate[i] + rng.randint(-8, 8)) & 0xFFFFFFFF
        m = differing(tuple(candidate), x, results)
        if m <= n:
            best, n = candidate, m
    return tuple(best), n


def main() -> None:
    if not torch.cuda.is_available():
        print("no GPU: eager's results known only where its erff takes the near polynomial")
    for dtype in (torch.float16, torch.bfloat16):
        x, results = eager(dtype)
        for degree in range(2, 8):
            fits = {"widest margin": widest_margin(degree, x, results),
                    "least squares": least_squares(degree)}
            for name, fit in fits.items():
                coefficients, n = search(as_bits(fit), x, results)
                print(f"{dtype} degree {degree}, {name}: {n} inputs differ", flush=True)
                if n == 0:
                    break
            if n == 0:
                print("    (" + ", ".join(f"0x{c:08X}" for c in coefficients) + ")")
                break


if __name__ == "__main__":
    main()
