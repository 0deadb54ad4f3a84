"""C for the CPU: one OpenMP-parallel function per (KernelSpec, ArgSpec).

The kernel takes one array of int64: ``[numel, sizes[R], strides[K][R], pointers[K]]`` where R is
the ArgSpec's rank and K the number of operands (inputs, then outputs). It returns 0, or an
error code (see spec.ERRORS). The innermost loop is written so that gcc vectorises it.
"""

from __future__ import annotations

import re

from ..config import config
from ..spec import BROADCAST, ArgSpec
from .cstyle import STORAGE_TYPES, CStyleRenderer, TypedGraph, helpers_for

PREAMBLE = r"""#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <math.h>

#define TF_FN static inline
typedef _Float16 tf_half;
TF_FN float tf_h2f(tf_half h) { return (float)h; }
TF_FN tf_half tf_f2h(float f) { return (tf_half)f; }
TF_FN uint32_t tf_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
TF_FN float tf_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
"""

# The math functions glibc (>= 2.35, x86-64) has vector variants of, in libmvec. Declared
# `simd`, gcc calls those variants from vectorised loops without -ffast-math, so NaN, Inf and
# signed zeros keep their meaning (accuracy: within 4 ulp). The CPU backend defines
# TF_VECTOR_MATH, and links libmvec, only where that glibc is present.
VECTOR_MATH = ("acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "cos", "cosh",
               "erf", "erfc", "exp", "exp10", "exp2", "expm1", "hypot", "log", "log10", "log1p",
               "log2", "pow", "sin", "sinh", "tan", "tanh")
_BINARY = ("atan2", "hypot", "pow")
_CALL = re.compile(rf"\b({'|'.join(VECTOR_MATH)})(f?|##S)\(")  # ##S: a helper, both types
VECTOR_MATH_GUARD = r"""#ifdef TF_VECTOR_MATH
#define TF_SIMD __attribute__((simd("notinbranch")))
#else
#define TF_SIMD
#endif"""


def vector_math_declarations(code: str) -> str:
    """``simd`` declarations of the vectorisable math functions ``code`` calls."""
    calls = set()
    for name, suffix in _CALL.findall(code):
        calls.update([(name, "f"), (name, "")] if suffix == "##S" else [(name, suffix)])
    if not calls:
        return ""
    lines = [VECTOR_MATH_GUARD]
    for name, suffix in sorted(calls):
        t = "float" if suffix else "double"
        params = f"{t}, {t}" if name in _BINARY else t
        lines.append(f"TF_SIMD {t} {name}{suffix}({params});")
    return "\n".join(lines)


class CRenderer(CStyleRenderer):
    preamble = PREAMBLE

    def render(self, typed: TypedGraph, argspec: ArgSpec) -> str:
        graph, dtypes = typed.graph, typed.dtypes
        rank, n_in = argspec.rank, graph.n_inputs
        codes = [d.inner for d in argspec.inputs] + [inner for inner, _ in argspec.outputs]
        out_dtypes = [dtypes[o] for o in graph.outputs]
        k = len(codes)
        lines = [
            "int tf_kernel(const int64_t* restrict args) {",
            "  const int64_t n = args[0];",
            "  const int64_t* restrict size = args + 1;",
            f"  const int64_t* restrict stride = args + {1 + rank};",
            "  (void)size; (void)stride;",
        ]
        pointer_base = 1 + rank + k * rank
        for i, dtype in enumerate(dtypes[:n_in]):
            t = STORAGE_TYPES[dtype]
            lines.append(f"  const {t}* restrict in{i} = (const {t}*)(intptr_t)args[{pointer_base + i}];")
        for o, dtype in enumerate(out_dtypes):
            t = STORAGE_TYPES[dtype]
            lines.append(f"  {t}* restrict out{o} = ({t}*)(intptr_t)args[{pointer_base + n_in + o}];")
        lines.append("  int err = 0;")
        lines.append("  if (n == 0) return 0;")
        parallel = f"if(n >= {config.parallel_threshold}) schedule(static) reduction(|:err)"
        if rank == 1:
            lines.append(f"  #pragma omp parallel for simd {parallel}")
            lines.append("  for (int64_t i = 0; i < n; i++) {")
            lines += self._inner(typed, argspec, codes, "i", lambda p: "0", lambda p: f"stride[{p}]")
            lines.append("  }")
        else:
            lines += self._rows(typed, argspec, codes, parallel)
        lines += ["  return err;", "}"]
        kernel = "\n".join(lines)
        helpers = helpers_for(kernel)
        declarations = vector_math_declarations(helpers + kernel)
        return "\n".join([self.preamble, declarations, helpers, "", kernel, ""])

    def _rows(self, typed: TypedGraph, argspec: ArgSpec, codes: list[str], parallel: str):
        """Rank >= 2: one parallel loop over rows (all outer dims), a simd loop over the inner."""
        rank, k = argspec.rank, len(codes)
        partial = argspec.partial_outputs
        n_in = len(argspec.inputs)
        lines = [
            f"  const int64_t inner = size[{rank - 1}];",
            "  const int64_t rows = n / inner;",
            f"  #pragma omp parallel for {parallel}",
            "  for (int64_t row = 0; row < rows; row++) {",
            "    int64_t rem = row;",
            f"    int64_t {', '.join(f'b{p} = 0' for p in range(k))};",
        ]
        for o, is_partial in enumerate(partial):
            if is_partial:
                lines.append(f"    int w{o} = 1;")
        for d in range(rank - 2, -1, -1):
            lines.append(f"    {{ const int64_t idx = rem % size[{d}]; rem /= size[{d}];")
            for p in range(k):
                lines.append(f"      b{p} += idx * stride[{p * rank + d}];")
            for o, is_partial in enumerate(partial):
                if is_partial:
                    lines.append(f"      w{o} &= (idx == 0) | (stride[{(n_in + o) * rank + d}] != 0);")
            lines.append("    }")
        lines.append("    #pragma omp simd reduction(|:err)")
        lines.append("    for (int64_t j = 0; j < inner; j++) {")
        lines += self._inner(
            typed, argspec, codes, "j", lambda p: f"b{p}", lambda p: f"stride[{p * rank + rank - 1}]"
        )
        lines += ["    }", "  }"]
        return lines

    def _inner(self, typed, argspec, codes, j, base, stride) -> list[str]:
        """Loads, the body and stores for one element; ``base(p)``/``stride(p)`` of operand p."""
        graph, dtypes = typed.graph, typed.dtypes
        n_in = graph.n_inputs
        pad = "    " if j == "i" else "      "
        lines = []
        for i in range(n_in):
            index = self.inner_index(codes[i], base(i), j, stride(i))
            lines.append(f"{pad}const {self.ctype(dtypes[i])} v{i} = {self.load(f'in{i}', index, dtypes[i])};")
        lines += [pad + s for s in self.body(typed)]
        for o, value in enumerate(graph.outputs):
            p = n_in + o
            index = self.inner_index(codes[p], base(p), j, stride(p))
            store = self.store(f"out{o}", index, f"v{value}", dtypes[value])
            if argspec.partial_outputs[o]:
                guard = f"{j} == 0" if codes[p] == BROADCAST else "1"
                if j == "j":
                    guard = f"w{o} && ({guard})"
                store = f"if ({guard}) {store}"
            lines.append(pad + store)
        return lines

