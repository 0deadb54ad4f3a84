"""C for the CPU: one OpenMP-parallel function per (KernelSpec, ArgSpec).

The kernel takes one array of int64: ``[numel, sizes[R], strides[K][R], pointers[K]]`` where R is
the ArgSpec's rank and K the number of operands (inputs, then outputs). It returns 0, or an
error code (see spec.ERRORS). The innermost loop is written so that gcc vectorises it; where an
op goes to eager's VML function (OpDef.vml), the loop runs in blocks, in stages around each call.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .. import ops
from ..config import config
from ..ir import Ref
from ..spec import BROADCAST, CONTIG, ArgSpec
from .cstyle import C_TYPES, STORAGE_TYPES, CStyleRenderer, TypedGraph, helpers_for

PREAMBLE = r"""#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <math.h>

#define TF_FN static inline
TF_FN uint32_t tf_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
TF_FN float tf_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* Floor division's dividend as eager's vector loops take it: a whole where a / b (q) overflows,
   since SLEEF's fmod, which they call, is NaN there for a subnormal b (cstyle's helpers) */
#define TF_DIVIDEND(a, mod, q) (isinf(q) && !isinf(a) ? (a) : (a) - (mod))
"""

# In a kernel that has float16 values (after PREAMBLE: the shared helpers use them).
FLOAT16 = """\
/* float16 as its bits, converted in integer and float arithmetic that gcc vectorises, selects
   as bit masks (it does not vectorise _Float16's own conversions, gcc 12 even with AVX512-FP16,
   which left a float16 kernel's loop scalar: 8-20x slower than Inductor's). Exact both ways,
   round to nearest even (every float16 and every float32 bit pattern checked against the
   hardware's conversion); a NaN keeps its sign (quiet, payload not kept: c10::Half's scalar
   conversion). A float16 subnormal is renormalised from a normal float, so flush-to-zero
   (torch.set_flush_denormal) does not touch it. */
typedef uint16_t tf_half;
TF_FN float tf_h2f(tf_half h) {
  const uint32_t bits = (uint32_t)(h & 0x7fffu) << 13, exponent = bits & 0x0f800000u;
  const uint32_t normal = bits + ((127u - 15u) << 23);
  const uint32_t special = normal + ((128u - 16u) << 23);  /* inf, NaN */
  const uint32_t subnormal = tf_f2u(tf_u2f(normal + (1u << 23)) - 0x1p-14f);  /* (and zero) */
  const uint32_t is_special = 0u - (uint32_t)(exponent == 0x0f800000u);
  const uint32_t is_subnormal = 0u - (uint32_t)(exponent == 0u);
  const uint32_t u = (normal & ~(is_special | is_subnormal)) | (special & is_special)
                     | (subnormal & is_subnormal);
  return tf_u2f(u | (uint32_t)(h & 0x8000u) << 16);
}
TF_FN tf_half tf_f2h(float f) {  /* the FP16 library's fp16_ieee_from_fp32_value (c10's) */
  const uint32_t w = tf_f2u(f), twice = w + w, sign = w & 0x80000000u;
  float base = (fabsf(f) * 0x1p112f) * 0x1p-110f;  /* past float16's range: inf */
  uint32_t bias = twice & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = tf_u2f((bias >> 1) + 0x07800000u) + base;  /* the sum rounds to float16's bits */
  const uint32_t bits = tf_f2u(base);
  const uint32_t value = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  return (tf_half)((sign >> 16) | (twice > 0xff000000u ? 0x7e00u : value));
}
/* tf_h2f(tf_f2h(f)) in float arithmetic, a third fewer operations: adding 2**13 times the base
   of f's binade (of float16's subnormals' below them) rounds |f| to float16's spacing there;
   past float16's largest value, inf (every float32 bit pattern checked, as above). */
TF_FN float tf_round_f16_native(float f) {
  const uint32_t w = tf_f2u(f), exponent = (w + w) & 0xff000000u;  /* f's, in the top byte */
  uint32_t binade = exponent < 0x71000000u ? 0x71000000u : exponent;
  binade = binade > 0x8f000000u ? 0x8f000000u : binade;  /* (2**16 and up: inf below) */
  const float magic = tf_u2f((binade >> 1) + 0x06800000u);
  float r = (magic + fabsf(f)) - magic;
  r = r >= 65520.0f ? INFINITY : r;
  return tf_u2f(tf_f2u(r) | (w & 0x80000000u));
}
#define TF_ROUND_F16_NATIVE tf_round_f16_native"""

# The math functions glibc (>= 2.35, x86-64) has vector variants of, in libmvec. Declared
# `simd`, gcc calls those variants from vectorised loops without -ffast-math, so NaN, Inf and
# signed zeros keep their meaning (accuracy: within 4 ulp). The CPU backend defines
# TF_VECTOR_MATH, and links libmvec, only where that glibc is present.
VECTOR_MATH = ("acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "cos", "cosh",
               "erf", "erfc", "exp", "exp10", "exp2", "expm1", "hypot", "log", "log10", "log1p",
               "log2", "pow", "sin", "sinh", "tan", "tanh")
_BINARY = ("atan2", "fmod", "hypot", "pow")
_CALL = re.compile(rf"\b({'|'.join(VECTOR_MATH)})(f?|##S)\(")  # ##S: a helper, both types
VECTOR_MATH_GUARD = r"""#ifdef TF_VECTOR_MATH
#define TF_SIMD __attribute__((simd("notinbranch")))
#else
#define TF_SIMD
#endif"""


def in_double(expr: str) -> str:
    """``expr`` with its float math calls made in double and rounded to float: correctly rounded
    float values, for an op whose result is then rounded to float16. Eager's float16 CPU kernels
    call SLEEF's float functions (within 1 ulp) or the C library's scalar ones, and so did ours
    while their loop stayed scalar; libmvec's float functions (within 4 ulp) put more results on
    the other side of a float16 rounding boundary: of the 65,536 float16 inputs, sigmoid 1, log
    3, the tanh GELU 259 differ from eager's (0, 0 and 0 in double; the tanh GELU's 25 left
    before tf_sleef_tanh_arg were SLEEF's saturation). bfloat16's 8 bits hide them (its tanh
    GELU: 8 in float, 20 before), and double halves the vector: its kernels keep float,
    as before."""
    out, pos = [], 0
    for match in _CALL.finditer(expr):
        if match.start() < pos or match.group(2) != "f":  # inside a call made double; not float
            continue
        depth, end, args, start = 1, match.end(), [], match.end()
        while depth:
            c = expr[end]
            depth += (c == "(") - (c == ")")
            if c == "," and depth == 1 or depth == 0:
                args.append(in_double(expr[start:end]))
                start = end + 1
            end += 1
        wide = ", ".join(f"(double)({a.strip()})" for a in args)
        out += [expr[pos:match.start()], f"(float){match.group(1)}({wide})"]
        pos = end
    return "".join(out) + expr[pos:]


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


# Eager's vectorised CPU kernels (ATen's Vectorized, in torch's AVX2 and AVX512 builds) take
# their math functions from SLEEF, which libtorch_cpu exports: the exp inside sigmoid, silu and
# the GELUs, expm1, log1p, sinh..., and every function of a float16/bfloat16 tensor (in float).
# Where this process has them (devices/cpu.sleef_functions), kernels call those very functions,
# for eager's bits (libmvec's differ in the last bits: silu in a quarter of float32 inputs).
# C function -> SLEEF's for float and for double ({n}: the lanes), the variants ATen calls.
# Not here: asinh and acosh (eager's kernels call the C library's), hypot (ours is correctly
# rounded, as SLEEF's). fmod (in fmod, remainder and floor division) is exact but NaN for a
# subnormal divisor, as eager's. Float erf is ATen's own: Abramowitz and Stegun's 7.1.26 around
# SLEEF's expf (tf_aten_erff).
SLEEF = {
    "acos": ("acosf{n}_u10", "acosd{n}_u10"), "asin": ("asinf{n}_u10", "asind{n}_u10"),
    "atan": ("atanf{n}_u10", "atand{n}_u10"), "atanh": ("atanhf{n}_u10", "atanhd{n}_u10"),
    "atan2": ("atan2f{n}_u10", "atan2d{n}_u10"), "cos": ("cosf{n}_u35", "cosd{n}_u10"),
    "cosh": ("coshf{n}_u10", "coshd{n}_u10"), "erf": (None, "erfd{n}_u10"),
    "erfc": ("erfcf{n}_u15", "erfcd{n}_u15"), "exp": ("expf{n}_u10", "expd{n}_u10"),
    "exp2": ("exp2f{n}_u10", "exp2d{n}_u10"), "expm1": ("expm1f{n}_u10", "expm1d{n}_u10"),
    "fmod": ("fmodf{n}", "fmodd{n}"),
    "lgamma": ("lgammaf{n}_u10", "lgammad{n}_u10"), "log": ("logf{n}_u10", "logd{n}_u10"),
    "log10": ("log10f{n}_u10", "log10d{n}_u10"), "log1p": ("log1pf{n}_u10", "log1pd{n}_u10"),
    "log2": ("log2f{n}_u10", "log2d{n}_u10"), "pow": ("powf{n}_u10", "powd{n}_u10"),
    "sin": ("sinf{n}_u35", "sind{n}_u10"), "sinh": ("sinhf{n}_u10", "sinhd{n}_u10"),
    "tan": ("tanf{n}_u10", "tand{n}_u10"), "tanh": ("tanhf{n}_u10", "tanhd{n}_u10"),
}
# tf_sleef[2i], [2i + 1]: SLEEF_NAMES[2i] (16 floats or 8 doubles), [2i + 1] (8 or 4), for
# each function and type, in this order; the loader fills the table with their addresses.
_SLEEF_SLOTS = [(name, double) for name in sorted(SLEEF) for double in (False, True)
                if SLEEF[name][double]]
SLEEF_NAMES = tuple("Sleef_" + SLEEF[name][double].format(n=n)
                    for name, double in _SLEEF_SLOTS for n in ((8, 4) if double else (16, 8)))
_LIBM_CALL = re.compile(rf"\b({'|'.join(SLEEF)})(f?|##S)\(")  # ##S: a helper, both types
_SLEEF_CALL = re.compile(rf"\btf_(?:sleef_({'|'.join(SLEEF)})(f?|##S)|aten_erff)\(")
SLEEF_TABLE = f"void* tf_sleef[{len(SLEEF_NAMES)}];  /* the loader fills it: c.SLEEF_NAMES */"
SLEEF_TYPES = """\
#ifndef __AVX__
#error "SLEEF's functions need AVX"
#endif
#define TF_SLEEF_FN __attribute__((visibility("hidden")))
typedef float tf_f32x4 __attribute__((vector_size(16)));
typedef float tf_f32x8 __attribute__((vector_size(32)));
typedef float tf_f32x16 __attribute__((vector_size(64)));
typedef double tf_f64x2 __attribute__((vector_size(16)));
typedef double tf_f64x4 __attribute__((vector_size(32)));
typedef double tf_f64x8 __attribute__((vector_size(64)));
#define TF_SLEEF(V, slot) ((V (*)(V))tf_sleef[slot])
#define TF_SLEEF2(V, slot) ((V (*)(V, V))tf_sleef[slot])"""
# ATen's Vectorized<float>::erf, operation for operation (its bits; the C library's erff
# differed in 40 % of a GELU's float32 results).
ATEN_ERFF = r"""/* ATen's Vectorized<float>::erf: Abramowitz-Stegun 7.1.26 around SLEEF's expf */
TF_FN float tf_aten_erff(float x) {
  const float t = 1.0f / fmaf(0.3275911f, fabsf(x), 1.0f);
  const float r = fmaf(fmaf(fmaf(fmaf(1.061405429f, t, -1.453152027f), t, 1.421413741f), t,
                            -0.284496736f), t, 0.254829592f);
  const float y = fmaf(-tf_sleef_expf(-(x * x)) * t, r, 1.0f);
  return tf_u2f(tf_f2u(y) ^ (tf_f2u(x) & 0x80000000u));
}"""


# The SLEEF functions that cost about what libmvec's do, which kernels call by default. run_fusion
# of 4M values on one thread, SLEEF's time / libmvec's, float (double): exp 1.05 (inline), exp2
# 1.06 (1.11), log 1.23 (0.95), log1p 1.31 (1.35), sin 1.18 (1.29), lgamma 0.38 (0.93), float
# erf (ATen's) 0.74. The others cost 2-6x: tanh 4.3 (2.1), expm1 3.0 (2.0), sinh 3.1, cosh 3.7,
# atanh 2.6, atan 2.5, atan2 2.2, asin 1.9, tan 2.0, erfc 6.6 (5.2), pow 1.5 (2.1), double erf
# 2.2 (the demo's GPT MLP epilogue, a tanh GELU: 3.3x eager's speed -> 1.2x): those stay libmvec's
# unless config.sleef_all, or for a float16 result, whose libmvec calls are in double
# (in_double), as costly as SLEEF's float ones. fmod: libmvec has none, and the C library's kept
# the loop scalar (remainder 4M floats: 257 ms against eager's 56; SLEEF's 8).
SLEEF_CHEAP = {(name, double) for name in ("exp", "exp2", "log", "log2", "log10", "log1p", "sin",
                                           "cos", "lgamma", "fmod") for double in (False, True)}
SLEEF_CHEAP.add(("erf", False))


def sleef_calls(expr: str, every: bool = True) -> str:
    """``expr`` with its math calls made to SLEEF's functions (tf_sleef_<name>), float erf to
    ATen's (tf_aten_erff): ``every`` one, or those of SLEEF_CHEAP."""
    def call(match: re.Match) -> str:
        name, f = match.groups()
        types = (False, True) if f == "##S" else (not f,)
        if not every and any((name, double) not in SLEEF_CHEAP for double in types):
            return match.group(0)
        return "tf_aten_erff(" if name + f == "erff" else f"tf_sleef_{name}{f}("
    return _LIBM_CALL.sub(call, expr)


def _sleef_wrapper(name: str, double: bool, slot: int) -> str:
    """tf_sleef_<name>: declared ``simd``, so gcc's vectorised loops call its vector-ABI
    variants, defined here (under asm labels) as calls of SLEEF's functions: the wide one for
    AVX512's 'e' variant, the narrow one for AVX2's 'd' and AVX's 'c', and for SSE's 'b' and the
    scalar one with their lanes repeated across it."""
    t, lanes = ("double", (8, 4, 2)) if double else ("float", (16, 8, 4))
    wide, narrow, short = (f"tf_f{64 if double else 32}x{n}" for n in lanes)
    f = f"tf_sleef_{name}{'' if double else 'f'}"
    args = ("a", "b") if name in _BINARY else ("a",)
    sleef = "TF_SLEEF2" if len(args) == 2 else "TF_SLEEF"

    def variant(abi: str, v: str, n: int, body: str) -> list[str]:
        label = f"_ZGV{abi}N{n}{'v' * len(args)}_{f}" if abi else f
        head = f"TF_SLEEF_FN {v} {f}_{abi or 1}({', '.join(f'{v} {a}' for a in args)})"
        return [f'{head} __asm__("{label}");', f"{head} {{ {body} }}"]

    def repeated(a: str, count: int) -> str:  # the narrow vector of a's lanes, repeated
        lane = [f"{a}[{i % count}]" if count > 1 else a for i in range(lanes[1])]
        return f"({narrow}){{{', '.join(lane)}}}"

    call = f"{sleef}({narrow}, {slot + 1})"
    spread = ", ".join(repeated(a, lanes[2]) for a in args)
    first = ", ".join(f"r[{i}]" for i in range(lanes[2]))
    return "\n".join([
        f"/* {SLEEF_NAMES[slot]} and {SLEEF_NAMES[slot + 1]} */",
        f'__attribute__((simd("notinbranch"), const)) TF_SLEEF_FN {t} {f}'
        f'({", ".join([t] * len(args))});',
        "#ifdef __AVX512F__",
        *variant("e", wide, lanes[0], f"return {sleef}({wide}, {slot})({', '.join(args)});"),
        "#endif", "#ifdef __AVX2__",
        *variant("d", narrow, lanes[1], f"return {call}({', '.join(args)});"),
        "#endif",
        *variant("c", narrow, lanes[1], f"return {call}({', '.join(args)});"),
        *variant("b", short, lanes[2],
                 f"const {narrow} r = {call}({spread}); return ({short}){{{first}}};"),
        *variant("", t, 1, f"return {call}({', '.join(repeated(a, 1) for a in args)})[0];"),
    ])


# SLEEF's functions that a kernel computes itself, inline, operation for operation as SLEEF's
# AVX2/AVX512 builds do (with fma): a call clobbers every vector register, and gcc vectorises
# these in the loop. expf (SLEEF's xexpf: Cody and Waite's reduction by ln 2, a polynomial of
# degree 6, a scaling in two halves): the same bits as Sleef_expf16_u10 on all 2**32 floats;
# 4M elements on one thread, called -> inline: a float32 sigmoid 2.19-2.22 -> 1.99-2.01 ms
# (libmvec's expf 1.79-1.90), the erf GELU 3.18 -> 2.88 (libmvec's erff 3.59).
SLEEF_INLINE = {("exp", False): r"""/* SLEEF's expf u10, inline (codegen/c.SLEEF_INLINE) */
TF_FN float tf_sleef_expf(float d) {
  const float q = rintf(d * 1.44269504088896340736f);
  const int32_t e = (int32_t)q;
  float s = fmaf(q, -0.693145751953125f, d);
  s = fmaf(q, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = fmaf(u, s, 0.00139304355252534151077271f);
  u = fmaf(u, s, 0.00833336077630519866943359f);
  u = fmaf(u, s, 0.0416664853692054748535156f);
  u = fmaf(u, s, 0.166666671633720397949219f);
  u = fmaf(u, s, 0.5f);
  u = 1.0f + fmaf(s * s, u, s);
  const float first = tf_u2f((uint32_t)((e >> 1) + 0x7f) << 23);
  u = u * first * tf_u2f((uint32_t)(e - (e >> 1) + 0x7f) << 23);
  u = d < -104.0f ? 0.0f : u;
  return 100.0f < d ? INFINITY : u;
}"""}


def sleef_definitions(code: str) -> str:
    """The SLEEF table, and the wrappers (or inline functions, and ATen's erff) that ``code``
    calls."""
    used = set()
    for name, suffix in _SLEEF_CALL.findall(code):
        if name:
            used.update([(name, False), (name, True)] if suffix == "##S" else [(name, not suffix)])
    if "tf_aten_erff(" in code:
        used.add(("exp", False))
    if not used:
        return ""
    functions = [SLEEF_INLINE.get((name, double)) or
                 _sleef_wrapper(name, double, 2 * _SLEEF_SLOTS.index((name, double)))
                 for name, double in sorted(used)]
    return "\n".join([SLEEF_TYPES, SLEEF_TABLE, *functions,
                      *([ATEN_ERFF] if "tf_aten_erff(" in code else [])])


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


# Eager's CPU kernels for exp, log, tanh, erf... of float32/float64 call MKL's VML in its
# high-accuracy mode (ATen's vml.h), whose results are not libm's: a kernel computes those ops a
# block of elements at a time and passes each block to the same VML function, for eager's bits.
# The functions live in libtorch_cpu, not in the global namespace: the backend fills tf_vml
# with their addresses when it loads the kernel (devices/cpu.vml_functions).
VML = tuple(sorted({op.vml for op in ops.OPS if op.vml}))  # tf_vml[2i]: vms<f>, [2i + 1]: vmd<f>
VML_MODE = 0x140102  # VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as ATen's vml.h calls it
BLOCK = 256  # elements a VML call takes: the block's arrays stay in L1
VML_TABLE = f"""typedef void (*tf_vml_fn)(int64_t n, const void* a, void* r, int64_t mode);
tf_vml_fn tf_vml[{2 * len(VML)}];  /* filled by the loader: vms/vmd{', '.join(VML)} */"""


# A store to a line that is not in the cache reads it first (for ownership): an output costs
# twice its bytes. Where a call's footprint outgrows the last-level cache, kernels that run in
# blocks stage each block's results and write them past the caches (x86 non-temporal stores, in
# asm: <immintrin.h> costs a compile 0.1 s; a copy for a block's unaligned head and tail; other
# CPUs do not stream, devices/cpu.stream_bytes). Each thread fences once, after its share of the
# loop: a fence after every block made an Adam step 2.8x slower.
STREAM = r"""#if defined(__x86_64__) && defined(__AVX512F__)
#define TF_LINE 64
#define TF_STREAM_STORE "vmovntdq %1, %0"
#elif defined(__x86_64__) && defined(__AVX__)
#define TF_LINE 32
#define TF_STREAM_STORE "vmovntdq %1, %0"
#elif defined(__x86_64__) && defined(__SSE2__)
#define TF_LINE 16
#define TF_STREAM_STORE "movntdq %1, %0"
#endif
TF_FN void tf_stream(void* restrict dst, const void* restrict src, int64_t bytes) {
  char* d = (char*)dst;
  const char* s = (const char*)src;
#ifdef TF_LINE
  typedef long long line __attribute__((vector_size(TF_LINE), aligned(1)));
  int64_t head = (int64_t)(-(uintptr_t)d & (TF_LINE - 1));
  if (head > bytes) head = bytes;
  memcpy(d, s, (size_t)head);
  d += head; s += head; bytes -= head;
  for (; bytes >= TF_LINE; bytes -= TF_LINE, d += TF_LINE, s += TF_LINE)
    __asm__ volatile(TF_STREAM_STORE : "=m"(*(line*)d) : "x"(*(const line*)s));
#endif
  memcpy(d, s, (size_t)bytes);
}
TF_FN void tf_fence(int stream) {
#ifdef TF_LINE
  if (stream) __asm__ volatile("sfence" ::: "memory");
#else
  (void)stream;
#endif
}"""


# A kernel without VML calls runs in its plain loop; where the machine tells its cache's size, the
# source also holds, under TF_STREAMED, the loop in blocks that streams its outputs: a second
# entry for calls from so many elements (devices/cpu builds it at the first such call).
STREAMED_ENTRY = "// streamed entry: n >= {}"
_STREAMED_ENTRY = re.compile(r"// streamed entry: n >= (\d+)\n")


def streamed_from(source: str) -> int | None:
    """From how many elements a source's streamed entry serves a call; None where it has none."""
    match = _STREAMED_ENTRY.match(source)
    return None if match is None else int(match.group(1))


PARALLEL_FOR = "schedule(static) reduction(|:err)"  # a loop's clauses besides its `if`


_WORK = re.compile(r"\btf_(log|round_b?f16)")  # domain-wrapped logs, 16-bit roundings


def parallel_threshold(body: list[str]) -> int:
    """The element count from which a kernel runs on all threads: each call of a math function
    in the body, and each rounding to 16 bits, counts as one more element's worth of work
    (measured: a thread pays off from ~8K elements of plain arithmetic, from ~2K elements of an
    LSTM cell's five calls; a float16 tanh GELU's nine roundings: 4096 elements 14.8 -> 8.3 µs on
    two threads, bfloat16's 5.8 -> 3.8)."""
    calls = sum(len(_CALL.findall(line)) + len(_SLEEF_CALL.findall(line))
                + len(_WORK.findall(line)) for line in body)
    return max(1, config.parallel_threshold // (1 + calls))


class CRenderer(CStyleRenderer):
    preamble = PREAMBLE

    def __init__(self, vml: Callable[[], bool] = lambda: False,
                 sleef: Callable[[], str] = lambda: "",
                 stream_bytes: Callable[[], int | None] = lambda: None) -> None:
        self.vml = vml  # whether this process has eager's VML functions (the backend asks torch)
        self.sleef = sleef  # which of eager's SLEEF functions kernels call: "", "cheap", "all"
        self.stream_bytes = stream_bytes  # from what footprint block kernels stream (STREAM)

    def render(self, typed: TypedGraph, argspec: ArgSpec) -> str:
        codes = [d.inner for d in argspec.inputs] + [inner for inner, _ in argspec.outputs]
        lines = self._prologue(typed, argspec, len(codes))
        # "parallel:" keeps the condition off the simd part of "parallel for simd": below the
        # threshold the loop still runs vectorised, on one thread.
        when = f"if(parallel: n >= {parallel_threshold(self.body(typed))})"
        blocks = self.vml_calls(typed)
        stream_from = self._stream_from(typed)

        def loop(blocked: bool) -> list[str]:
            if argspec.rank > 1:
                return self._rows(typed, argspec, codes, when, blocks, blocked)
            at = (lambda p: "0", lambda p: f"stride[{p}]")  # each operand's base and stride
            if blocked:
                return self._parallel(when, self._blocks(
                    typed, argspec, codes, "n", "i", at, blocks, "  "))
            return [f"  #pragma omp parallel for simd {when} {PARALLEL_FOR}",
                    "  for (int64_t i = 0; i < n; i++) {",
                    *self._inner(typed, argspec, codes, "i", *at), "  }"]

        header, streams = "", bool(blocks)
        if blocks:  # the call's size decides whether it streams
            stream = "0" if stream_from is None else f"n >= {stream_from}"
            lines += [f"  const int stream = {stream};", *loop(True)]
        elif stream_from is not None and self._staged(argspec, codes):
            # The plain loop, and for big calls a second entry (built at the first, devices/cpu)
            # that streams: in blocks, 2-7 % slower inside the caches, 20-30 % quicker past them.
            header, streams = STREAMED_ENTRY.format(stream_from) + "\n", True
            lines += ["#ifdef TF_STREAMED", "  const int stream = 1;", *loop(True), "#else",
                      *loop(False), "#endif"]
        else:
            lines += loop(False)
        lines += ["  return err;", "}"]
        kernel = "\n".join(lines)
        shared = helpers_for(kernel)
        sleef = self.sleef()
        if sleef:
            shared = sleef_calls(shared, every=sleef == "all")
        half = any(name in kernel + shared
                   for name in ("tf_half", "tf_h2f", "tf_f2h", "tf_round_f16"))
        helpers = "\n".join(filter(None, [FLOAT16 if half else "", VML_TABLE if blocks else "",
                                          STREAM if streams else "", shared, domain_guards(kernel),
                                          HUGE_PAGES]))
        declarations = "\n".join(filter(None, [vector_math_declarations(helpers + kernel),
                                                sleef_definitions(helpers + kernel)]))
        return "\n".join([header + self.preamble, declarations, helpers, "", kernel, ""])

    def _stream_from(self, typed: TypedGraph) -> int | None:
        """From how many elements a call's footprint (every operand's bytes) reaches the
        threshold from which kernels write their outputs past the caches; None: never."""
        threshold = self.stream_bytes()
        if threshold is None:
            return None
        per_element = sum(d.itemsize for d in typed.dtypes[:typed.graph.n_inputs]) + sum(
            typed.dtypes[v].itemsize for v in typed.graph.outputs)
        return max(1, -(-threshold // per_element))

    @staticmethod
    def _staged(argspec: ArgSpec, codes: list[str]) -> list[int]:
        """The outputs a kernel in blocks streams: those written whole and contiguous."""
        n_in = len(argspec.inputs)
        return [o for o, partial in enumerate(argspec.partial_outputs)
                if codes[n_in + o] == CONTIG and not partial]

    @staticmethod
    def _parallel(when: str, loop: list[str]) -> list[str]:
        """``loop`` shared out among the threads (from the ``when`` clause on), each fencing its
        streamed stores after its share (a parallel region around the loop: ``parallel for``
        leaves no place for it)."""
        return [f"  #pragma omp parallel {when} reduction(|:err)", "  {",
                "    #pragma omp for schedule(static) nowait",
                *("  " + line for line in loop), "    tf_fence(stream);", "  }"]

    def vml_calls(self, typed: TypedGraph) -> dict[int, int]:
        """Op index -> its function's index in tf_vml, for the ops this kernel passes to VML:
        those eager's kernel does (OpDef.vml) computing in float32/float64, where this process
        has VML."""
        calls = {}
        for k, selected in enumerate(typed.selected):
            if selected.op.vml and selected.compute in (torch.float32, torch.float64):
                calls[k] = 2 * VML.index(selected.op.vml) + (selected.compute == torch.float64)
        return calls if calls and self.vml() else {}

    def _blocks(self, typed: TypedGraph, argspec: ArgSpec, codes: list[str], total: str,
                j: str, at: tuple[Callable, Callable], calls: dict[int, int],
                pad: str) -> list[str]:
        """The loop over ``total`` elements (index ``j``) a block of BLOCK at a time: the ops in
        stages, one simd loop each, a VML call on a whole block between two stages. A value
        that a later stage reads waits in a block array (``t<id>``; a VML op's argument
        ``a<id>`` and result ``r<id>``); inputs are loaded again where a stage reads them."""
        graph, dtypes, n = typed.graph, typed.dtypes, typed.graph.n_inputs
        # Where each value is computed: as early as its operands allow (a VML result: after its
        # call). Measured on an LSTM cell: 7 % quicker than as late as its readers allow, which
        # carries no values in arrays but reads the inputs in three passes instead of one.
        stage = [0] * (n + len(graph.ops))
        for k, op in enumerate(graph.ops):
            first = max((stage[o.id] for o in op.operands if isinstance(o, Ref)), default=0)
            stage[n + k] = first + (k in calls)
        uses: dict[int, set[int]] = {}  # value -> the stages that read it
        for k, op in enumerate(graph.ops):
            for o in op.operands:
                if isinstance(o, Ref):
                    uses.setdefault(o.id, set()).add(stage[n + k] - (k in calls))
        for value in graph.outputs:
            uses.setdefault(value, set()).add(stage[value])
        carried = sorted(v for v in range(n, len(stage)) if v - n not in calls
                         and any(s > stage[v] for s in uses.get(v, ())))
        arrays = [f"{C_TYPES[dtypes[v]]} t{v}[{BLOCK}];" for v in carried]
        # VML op -> the result of another it reads in place. (Not an input in place: reading
        # the block from memory, VML waits for it, where a copy loop streams it with the rest:
        # an LSTM cell 5 % slower.)
        given = {}
        for k in calls:
            compute, v = typed.selected[k].compute, graph.ops[k].operands[0]
            if (isinstance(v, Ref) and v.id - n in calls and dtypes[v.id] == compute
                    and typed.selected[k].op.vml_argument is None):
                given[k] = f"r{v.id}"
            else:
                arrays.append(f"{C_TYPES[compute]} a{n + k}[{BLOCK}];")
            arrays.append(f"{C_TYPES[compute]} r{n + k}[{BLOCK}];")
        # Outputs written whole and contiguous go through ``d<o>``: the output itself, or where
        # the call streams (STREAM) a block array, streamed out after the block's stages.
        n_in = len(argspec.inputs)
        staged = {o: self.inner_index(CONTIG, at[0](n_in + o), f"{j}0", "")
                  for o in self._staged(argspec, codes)}
        for o in staged:
            t = STORAGE_TYPES[dtypes[graph.outputs[o]]]
            arrays += [f"{t} s{o}[{BLOCK}];",
                       f"{t}* restrict d{o} = stream ? s{o} : out{o} + {staged[o]};"]
        body = self.body(typed)  # the element path's statements, one per op
        pad2 = pad + "  "
        lines = [f"{pad}for (int64_t {j}0 = 0; {j}0 < {total}; {j}0 += {BLOCK}) {{",
                 f"{pad2}const int64_t m = {total} - {j}0 < {BLOCK} ? {total} - {j}0 : {BLOCK};",
                 *(pad2 + a for a in arrays)]
        for s in range(max(stage) + 1):
            loop = [f"const int64_t {j} = {j}0 + k;"]
            for v in sorted(v for v, stages in uses.items() if s in stages):
                if v < n:  # an input: loaded again
                    loop.append(self._load(typed, codes, v, j, *at))
                elif v - n in calls:  # a VML result (its call came before this stage)
                    value = self.convert(f"r{v}[k]", typed.selected[v - n].compute, dtypes[v])
                    loop.append(f"const {C_TYPES[dtypes[v]]} v{v} = {value};")
                elif stage[v] < s:  # from an earlier stage
                    loop.append(f"const {C_TYPES[dtypes[v]]} v{v} = t{v}[k];")
            for k in range(len(graph.ops)):
                if stage[n + k] == s and k not in calls:
                    loop.append(body[k])
                elif k in calls and stage[n + k] == s + 1 and k not in given:
                    loop.append(f"a{n + k}[k] = {self._vml_argument(typed, k)};")
            loop += [f"t{v}[k] = v{v};" for v in carried if stage[v] == s]
            loop += [self.store(f"d{o}", "k", f"v{value}", dtypes[value]) if o in staged
                     else self._store(typed, argspec, codes, o, j, *at)
                     for o, value in enumerate(graph.outputs) if stage[value] == s]
            if any(not line.startswith("const ") for line in loop):  # not loads alone
                lines += [f"{pad2}#pragma omp simd reduction(|:err)",
                          f"{pad2}for (int64_t k = 0; k < m; k++) {{",
                          *(pad2 + "  " + line for line in loop),
                          f"{pad2}}}"]
            lines += [f"{pad2}tf_vml[{calls[k]}](m, {given.get(k, f'a{n + k}')}, r{n + k}, "
                      f"{VML_MODE:#x});" for k in sorted(calls) if stage[n + k] == s + 1]
        lines += [f"{pad2}if (stream) tf_stream(out{o} + {start}, s{o}, "
                  f"m * (int64_t)sizeof(*out{o}));" for o, start in staged.items()]
        return lines + [f"{pad}}}"]

    def _vml_argument(self, typed: TypedGraph, k: int) -> str:
        """What op ``k``'s VML function is given: its operand in its compute type, or what
        OpDef.vml_argument makes of its operands."""
        op, selected = typed.graph.ops[k], typed.selected[k]
        if selected.op.vml_argument is not None:
            ctx, operands = self.op_context(typed, k)
            return selected.op.vml_argument(ctx, *operands)
        return str(self._operand(op.operands[0], selected.casts[0], typed, False))

    def body(self, typed: TypedGraph) -> list[str]:
        """The element path's statements: math calls to SLEEF's functions where this process
        has them (SLEEF_CHEAP's, or every one: config.sleef_all, or a float16 result), float16
        results' others in double (in_double), logs through their domain wrappers."""
        n, sleef = typed.graph.n_inputs, self.sleef()
        lines = []
        for line, chosen, dtype in zip(super().body(typed), typed.selected, typed.dtypes[n:],
                                       strict=True):
            half = dtype == torch.float16
            if sleef and chosen.compute not in chosen.op.libm:
                line = sleef_calls(line, every=sleef == "all" or half)
            lines.append(guard_domains(in_double(line) if half else line))
        return lines

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

    def _rows(self, typed: TypedGraph, argspec: ArgSpec, codes: list[str], when: str,
              blocks: dict[int, int], blocked: bool) -> list[str]:
        """Rank >= 2: one parallel loop over rows (all outer dims), a simd loop over the inner
        (or, ``blocked``, its blocks)."""
        rank, k = argspec.rank, len(codes)
        partial = argspec.partial_outputs
        n_in = len(argspec.inputs)
        stride_of = lambda p, d: f"stride[{p * rank + d}]"  # noqa: E731
        head = [f"  const int64_t inner = size[{rank - 1}];", "  const int64_t rows = n / inner;"]
        lines = [
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
        at = (lambda p: f"b{p}", lambda p: stride_of(p, rank - 1))
        if blocked:
            loop = self._blocks(typed, argspec, codes, "inner", "j", at, blocks, "    ")
            return [*head, *self._parallel(when, [*lines, *loop, "  }"])]
        lines.append("    #pragma omp simd reduction(|:err)")
        lines.append("    for (int64_t j = 0; j < inner; j++) {")
        lines += self._inner(typed, argspec, codes, "j", *at)
        lines += ["    }", "  }"]
        return [*head, f"  #pragma omp parallel for {when} {PARALLEL_FOR}", *lines]

    def _inner(self, typed, argspec, codes, j, base, stride) -> list[str]:
        """Loads, the body and stores for one element; ``base(p)``/``stride(p)`` of operand p."""
        pad = "    " if j == "i" else "      "
        n_in = typed.graph.n_inputs
        return [pad + line for line in (
            *(self._load(typed, codes, i, j, base, stride) for i in range(n_in)),
            *self.body(typed),
            *(self._store(typed, argspec, codes, o, j, base, stride)
              for o in range(len(typed.graph.outputs))))]

    def _load(self, typed, codes, i: int, j: str, base, stride) -> str:
        """Input ``i``'s element ``j`` into ``v<i>``."""
        index = self.inner_index(codes[i], base(i), j, stride(i))
        value = self.load(f"in{i}", index, typed.dtypes[i])
        return f"const {self.ctype(typed.dtypes[i])} v{i} = {value};"

    def _store(self, typed, argspec, codes, o: int, j: str, base, stride) -> str:
        """Output ``o``'s element ``j``; a partial output's only where it is its own."""
        graph = typed.graph
        p, value = graph.n_inputs + o, graph.outputs[o]
        index = self.inner_index(codes[p], base(p), j, stride(p))
        store = self.store(f"out{o}", index, f"v{value}", typed.dtypes[value])
        if argspec.partial_outputs[o]:
            guard = f"{j} == 0" if codes[p] == BROADCAST else "1"
            if j == "j":
                guard = f"w{o} && ({guard})"
            store = f"if ({guard}) {store}"
        return store
