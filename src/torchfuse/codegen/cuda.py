"""CUDA C for NVIDIA GPUs: one source per (KernelSpec, ArgSpec), compiled by NVRTC.

Operands follow codegen/c.py: inputs, then outputs; sizes, then per-operand strides per dimension
(in elements). Every entry point takes them as separate scalar parameters::

    (int64 n, int64 size[R], int64 stride[K][R], pointer[K] [, int* error])

A source holds up to three entry points over the same element body, each a grid-stride loop (the
launcher gives it a thread per element or vector; the loop serves grids past the hardware's
limit) under ``#ifdef TF_ENTRY_<name>``; the backend compiles one at a time (``scalar32`` when
the kernel is built, ``vector32`` right after on a background thread, ``scalar64`` when a call
first needs it) and the launcher picks one per call (devices/cuda). ``scalar32`` and
``scalar64``: one element per thread, 32- or 64-bit index arithmetic (turning an index into
offsets is far cheaper in 32 bits). ``vector32``: each thread moves 8, 16 or 32 bytes of every
operand in one or two loads or stores (``vector_width``), which needs 16-byte aligned pointers;
flat kernels (rank 1, every operand contiguous) have it and ``scalar32``, and index in 32 bits
only (the launcher splits a call of 2**31 elements or more into chunks); strided kernels whose
operands are all contiguous or broadcast along the inner dimension (a bias added to rows, a
chunk of a wider tensor) have all three. Names start with ``tf_``, or ``tf_checked_`` when the
body can fail (integer division by zero): those take an error flag as last parameter.

The source ends with ``scalar32`` once more, in PTX (codegen/ptx.py), under ``#if 0``: the
backend hands that to ptxas instead of compiling the C entry with NVRTC.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from .. import ops
from ..config import log
from ..ir import Const
from ..spec import BROADCAST, CONTIG, ArgSpec
from . import ptx
from .cstyle import C_TYPES, STORAGE_TYPES, CStyleRenderer, TypedGraph, helpers_for

# Threads per block. 128 against 256, each workload's kernel against Inductor's in a fresh process
# on an H100 (bench/RESULTS.md, session 6): where_mix float32 0.999 (1.005), lstm_cell float32
# 0.992 (0.999), gated float16 0.988 (0.997), the rest within 0.2 % either way.
BLOCK = 128
PTX_MARK = "entry scalar32 as PTX"  # the comment opening its block at the end of a source
VECTOR_BYTES = 16

# NVRTC has no default include path: the fixed-width types and float constants are declared
# here. Built by nvcc instead (a failed kernel's reproduction), the system headers give them.
PREAMBLE = r"""#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#include <math.h>
#endif
#ifndef INT32_MIN
#define INT32_MIN (-2147483647 - 1)
#endif
#ifndef INT64_MIN
#define INT64_MIN (-9223372036854775807LL - 1)
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

#define TF_FN static __device__ __forceinline__
struct __align__(16) tf_uint4x2 { uint4 a, b; };  /* 32 bytes: two 16-byte loads or stores */
/* A streamed operand's vector load: ld.global, not the read-only path (ld.global.nc) NVRTC
 * picks for a const __restrict__ pointer, nor evict-first (.cs): see vector() */
TF_FN uint4 tf_ld(const uint4* p) {
  uint4 v;
  asm("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
TF_FN uint2 tf_ld(const uint2* p) {
  uint2 v; asm("ld.global.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p)); return v;
}
TF_FN uint32_t tf_ld(const uint32_t* p) {
  uint32_t v; asm("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p)); return v;
}
template <typename T> TF_FN T tf_ld(const T* p) { return *p; }
TF_FN tf_uint4x2 tf_ld(const tf_uint4x2* p) { return {tf_ld(&p->a), tf_ld(&p->b)}; }
typedef unsigned short tf_half;
TF_FN float tf_h2f(tf_half h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
TF_FN tf_half tf_f2h(float f) {
  tf_half h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
TF_FN uint32_t tf_f2u(float f) { return __float_as_uint(f); }
TF_FN float tf_u2f(uint32_t u) { return __uint_as_float(u); }
/* n / d: 32-bit indices by a multiply-high with the host's magic number for d (n < 2**31) */
TF_FN uint32_t tf_divide(uint32_t n, uint32_t d, uint32_t magic, uint32_t shift) {
  return (__umulhi(n, magic) + n) >> shift;
}
TF_FN uint64_t tf_divide(uint64_t n, uint64_t d, uint32_t magic, uint32_t shift) { return n / d; }
/* maximum, minimum, clamp, hardtanh: CUDA eager's ::max/::min of two numbers is fmax/fmin, whose
   max of -0 and +0 is +0 and min -0 in either order (the CPU's keeps the first) */
#define TF_FMAX(S, a, b) fmax##S(a, b)
#define TF_FMIN(S, a, b) fmin##S(a, b)
#if __CUDA_ARCH__ >= 800  /* one instruction instead of the portable bit arithmetic */
/* The packed form: the scalar cvt.rn.bf16.f32 runs on the slow conversion unit (F2F.BF16),
   the packed one on the ALU pipe (F2FP.BF16.PACK_AB), like float16's; same rounding. */
TF_FN uint16_t tf_f2bf_native(float f) {
  uint32_t h; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(0.0f), "f"(f));
  return (uint16_t)h;
}
#define TF_F2BF_NATIVE tf_f2bf_native
/* Rounding a float to bfloat16 and back: the rounded value in the upper half of the packed
   pair, zero in the lower, is already the float's bit pattern (one instruction, no shift). */
TF_FN float tf_round_bf16_native(float f) {
  uint32_t h; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(f), "f"(0.0f));
  return __uint_as_float(h);
}
#define TF_ROUND_BF16_NATIVE tf_round_bf16_native
#endif
/* Programmatic dependent launch (sm_90+; devices/cuda launches such an entry so): the entry
   first waits until the kernel before it in the stream has finished and its writes show (its
   loads may read them). Its blocks do not trigger the next kernel's launch early
   (griddepcontrol.launch_dependents): they trigger it by exiting, so the next kernel's blocks
   take the places of this one's last blocks as they finish instead of waiting in places this
   kernel's blocks could use (a tanh GELU on an H200: 1.23x Inductor's time with the early
   trigger, 0.98x without). */
#if __CUDA_ARCH__ >= 900
#define TF_GRID_DEPENDENCY asm volatile("griddepcontrol.wait;" ::: "memory");
#else
#define TF_GRID_DEPENDENCY
#endif
/* sigmoid(x) = 1 / (1 + expf(-x)) as eager computes it, for a result rounded to float16
   (tf_sigmoid_f16) or bfloat16 (tf_sigmoid_bf16), without division's per-element test and
   branch to its out-of-line slow path (a fifth of the float16 LSTM cell's instructions).
   tf_rcp_main is that division's main path: rcp.approx and one Newton step give the correctly
   rounded 1 / d for d in [2**-126, 2**126), as div.rn does. Here d = 1 + expf(-x) >= 1; past
   2**126, where 1 / d is below 2**-126: float16 rounds any such result to 0, so d stops at
   2**100 (an infinite d would make the Newton step NaN); bfloat16 keeps float's exponent, so d
   is scaled by 2**-64 into the main path's range and the result back, exactly where it is
   normal; the subnormal results of the three bfloat16 inputs that have them (-87.5, -88,
   -88.5) round as eager's (tests: every float16 and bfloat16 input, bit for bit). min.NaN
   keeps a NaN, and needs sm_80; older GPUs divide. */
#if __CUDA_ARCH__ >= 800
TF_FN float tf_rcp_main(float d) {
  float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return fmaf(r, fmaf(-d, r, 1.0f), r);
}
TF_FN float tf_min_nan(float a, float b) {
  float m; asm("min.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b)); return m;
}
TF_FN float tf_sigmoid_f16(float x) { return tf_rcp_main(tf_min_nan(1.0f + expf(-x), 0x1p100f)); }
TF_FN float tf_sigmoid_bf16(float x) {
  return tf_rcp_main(tf_min_nan((1.0f + expf(-x)) * 0x1p-64f, 0x1p100f)) * 0x1p-64f;
}
#else
TF_FN float tf_sigmoid_f16(float x) { return 1 / (1 + expf(-x)); }
TF_FN float tf_sigmoid_bf16(float x) { return 1 / (1 + expf(-x)); }
#endif
"""

# Pairs of float16 or bfloat16 in one 32-bit word (vector kernels; element k in the low half,
# k + 1 in the high): packed from two floats by one cvt that rounds each as eager rounds it,
# unpacked exactly, added, subtracted or multiplied with one rounding (see ops.OpDef.pair).
PAIRS = r"""
TF_FN void tf_hunpack2(uint32_t h, float& lo, float& hi) {
  asm("{ .reg .b16 l, u; mov.b32 {l, u}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, u; }"
      : "=f"(lo), "=f"(hi) : "r"(h));
}
TF_FN void tf_bfunpack2(uint32_t h, float& lo, float& hi) {
  lo = tf_u2f(h << 16); hi = tf_u2f(h & 0xffff0000u);
}
#define TF_PAIR_OP(name, ptx) \
TF_FN uint32_t name(uint32_t a, uint32_t b) { \
  uint32_t d; asm(ptx " %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; \
}
TF_PAIR_OP(tf_hadd2, "add.rn.f16x2")
TF_PAIR_OP(tf_hsub2, "sub.rn.f16x2")
TF_PAIR_OP(tf_hmul2, "mul.rn.f16x2")
#if __CUDA_ARCH__ >= 800
TF_FN uint32_t tf_hpack2(float lo, float hi) {
  uint32_t d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
TF_FN uint32_t tf_bfpack2(float lo, float hi) {
  uint32_t d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
#else
TF_FN uint32_t tf_hpack2(float lo, float hi) {
  return (uint32_t)tf_f2h(lo) | (uint32_t)tf_f2h(hi) << 16;
}
TF_FN uint32_t tf_bfpack2(float lo, float hi) {
  return (uint32_t)tf_f2bf(lo) | (uint32_t)tf_f2bf(hi) << 16;
}
#endif
#if __CUDA_ARCH__ >= 900
TF_PAIR_OP(tf_bfadd2, "add.rn.bf16x2")
TF_PAIR_OP(tf_bfsub2, "sub.rn.bf16x2")
TF_PAIR_OP(tf_bfmul2, "mul.rn.bf16x2")
#else  /* through float: the same single rounding */
#define TF_BF_PAIR_OP(name, op) \
TF_FN uint32_t name(uint32_t a, uint32_t b) { \
  float a0, a1, b0, b1; tf_bfunpack2(a, a0, a1); tf_bfunpack2(b, b0, b1); \
  return tf_bfpack2(a0 op b0, a1 op b1); \
}
TF_BF_PAIR_OP(tf_bfadd2, +)
TF_BF_PAIR_OP(tf_bfsub2, -)
TF_BF_PAIR_OP(tf_bfmul2, *)
#endif"""
HALVES = {torch.float16: "h", torch.bfloat16: "bf"}  # the pair helpers' infix: tf_hadd2

# The erf GELU of a pair (ops.py's pair form), eager's bits. Eager computes x * 0.5 * (1 +
# erff(x * M_SQRT1_2)) in float; CUDA's erff is branch-free, one polynomial for |a| < 1.00376
# and, past it, an exp of another, each with its coefficients picked per element: about 20
# instructions of an element's 30 in a 16-bit bias + GELU + scale, which an H200 must issue
# faster than its memory moves the element (1.25x the copy floor, bench/RESULTS.md session 14).
# Here |x| < ops.GELU_NEAR (1.5) computes a polynomial of the dtype's own, tf_hgelu_near0
# (ops.py's gelu_near0: x * fma(x, R(x * x), 0.5), of the lowest degree whose every result rounds
# as eager's there: 8 instructions an element for float16, 6 for bfloat16, where eager's erff
# polynomial and its scaling take 11); every other input, specials too, reads eager's own result
# from a table of all 65,536 (ops.TABLES: devices/cuda fills it when it loads the kernel),
# through L1 with a load only where needed (the low half's index by a byte permute: NVRTC's
# shift and mask of h & 0xffff took two instructions more; each result put in place by a byte
# permute too: a mask and a permute where written as masks), at the address the kernel computes
# once a thread (tb, tf_table_at). The scalar entries keep the formula, and so do GPUs where the
# backend says the table does not pay (an H100, at the floor with the formula, ran the table's
# kernel up to 5 % slower) or does not agree with the polynomial (eager built with a CUDA whose
# erff differs).
def _gelu_near0(t: str, dtype: torch.dtype) -> str:
    first, *rest = ops.GELU_NEAR_POLYNOMIALS[dtype]
    horner = "".join(f"\n  p = fmaf(p, t, __uint_as_float(0x{c:08X}u));" for c in rest)
    return f"""
TF_FN float tf_{t}gelu_near0(float x) {{
  const float t = x * x;
  float p = __uint_as_float(0x{first:08X}u);{horner}
  return x * fmaf(x, p, 0.5f);
}}"""


GELU_PAIRS = f"""
/* A table's address, once a thread (_Kernel.vector), as the table's plus n >> 62 (n, the
   kernel's element count, is below 2**62) added in assembly, where NVVM cannot fold it into
   each index: the symbol's own address ptxas reloads from the constant bank before every load,
   an instruction an element; this one it keeps in registers (H200, bias + GELU + scale over
   16-bit rows, with the permutes: 2 %). */
TF_FN const uint16_t* tf_table_at(const uint16_t* table, int64_t n) {{
  const uint16_t* p; asm("add.s64 %0, %1, %2;" : "=l"(p) : "l"(table), "l"(n >> 62));
  return p;
}}
#define TF_GELU_PAIR(t, table) \\
__device__ uint16_t table[65536]; \\
TF_FN uint32_t tf_##t##gelu2(uint32_t h, const uint16_t* tb) {{ \\
  float x0, x1; tf_##t##unpack2(h, x0, x1); \\
  uint32_t r = tf_##t##pack2(tf_##t##gelu_near0(x0), tf_##t##gelu_near0(x1)); \\
  if (!(fabsf(x0) < {ops.GELU_NEAR!r}f)) \\
    r = __byte_perm(r, __ldg(&tb[__byte_perm(h, 0, 0x7710)]), 0x3254); \\
  if (!(fabsf(x1) < {ops.GELU_NEAR!r}f)) \\
    r = __byte_perm(r, __ldg(&tb[h >> 16]), 0x5410); \\
  return r; \\
}}"""


# Eager's float -> integer casts on CUDA: cvt.rzi from the value's own precision, which saturates
# (NaN gives 0 from float, INT_MIN from double into 32 bits); the __*_rz intrinsics spell it
# without undefined behaviour. uint8 goes through int64, as c10's TypeCast.h does.
_FLOAT_TO_INT = {
    torch.int64: "__{w}2ll_rz({x})",
    torch.int32: "__{w}2int_rz({x})",
    torch.int16: "(int16_t)__{w}2int_rz({x})",
    torch.int8: "(int8_t)__{w}2int_rz({x})",
    torch.uint8: "(uint8_t)__{w}2ll_rz({x})",
}


LOAD_TYPES = {32: "tf_uint4x2", 16: "uint4", 8: "uint2", 4: "uint32_t", 2: "uint16_t", 1: "uint8_t"}


# Instructions a math function takes per call on its common path, for vector_width's estimate of
# a body's work (SASS of NVRTC 13.5 for sm_90, -fmad=false, counted up to the exit; rare paths
# such as sin's reduction of huge arguments left out). Any other call or operator counts one, a
# float division DIVIDE_COST.
MATH_COST = {"exp": 10, "exp2": 4, "expm1": 24, "log": 28, "log1p": 33, "log2": 30, "log10": 29,
             "sin": 30, "cos": 30, "tan": 40, "tanh": 17, "sinh": 25, "cosh": 16, "asin": 25,
             "acos": 26, "atan": 19, "asinh": 46, "acosh": 47, "atanh": 42, "erf": 29, "erfc": 48,
             "lgamma": 100, "sqrt": 13, "rsqrt": 4, "pow": 98, "atan2": 54, "hypot": 31, "fmod": 77,
             "tf_sigmoid_f16": 15, "tf_sigmoid_bf16": 17}
DIVIDE_COST = 16
HEAVY = 6  # instructions an element per byte it moves from which a thread moves 16 bytes
_CALLED = re.compile(r"\b([A-Za-z_]\w*?)f?\(")


def instructions(body: list[str]) -> int:
    """A rough count of the instructions one element of ``body`` (``T vN = EXPR;`` statements)
    takes: a statement one, each call MATH_COST's or one, each division DIVIDE_COST."""
    total = 0
    for statement in body:
        expr = statement.split("=", 1)[1]
        total += 1 + sum(MATH_COST.get(name, 1) for name in _CALLED.findall(expr))
        total += DIVIDE_COST * expr.count(" / ")
    return total


def vector_width(dtypes, streamed: int, flat: bool = True, work: float = 0.0,
                 scale: int = 1) -> int:
    """Elements per thread in a vector kernel (``dtypes``: its operands; ``streamed``: the bytes
    per element of the inputs it streams from memory, which are neither broadcast nor reused by
    every row; ``work``: the instructions its body takes per byte an element moves, heavy from
    HEAVY): 8 bytes of the widest operand where a thread then still loads 16 bytes or more and
    the body is light, else 16 (one load or store of each operand); twice that (two) in a
    strided kernel whose widest operand is float16 or bfloat16 (any, where ``scale`` is 2) and
    whose body takes HEAVY / ``scale`` instructions a byte or more. Measured on the H100, x the
    copy floor or x Inductor's kernel:

    - More threads that move less each fed the memory better (gated, where_mix float32 0.993 ->
      0.980, adam_step 1.005 -> 0.998; LSTM cell rows float32 0.983 -> 0.974), but a thread
      that loads only 8 bytes leaves too few bytes in flight (gelu_tanh, one input: 1.008 ->
      1.066; a bias added to rows, one streamed input: 1.008 -> 1.080).
    - A heavy body spends its threads' time on index arithmetic and math, not on loads: 16 bytes
      a thread, x Inductor, where_mix float16 (7.7 instructions a byte) 1.137 -> 1.002, bfloat16
      1.165 -> 1.021, sin(x) * cos(y) float16 (11) 1.160 -> 0.992; light bodies lose by it
      (gated float16, 5.3: 0.991 -> 1.002; sin(x) * cos(y) float32, 5.3: 1.000 -> 1.010).
      Flat kernels only: the LSTM cell's float16 rows (9.3), at 32 elements a thread instead of
      16, 1.0005 -> 1.012.
    - Strided float16/bfloat16 kernels compute in float, twice the work per byte of float32's,
      and unravel an index per thread: 16 elements pay for it where 8 left a GELU over
      bias-added rows at 1.10 (-> 1.04). Not in flat kernels (gelu_tanh float16 1.033 -> 1.042),
      nor in strided ones lighter than HEAVY, whose two 16-byte loads or stores a thread each
      cover half of every 32-byte sector in their warp's span (bench/RESULTS.md, session 17,
      x the floor, two loads -> one: (x + b) * s over rows, float16, 1.042 -> 1.004;
      tanh(x + b) * s, float16, 5.75 instructions a byte, 1.022 -> 1.003).
    - ``scale`` 2, a GPU whose memory feeds each multiprocessor faster (an H200: 37 GB/s
      against an H100's 25), wants more bytes in flight: a light thread must load 32 bytes to
      stay at 8 bytes an operand, strided kernels double from HEAVY / 2 instructions a byte,
      and so do heavy 16-bit flat ones. On an H200, x Inductor's kernel (or tf/ind in the
      bench): gated float32 1.032 -> 0.996, where_mix float32 1.090 -> 0.993, gated float16
      1.121 -> 0.997, the LSTM cell float32 1.082 -> 1.007, bias_act_scale float32 (1.004 ->
      0.992), gelu_tanh bfloat16 0.979 -> 0.868; not gelu_tanh float32 at 32 bytes (0.966 ->
      0.991), nor the LSTM cell float16 at 32 (1.124 -> 1.131), nor adam_step float32 at 16
      (0.998 -> 1.004). Strided bodies over rows, x the floor, one 16-byte load of each
      operand a thread -> two: (x + b) * s float32 (0.25 instructions a byte) 0.998 -> 1.135,
      float16 (1) 1.001 -> 1.150, tanh(x + b) * s float32 (2.5) 1.001 -> 1.084; sigmoid(x + b)
      * s float32 (3.6) 1.013 -> 1.008, float16 (5.3) 1.052 -> 1.017, GELU float32 (4) 1.050 ->
      1.021 (session 17).
    """
    widest = max(d.itemsize for d in dtypes)
    heavy = work >= HEAVY
    narrow = max(1, VECTOR_BYTES // 2 // widest)
    light = not (heavy and flat) and narrow * streamed >= VECTOR_BYTES * scale
    width = narrow if light else VECTOR_BYTES // widest
    if flat:
        doubled = widest == 2 and heavy and scale > 1
    else:
        doubled = (widest == 2 or scale > 1) and work * scale >= HEAVY
    return width * 2 if doubled else width


def entry_points(argspec: ArgSpec) -> list[str]:
    """The entry points a kernel for ``argspec`` has; the first, compiled with the kernel, serves
    every call below 2**31 elements and offsets, and is the quickest to compile."""
    vectorisable = (all(d.inner in (CONTIG, BROADCAST) for d in argspec.inputs)
                    and all(inner == CONTIG for inner, _ in argspec.outputs))
    if is_flat(argspec):
        return ["scalar32", "vector32"]
    return ["scalar32", "vector32", "scalar64"] if vectorisable else ["scalar32", "scalar64"]


def is_flat(argspec: ArgSpec) -> bool:
    """Rank 1 and every operand contiguous: the case vector kernels serve."""
    return (argspec.rank == 1 and all(d.inner == CONTIG for d in argspec.inputs)
            and all(inner == CONTIG and not partial for inner, partial in argspec.outputs))


def _half_bits(value: bool | int | float, dtype: torch.dtype) -> int | None:
    """The 16 bits of ``value`` in float16/bfloat16 where it is exact there (sign of zero too),
    else None (NaN, booleans and anything that rounds)."""
    if isinstance(value, bool) or value != value:
        return None
    half = torch.tensor(float(value), dtype=torch.float64).to(dtype)
    if float(half) != value or math.copysign(1, float(half)) != math.copysign(1, value):
        return None
    return int(half.view(torch.int16)) & 0xFFFF


_VALUE = re.compile(r"\bv(\d+)\b")  # a value's name in an op's expression: v3


def _nth(expr: str, j: int) -> str:
    """``expr`` over the values of the ``j``-th element of a pair: ``v3`` -> ``v3_<j>``."""
    return _VALUE.sub(rf"v\g<1>_{j}", expr)


class CUDARenderer(CStyleRenderer):
    """``scale(device key) -> int``: the vector width's scale for that GPU (``vector_width``);
    ``tables(device key, name) -> bool``: whether its kernels read table ``name`` of eager's
    results (ops.TABLES). The backend knows its GPUs, the renderer only these answers."""

    cuda = True
    preamble = PREAMBLE

    def __init__(self, scale: Callable[[str], int] = lambda device: 1,
                 tables: Callable[[str, str], bool] = lambda device, name: False) -> None:
        self.scale, self.tables = scale, tables

    def convert(self, expr: str, src: torch.dtype, dst: torch.dtype) -> str:
        if src.is_floating_point and dst in _FLOAT_TO_INT:
            return f"({_FLOAT_TO_INT[dst].format(w=C_TYPES[src], x=expr)})"
        return super().convert(expr, src, dst)

    def render(self, typed: TypedGraph, argspec: ArgSpec) -> str:
        kernel = _Kernel(self, typed, argspec)
        code = "\n".join(kernel.lines())
        header = (f"// entry points: {' '.join(entry_points(argspec))}\n"
                  f"// operand bytes: {' '.join(str(d.itemsize) for d in kernel.dtypes)}\n"
                  f"// vector elements: {kernel.width}\n"
                  f"// waits for the kernel before: {' '.join(kernel.waiting) or '-'}")
        pairs = PAIRS if re.search(r"\btf_(h|bf)\w+2\(", code) else ""
        gelus = [(dtype, t) for dtype, t in HALVES.items() if f"tf_{t}gelu2(" in code]
        if gelus:
            pairs += GELU_PAIRS + "".join(
                _gelu_near0(t, dtype) + f"\nTF_GELU_PAIR({t}, {ops.GELU_TABLE.format(t=t)})"
                for dtype, t in gelus)
        return "\n".join([header, self.preamble, helpers_for(code + pairs), pairs, "", code,
                          *kernel.assembly(), ""])


class _Kernel:
    """The pieces of one kernel's source: parameters, index arithmetic, element body."""

    def __init__(self, renderer: CUDARenderer, typed: TypedGraph, argspec: ArgSpec) -> None:
        graph = typed.graph
        self.r, self.typed, self.argspec = renderer, typed, argspec
        self.n_in = graph.n_inputs
        self.dtypes = [*typed.dtypes[: self.n_in], *(typed.dtypes[o] for o in graph.outputs)]
        self.codes = [d.inner for d in argspec.inputs] + [inner for inner, _ in argspec.outputs]
        self.body = renderer.body(typed)
        self.checked = any("&err" in statement for statement in self.body)
        self.flat = is_flat(argspec)
        streamed = sum(d.dtype.itemsize for d in argspec.inputs
                       if d.inner == CONTIG and not d.reused)
        moved = streamed + sum(d.itemsize for d in self.dtypes[self.n_in:])
        work = instructions(self.body) / moved
        self.width = vector_width(self.dtypes, streamed, self.flat, work,  # vector elements
                                  renderer.scale(argspec.device))
        self.waiting = [e for e in entry_points(argspec) if self.waits(e)]

    def waits(self, entry: str) -> bool:
        """Whether ``entry`` starts with the grid dependency (TF_GRID_DEPENDENCY), and is
        launched to overlap the kernel before it: vector entries whose threads move 16 bytes of
        the widest operand or more. A thread's wait costs its block a fixed time at its start:
        blocks of 8 bytes a thread (light flat kernels on an H100: gated, where_mix) ran 18-21 %
        slower with it, blocks of 16 bytes or more gained 0.3-1.3 % by the overlap
        (bench/RESULTS.md, session 9); scalar entries move one element a thread."""
        widest = max(d.itemsize for d in self.dtypes)
        return entry.startswith("vector") and self.width * widest >= VECTOR_BYTES

    # ---- parameters --------------------------------------------------------------------------

    def params(self) -> str:
        rank, k = self.argspec.rank, len(self.dtypes)
        names = ["n_", *(f"size{d}_" for d in range(rank))]
        dividers = [f"const uint32_t {kind}{d}_"
                    for d in range(1, rank) for kind in ("magic", "shift")]
        names += [f"stride{p}_{d}_" for p in range(k) for d in range(rank)]
        params = [f"const int64_t {name}" for name in names]
        params[1 + rank:1 + rank] = dividers
        for p, dtype in enumerate(self.dtypes):
            t = STORAGE_TYPES[dtype]
            if p < self.n_in:
                params.append(f"const {t}* __restrict__ in{p}")
            else:
                params.append(f"{t}* __restrict__ out{p - self.n_in}")
        if self.checked:
            params.append("int* __restrict__ error")
        return ",\n    ".join(params)

    def args(self) -> str:
        return ", ".join(p.split()[-1] for p in self.params().split(","))

    # ---- one element -------------------------------------------------------------------------

    def element(self, offset, guard=lambda o: None, load=None, store=None) -> list[str]:
        """Loads, body and stores of one element; ``offset(p)`` indexes operand p."""
        r, dtypes, n_in = self.r, self.dtypes, self.n_in
        load = load or (lambda p: r.load(f"in{p}", offset(p), dtypes[p]))
        lines = [f"const {C_TYPES[dtypes[i]]} v{i} = {load(i)};" for i in range(n_in)]
        lines += self.body
        for o, value in enumerate(self.typed.graph.outputs):
            p = n_in + o
            stmt = (store(p, f"v{value}") if store
                    else r.store(f"out{o}", offset(p), f"v{value}", dtypes[p]))
            condition = guard(o)
            lines.append(f"if ({condition}) {stmt}" if condition else stmt)
        return lines

    def offsets(self, index: str) -> list[str]:
        """Element ``index`` unravelled over the dimensions into ``j0..``; each operand's offset
        ``o<p>`` from its strides (the inner one only where it is not 1 or 0)."""
        rank, k = self.argspec.rank, len(self.dtypes)
        inner = rank - 1
        lines = [f"I rem = {index};"] if rank > 1 else []
        for d in range(inner, 0, -1):
            lines.append(f"const I q{d} = tf_divide(rem, (I)size{d}_, magic{d}_, shift{d}_);")
            lines.append(f"const I j{d} = rem - q{d} * (I)size{d}_; rem = q{d};")
        lines.append("const I j0 = rem;" if rank > 1 else f"const I j0 = {index};")
        for p in range(k):
            terms = [f"j{d} * (I)stride{p}_{d}_" for d in range(inner)]
            code = self.codes[p]
            if code == CONTIG:
                terms.append(f"j{inner}")
            elif code != BROADCAST:
                terms.append(f"j{inner} * (I)stride{p}_{inner}_")
            lines.append(f"const I o{p} = {' + '.join(terms) or '0'};")
        return lines

    def guard(self, o: int) -> str | None:
        """A partial output is smaller than the iteration space: write each element once, from
        the first position along every dimension where it is broadcast."""
        if not self.argspec.partial_outputs[o]:
            return None
        inner, p = self.argspec.rank - 1, self.n_in + o
        conditions = [f"(j{d} == 0 || stride{p}_{d}_ != 0)" for d in range(inner)]
        if self.codes[p] == BROADCAST:
            conditions.append(f"j{inner} == 0")
        return " && ".join(conditions) or "1"

    def strided_element(self) -> list[str]:
        return self.offsets("i") + self.element(lambda p: f"o{p}", self.guard)

    # ---- kernels -------------------------------------------------------------------------------

    def scalar(self) -> list[str]:
        element = self.element(lambda p: "i") if self.flat else self.strided_element()
        return [
            "template <typename I>",
            f"TF_FN void tf_scalar(\n    {self.params()}) {{",
            "  const I n = (I)n_;",
            "  const I step = (I)gridDim.x * blockDim.x;",
            "  int err = 0;",
            "  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {",
            *(f"    {line}" for line in element),
            "  }",
            *self.report(),
            "}",
        ]

    def vector(self) -> list[str]:
        """A thread moves ``width`` elements of each operand in one load or store of at most 16
        bytes. Flat kernels: the last, partial vector goes element by element. Strided ones
        (every operand contiguous or broadcast along the inner dimension): the launcher runs
        them only where the inner size and the contiguous operands' other strides are multiples
        of ``width`` (so no vector straddles a row), and a broadcast operand is loaded once.
        Streamed operands (not a row every row reuses) are loaded with a plain ``ld.global``
        (``tf_ld``); a reused row keeps NVRTC's read-only ``ld.global.nc``; stores are plain.
        Measured on an H100, kernel time against Inductor's in fresh processes (bench/RESULTS.md,
        session 6): evict-first loads and stores (session 5's choice) were 1.3-2.7 % slower on
        gated, where_mix, bias_act_scale and gelu_tanh float32 there, though not in the bench's
        own process; ``ld.global.nc`` for streamed loads as quick as ``ld.global`` but on 16-byte
        loads (gelu_tanh float16 1.7 % slower)."""
        width = self.width
        r, dtypes, n_in, flat = self.r, self.dtypes, self.n_in, self.flat
        words = [LOAD_TYPES[width * d.itemsize] for d in dtypes]
        inputs, outputs = range(n_in), range(n_in, len(dtypes))
        offset = (lambda p: "base") if flat else (lambda p: f"o{p}")

        def each(statement: str, pad: str = "      ") -> list[str]:
            return [f"{pad}#pragma unroll", f"{pad}for (int k = 0; k < {width}; k++) {statement}"]

        def load(p: int) -> list[str]:
            if self.codes[p] == BROADCAST:
                return [f"{{ const {STORAGE_TYPES[dtypes[p]]} s = in{p}[{offset(p)}];",
                        *each(f"b{p}.e[k] = s; }}", pad="        ")]
            pointer = f"(const {words[p]}*)(in{p} + {offset(p)})"
            if self.argspec.inputs[p].reused:
                return [f"b{p}.all = *{pointer};"]
            return [f"b{p}.all = tf_ld({pointer});"]

        def store(p: int) -> str:
            pointer = f"({words[p]}*)(out{p - n_in} + {offset(p)})"
            statement = f"*{pointer} = b{p}.all;"
            condition = None if flat else self.guard(p - n_in)
            return f"if ({condition}) {statement}" if condition else statement

        element, step = self.pair(), 2
        if element is None:
            element, step = self.element(
                None,
                load=lambda p: r.load(f"b{p}.e", "k", dtypes[p]),
                store=lambda p, value: r.store(f"b{p}.e", "k", value, dtypes[p]),
            ), 1
        if self.checked:  # only elements inside the tensor may report an error
            element = ["int err = 0;", *element, "tf_err |= err & (i < full || base + k < n);"]
        unions = [f"    union {{ {words[p]} all; {STORAGE_TYPES[d]} e[{width}];"
                  + (f" uint32_t w[{width // 2}];" if d in HALVES and step == 2 else "")
                  + f" }} b{p};"
                  for p, d in enumerate(dtypes)]
        if flat:
            loads = ["    if (i < full) {",
                     *(f"      {line}" for p in inputs for line in load(p)),
                     "    } else {",
                     *(line for p in inputs
                       for line in each(f"b{p}.e[k] = base + k < n ? in{p}[base + k] : 0;")),
                     "    }"]
            tail = "if (base + k < n) out{}[base + k] = b{}.e[k];"
            stores = ["    if (i < full) {",
                      *(f"      {store(p)}" for p in outputs),
                      "    } else {",
                      *(line for p in outputs for line in each(tail.format(p - n_in, p))),
                      "    }"]
        else:  # every vector is whole: the inner size is a multiple of width
            loads = [*(f"    {line}" for line in self.offsets("base")),
                     *(f"    {line}" for p in inputs for line in load(p))]
            stores = [f"    {store(p)}" for p in outputs]
        tables = [f"  const uint16_t* const {name}_at = tf_table_at({name}, n_);"
                  for name in ops.TABLES if any(f"{name}_at" in line for line in element)]
        return [
            "template <typename I>",
            f"TF_FN void tf_vector(\n    {self.params()}) {{",
            f"  const I n = (I)n_, full = n / {width}, vectors = (n + {width - 1}) / {width};",
            *tables,
            "  const I step = (I)gridDim.x * blockDim.x;",
            "  int tf_err = 0;",
            "  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += step) {",
            f"    const I base = i * {width};",
            *unions,
            *loads,
            "    #pragma unroll",
            f"    for (int k = 0; k < {width}; k += {step}) {{",
            *(f"      {line}" for line in element),
            "    }",
            *stores,
            "  }",
            *self.report("tf_err"),
            "}",
        ]

    def pair(self) -> list[str] | None:
        """Elements ``k`` and ``k + 1`` of a vector together, where values are float16 or
        bfloat16: such a value is a pair ``h<id>`` (one 32-bit word, as loaded and stored),
        unpacked into floats ``v<id>_0``, ``v<id>_1`` only where an op computes in float; ops
        with a pair form (add, sub, mul) compute on pairs, every other op's two results are
        rounded by one packing cvt, but a bfloat16 value that no pair op takes and no output
        stores is rounded in place, each float by one cvt (a pack and two unpacks take three).
        Other values are two floats (or ints) ``v<id>_0``, ``v<id>_1``. None where no value is
        float16 or bfloat16, the body can fail, or a vector holds one element (float64 operands
        beside the halves)."""
        typed, r, dtypes, n_in = self.typed, self.r, self.dtypes, self.n_in
        n = typed.graph.n_inputs
        if self.checked or self.width % 2 or not any(d in HALVES for d in typed.dtypes):
            return None
        pairs = [self.pair_expr(k) for k in range(len(typed.graph.ops))]
        packed = set(typed.graph.outputs) | {
            operand.id for op, pair in zip(typed.graph.ops, pairs) if pair is not None
            for operand in op.operands if operand is not None and not isinstance(operand, Const)}
        elements = ("k", "k + 1")
        lines: list[str] = []
        floats: set[int] = set()  # values whose two floats are there

        def unpack(expr: str) -> None:
            for value in sorted({int(v) for v in _VALUE.findall(expr)} - floats):
                half = HALVES[typed.dtypes[value]]
                lines.append(f"float v{value}_0, v{value}_1; "
                             f"tf_{half}unpack2(h{value}, v{value}_0, v{value}_1);")
                floats.add(value)

        for i in range(n_in):
            if dtypes[i] in HALVES:
                lines.append(f"const uint32_t h{i} = b{i}.w[k / 2];")
            else:
                lines += [f"const {C_TYPES[dtypes[i]]} v{i}_{j} = "
                          f"{r.load(f'b{i}.e', k, dtypes[i])};" for j, k in enumerate(elements)]
                floats.add(i)
        for k in range(len(typed.graph.ops)):
            value, out = n + k, typed.dtypes[n + k]
            if pairs[k] is not None:
                lines.append(f"const uint32_t h{value} = {pairs[k]};")
                continue
            expr, result = r.op_result(typed, k)
            if out == torch.float16 or (out == torch.bfloat16 and value in packed):
                unpack(expr)
                lines += [f"const float r{value}_{j} = (float)({_nth(expr, j)});" for j in (0, 1)]
                lines.append(f"const uint32_t h{value} = "
                             f"tf_{HALVES[out]}pack2(r{value}_0, r{value}_1);")
            else:
                expr = r.convert(expr, result, out)
                unpack(expr)
                lines += [f"const {C_TYPES[out]} v{value}_{j} = {_nth(expr, j)};" for j in (0, 1)]
                floats.add(value)
        for o, value in enumerate(typed.graph.outputs):
            p = n_in + o
            if dtypes[p] in HALVES:
                lines.append(f"b{p}.w[k / 2] = h{value};")
            else:
                lines += [r.store(f"b{p}.e", k, f"v{value}_{j}", dtypes[p])
                          for j, k in enumerate(elements)]
        return lines

    def pair_expr(self, k: int) -> str | None:
        """Op ``k`` on pairs: its op has a pair form, it computes in its float16/bfloat16 output
        dtype, and every operand is a value of that dtype or a constant exact in it."""
        typed = self.typed
        selected, op = typed.selected[k], typed.graph.ops[k]
        out = typed.dtypes[typed.graph.n_inputs + k]
        if selected.op.pair is None or out not in HALVES or selected.compute != out:
            return None
        operands = []
        for operand, cast in zip(op.operands, selected.casts):
            if isinstance(operand, Const):
                bits = _half_bits(operand.value, out)
                if bits is None:
                    return None
                operands.append(ops.Operand(f"0x{bits:04x}{bits:04x}u", operand.value, out))
            elif operand is not None:
                if typed.dtypes[operand.id] != out or cast != out:
                    return None
                operands.append(ops.Operand(f"h{operand.id}", dtype=out))
            else:
                operands.append(None)
        ctx = ops.Ctx(compute=out, out=out, attrs=op.attr_dict, T="uint32_t", U="uint32_t",
                      t=HALVES[out], f="", literal=str, cuda=True,
                      table=lambda name: self.r.tables(self.argspec.device, name))
        template = selected.op.pair
        return template(ctx, *operands) if callable(template) else ctx.fmt(template, operands)

    def report(self, flag: str = "err") -> list[str]:
        return [f"  if ({flag}) *error = 1;"] if self.checked else [f"  (void){flag};"]

    def entry(self, name: str) -> list[str]:
        prefix = "tf_checked_" if self.checked else "tf_"
        kind, bits = name[:-2], name[-2:]
        index = "uint32_t" if bits == "32" else "uint64_t"
        return [
            f"#ifdef TF_ENTRY_{name}",
            f'extern "C" __global__ void __launch_bounds__({BLOCK}) {prefix}{name}(',
            f"    {self.params()}) {{",
            *(["  TF_GRID_DEPENDENCY"] if name in self.waiting else []),
            f"  tf_{kind}<{index}>({self.args()});",
            "}",
            "#endif",
        ]

    def assembly(self) -> list[str]:
        """The scalar32 entry as PTX (codegen/ptx.py) where the translation reads every
        statement, under ``#if 0``: the backend gives it to ptxas directly."""
        try:
            entry = ptx.scalar_entry(self, BLOCK)
        except ops.Unsupported:
            return []
        except Exception as error:  # a bug here must not cost the C kernel
            log(1, f"no PTX for the scalar entry: {type(error).__name__}: {error}")
            return []
        return [f"#if 0  /* {PTX_MARK} */", entry, "#endif"]

    def lines(self) -> list[str]:
        """The entry points, each under ``#ifdef TF_ENTRY_<name>`` (the backend compiles one at a
        time: see the module's docstring).
        Flat kernels index in 32 bits only: the launcher splits a call of 2**31 elements or more
        into chunks."""
        names = entry_points(self.argspec)
        lines = [*self.scalar(), ""]
        if "vector32" in names:
            lines += [*self.vector(), ""]
        for name in names:
            lines += [*self.entry(name), ""]
        return lines
