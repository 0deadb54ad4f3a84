"""Every CPU kernel's loop is a vector loop, where eager's is: gcc's own report (-fopt-info-vec)
on the kernel each op renders to, for each floating-point dtype, and for bool masks and casts.

A loop gcc cannot vectorise still computes eager's values, 5-30x slower (softplus, logaddexp,
floor division, fmax, clamp by tensors, a float16 floor, a bool mask times a tensor all ran so):
only this test sees it. Scalar by design, and not checked: integer division, remainder and pow by
a tensor (x86 has no vector integer division; eager's loops are scalar too), and kernels whose
result is a constant (gcc makes their loop a memset).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile

import pytest
import torch

import torchfuse
from conftest import trace
from test_ops import CASES, FLOATS, _inputs
from torchfuse.config import config
from torchfuse.devices import cpu as cpu_backend
from torchfuse.ir import NotFusible

_GCC = "gcc version" in subprocess.run([config.cc, "-v"], capture_output=True, text=True).stderr
pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not _GCC or not torchfuse.can_fuse("cpu"),
    reason="gcc's vectorizer report, on x86-64")

# (op, dtype) that gcc 12 leaves scalar: a bfloat16 rounding compared into a bool
SCALAR = {("isfinite", torch.bfloat16)}
# The loops over elements: the plain entry's, the streamed one's (TF_STREAMED) and VML's chunks'
_LOOP = re.compile(r"for \(int64_t (i = 0; i < n; i|k = 0; k < m; k)\+\+\)")


def _vectorised(fn, *inputs) -> bool:
    """Whether gcc vectorises each loop over elements of ``fn``'s kernel (in the entry that has
    it: a loop is compiled with TF_STREAMED or without)."""
    try:
        source = torchfuse.get_fused_kernel_code(trace(fn, *inputs), *inputs)
    except NotFusible:
        pytest.skip("not fused")
    loops = {n + 1 for n, line in enumerate(source.splitlines()) if _LOOP.search(line)}
    assert loops, source
    # without OpenMP, whose lowering reports the loop at other lines (its body is the same)
    flags = [f for f in cpu_backend._flags(config.cc, config.cflags)
             if f not in ("-shared", "-fopenmp")]
    vectorised = set()
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "kernel.c")
        with open(path, "w") as f:
            f.write(source)
        for entry in ((), ("-DTF_STREAMED",)):
            report = subprocess.run(
                [config.cc, *flags, *entry, "-fopt-info-vec-optimized", "-c", "-o", os.devnull,
                 path], capture_output=True, text=True, check=True).stderr
            vectorised.update(map(int, re.findall(r"kernel\.c:(\d+):\d+: optimized: loop vec",
                                                  report)))
    return loops <= vectorised


PARAMS = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
          for name, (_, _, dtypes) in CASES.items() for dtype in FLOATS if dtype in dtypes]


@pytest.mark.parametrize("sleef_all", [False, True], ids=["default", "sleef_all"])
@pytest.mark.parametrize("name,dtype", PARAMS)
def test_op_loops_vectorise(name, dtype, sleef_all):
    if sleef_all and (dtype != torch.float32 or cpu_backend.sleef_functions() is None):
        pytest.skip("every SLEEF function: float32 (16-bit results call them by default)")
    fn, arity, _ = CASES[name]
    inputs = _inputs(name, arity, dtype)
    try:
        fn(*inputs)
    except (RuntimeError, NotImplementedError):
        pytest.skip("eager refuses the dtype")
    with torchfuse.config.override(sleef_all=sleef_all):
        assert _vectorised(fn, *inputs) != ((name, dtype) in SCALAR)


# Bool masks, and the conversions beside them: integer square, float -> integer -> float
MASKED = {
    "x * mask": lambda x, m: x * m,
    "mask.to(x) + x": lambda x, m: m.to(x.dtype) + x,
    "(mask & (x > 0)) * x": lambda x, m: (m & (x > 0)) * x,
    "where(mask, x, -x)": lambda x, m: torch.where(m, x, -x),
    "x.masked_fill(mask, 0) * 2": lambda x, m: x.masked_fill(m, 0.0) * 2,
    "square(int32)": lambda x, m: torch.square(x.to(torch.int32)) + m,
    "x.to(int32).to(x) * mask": lambda x, m: x.to(torch.int32).to(x.dtype) * m,
    "x.to(int64).to(x) * mask": lambda x, m: x.to(torch.int64).to(x.dtype) * m,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MASKED)
def test_bool_mask_loops_vectorise(name, dtype):
    x, mask = torch.randn(64, dtype=dtype), torch.rand(64) > 0.5
    assert _vectorised(MASKED[name], x, mask)
