"""The C-style renderer shared by every device: types, constants, conversions and the op body.

A device renderer subclasses :class:`CStyleRenderer`, sets a few attributes (its preamble, how
it stores half floats) and writes the loop around :meth:`CStyleRenderer.body`.

Values live in *compute types*: float16 and bfloat16 values are held in ``float`` and rounded
back to their own precision after every op, as eager rounds every op's result; everything else
is held in its own C type.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import torch

from .. import ops
from ..ir import Const, FusionGraph
from ..spec import BROADCAST, CONTIG, ArgSpec

C_TYPES = {
    torch.float16: "float",
    torch.bfloat16: "float",
    torch.float32: "float",
    torch.float64: "double",
    torch.uint8: "uint8_t",
    torch.int8: "int8_t",
    torch.int16: "int16_t",
    torch.int32: "int32_t",
    torch.int64: "int64_t",
    torch.bool: "bool",
}
STORAGE_TYPES = {**C_TYPES, torch.float16: "tf_half", torch.bfloat16: "uint16_t",
                 torch.bool: "uint8_t"}
INT_TAGS = {torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
            torch.int64: "i64"}
INT_MIN = {torch.int8: -(2**7), torch.int16: -(2**15), torch.int32: -(2**31),
           torch.int64: -(2**63)}


# Helpers every device shares, in dependency order; a kernel includes only those it uses.
# TF_FN, tf_half, tf_h2f/tf_f2h and tf_f2u/tf_u2f come from the device's own preamble, and so
# does a helper's own form where a device has a quicker one (TF_ROUND_F16_NATIVE...). Integer
# helpers never divide by zero, never overflow a signed type and never shift out of range: they
# set *err (division by zero) or wrap, as eager does.
HELPERS: list[tuple[tuple[str, ...], str]] = [
    (("TF_MAX", "TF_MIN"), r"""
#define TF_MAX(a, b) ((a) < (b) ? (b) : (a))
#define TF_MIN(a, b) ((b) < (a) ? (b) : (a))"""),
    (("tf_bf2f", "tf_f2bf", "tf_round_bf16"), r"""
TF_FN float tf_bf2f(uint16_t h) { return tf_u2f((uint32_t)h << 16); }
TF_FN uint16_t tf_f2bf(float f) {
#ifdef TF_F2BF_NATIVE
  return TF_F2BF_NATIVE(f);
#endif
  const uint32_t u = tf_f2u(f);
  const uint16_t even = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  /* to nearest even */
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : even;  /* NaN: a select, no branch */
}
TF_FN float tf_round_bf16(float f) {
#ifdef TF_ROUND_BF16_NATIVE
  return TF_ROUND_BF16_NATIVE(f);
#endif
  return tf_bf2f(tf_f2bf(f));
}"""),
    (("tf_round_f16",), r"""
TF_FN float tf_round_f16(float f) {
#ifdef TF_ROUND_F16_NATIVE
  return TF_ROUND_F16_NATIVE(f);
#endif
  return tf_h2f(tf_f2h(f));
}"""),
    (("tf_div_floor_steps",), r"""
/* Floor division as eager's vectorised CPU kernel computes float16/bfloat16 (c10's
   div_floor_floating on Vectorized<Half/BFloat16>): each operation rounded by R; where the
   rounded quotient overflows, a finite a is divided whole. Every value computed, then selected
   (TF_DIV_FLOOR_BODY's comment says why) */
#define TF_DIV_FLOOR_ROUNDED(S, R) \
TF_FN float tf_div_floor_steps_##S(float a, float b) { \
  const float q = R(a / b), mod = fmodf(a, b), rest = R(a - mod); \
  const float whole = R((isinf(q) && !isinf(a) ? a : rest) / b), less = R(whole - 1); \
  const float div = mod != 0 && (b < 0) != (mod < 0) ? less : whole; \
  const float floordiv = floorf(div), up = R(floordiv + 1); \
  const float result = R(div - floordiv) > 0.5f ? up : floordiv; \
  return b == 0 ? q : div == 0 ? copysignf(0.0f, q) : result; \
}
TF_DIV_FLOOR_ROUNDED(f16, tf_round_f16)
TF_DIV_FLOOR_ROUNDED(bf16, tf_round_bf16)"""),
    (("tf_sleef_tanh_arg",), r"""
/* The argument that makes the C library's tanh saturate where eager's vectorised CPU kernels of
   the tanh GELU and mish do (ATen's Vectorized tanh, SLEEF's: exactly +-1 past its bound, where
   libmvec's tanhf still gives 1 - 2**-24 up to |y| ~ 10; and 0 for the least subnormal, where
   eager's vector loops' mish of x < -102.874 is -0): y itself, +-20 (+-40 in double), whose
   tanh is +-1 in every library, or +-0. The call stays unconditional: a select of its result
   made gcc call the scalar tanh in each lane. */
TF_FN float tf_sleef_tanh_argf(float y) {
  const float a = fabsf(y);
  return a > 8.664339742f ? copysignf(20.0f, y) : a < 0x1p-148f ? copysignf(0.0f, y) : y;
}
TF_FN double tf_sleef_tanh_arg(double y) {
  const double a = fabs(y);
  return a > 18.714973875 ? copysign(40.0, y) : a < 0x1p-1073 ? copysign(0.0, y) : y;
}"""),
    (("tf_sleef_expm1_arg",), r"""
/* The argument that makes the C library's expm1 give -1 where eager's vectorised CPU kernel
   (SLEEF's expm1, within 1 ulp) does: below ln(2**-24) (ln(2**-53) in double), where the
   correctly rounded result is still -1 + 2**-24 down to ln(2**-25): x itself, or -20 (-40),
   whose expm1 is -1 in every library. */
TF_FN float tf_sleef_expm1_argf(float x) {
  return x < -16.635532333438687426013570f ? -20.0f : x;
}
TF_FN double tf_sleef_expm1_arg(double x) {
  return x < -36.736800569677101399113302437 ? -40.0 : x;
}"""),
    (("tf_hypot",), r"""
/* hypot(x, y) in double, correctly rounded in all but rare cases as eager's is (SLEEF's, within
   0.5001 ulp; libmvec's, within 1 ulp, differed in 10 % of random pairs): the square root of
   fma(a, a, b * b), corrected by the exact residual of its square (Borges, "An improved
   algorithm for hypot(a, b)", 2019), the operands scaled by a power of two into a range where
   neither square overflows nor underflows. An infinity wins over NaN. */
TF_FN double tf_hypot(double x, double y) {
  const double ax = fabs(x), ay = fabs(y);
  const double hi = ax > ay ? ax : ay, lo = ax > ay ? ay : ax;  /* NaN: NaN in one of them */
  const double s = hi > 0x1p500 ? 0x1p-600 : hi < 0x1p-500 ? 0x1p600 : 1.0;
  const double a = hi * s, b = lo * s;
  const double h = sqrt(fma(a, a, b * b)), h2 = h * h, a2 = a * a;
  const double delta = (fma(-b, b, h2 - a2) + fma(h, h, -h2)) - fma(a, a, -a2);
  const double r = h > 0 ? (h - delta / (2 * h)) / s : h;  /* 0 or NaN as they are */
  return isinf(x) || isinf(y) ? INFINITY : r;
}"""),
    (("tf_f2i32", "tf_f2i64"), r"""
/* float -> integer as x86 converts (out of range and NaN give the minimum), without UB.
   |x| < 1 gives a literal 0: gcc with -fno-trapping-math folds (float)(int)x into trunc(x),
   which keeps the sign of x in (-1, 0): -0 where eager's integer 0 converts to +0 (and 1 / it
   is then an infinity of the wrong sign). */
TF_FN int32_t tf_f2i32(double x) {
  return (x != x || x <= -2147483649.0 || x >= 2147483648.0) ? INT32_MIN
         : (x > -1.0 && x < 1.0) ? 0 : (int32_t)x;
}
TF_FN int64_t tf_f2i64(double x) {
  return (x != x || x < -0x1p63 || x >= 0x1p63) ? INT64_MIN
         : (x > -1.0 && x < 1.0) ? 0 : (int64_t)x;
}"""),
    (("tf_max", "tf_min", "tf_fmax", "tf_fmin", "tf_pick", "tf_remainder", "tf_div_floor",
      "tf_logaddexp"), r"""
/* c10's div_floor_floating, eager's floor of a floating-point quotient: Q(x) divides x by b
   (TF_QUOTIENT) or multiplies it by the reciprocal CUDA eager takes of a Python number
   (TF_TIMES_INVERSE); R holds a value in the result's type (TF_SAME, or a 16-bit rounding);
   TF_DIVIDEND is what is divided: a - mod, or the CPU's (codegen/c.PREAMBLE). Every value is
   computed, then selected: gcc does not vectorise a loop with a branch (the early returns kept
   floor division's CPU loops scalar: 5-20x eager's time). Q(a) is a / b also where b is 0
   (the reciprocal is then an infinity). */
#ifndef TF_DIVIDEND
#define TF_DIVIDEND(a, mod, q) ((a) - (mod))
#endif
#define TF_DIV_FLOOR_BODY(T, S, Q, R) \
  const T q = Q(a), mod = fmod##S(a, b), whole = Q(TF_DIVIDEND(a, mod, q)), less = whole - 1; \
  const T div = mod != 0 && (b < 0) != (mod < 0) ? less : whole; \
  const T floordiv = R(floor##S(div)), up = R(floordiv + 1); \
  const T result = div - floordiv > (T)0.5 ? up : floordiv; \
  return b == 0 ? q : div == 0 ? copysign##S((T)0, q) : result;
#define TF_QUOTIENT(x) ((x) / b)
#define TF_TIMES_INVERSE(x) ((x) * inverse)
#define TF_SAME(x) (x)
#ifndef TF_FMAX  /* max/min of numbers (not NaN) as the device's eager: the CPU's keeps the first */
#define TF_FMAX(S, a, b) TF_MAX(a, b)
#define TF_FMIN(S, a, b) TF_MIN(a, b)
#endif
/* (NaN tests as nested selects: gcc vectorised no loop of clamp's max-then-min with a ||) */
#define TF_FLOAT_HELPERS(S, T) \
TF_FN T tf_max##S(T a, T b) { return a != a ? a + b : b != b ? a + b : TF_FMAX(S, a, b); } \
TF_FN T tf_min##S(T a, T b) { return a != a ? a + b : b != b ? a + b : TF_FMIN(S, a, b); } \
/* C's fmax and fmin as glibc computes them (of equal numbers the first), written out: gcc \
   vectorises no call of fmaxf */ \
TF_FN T tf_fmax##S(T a, T b) { return a != a ? b : b != b ? a : TF_MAX(a, b); } \
TF_FN T tf_fmin##S(T a, T b) { return a != a ? b : b != b ? a : TF_MIN(a, b); } \
/* c ? a : b with a and b computed first (a function's arguments are): a math call in a \
   select's arm stays behind a branch, and gcc vectorises no loop with one (the CPU's softplus, \
   elu; CUDA's templates keep the select) */ \
TF_FN T tf_pick##S(int c, T a, T b) { return c ? a : b; } \
TF_FN T tf_remainder##S(T a, T b) { \
  const T mod = fmod##S(a, b), shifted = mod + b; \
  return mod != 0 && (b < 0) != (mod < 0) ? shifted : mod; \
} \
TF_FN T tf_div_floor##S(T a, T b) { TF_DIV_FLOOR_BODY(T, S, TF_QUOTIENT, TF_SAME) } \
TF_FN T tf_div_floor_rcp##S(T a, T b, T inverse) { \
  TF_DIV_FLOOR_BODY(T, S, TF_TIMES_INVERSE, TF_SAME) \
} \
TF_FN T tf_logaddexp##S(T a, T b) { \
  const T sum = TF_MAX(a, b) + log1p##S(exp##S(-fabs##S(a - b))); \
  return isinf(a) && a == b ? a : sum; \
}
TF_FLOAT_HELPERS(f, float)
TF_FLOAT_HELPERS(, double)"""),
    (("_held_f16", "_held_bf16"), r"""
/* CUDA eager's floor division of float16/bfloat16 (div_floor_floating on c10::Half/BFloat16
   values): the quotient in float, the floor held in the 16-bit type */
#define TF_DIV_FLOOR_HELD(S, R) \
TF_FN float tf_div_floor_held_##S(float a, float b) { \
  TF_DIV_FLOOR_BODY(float, f, TF_QUOTIENT, R) \
} \
TF_FN float tf_div_floor_rcp_held_##S(float a, float b, float inverse) { \
  TF_DIV_FLOOR_BODY(float, f, TF_TIMES_INVERSE, R) \
}
TF_DIV_FLOOR_HELD(f16, tf_round_f16)
TF_DIV_FLOOR_HELD(bf16, tf_round_bf16)"""),
    (("_u8(", "_i8(", "_i16(", "_i32(", "_i64("), r"""
#define TF_INT_HELPERS(t, T, U, BITS) \
TF_FN T tf_div_trunc_##t(T a, T b, int* err) { \
  if (b == 0) { *err = 1; return 0; } \
  if ((T)-1 < 0 && b == (T)-1) return (T)(-(U)a); \
  return (T)(a / b); \
} \
TF_FN T tf_div_floor_##t(T a, T b, int* err) { \
  if (b == 0) { *err = 1; return 0; } \
  if ((T)-1 < 0 && b == (T)-1) return (T)(-(U)a); \
  T q = (T)(a / b), r = (T)(a % b); \
  if (r != 0 && ((r < 0) != (b < 0))) q -= 1; \
  return q; \
} \
TF_FN T tf_remainder_##t(T a, T b, int* err) { \
  if (b == 0) { *err = 1; return 0; } \
  if ((T)-1 < 0 && b == (T)-1) return 0; \
  T r = (T)(a % b); \
  if (r != 0 && ((r < 0) != (b < 0))) r += b; \
  return r; \
} \
TF_FN T tf_fmod_##t(T a, T b, int* err) { \
  if (b == 0) { *err = 1; return 0; } \
  if ((T)-1 < 0 && b == (T)-1) return 0; \
  return (T)(a % b); \
} \
TF_FN T tf_pow_##t(T a, T b) { \
  if (b < 0) return a == 1 ? 1 : (a == (T)-1 && (T)-1 < 0) ? ((b & 1) ? a : 1) : 0; \
  U result = 1, base = (U)a; \
  while (b) { if (b & 1) result *= base; b /= 2; base *= base; } \
  return (T)result; \
} \
TF_FN T tf_shl_##t(T a, T b) { return (b < 0 || b >= BITS) ? 0 : (T)((U)a << b); } \
TF_FN T tf_shr_##t(T a, T b) {  /* past the width: the sign bit's copies, 0 unsigned */ \
  if (b < 0 || b >= BITS) return (T)-1 < 0 ? (T)(a >> (BITS - 1)) : 0; \
  return (T)(a >> b); \
}"""),
]
INT_HELPER_TYPES = {"u8": ("uint8_t", "uint32_t", 8), "i8": ("int8_t", "uint32_t", 8),
                    "i16": ("int16_t", "uint32_t", 16), "i32": ("int32_t", "uint32_t", 32),
                    "i64": ("int64_t", "uint64_t", 64)}


def helpers_for(code: str) -> str:
    """The shared helpers ``code`` uses (and those they use), in dependency order."""
    chosen: list[str] = []
    used = code
    for names, helper in reversed(HELPERS):
        if any(name in used for name in names):
            if helper.lstrip().startswith("#define TF_INT_HELPERS"):
                helper += "".join(f"\nTF_INT_HELPERS({tag}, {t}, {u}, {bits})"
                                  for tag, (t, u, bits) in INT_HELPER_TYPES.items()
                                  if f"_{tag}(" in code)
            chosen.append(helper)
            used += helper
    return "\n".join(reversed(chosen))


@dataclasses.dataclass(frozen=True)
class TypedGraph:
    """A FusionGraph with a dtype for every value, as eager computes them for one ArgSpec."""

    graph: FusionGraph
    dtypes: tuple[torch.dtype, ...]
    selected: tuple[ops.Selected, ...]  # one per op
    scalar: tuple[bool, ...]  # per value: what eager reads as a scalar (TensorDesc.scalar/expanded)


def _is_float32(value: float) -> bool:
    """Whether a double is exactly a float (then ``1.5f`` is the same constant)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0] == value
    except OverflowError:
        return False


class CStyleRenderer:
    """Renders a TypedGraph to C-like source; devices subclass it for their loop and preamble."""

    cuda = False  # picks the op table's CUDA overrides
    preamble = ""  # device includes and primitives, placed before the helpers

    # ---- values ----------------------------------------------------------------------------

    @staticmethod
    def ctype(dtype: torch.dtype) -> str:
        return C_TYPES[dtype]

    @staticmethod
    def literal(value: bool | int | float, dtype: torch.dtype) -> str:
        """``value`` as a C constant of ``dtype``'s compute type.

        Scalars are not rounded to float16/bfloat16 first: eager keeps them in float (opmath).
        """
        if dtype.is_floating_point:
            value = float(value)
            # NAN and INFINITY are floats: typed for double, or C++ overloads are ambiguous
            cast = "" if C_TYPES[dtype] == "float" else "(double)"
            if math.isnan(value):
                text = f"{cast}NAN"
            elif math.isinf(value):
                text = f"{cast}INFINITY" if value > 0 else f"(-{cast}INFINITY)"
            elif C_TYPES[dtype] == "float" and _is_float32(value):
                text = f"{value!r}f"
            elif C_TYPES[dtype] == "float":
                text = f"(float){value!r}"
            else:
                text = repr(value)
            return f"({text})" if text.startswith(("-", "(")) else text
        if dtype == torch.bool:
            return "1" if value else "0"
        value = int(value)
        if dtype in INT_MIN and value == INT_MIN[dtype]:
            return f"(({C_TYPES[dtype]})({value + 1}LL - 1))"
        return f"(({C_TYPES[dtype]}){value}LL)"

    def convert(self, expr: str, src: torch.dtype, dst: torch.dtype) -> str:
        """Convert a value in ``src``'s compute type to ``dst``'s, as eager's casts do."""
        if dst == torch.bool:
            return expr if src == torch.bool else f"(({expr}) != 0)"
        if src == torch.bool:  # through int: gcc vectorises no loop that converts a bool to float
            expr = f"(int)({expr})"
        if dst == torch.float16:
            return f"tf_round_f16((float)({expr}))" if src != torch.float16 else expr
        if dst == torch.bfloat16:
            return f"tf_round_bf16((float)({expr}))" if src != torch.bfloat16 else expr
        if src.is_floating_point and not dst.is_floating_point:
            # c10 casts to uint8 through int64 (its static_cast_with_inter_type): a double's low
            # byte past int32's range (a float's there is 0 either way)
            through_int64 = dst == torch.int64 or (dst == torch.uint8 and src == torch.float64)
            wide = "tf_f2i64" if through_int64 else "tf_f2i32"
            return f"(({C_TYPES[dst]}){wide}({expr}))"
        if C_TYPES[src] == C_TYPES[dst]:
            return expr
        return f"(({C_TYPES[dst]})({expr}))"

    def load(self, pointer: str, index: str, dtype: torch.dtype) -> str:
        element = f"{pointer}[{index}]"
        if dtype == torch.float16:
            return f"tf_h2f({element})"
        if dtype == torch.bfloat16:
            return f"tf_bf2f({element})"
        return f"({element} != 0)" if dtype == torch.bool else element

    def store(self, pointer: str, index: str, value: str, dtype: torch.dtype) -> str:
        if dtype == torch.float16:
            value = f"tf_f2h({value})"
        elif dtype == torch.bfloat16:
            value = f"tf_f2bf({value})"
        return f"{pointer}[{index}] = {value};"

    # ---- the body: one statement per op ---------------------------------------------------

    def _operand(self, operand, cast: torch.dtype | None, typed: TypedGraph, narrow: bool):
        """One operand in the compute type ``cast``. A number keeps its value in float where
        the compute type is float16/bfloat16 (eager's opmath scalar), but where ``narrow``
        (ops.OpDef.narrow) it is rounded to that type first."""
        if operand is None:
            return None
        if isinstance(operand, Const):
            value = operand.value
            if narrow and cast in ops.HALF_DTYPES and not isinstance(value, bool):
                value = ops.rounded(value, cast)
            return ops.Operand(self.literal(value, cast), const=value, dtype=cast, scalar=True)
        src = typed.dtypes[operand.id]
        scalar = typed.scalar[operand.id]
        original = ""
        if cast in ops.HALF_DTYPES and src not in (cast, torch.bool):
            original = self.convert(f"v{operand.id}", src, torch.float32)
        return ops.Operand(self.convert(f"v{operand.id}", src, cast), dtype=src, scalar=scalar,
                           original=original)

    def op_expr(self, typed: TypedGraph, k: int) -> str:
        """The C expression of op ``k``, converted to its output dtype."""
        expr, result = self.op_result(typed, k)
        return self.convert(expr, result, typed.dtypes[typed.graph.n_inputs + k])

    def op_result(self, typed: TypedGraph, k: int) -> tuple[str, torch.dtype]:
        """The C expression of op ``k`` and the dtype it computes, before the conversion to
        the op's output dtype."""
        selected = typed.selected[k]
        ctx, operands = self.op_context(typed, k)
        template = selected.template
        expr = template(ctx, *operands) if callable(template) else ctx.fmt(template, operands)
        # float16/bfloat16 compute in float: the result is rounded to its dtype like eager's.
        result = torch.bool if selected.op.boolean else selected.compute
        if result in ops.HALF_DTYPES:
            result = torch.float32
        return expr, result

    def op_context(self, typed: TypedGraph, k: int) -> tuple[ops.Ctx, list[ops.Operand]]:
        """What op ``k``'s template is rendered with: its Ctx and operands."""
        graph, dtypes, selected = typed.graph, typed.dtypes, typed.selected[k]
        op = graph.ops[k]
        out = dtypes[graph.n_inputs + k]
        narrow = selected.op.narrowed(self.cuda)
        operands = [self._operand(o, c, typed, p in narrow)
                    for p, (o, c) in enumerate(zip(op.operands, selected.casts))]
        compute = selected.compute
        ctx = ops.Ctx(
            compute=compute,
            out=out,
            attrs=op.attr_dict,
            T=C_TYPES[compute],
            U="uint64_t" if compute == torch.int64 else "uint32_t",
            t=INT_TAGS.get(compute, ""),
            f="f" if C_TYPES[compute] == "float" else "",
            literal=lambda value: self.literal(value, compute),
            cuda=self.cuda,
            narrow=lambda expr: self.convert(
                expr, torch.float32 if compute in ops.HALF_DTYPES else compute, compute),
        )
        return ctx, operands

    def body(self, typed: TypedGraph) -> list[str]:
        """Statements computing every op's value ``v<id>`` from the loaded inputs."""
        n = typed.graph.n_inputs
        return [
            f"{C_TYPES[typed.dtypes[n + k]]} v{n + k} = {self.op_expr(typed, k)};"
            for k in range(len(typed.graph.ops))
        ]

    # ---- index expressions shared by the loops ---------------------------------------------

    @staticmethod
    def inner_index(code: str, base: str, j: str, stride: str) -> str:
        if code == CONTIG:
            return f"{base} + {j}" if base != "0" else j
        if code == BROADCAST:
            return base
        return f"{base} + {j} * {stride}" if base != "0" else f"{j} * {stride}"

    def render(self, typed: TypedGraph, argspec: ArgSpec) -> str:  # pragma: no cover
        raise NotImplementedError
