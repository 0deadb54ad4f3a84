"""The op table: the single source of truth for what torchfuse fuses and how each op renders.

Each :class:`OpDef` names the ATen op packets it covers, how operands are cast before computing,
and one C expression per *type class* of the compute dtype: ``f`` (floating), ``i`` (integer),
``b`` (bool). A missing class means "not fusible for this dtype" and sends that call to the
fallback, which then gives eager's result or error.

Operands are an op's Tensor and Scalar arguments in schema order, named ``{a} {b} {c} {d}`` in
templates; the other arguments (strings, dtypes, optional floats) are *attributes*. Templates may
also use ``{T}`` (the compute C type), ``{U}`` (its unsigned twin, 32 or 64 bits wide), ``{t}``
(a short type tag used by integer helpers, e.g. ``i32``) and ``{f}`` (the C math suffix, ``f`` for
float). ``err`` is the kernel's error flag: integer helpers set it on division by zero.

The fusion pass asks :func:`support` whether a node fuses, and the code generator asks
:func:`select` how to render it, so "fusible" and "renderable" cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.torch_version import TorchVersion

aten = torch.ops.aten
prims = torch.ops.prims


class Unsupported(Exception):
    """An op, attribute or dtype that the code generator does not render."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
DTYPES = (*FLOAT_DTYPES, *INT_DTYPES, torch.bool)


def type_class(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "f"
    return "b" if dtype == torch.bool else "i"


@dataclasses.dataclass(frozen=True)
class Operand:
    """One operand as the renderer sees it: a C expression in the compute type."""

    expr: str
    const: Any = None  # the Python value when the operand is a constant, else None
    dtype: torch.dtype | None = None  # the operand's own dtype (before casting)
    scalar: bool = False  # the same value at every element, as eager's is_scalar: a constant, a
    # one-element tensor, or an input expanded from one (TensorDesc.expanded)
    original: str = ""
    """A wider operand (a 0-d float32 tensor, say) of a float16/bfloat16 computation before its
    rounding to that type, in float; empty where the two are the same."""

    def __str__(self) -> str:
        return self.expr

    @property
    def number(self) -> bool:
        """A Python number (not a bool): what eager's kernels may read as a CPU scalar."""
        return self.const is not None and not isinstance(self.const, bool)

    def is_const(self, value: float) -> bool:
        return self.const is not None and not isinstance(self.const, bool) and self.const == value


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a render function may know: compute dtype, its C names, attributes, the target."""

    compute: torch.dtype
    out: torch.dtype
    attrs: dict
    T: str
    U: str
    t: str
    f: str
    literal: Callable[[float], str]  # renders a Python number as a constant of the compute type
    cuda: bool = False
    narrow: Callable[[str], str] = str
    """Rounds an expression computed in float to a float16/bfloat16 compute dtype (the
    renderer's conversion), as eager's arithmetic in c10::Half/BFloat16 rounds each operation
    where a kernel does it in its scalar type rather than in float; other dtypes keep it."""
    table: Callable[[str], bool] = lambda name: False
    """Whether a pair form may read eager's results from table ``name`` (TABLES): the backend
    says where that pays and the table agrees with the form's own arithmetic."""

    def fmt(self, template: str, operands: Sequence[Operand]) -> str:
        names = dict(zip("abcd", (o.expr for o in operands)))
        return template.format(T=self.T, U=self.U, t=self.t, f=self.f, **names)


HALF_DTYPES = (torch.float16, torch.bfloat16)


Render = Callable[..., str]  # (ctx, *operands) -> C expression


@dataclasses.dataclass(frozen=True)
class OpDef:
    name: str
    packets: tuple[str, ...]
    f: str | Render | None = None
    i: str | Render | None = None
    b: str | Render | None = None
    compute: str | tuple[str, ...] = "out"
    """How operands are cast before computing: "out" to the output dtype, "common" to the
    promoted dtype of the operands (comparisons), "none" not at all; or one of those per operand."""
    boolean: bool = False
    """The expression is a C truth value (the output dtype is bool)."""
    check: Callable[[dict], str | None] | None = None
    """attributes -> the reason this call is not fused, or None."""
    cuda: dict = dataclasses.field(default_factory=dict)
    """Per type class, an expression that replaces the C one in CUDA source; under "narrow",
    CUDA's positions for ``narrow``."""
    narrow: tuple[int, ...] = ()
    """The operand positions where eager reads a Python number in a float16/bfloat16 tensor's
    own type (TensorIterator converts it to the common dtype); elsewhere a number keeps its
    value in float (the kernel reads its original_scalar_value, as an opmath scalar)."""
    vml: str | None = None
    """The function of MKL's VML (Vector Math Library) that eager's CPU kernel calls for this
    op on float32/float64 tensors (``Exp`` for vmsExp/vmdExp), where torch is built with MKL:
    a CPU kernel passes it a block of elements and gets eager's bits (codegen.c)."""
    vml_argument: Render | None = None
    """What eager's kernel passes to the VML function, where not the operand itself (logit's
    quotient, of the operands as ``f`` has them)."""
    libm: tuple[torch.dtype, ...] = ()
    """The compute dtypes for which eager's CPU kernel calls the C library's function where
    SLEEF has one (codegen.c.SLEEF): there a CPU kernel calls libmvec's, within 4 ulp."""
    refuses: Callable[[Sequence[Any]], str | None] | None = None
    """operands (tensors, maybe fake, or numbers) -> why eager refuses them, or None. Fake
    tensors let such calls through (sub of a bool, pow of bools, an integer to a negative
    power): they must stay eager's, to raise eager's error."""
    pair: str | Render | None = None
    """CUDA, float16/bfloat16 computed as such: the op on two elements packed in one 32-bit word
    (``{t}`` is ``h`` or ``bf``), giving eager's bits. Add, sub, mul: their float result of two
    halves, rounded once, is the correctly rounded half result (exact, or rounded twice
    innocuously, 24 >= 2 * 11 + 2 bits); GELU: a helper of its own. A Render may return None
    (alpha other than 1)."""

    def template(self, cls: str, cuda: bool = False) -> str | Render | None:
        if cuda and cls in self.cuda:
            return self.cuda[cls]
        return getattr(self, cls)

    def narrowed(self, cuda: bool = False) -> tuple[int, ...]:
        return self.cuda.get("narrow", self.narrow) if cuda else self.narrow


# --- render functions for the ops a template cannot say -------------------------------------------


def _scalar(ctx: Ctx, b: Operand) -> str:
    """The second operand as eager's CPU kernels for mul and the divisions read a scalar there
    (a one-element tensor; is_scalar(2)) in float16/bfloat16: its original value, in float."""
    return b.original if b.scalar and b.original and not ctx.cuda else b.expr


def _axpy(sign: str, swap: bool = False) -> dict:
    """add / sub / rsub: a (+|-) alpha * b, wrapping for integers. An alpha other than 1 is a
    fused multiply-add, as eager's CPU vector code (vec::fmadd) and nvcc's contraction have it."""

    def f(ctx: Ctx, a: Operand, b: Operand, alpha: Operand) -> str:
        a, b = (b, a) if swap else (a, b)
        if alpha.is_const(1):
            return f"{a} {sign} {b}"
        return f"fma{ctx.f}({'-' if sign == '-' else ''}{alpha}, {b}, {a})"

    def i(ctx: Ctx, a: Operand, b: Operand, alpha: Operand) -> str:
        a, b = (b, a) if swap else (a, b)
        scaled = f"({ctx.U}){b}" if alpha.is_const(1) else f"({ctx.U}){alpha} * ({ctx.U}){b}"
        return f"({ctx.T})(({ctx.U}){a} {sign} {scaled})"

    def b(ctx: Ctx, a: Operand, b: Operand, alpha: Operand) -> str:
        a, b = (b, a) if swap else (a, b)
        return f"({a} {sign} {alpha} * {b}) != 0"

    def pair(ctx: Ctx, a: Operand, b: Operand, alpha: Operand) -> str | None:
        a, b = (b, a) if swap else (a, b)
        name = "add" if sign == "+" else "sub"
        return f"tf_{ctx.t}{name}2({a}, {b})" if alpha.is_const(1) else None

    return {"f": f, "i": i, "b": b, "pair": pair}


def _div_floor(ctx: Ctx, a: Operand, b: Operand) -> str:
    """Floor division (rounding_mode="floor", floor_divide). Eager's vectorised CPU kernel
    computes float16/bfloat16 in their own type, each step rounded, but by a scalar divisor (a
    Python number or a one-element tensor) in float; computed in float throughout, about 1 % of
    float16 quotients of tensors orders of magnitude apart differed, by one or by a 16-bit
    rounding step."""
    if ctx.compute in HALF_DTYPES and not b.scalar:
        return f"tf_div_floor_steps_{'f16' if ctx.compute == torch.float16 else 'bf16'}({a}, {b})"
    return f"tf_div_floor{ctx.f}({a}, {_scalar(ctx, b)})"


def _float_reciprocal(ctx: Ctx, b: Operand) -> str:
    """1 / a Python number as CUDA's floor and truncating divisions take it: in float (double
    for double), of the number as a float; true division takes the double's (_div_cuda)."""
    wide = torch.float64 if ctx.T == "double" else torch.float32  # eager's accscalar type
    return ctx.literal((1 / torch.tensor(float(b.const), dtype=wide)).item())


def _div_floor_cuda(ctx: Ctx, a: Operand, b: Operand) -> str:
    """Floor division as CUDA eager computes it: c10's div_floor_floating on the tensors' own
    types, so float16/bfloat16 take the quotient in float and hold its floor in the 16-bit type
    (in float throughout, 41 of 262144 float16 quotients differed); by a Python number, the
    quotient is the product with the reciprocal of the number as a float (a double for double;
    true division takes the double's reciprocal). A one-element CUDA tensor divides as a tensor."""
    held = {torch.float16: "_held_f16", torch.bfloat16: "_held_bf16"}.get(ctx.compute, ctx.f)
    if not b.number:
        return f"tf_div_floor{held}({a}, {b})"
    return f"tf_div_floor_rcp{held}({a}, {b}, {_float_reciprocal(ctx, b)})"


def _div_trunc(ctx: Ctx, a: Operand, b: Operand) -> str:
    """Truncating division: the float16/bfloat16 quotient rounded, then truncated, as eager's
    kernels divide by a tensor; by a scalar (the CPU's one-element tensor or number, CUDA's
    number: the product with its float reciprocal) the float quotient is truncated."""
    if ctx.cuda and b.number:
        return f"trunc{ctx.f}({a} * {_float_reciprocal(ctx, b)})"
    if b.scalar and not ctx.cuda:
        return f"trunc{ctx.f}({a} / {_scalar(ctx, b)})"
    return f"trunc{ctx.f}({ctx.narrow(f'{a} / {b}')})"


def _div_mode(mode: str | None) -> dict:
    if mode is None:
        return {"f": lambda ctx, a, b: f"{a} / {_scalar(ctx, b)}"}
    if mode == "trunc":
        return {"f": _div_trunc, "i": "tf_div_trunc_{t}({a}, {b}, &err)"}
    return {"f": _div_floor, "i": "tf_div_floor_{t}({a}, {b}, &err)"}


def _div(cls: str) -> Render:
    def render(ctx: Ctx, a: Operand, b: Operand) -> str:
        template = _div_mode(ctx.attrs.get("rounding_mode")).get(cls)
        if template is None:
            raise Unsupported(f"div with rounding_mode={ctx.attrs.get('rounding_mode')} on {cls}")
        return template(ctx, a, b) if callable(template) else ctx.fmt(template, (a, b))

    return render


def _div_cuda(ctx: Ctx, a: Operand, b: Operand) -> str:
    """CUDA eager divides by a Python number as the product with its reciprocal (ATen's
    div_true_kernel_cuda, for a CPU scalar divisor: "may lose one bit of precision compared to
    computing the division"): eager's values, and a multiply where the division was (div.rn: a
    test and a branch to a slow path besides the reciprocal). The reciprocal is the double's,
    rounded to the compute type: on an H100 with torch 2.11, x / -1e-3 multiplies float32 x by
    -1000.0, not by 1 / -0.001f = -999.99994, and x / 1e39 by 1e-39, not by 1 / inf."""
    if ctx.attrs.get("rounding_mode") == "floor":
        return _div_floor_cuda(ctx, a, b)
    if ctx.attrs.get("rounding_mode") is not None:
        return _div("f")(ctx, a, b)
    if not b.number:  # div.rn by its intrinsic: NVRTC folds a / with constant operands 0 into
        # a NaN that x != x calls a number (relu(div(x < x, x < x)) gave 0 for eager's NaN)
        return f"__{'d' if ctx.T == 'double' else 'f'}div_rn({a}, {b})"
    inverse = 1 / torch.tensor(float(b.const), dtype=torch.float64)
    compute = torch.float64 if ctx.T == "double" else torch.float32  # eager's opmath type
    return f"{a} * {ctx.literal(inverse.to(compute).item())}"


_POW_SPECIAL = {
    2.0: "{a} * {a}",
    3.0: "{a} * {a} * {a}",
    0.5: "sqrt{f}({a})",
    -0.5: "1 / sqrt{f}({a})",
    -1.0: "1 / {a}",
    -2.0: "1 / ({a} * {a})",
    1.0: "{a}",
}
_POW_SPECIAL_CUDA = {**_POW_SPECIAL, -0.5: "rsqrt{f}({a})"}  # eager's CUDA pow calls its rsqrt
# float16/bfloat16 (but the CPU's float16, computed in float): eager multiplies in the scalar
# type, each product rounded ({r}: a * a rounded).
_POW_SPECIAL_16 = {3.0: "{r} * {a}", -2.0: "1 / {r}"}


def _pow_f(ctx: Ctx, a: Operand, b: Operand) -> str:
    exponent = None if b.const is None else float(b.const)  # narrowed: 2.7 is 2.69921875
    half = ctx.compute in HALF_DTYPES
    # Eager special-cases these exponents (pow_tensor_scalar_optimized_kernel), except for
    # float16 on the CPU; sqrt and pow differ at -inf, so there ±0.5 stay pow.
    special = ctx.cuda or ctx.compute != torch.float16 or abs(exponent or 0.5) != 0.5
    table = _POW_SPECIAL_CUDA if ctx.cuda else _POW_SPECIAL
    if exponent == 0.5 and not special:
        # gcc's vectorizer makes pow(x, 0.5) sqrt(x), which differs at -0 and -inf: put back
        # pow's +0 and +inf there
        return ctx.fmt("tf_pick{f}({a} == -INFINITY, INFINITY, pow{f}({a}, {b}) + 0)", (a, b))
    if exponent not in table or not special:
        return ctx.fmt("pow{f}({a}, {b})", (a, b))
    if half and exponent in _POW_SPECIAL_16 and (ctx.cuda or ctx.compute == torch.bfloat16):
        return _POW_SPECIAL_16[exponent].format(r=ctx.narrow(f"{a} * {a}"), a=a)
    return ctx.fmt(table[exponent], (a,))


def _pow_i(ctx: Ctx, a: Operand, b: Operand) -> str:
    """Integer pow: by a constant 2 or 3 (square), the wrapping product, which gcc vectorises
    (tf_pow's loop it does not)."""
    if b.const in (2, 3):  # (None, True and False are not)
        return ctx.fmt(f"({{T}})({' * '.join(['({U}){a}'] * int(b.const))})", (a,))
    return ctx.fmt("tf_pow_{t}({a}, {b})", (a, b))


def _clamp(ctx: Ctx, x: Operand, lo: Operand, hi: Operand) -> str:
    # clamp(x, lo, hi) = min(max(x, lo), hi), and any NaN (in x or a bound) gives NaN.
    # Missing bounds arrive as None.
    floating = ctx.compute.is_floating_point
    out = x.expr
    if lo is not None:
        out = f"tf_max{ctx.f}({out}, {lo})" if floating else f"TF_MAX({out}, {lo})"
    if hi is not None:
        out = f"tf_min{ctx.f}({out}, {hi})" if floating else f"TF_MIN({out}, {hi})"
    return out


def _clamp_lone_bound(ctx: Ctx, x: Operand, lo: Operand, hi: Operand, library: str = "") -> str:
    """clamp as CUDA eager (and CPU eager before torch 2.13) computes it: a lone scalar bound goes
    through fmax/fmin (``library`` + fmax: the CPU's written out), which ignore a NaN bound."""
    bound = lo if hi is None else hi if lo is None else None
    if bound is None or bound.const is None or not ctx.compute.is_floating_point:
        return _clamp(ctx, x, lo, hi)
    fn = "fmax" if hi is None else "fmin"
    return f"({x} != {x} ? {x} : {library}{fn}{ctx.f}({x}, {bound}))"


_CLAMP_CPU = (functools.partial(_clamp_lone_bound, library="tf_")
              if TorchVersion(torch.__version__) < "2.13" else _clamp)
_CLAMP = {"f": _CLAMP_CPU, "i": _clamp, "cuda": {"f": _clamp_lone_bound}}


def _sleef_tanh(y: str) -> str:
    """tanh(y) in a CPU kernel where eager's is SLEEF's (codegen/cstyle, tf_sleef_tanh_arg):
    1 + tanh is then 0 where eager's is (a float16 tanh GELU of x ~ -5.06 gave -1.8e-7 for
    eager's -0; a float32 one divided by itself gave 1 for eager's NaN). The C library's tanh
    stays outermost, where a 16-bit kernel's in_double finds it."""
    return f"tanh{{f}}(tf_sleef_tanh_arg{{f}}({y}))"


# Eager's formulas, its operations in its order. Eager's compilers contract x + k * x**3 into
# one fma (CUDA's nvcc; gcc in the CPU's AVX2/AVX512 kernels, whose vector arithmetic it sees
# through), and we compile without contraction (-fmad=false, -ffp-contract=off): the forms say
# so (without it the CPU's float tanh GELU differed in 0.5 % of results). For a
# float16/bfloat16 x, 0.5 * x * (1 + e) is x * fma(0.5, e, 0.5) bit for bit (halving x is exact,
# as is halving 1 + e, which is 0 or at least 2**-24: each side rounds the same product once; not
# so for float's odd subnormals): one instruction of the ~30 an element of a 16-bit GELU takes on
# CUDA, where such kernels are bound by arithmetic rather than memory.
_ERF_CDF = "erf{f}({a} * 0.70710678118654752440{F})"
_TANH_INNER = "0.79788456080286535588{F} * fma{f}(0.044715{F}, {a} * {a} * {a}, {a})"
_TANH_CDF_CUDA = f"tanh{{f}}({_TANH_INNER})"
_GELU = {
    "none": f"0.5{{F}} * {{a}} * (1 + {_ERF_CDF})",
    "tanh": f"0.5{{F}} * {{a}} * (1 + {_sleef_tanh(_TANH_INNER)})",
    "tanh_cuda": f"0.5{{F}} * {{a}} * (1 + {_TANH_CDF_CUDA})",
    "none_cuda16": f"{{a}} * fma{{f}}(0.5{{F}}, {_ERF_CDF}, 0.5{{F}})",
    "tanh_cuda16": f"{{a}} * fma{{f}}(0.5{{F}}, {_TANH_CDF_CUDA}, 0.5{{F}})",
}


def _gelu(ctx: Ctx, a: Operand) -> str:
    approximate = ctx.attrs.get("approximate", "none")
    target = ("_cuda16" if ctx.compute in HALF_DTYPES else "_cuda") if ctx.cuda else ""
    template = _GELU.get(approximate + target, _GELU[approximate])
    return template.replace("{F}", "f" if ctx.f else "").format(a=a, f=ctx.f)


def _gelu_pair(ctx: Ctx, a: Operand) -> str | None:
    """The erf GELU of two float16/bfloat16 (CUDA's vector entries, where the table pays):
    eager's formula near 0, eager's own results from a table elsewhere (codegen/cuda.py,
    tf_hgelu2)."""
    if (ctx.attrs.get("approximate", "none") != "none"
            or not ctx.table(GELU_TABLE.format(t=ctx.t))):
        return None
    return f"tf_{ctx.t}gelu2({a}, {GELU_TABLE.format(t=ctx.t)}_at)"  # the kernel's tf_table_at


# CUDA's erff for |a| < 1.00376 (0x3F807B28), as NVRTC 13.5 writes it in PTX: a polynomial in
# a * a, Horner's fmas from the highest coefficient (float bits), then fma(p, a, a).
ERFF_NEAR = (0x388D8E09, 0xBA487A7D, 0x3BA886C1, 0xBCDBC4CF, 0x3DE712BB, 0xBEC09388, 0x3E0375D4)
ERFF_NEAR_END = 0x3F807B28  # erff(a) takes that polynomial while |a| < this float's value
GELU_NEAR = 1.5
# The pair form's GELU for |x| < GELU_NEAR: x * fma(x, R(x * x), 0.5), R(t) a polynomial
# (Horner's fmas from the highest coefficient, float bits) for 0.5 * erf(sqrt(t / 2)) / sqrt(t),
# for each dtype of the lowest degree whose every result there rounds as eager's
# (bench/fit_gelu_near.py: 8 instructions an element for float16, 6 for bfloat16, against 11
# for eager's erff polynomial and its scaling). Past |x| = 1.4195 eager's erff takes its other
# branch, an exp2 by the GPU's ex2.approx, which no CPU model reproduces: there the polynomials
# match the H200's own eager results, and each GPU checks them against its eager (Table.agrees).
# H200, bias + GELU + scale over rows, x the copy of as many bytes: float16 degree 5 to
# 1.4140625 1.074 -> to 1.5 1.067 (a tenth fewer table reads), bfloat16 degree 4 to
# 1.4140625 1.049 -> degree 3 to 1.5 1.037; degree 4 for float16 to 1.25 (more table reads):
# 1.092; degree 6 for float16 to 1.75 / 1.875: 1.068 / 1.074; degree 4 for bfloat16 to 2.0: 1.043.
GELU_NEAR_POLYNOMIALS = {
    torch.float16: (0xB6C17941, 0x38DED41D, 0xBA9A207D, 0x3C234AE2, 0xBD882B20, 0x3ECC4222),
    torch.bfloat16: (0xBA5D4BE7, 0x3C1DF102, 0xBD87F5C1, 0x3ECC417C),
}


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fmaf of float32 tensors, rounded once as the GPU rounds it: the product is exact in
    double, the sum is rounded to odd there (TwoSum's error moves an inexact even result one
    ulp toward it), and rounding that to float is then the correct rounding."""
    p, c = a.double() * b.double(), c.double()
    s = p + c
    z = s - p
    e = (p - (s - z)) + (c - z)  # s + e == p + c exactly
    even = (s.view(torch.int64) & 1) == 0
    odd = torch.nextafter(s, torch.where(e > 0, math.inf, -math.inf))
    return torch.where((e != 0) & even, odd, s).float()


def horner32(coefficients: Sequence[int], t: torch.Tensor) -> torch.Tensor:
    """A polynomial in float32 t (float bits, the highest coefficient first) by fmaf's."""
    c = torch.tensor(coefficients, dtype=torch.int64).to(torch.int32).view(torch.float32)
    p = c[0].expand_as(t)
    for coefficient in c[1:]:
        p = fma32(p, t, coefficient.expand_as(t))
    return p


def _erff_arguments(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(0.70710678118654752440, dtype=torch.float32)


def erff_near(x: torch.Tensor) -> torch.Tensor:
    """Where eager's erf GELU of float32 values x takes erff's near polynomial (eager_gelu_near0's
    domain: |x| < 1.4195)."""
    return _erff_arguments(x).abs() < torch.tensor(ERFF_NEAR_END, dtype=torch.int32).view(
        torch.float32)


def eager_gelu_near0(x: torch.Tensor) -> torch.Tensor:
    """CUDA eager's erf GELU of float32 values where erff_near, as the GPU computes it: x * 0.5
    * (1 + erff(x * M_SQRT1_2)) with erff's near polynomial, written as x * fma(0.5, erff, 0.5)
    (the same bits). What the pair forms' polynomials are fitted against there."""
    a = _erff_arguments(x)
    half = torch.full_like(x, 0.5)
    return x * fma32(half, fma32(horner32(ERFF_NEAR, a * a), a, a), half)


def gelu_near0(x: torch.Tensor, polynomial: Sequence[int]) -> torch.Tensor:
    """The pair form's GELU of float32 values near 0 (codegen/cuda.py, tf_hgelu_near0) with a
    polynomial R (GELU_NEAR_POLYNOMIALS[dtype]), as the GPU computes it."""
    p = horner32(polynomial, x * x)
    return x * fma32(x, p, torch.full_like(x, 0.5))


def every_value(dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """The 65,536 values of a 16-bit dtype in the order of their bit patterns (a table's)."""
    bits = torch.arange(2**16, dtype=torch.int32, device=device)
    return bits.to(torch.int16).view(dtype)


def _gelu_agrees(table: torch.Tensor) -> bool:
    """Whether gelu_near0 gives a table's results wherever the pair form computes them (the
    GPU's eager may be built with another CUDA, whose erff differs)."""
    x = every_value(table.dtype).float()
    near = x.abs() < GELU_NEAR
    mine = gelu_near0(x[near], GELU_NEAR_POLYNOMIALS[table.dtype]).to(table.dtype).view(torch.int16)
    return torch.equal(mine, table[near].view(torch.int16))


@dataclasses.dataclass(frozen=True)
class Table:
    """Eager's results of a function of one float16/bfloat16 value for each of the 65,536 bit
    patterns, which CUDA kernels read where eager's formula is dear (tf_hgelu2)."""

    dtype: torch.dtype
    eager: Callable[[torch.Tensor], torch.Tensor]
    agrees: Callable[[torch.Tensor], bool]
    """eager's results (on the CPU, in every_value's order) -> whether the kernel's own
    arithmetic, where it uses that instead of the table, gives those results."""


# The C array's name -> its table. devices/cuda computes each once per GPU, with eager on that
# GPU, and copies it into every kernel it loads that declares the array.
GELU_TABLE = "tf_gelu_{t}_table"  # t: the pair helpers' infix, h or bf
TABLES = {
    GELU_TABLE.format(t="h"): Table(torch.float16, torch.nn.functional.gelu, _gelu_agrees),
    GELU_TABLE.format(t="bf"): Table(torch.bfloat16, torch.nn.functional.gelu, _gelu_agrees),
}


# CUDA eager's hardsigmoid and hardswish multiply by one_sixth = 1.0f / 6.0f, a float whatever
# the opmath type; the CPU divides by 6.
_ONE_SIXTH = torch.tensor(1 / 6, dtype=torch.float32).item()


def _hardsigmoid_cuda(ctx: Ctx, a: Operand) -> str:
    return f"TF_MIN(TF_MAX({a} + 3, 0), 6) * {ctx.literal(_ONE_SIXTH)}"


def _hardswish_cuda(ctx: Ctx, a: Operand) -> str:
    return f"{a} * TF_MIN(TF_MAX({a} + 3, 0), 6) * {ctx.literal(_ONE_SIXTH)}"


def _tanh_backward(ctx: Ctx, a: Operand, b: Operand) -> str:
    """a * (1 - b * b) as eager computes it: 1 - b * b one fma (the CPU's vector code, nvcc's
    contraction on CUDA), but CUDA's float16/bfloat16 in the scalar type, rounded at each
    step."""
    if ctx.cuda and ctx.compute in HALF_DTYPES:
        square = ctx.narrow(f"{b} * {b}")
        return f"{a} * {ctx.narrow(f'1 - {square}')}"
    return f"{a} * fma{ctx.f}(-{b}, {b}, 1)"


def _sigmoid_backward(ctx: Ctx, a: Operand, b: Operand) -> str:
    """a * (1 - b) * b, computed as eager does: in the scalar type, rounded at each step, for
    float16 (and bfloat16 on CUDA); in float otherwise."""
    if ctx.compute == torch.float16 or (ctx.cuda and ctx.compute == torch.bfloat16):
        complement = ctx.narrow(f"1 - {b}")
        return f"{ctx.narrow(f'{a} * {complement}')} * {b}"
    return f"{a} * (1 - {b}) * {b}"


def _logit(ctx: Ctx, a: Operand) -> str:
    return f"log{ctx.f}({_logit_quotient(ctx, a)})"


def _logit_quotient(ctx: Ctx, a: Operand) -> str:
    """logit is log(z / (1 - z)), z = a clamped to [eps, 1 - eps] where eps is given: this is
    the quotient, which the CPU's eager passes to VML's Ln in float32/float64. It computes
    float16/bfloat16 in the scalar type: eps, 1 - eps and each step rounded to it (the bfloat16
    1 - 1e-3 is 1, so logit(1) stays inf there); CUDA's in float."""
    stepwise = not ctx.cuda and ctx.compute in HALF_DTYPES
    narrow = ctx.narrow if stepwise else lambda expr: expr
    eps, z = ctx.attrs.get("eps"), a
    if eps is not None:
        lo = rounded(eps, ctx.compute) if stepwise else eps
        hi = rounded(1 - lo, ctx.compute) if stepwise else 1 - eps
        lo, hi = ctx.literal(lo), ctx.literal(hi)
        z = f"({a} < {lo} ? {lo} : ({a} > {hi} ? {hi} : {a}))"
    complement = narrow(f"1 - {z}")
    return narrow(f"{z} / ({complement})")


def rounded(value: float, dtype: torch.dtype) -> float:
    """A Python number as eager's Scalar.to<scalar_t>() gives it for ``dtype`` (via float)."""
    return torch.tensor(value, dtype=torch.float32).to(dtype).item()


_FINFO_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.3895313892515355e38}


def _nan_to_num(ctx: Ctx, a: Operand) -> str:
    big = _FINFO_MAX.get(ctx.out, torch.finfo(ctx.out).max)
    nan = ctx.attrs.get("nan") or 0.0
    posinf = ctx.attrs.get("posinf")
    neginf = ctx.attrs.get("neginf")
    posinf = big if posinf is None else posinf
    neginf = -big if neginf is None else neginf
    lit = ctx.literal
    return (
        f"({a} != {a} ? {lit(nan)} : ({a} == INFINITY ? {lit(posinf)} : "
        f"({a} == -INFINITY ? {lit(neginf)} : {a})))"
    )


def _convert(ctx: Ctx, a: Operand) -> str:
    # The cast itself happens when the result is stored into a value of the output dtype.
    return a.expr


def _check_to_copy(attrs: dict) -> str | None:
    for name in ("layout", "device", "pin_memory"):
        if attrs.get(name) is not None:
            return f"_to_copy changes {name}"
    if attrs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
        return "_to_copy changes memory format"
    return None


def _check_clone(attrs: dict) -> str | None:
    if attrs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
        return "clone changes memory format"
    return None


def _check_round(attrs: dict) -> str | None:
    return None if attrs.get("decimals", 0) == 0 else "round with decimals"


def _any_bool(operands: Sequence[Any]) -> str | None:
    return "a bool" if torch.bool in map(_dtype_of, operands) else None


def _pow_refused(operands: Sequence[Any]) -> str | None:
    """pow of bools; of an integer or bool tensor by a negative integer number (eager's "Integers
    to negative integer powers are not allowed", a random program's find, seed 965,370)."""
    base, exponent = operands
    if all(_dtype_of(v) is torch.bool for v in operands):
        return "bools"
    if (isinstance(base, torch.Tensor) and not base.dtype.is_floating_point
            and isinstance(exponent, int) and exponent < 0):
        return "an integer to a negative integer power"
    return None


def _integer_division(operands: Sequence[Any]) -> str | None:
    """addcdiv's tensor1 / tensor2 of integers or bools: eager's RuntimeError."""
    dtypes = [_dtype_of(v) for v in operands[1:3]]
    integral = [d is not None and not d.is_floating_point for d in dtypes]
    return "integers (integer division)" if all(integral) else None


def _check_div(attrs: dict) -> str | None:
    mode = attrs.get("rounding_mode")
    return None if mode in (None, "trunc", "floor") else f"rounding_mode={mode!r}"


# --- the table ----------------------------------------------------------------------------------


def _fn(name: str, expr: str | None = None, packets: tuple[str, ...] | None = None, **kw) -> OpDef:
    """A floating-point function that integer inputs reach promoted to float (sin, exp, ...)."""
    return OpDef(name, packets or (name,), f=expr or f"{name}{{f}}({{a}})", **kw)


def _cmp(name: str, op: str) -> OpDef:
    return OpDef(name, (name,), f=f"{{a}} {op} {{b}}", i=f"{{a}} {op} {{b}}",
                 b=f"{{a}} {op} {{b}}", compute="common", boolean=True, narrow=(0, 1))


def _hypot(ctx: Ctx, a: Operand, b: Operand) -> str:
    """The CPU's hypot correctly rounded, as eager's is (SLEEF's, within 0.5001 ulp, and the C
    library's): float's in double (libmvec's hypotf differed in 8 % of random float32 pairs; a
    random program's find: sin(hypot(x * x, x)), seed 714,490), double's by tf_hypot (libmvec's
    hypot: 0.6-6 %). An infinity wins over NaN, as in hypot."""
    if not ctx.f:
        return f"tf_hypot({a}, {b})"
    return (f"(isinf({a}) || isinf({b}) ? INFINITY"
            f" : (float)sqrt((double){a} * {a} + (double){b} * {b}))")


_SIGMOID = "1 / (1 + exp{f}(-{a}))"
_SIGMOID_16 = {torch.float16: "tf_sigmoid_f16({a})", torch.bfloat16: "tf_sigmoid_bf16({a})"}


def _sigmoid_cuda(ctx: Ctx, a: Operand) -> str:
    """A CUDA result rounded to 16 bits: the same values without division's slow-path branch
    (codegen/cuda.py, tf_sigmoid_f16)."""
    return ctx.fmt(_SIGMOID_16.get(ctx.out, _SIGMOID), (a,))


_IDENTITY = "{a}"
_WRAP_MUL = "({T})(({U}){a} * ({U}){b})"

OPS: tuple[OpDef, ...] = (
    # unary floating-point functions
    # eager's CPU kernel calls VML for these (ATen's vml.h; measured: its bits on float32 and
    # float64, contiguous or strided)
    *(_fn(n, vml=v) for n, v in (("acos", "Acos"), ("asin", "Asin"), ("atan", "Atan"),
                                 ("cos", "Cos"), ("exp", "Exp"), ("erf", "Erf"), ("erfc", "Erfc"),
                                 ("log", "Ln"), ("log10", "Log10"), ("log2", "Log2"),
                                 ("sin", "Sin"), ("sqrt", "Sqrt"), ("tan", "Tan"),
                                 ("tanh", "Tanh"))),
    *(_fn(n) for n in ("acosh", "asinh", "atanh", "lgamma", "log1p", "exp2")),
    # torch 2.14's float32 kernels of these call the C library's functions (2.13's, SLEEF's)
    *(_fn(n, libm=(torch.float32,) if TorchVersion(torch.__version__) >= "2.14" else ())
      for n in ("cosh", "sinh")),
    _fn("expm1", "expm1{f}(tf_sleef_expm1_arg{f}({a}))", cuda={"f": "expm1{f}({a})"}),
    # CUDA eager calls CUDA's rsqrt (rsqrt.approx for float: not 1 / sqrt's correct rounding)
    _fn("rsqrt", "1 / sqrt{f}({a})", cuda={"f": "rsqrt{f}({a})"}),
    _fn("reciprocal", "1 / {a}"),
    _fn("sigmoid", _SIGMOID, cuda={"f": _sigmoid_cuda}),
    _fn("frac", "{a} - trunc{f}({a})"),
    _fn("silu", "{a} / (1 + exp{f}(-{a}))"),
    _fn("mish", "{a} * " + _sleef_tanh("log1p{f}(exp{f}({a}))"),
        cuda={"f": "{a} * tanh{f}(log1p{f}(exp{f}({a})))"}),
    _fn("hardsigmoid", "TF_MIN(TF_MAX({a} + 3, 0), 6) / 6", cuda={"f": _hardsigmoid_cuda}),
    _fn("hardswish", "{a} * TF_MIN(TF_MAX({a} + 3, 0), 6) / 6", cuda={"f": _hardswish_cuda}),
    _fn("gelu", _gelu, pair=_gelu_pair),
    _fn("logit", _logit, vml="Ln", vml_argument=_logit_quotient),
    _fn("nan_to_num", _nan_to_num),
    _fn("leaky_relu", "{a} > 0 ? {a} : {a} * {b}"),
    # tf_pick: the CPU's select, its arms computed first (a call in one kept the loop scalar)
    _fn("elu", "tf_pick{f}({a} <= 0, expm1{f}({a} * {d}) * {b} * {c}, {a} * {c})",
        cuda={"f": "{a} <= 0 ? expm1{f}({a} * {d}) * {b} * {c} : {a} * {c}"}),
    _fn("softplus", "tf_pick{f}(({a} * {b}) > {c}, {a}, log1p{f}(exp{f}({a} * {b})) / {b})",
        cuda={"f": "({a} * {b}) > {c} ? {a} : log1p{f}(exp{f}({a} * {b})) / {b}"}),
    _fn("atan2", "atan2{f}({a}, {b})"),
    _fn("hypot", _hypot, cuda={"f": "hypot{f}({a}, {b})"}),
    _fn("copysign", "copysign{f}({a}, {b})"),
    _fn("logaddexp", "tf_logaddexp{f}({a}, {b})"),
    _fn("sigmoid_backward", _sigmoid_backward),
    _fn("tanh_backward", _tanh_backward),
    # rounding: the identity on integers (eager refuses bools)
    *(OpDef(n, (n,), f=f"{c}{{f}}({{a}})", i=_IDENTITY)
      for n, c in (("ceil", "ceil"), ("floor", "floor"), ("trunc", "trunc"), ("round", "rint"))),
    # sign-like
    OpDef("abs", ("abs",), f="fabs{f}({a})", i="({T})({a} < 0 ? -({U}){a} : ({U}){a})"),
    OpDef("neg", ("neg",), f="-{a}", i="({T})(-({U}){a})"),
    OpDef("sign", ("sign", "sgn"), f="({a} > 0) - ({a} < 0)", i="({a} > 0) - ({a} < 0)",
          b=_IDENTITY),
    # relu(-0.0): -0.0 on the CPU (its max keeps the input), 0.0 on CUDA
    OpDef("relu", ("relu",), f="{a} < 0 ? 0 : {a}", i="{a} > 0 ? {a} : 0",
          cuda={"f": "({a} > 0 || {a} != {a}) ? {a} : 0"}),
    OpDef("signbit", ("signbit",), f="copysign{f}(1, {a}) < 0", i="{a} < 0", b="0", compute="none",
          boolean=True, cuda={"f": "signbit({a})"}),  # CUDA C++: copysign(int, double) is ambiguous
    # classification
    OpDef("isnan", ("isnan",), f="{a} != {a}", i="0", b="0", compute="none", boolean=True),
    OpDef("isinf", ("isinf",), f="isinf({a}) != 0", i="0", b="0", compute="none", boolean=True),
    OpDef("isposinf", ("isposinf",), f="{a} == INFINITY", i="0", b="0", compute="none",
          boolean=True),
    OpDef("isneginf", ("isneginf",), f="{a} == -INFINITY", i="0", b="0", compute="none",
          boolean=True),
    # arithmetic
    # narrow: where eager reads a Python number in the 16-bit type (measured, per device; the
    # CPU also rounds add's alpha)
    OpDef("add", ("add",), **_axpy("+"), narrow=(0, 1, 2), cuda={"narrow": ()}),
    OpDef("sub", ("sub",), **_axpy("-"), narrow=(0, 1, 2), cuda={"narrow": ()},
          refuses=_any_bool),
    OpDef("rsub", ("rsub",), **_axpy("-", swap=True), narrow=(0, 1, 2), cuda={"narrow": ()},
          refuses=_any_bool),
    OpDef("mul", ("mul",), f=lambda ctx, a, b: f"{a} * {_scalar(ctx, b)}", i=_WRAP_MUL,
          b="{a} && {b}", pair="tf_{t}mul2({a}, {b})", narrow=(0,), cuda={"narrow": ()}),
    OpDef("div", ("div",), f=_div("f"), i=_div("i"), check=_check_div, cuda={"f": _div_cuda},
          narrow=(0,)),
    OpDef("floor_divide", ("floor_divide",), f=_div_floor, cuda={"f": _div_floor_cuda},
          i="tf_div_floor_{t}({a}, {b}, &err)", narrow=(0,)),
    OpDef("remainder", ("remainder",), f="tf_remainder{f}({a}, {b})",
          i="tf_remainder_{t}({a}, {b}, &err)", narrow=(0, 1)),
    OpDef("fmod", ("fmod",), f="fmod{f}({a}, {b})", i="tf_fmod_{t}({a}, {b}, &err)",
          narrow=(0, 1)),
    OpDef("pow", ("pow",), f=_pow_f, i=_pow_i, narrow=(0, 1),
          refuses=_pow_refused),
    OpDef("maximum", ("maximum",), f="tf_max{f}({a}, {b})", i="TF_MAX({a}, {b})",
          b="{a} || {b}"),
    OpDef("minimum", ("minimum",), f="tf_min{f}({a}, {b})", i="TF_MIN({a}, {b})",
          b="{a} && {b}"),
    OpDef("fmax", ("fmax",), f="tf_fmax{f}({a}, {b})", i="TF_MAX({a}, {b})", b="{a} || {b}",
          cuda={"f": "fmax{f}({a}, {b})"}),
    OpDef("fmin", ("fmin",), f="tf_fmin{f}({a}, {b})", i="TF_MIN({a}, {b})", b="{a} && {b}",
          cuda={"f": "fmin{f}({a}, {b})"}),
    OpDef("clamp", ("clamp",), **_CLAMP),
    OpDef("clamp_min", ("clamp_min",), f=lambda ctx, a, b: _CLAMP_CPU(ctx, a, b, None),
          i="TF_MAX({a}, {b})", cuda={"f": lambda ctx, a, b: _clamp_lone_bound(ctx, a, b, None)}),
    OpDef("clamp_max", ("clamp_max",), f=lambda ctx, a, b: _CLAMP_CPU(ctx, a, None, b),
          i="TF_MIN({a}, {b})", cuda={"f": lambda ctx, a, b: _clamp_lone_bound(ctx, a, None, b)}),
    OpDef("hardtanh", ("hardtanh",), f="tf_min{f}(tf_max{f}({a}, {b}), {c})",
          i="TF_MIN(TF_MAX({a}, {b}), {c})"),
    # CUDA eager compares with threshold.to<scalar_t>(): bfloat16's 0.1 is 0.10009765625
    OpDef("threshold", ("threshold",), f="{a} <= {b} ? {c} : {a}", i="{a} <= {b} ? {c} : {a}",
          cuda={"narrow": (1,)}),
    OpDef("threshold_backward", ("threshold_backward",), f="{b} <= {c} ? 0 : {a}",
          i="{b} <= {c} ? 0 : {a}", cuda={"narrow": (2,)}),
    # eager's two branches, each one fma (the CPU's vector code, nvcc's contraction on CUDA)
    OpDef("lerp", ("lerp",), f="fabs{f}({c}) < 0.5 ? fma{f}({c}, {b} - {a}, {a}) "
                               ": fma{f}(-({b} - {a}), 1 - {c}, {b})"),
    OpDef("addcmul", ("addcmul",), f="fma{f}({d} * {b}, {c}, {a})",  # the CPU's vector code
          i="({T})(({U}){a} + ({U}){d} * ({U}){b} * ({U}){c})",
          cuda={"f": "fma{f}({d}, {b} * {c}, {a})"}),  # a + value * (b * c), contracted
    OpDef("addcdiv", ("addcdiv",), f="{a} + {d} * {b} / {c}", refuses=_integer_division,
          cuda={"f": "fma{f}({d}, {b} / {c}, {a})"}),
    # comparisons and logic
    _cmp("eq", "=="), _cmp("ne", "!="), _cmp("lt", "<"), _cmp("le", "<="), _cmp("gt", ">"),
    _cmp("ge", ">="),
    OpDef("logical_not", ("logical_not",), f="!{a}", i="!{a}", b="!{a}", compute="none",
          boolean=True),
    *(OpDef(f"logical_{n}", (f"logical_{n}",), f=e, i=e, b=e, compute="none", boolean=True)
      for n, e in (("and", "({a} != 0) && ({b} != 0)"), ("or", "({a} != 0) || ({b} != 0)"),
                   ("xor", "({a} != 0) != ({b} != 0)"))),
    OpDef("bitwise_not", ("bitwise_not",), i="({T})~{a}", b="!{a}"),
    *(OpDef(f"bitwise_{n}", (f"bitwise_{n}",), i=f"{{a}} {c} {{b}}",
            b=f"{{a}} {c} {{b}}") for n, c in (("and", "&"), ("or", "|"), ("xor", "^"))),
    OpDef("bitwise_left_shift", ("bitwise_left_shift", "__lshift__"), i="tf_shl_{t}({a}, {b})"),
    OpDef("bitwise_right_shift", ("bitwise_right_shift", "__rshift__"),
          i="tf_shr_{t}({a}, {b})"),
    # selection
    OpDef("where", ("where",), f="{a} ? {b} : {c}", i="{a} ? {b} : {c}", b="{a} ? {b} : {c}",
          compute=("none", "out", "out")),
    OpDef("masked_fill", ("masked_fill",), f="{b} ? {c} : {a}", i="{b} ? {c} : {a}",
          b="{b} ? {c} : {a}", compute=("out", "none", "out")),
    # dtype conversion and copies: the store into the output dtype does the work
    OpDef("convert", ("_to_copy",), f=_convert, i=_convert, b=_convert, compute="none",
          check=_check_to_copy),
    OpDef("convert_element_type", ("prims.convert_element_type",), f=_convert, i=_convert,
          b=_convert, compute="none"),
    OpDef("clone", ("clone",), f=_IDENTITY, i=_IDENTITY, b=_IDENTITY,
          check=_check_clone),
)


# --- lookup ---------------------------------------------------------------------------------


def _is_value_arg(arg: torch._C.Argument) -> bool:
    return str(arg.type) in ("Tensor", "number", "Optional[Tensor]", "Optional[number]")


def _functional_overloads(packet: torch._ops.OpOverloadPacket) -> list[torch._ops.OpOverload]:
    """The overloads of a packet that take tensors/scalars and return one new tensor."""
    found = []
    for name in packet.overloads():
        overload = getattr(packet, name)
        schema = overload._schema
        returns = [str(r.type) for r in schema.returns]
        if returns != ["Tensor"] or schema.is_mutable or name.endswith("out"):
            continue
        if not any(str(a.type) == "Tensor" for a in schema.arguments):
            continue
        found.append(overload)
    return found


def _build_index() -> dict[Any, OpDef]:
    index: dict[Any, OpDef] = {}
    for op in OPS:
        for packet_name in op.packets:
            namespace, _, name = packet_name.rpartition(".")
            packet = getattr(getattr(torch.ops, namespace or "aten"), name, None)
            if packet is None:  # an op this torch version does not have
                continue
            for overload in _functional_overloads(packet):
                index.setdefault(overload, op)
    return index


INDEX: dict[Any, OpDef] = _build_index()


def lookup(target: Any) -> OpDef | None:
    return INDEX.get(target)


def split_arguments(target: Any, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """Bind a call to its schema: (operands in schema order, attributes by name).

    Operands are the Tensor and Scalar arguments (missing optional ones are None); attributes
    are the rest, defaults filled in.
    """
    operands, attrs = [], {}
    for index, arg in enumerate(target._schema.arguments):
        if index < len(args) and not arg.kwarg_only:
            value = args[index]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            raise TypeError(f"{target} is missing argument {arg.name!r}")
        if _is_value_arg(arg):
            operands.append(value)
        else:
            attrs[arg.name] = value
    return operands, attrs


def join_arguments(target: Any, operands: Sequence, attrs: dict) -> tuple[list, dict]:
    """The inverse of :func:`split_arguments`: positional args and kwargs to call ``target``."""
    args, kwargs, values = [], {}, iter(operands)
    for arg in target._schema.arguments:
        value = next(values) if _is_value_arg(arg) else attrs[arg.name]
        if arg.kwarg_only:
            kwargs[arg.name] = value
        else:
            args.append(value)
    return args, kwargs


def support(target: Any, attrs: dict) -> str | None:
    """Why a call of ``target`` with these attributes is not fused, or None when it is."""
    op = lookup(target)
    if op is None:
        name = getattr(target, "__name__", str(target))
        return f"{name} is not a pointwise op torchfuse knows"
    return op.check(attrs) if op.check else None



@dataclasses.dataclass(frozen=True)
class Selected:
    """How one op renders for given operand dtypes: the template and the casts before it."""

    op: OpDef
    template: str | Render
    compute: torch.dtype  # the dtype the expression computes in
    casts: tuple[torch.dtype | None, ...]  # per operand: the dtype it is cast to first


def _dtype_of(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, bool):
        return torch.bool
    return torch.int64 if isinstance(value, int) else torch.float64


def select(target: Any, attrs: dict, operands: Sequence[Any], out: torch.dtype,
           cuda: bool = False) -> Selected:
    """Choose the template for one call, given its operands (tensors, possibly meta, or numbers).

    Raises:
        Unsupported: when the op, its attributes or the dtypes are not rendered.
    """
    reason = support(target, attrs)
    if reason:
        raise Unsupported(reason)
    op = lookup(target)
    reason = op.refuses and op.refuses(operands)
    if reason:
        raise Unsupported(f"eager refuses {op.name} of {reason}")
    modes = op.compute if isinstance(op.compute, tuple) else (op.compute,) * len(operands)
    common = torch.result_type(*operands) if "common" in modes else None
    casts = []
    for value, mode in zip(operands, modes):
        if value is None or mode == "none":
            casts.append(_dtype_of(value))
        else:
            casts.append(out if mode == "out" else common)
    compute = next((c for c, m in zip(casts, modes) if m != "none" and c is not None), casts[0])
    for dtype in (out, compute, *casts):
        if dtype is not None and dtype not in DTYPES:
            raise Unsupported(f"dtype {dtype}")
    template = op.template(type_class(compute), cuda)
    if template is None:
        raise Unsupported(f"{op.name} is not fused for {compute}")
    return Selected(op, template, compute, tuple(casts))
