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


# libmvec sends a vector holding any lane outside these functions' domain (x < 0; x < -1 for
# log1p) down a scalar path, 5-20x slower; where(x > 0, log(x), ...) has such lanes everywhere.
# The wrappers give those lanes the argument whose result is +0 (blending bits: gcc sees through
# a select, folds log(1) and calls log(x) after all), then add what the domain gives there:
# -inf at its edge, NaN beyond it and for NaN, and -0 (which changes no result) inside it.
_DOMAINS = {"log": ("0", "1"), "log2": ("0", "1"), "log10": ("0", "1"), "log1p": ("-1", "0")}
_GUARDED = re.compile(rf"\b({'|'.join(_DOMAINS)})(f?)\(")
_GUARD = """TF_FN {T} tf_{name}({T} x) {{
  const {T} neutral = {zero};
  {U} bits, neutral_bits, inside = -({U})(x > {edge});
  memcpy(&bits, &x, sizeof x);
  memcpy(&neutral_bits, &neutral, sizeof x);
  bits = (bits & inside) | (neutral_bits & ~inside);
  {T} argument;
  memcpy(&argument, &bits, sizeof x);
  return {name}(argument) + (x > {edge} ? ({T})-0.0 : (x == {edge} ? -INFINITY : NAN));
}}"""


def guard_domains(expr: str) -> str:
    """``expr`` with its log-like calls through the domain wrappers."""
    return _GUARDED.sub(r"tf_\1\2(", expr)


def domain_guards(code: str) -> str:
    """The domain wrappers ``code`` calls."""
    used = sorted(set(re.findall(rf"\btf_({'|'.join(_DOMAINS)})(f?)\(", code)))
    return "\n".join(
        _GUARD.format(T="float" if f else "double", U="uint32_t" if f else "uint64_t",
                      name=name + f, edge=_DOMAINS[name][0], zero=_DOMAINS[name][1])
        for name, f in used)


# A fresh output this big comes from mmap, and its first touch faults in every 4 KiB page;
# asking for 2 MiB pages first cuts the faults 512-fold (a fresh 64 MiB output: 18 -> 8 ms).
# A hint only: where the system has no transparent huge pages, nothing changes.
HUGE_PAGES = r"""#ifdef __linux__
#include <sys/mman.h>
#endif
TF_FN void tf_huge_pages(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t huge = (uintptr_t)1 << 21;
  uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
  uintptr_t end = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
  if (bytes >= (4 << 20) && end > start) madvise((void*)start, end - start, MADV_HUGEPAGE);
#else
  (void)p; (void)bytes;
#endif
}"""


def parallel_threshold(body: list[str]) -> int:
    """The element count from which a kernel runs on all threads: each call of a math function
    in the body counts as one more element's worth of work (measured: a thread pays off from
    ~8K elements of plain arithmetic, from ~2K elements of an LSTM cell's five calls)."""
    calls = sum(len(_CALL.findall(line)) + len(re.findall(r"\btf_log", line)) for line in body)
    return max(1, config.parallel_threshold // (1 + calls))


class CRenderer(CStyleRenderer):
    preamble = PREAMBLE

    def render(self, typed: TypedGraph, argspec: ArgSpec) -> str:
        codes = [d.inner for d in argspec.inputs] + [inner for inner, _ in argspec.outputs]
        lines = self._prologue(typed, argspec, len(codes))
        # "parallel:" keeps the condition off the simd part of "parallel for simd": below the
        # threshold the loop still runs vectorised, on one thread.
        parallel = (f"if(parallel: n >= {parallel_threshold(self.body(typed))}) "
                    "schedule(static) reduction(|:err)")
        if argspec.rank == 1:
            lines.append(f"  #pragma omp parallel for simd {parallel}")
            lines.append("  for (int64_t i = 0; i < n; i++) {")
            lines += self._inner(typed, argspec, codes, "i", lambda p: "0",
                                 lambda p: f"stride[{p}]")
            lines.append("  }")
        else:
            lines += self._rows(typed, argspec, codes, parallel)
        lines += ["  return err;", "}"]
        kernel = "\n".join(lines)
        helpers = "\n".join(filter(None, [helpers_for(kernel), domain_guards(kernel),
                                          HUGE_PAGES]))
        declarations = vector_math_declarations(helpers + kernel)
        return "\n".join([self.preamble, declarations, helpers, "", kernel, ""])

    def body(self, typed: TypedGraph) -> list[str]:
        return [guard_domains(line) for line in super().body(typed)]

    @staticmethod
    def _prologue(typed: TypedGraph, argspec: ArgSpec, k: int) -> list[str]:
        """The kernel's signature and its arguments unpacked: sizes, strides, pointers."""
        rank, n_in = argspec.rank, typed.graph.n_inputs
        lines = [
            "int tf_kernel(const int64_t* restrict args) {",
            "  const int64_t n = args[0];",
            "  const int64_t* restrict size = args + 1;",
            f"  const int64_t* restrict stride = args + {1 + rank};",
            "  (void)size; (void)stride;",
        ]
        pointers = 1 + rank + k * rank
        for i, dtype in enumerate(typed.dtypes[:n_in]):
            t = STORAGE_TYPES[dtype]
            lines.append(f"  const {t}* restrict in{i} = "
                         f"(const {t}*)(intptr_t)args[{pointers + i}];")
        for o, value in enumerate(typed.graph.outputs):
            t = STORAGE_TYPES[typed.dtypes[value]]
            lines.append(f"  {t}* restrict out{o} = ({t}*)(intptr_t)args[{pointers + n_in + o}];")
        lines += ["  int err = 0;", "  if (n == 0) return 0;"]
        return lines + [f"  tf_huge_pages(out{o}, n * (int64_t)sizeof(*out{o}));"
                        for o, partial in enumerate(argspec.partial_outputs) if not partial]

    def _rows(self, typed: TypedGraph, argspec: ArgSpec, codes: list[str], parallel: str):
        """Rank >= 2: one parallel loop over rows (all outer dims), a simd loop over the inner."""
        rank, k = argspec.rank, len(codes)
        partial = argspec.partial_outputs
        n_in = len(argspec.inputs)
        stride_of = lambda p, d: f"stride[{p * rank + d}]"  # noqa: E731
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
                lines.append(f"      b{p} += idx * {stride_of(p, d)};")
            for o, is_partial in enumerate(partial):
                if is_partial:
                    own = stride_of(n_in + o, d)
                    lines.append(f"      w{o} &= (idx == 0) | ({own} != 0);")
            lines.append("    }")
        lines.append("    #pragma omp simd reduction(|:err)")
        lines.append("    for (int64_t j = 0; j < inner; j++) {")
        lines += self._inner(typed, argspec, codes, "j", lambda p: f"b{p}",
                             lambda p: stride_of(p, rank - 1))
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
            value = self.load(f"in{i}", index, dtypes[i])
            lines.append(f"{pad}const {self.ctype(dtypes[i])} v{i} = {value};")
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

