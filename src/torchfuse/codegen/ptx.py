"""PTX for a CUDA kernel's first entry point (``scalar32``), written here instead of by NVRTC.

A cold NVRTC compile spends 13-28 ms in its C++ front end and NVVM before ptxas even starts
(bench/RESULTS.md, session 4); the entry point every kernel needs first is simple enough to
write directly: a grid-stride loop, 32-bit index arithmetic, loads, the element body, stores.
This module writes that loop in PTX and translates the element body from the very C statements
the CUDA source holds (codegen/cstyle: ``T vN = EXPR;``), so ptxas alone makes machine code.

Math functions and the shared helpers (``expf``, ``tf_maxf``, ...) become calls of PTX
functions from a *library*: the same functions compiled by NVRTC once per machine
(:func:`library_source`; devices/cuda caches it), so an element's value is the one the C entry
computes, bit for bit. :func:`link` puts an entry and the library functions it calls into one
module. Float division is written out (:meth:`Emitter.divide`), rounded as ``div.rn.f32``
rounds, without that instruction's out-of-line slow path and the ptxas time it costs.

The C this understands: the types of ``TYPES``; literals, ``v<id>``, ``NAN``/``INFINITY``;
unary ``- ! ~``; the binary arithmetic, bitwise, shift, comparison and logical operators; ``?:``;
casts; calls of the library's functions and of a few conversions written as PTX instructions.
Operands convert as C++'s usual arithmetic conversions say. Anything else, and kernels that
report errors, raise ``ops.Unsupported``: that entry is then compiled from C by NVRTC.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from fractions import Fraction

import torch

from ..ops import HALF_DTYPES, Unsupported
from ..spec import BROADCAST, CONTIG
from .cstyle import C_TYPES, INT_HELPER_TYPES, helpers_for

# ---- C types and their registers -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CType:
    kind: str  # "f" floating, "s" signed, "u" unsigned, "b" bool
    bits: int

    @property
    def ptx(self) -> str:
        """The instruction type: integers narrower than 32 bits live in 32-bit registers, sign-
        or zero-extended (so every value of a register is the value of its C type)."""
        return "pred" if self.kind == "b" else f"{self.kind}{max(self.bits, 32)}"

    @property
    def bitwise(self) -> str:
        return f"b{max(self.bits, 32)}"

    @property
    def reg(self) -> str:
        if self.kind == "b":
            return "p"
        if self.kind == "f":
            return "f" if self.bits == 32 else "fd"
        return "r" if self.bits <= 32 else "rd"


BOOL, INT, UINT, LONG, ULONG = CType("b", 1), CType("s", 32), CType("u", 32), CType("s", 64), \
    CType("u", 64)
FLOAT, DOUBLE = CType("f", 32), CType("f", 64)
TYPES = {"bool": BOOL, "int8_t": CType("s", 8), "uint8_t": CType("u", 8),
         "int16_t": CType("s", 16), "uint16_t": CType("u", 16), "int": INT, "int32_t": INT,
         "uint32_t": UINT, "int64_t": LONG, "uint64_t": ULONG, "float": FLOAT, "double": DOUBLE}
REGISTERS = {"p": ".pred", "h": ".b16", "r": ".b32", "rd": ".b64", "f": ".f32", "fd": ".f64"}


def promote(t: CType) -> CType:
    """C's integral promotion: bool and integers narrower than int become int."""
    return INT if t.kind != "f" and t.bits < 32 else t


def common(a: CType, b: CType) -> CType:
    """The type C++'s usual arithmetic conversions give two operands."""
    if DOUBLE in (a, b):
        return DOUBLE
    if FLOAT in (a, b):
        return FLOAT
    a, b = promote(a), promote(b)
    if a == b:
        return a
    if a.kind == b.kind:
        return a if a.bits > b.bits else b
    unsigned, signed = (a, b) if a.kind == "u" else (b, a)
    if unsigned.bits >= signed.bits:
        return unsigned
    return signed  # wider: it holds every value of the unsigned one


# ---- the library: math functions and helpers, compiled once by NVRTC --------------------------

_MATH1 = ("acos", "asin", "atan", "acosh", "asinh", "atanh", "cos", "cosh", "exp", "expm1",
          "erf", "erfc", "lgamma", "log", "log10", "log1p", "log2", "sin", "sinh", "sqrt", "rsqrt",
          "tan", "tanh", "exp2", "ceil", "floor", "trunc", "rint", "fabs")
_MATH2 = ("atan2", "hypot", "copysign", "pow", "fmod", "fmax", "fmin", "tf_max", "tf_min",
          "tf_remainder", "tf_div_floor", "tf_logaddexp")
_MATH3 = ("tf_div_floor_rcp",)
_FLOAT = {"tf_sigmoid_f16": 1, "tf_sigmoid_bf16": 1,  # float of floats: name -> arity
          "tf_div_floor_held_f16": 2, "tf_div_floor_held_bf16": 2,
          "tf_div_floor_rcp_held_f16": 3, "tf_div_floor_rcp_held_bf16": 3}
_CLASSIFY = ("signbit", "isinf")  # bool of a float or double (C++ overloads)
_INT_HELPERS = ("tf_pow", "tf_shl", "tf_shr")  # T of (T, T), per integer tag


@dataclasses.dataclass(frozen=True)
class Function:
    """A library function: the C name the body calls, its PTX name, result and parameter types
    (integer helpers pass their narrow types as int, sign- or zero-extended)."""

    symbol: str
    result: CType
    params: tuple[CType, ...]
    wrapper: str  # its definition in the library's C++ source


def _functions() -> dict[str, Function]:
    found: dict[str, Function] = {}
    def wrapper(name: str, symbol: str, t: CType, c: str, arity: int) -> Function:
        params = ", ".join(f"{c} {x}" for x in "abc"[:arity])
        call = f"{name}({', '.join('abc'[:arity])})"
        return Function(symbol, t, (t,) * arity,
                        f'extern "C" __device__ {c} {symbol}({params}) {{ return {call}; }}')

    for name in _MATH1 + _MATH2 + _MATH3:
        arity = 1 if name in _MATH1 else 2 if name in _MATH2 else 3
        for suffix, t, c in (("f", FLOAT, "float"), ("", DOUBLE, "double")):
            found[f"{name}{suffix}"] = wrapper(f"{name}{suffix}", f"tf_lib_{name}{suffix}", t, c,
                                               arity)
    for name, arity in _FLOAT.items():
        found[name] = wrapper(name, f"tf_lib_{name[3:]}", FLOAT, "float", arity)
    for name in _CLASSIFY:
        for t, c in ((FLOAT, "float"), (DOUBLE, "double")):
            symbol = f"tf_lib_{name}_{c}"
            found[f"{name}:{c}"] = Function(
                symbol, BOOL, (t,),
                f'extern "C" __device__ int {symbol}({c} a) {{ return {name}(a) ? 1 : 0; }}')
    for name in _INT_HELPERS:
        for tag, (c, _, _) in INT_HELPER_TYPES.items():
            t = TYPES[c]
            wide = "long long" if t.bits == 64 else "int"
            symbol = f"tf_lib_{name[3:]}_{tag}"
            found[f"{name}_{tag}"] = Function(
                symbol, t, (t, t),
                f'extern "C" __device__ {wide} {symbol}({wide} a, {wide} b) '
                f"{{ return {name}_{tag}(({c})a, ({c})b); }}")
    return found


FUNCTIONS = _functions()


def library_source(preamble: str) -> str:
    """The library's C++ source: the device preamble, the shared helpers, and one exported
    function per entry of FUNCTIONS (compile with ``-rdc=true`` so that each one stays)."""
    wrappers = "\n".join(f.wrapper for f in FUNCTIONS.values())
    return "\n".join([preamble, helpers_for(wrappers), "", wrappers, ""])


@dataclasses.dataclass(frozen=True)
class Library:
    """The library's PTX, split into its top-level items, for :func:`link`."""

    header: str  # .version, .target, .address_size of the PTX NVRTC wrote
    items: tuple[tuple[str, str], ...]  # (name, text): functions (a prototype, then the
    # definition) and the constant tables they read, in the order NVRTC wrote them

    @classmethod
    def parse(cls, ptx: str) -> Library:
        header = [line for line in ptx.splitlines()
                  if line.startswith((".version", ".target", ".address_size"))]
        items: list[tuple[str, str]] = []
        lines: list[str] = []
        depth = 0
        for line in ptx.splitlines():
            stripped = line.strip()
            if not lines and (not stripped or stripped.startswith("//")
                              or line.startswith((".version", ".target", ".address_size"))):
                continue
            lines.append(line)
            depth += line.count("{") - line.count("}")
            if depth == 0 and stripped.endswith((";", "}")):
                text = "\n".join(lines)
                match = (re.search(r"\.func\s*(?:\([^)]*\)\s*)?(\w+)", text)
                         or re.search(r"(\w+)\s*(?:\[\d*\])?\s*(?:=[^;]*)?;\s*$", lines[0]))
                if match is None:
                    raise ValueError(f"unrecognised PTX item: {lines[0]}")
                items.append((match.group(1), text.replace(".visible .func", ".func")))
                lines = []
        return cls("\n".join(header), tuple(items))

    def needed(self, text: str) -> set[str]:
        """The names ``text`` refers to, and those they refer to."""
        texts: dict[str, list[str]] = {}
        for name, item in self.items:
            texts.setdefault(name, []).append(item)
        names, todo = set(), [text]
        while todo:
            for word in re.findall(r"[A-Za-z_$][\w$]*", todo.pop()):
                if word in texts and word not in names:
                    names.add(word)
                    todo += texts[word]
        return names


def link(entry: str, library: Library) -> str:
    """One PTX module: the library's header, the library items ``entry`` uses, ``entry``; calls
    of leaf functions (no calls, no stack) written out in place, as NVVM would have inlined
    them: ptxas does not inline, and a call costs the loop its scheduling across it."""
    definitions = {name: text for name, text in library.items if "{" in text}
    sites = iter(range(1, 1 << 30))
    entry = _CALL.sub(lambda call: _inlined(call, definitions, next(sites)), entry)
    needed = library.needed(entry)
    items = [text for name, text in library.items if name in needed]
    return "\n\n".join([library.header, *items, entry, ""])


# A call as Emitter.call writes it: arguments stored, the call, the result loaded.
_CALL = re.compile(r"\t\{\n((?:\t\.param [^\n]*\n\tst\.param[^\n]*\n)*)"
                   r"\t\.param \.b(\d+) retval0;\n"
                   r"\tcall\.uni \(retval0\), (\w+), \([^)]*\);\n"
                   r"\tld\.param\.\w+ (%\w+), \[retval0\];\n\t\}")


def _inlined(call: re.Match, definitions: dict[str, str], site: int) -> str:
    """The body of the function ``call`` calls in its place (registers and labels renamed
    apart, parameters and result moved), or the call itself where that function is no leaf."""
    text = definitions.get(call.group(3))
    if text is None or "call" in text or ".local" in text or "%SP" in text:
        return call.group(0)
    header, body = text.split("{", 1)
    body = body.rsplit("}", 1)[0]
    body = re.sub(r"%([a-z]+)(\d+)\b", rf"%\1_i{site}_\2", body)
    body = re.sub(r"%([a-z]+)<(\d+)>", rf"%\1_i{site}_<\2>", body)
    body = re.sub(r"(\$L\w+)", rf"\1_i{site}", body)
    arguments = re.findall(r"st\.param\.\w+ \[param\d+\], (%\w+);", call.group(1))
    params = re.findall(r"\.param \.b(\d+) (\w+)", header)[1:]  # [0] is the result
    for (bits, name), argument in zip(params, arguments, strict=True):
        load = re.compile(rf"ld\.param\.[a-z]+(\d+)\s+(%\w+), \[{name}\];")
        if any(width != bits for width, _ in load.findall(body)):
            return call.group(0)  # it reads part of a parameter (a narrow integer)
        body = load.sub(rf"mov.b{bits} \2, {argument};", body)
    result = f"mov.b{call.group(2)} {call.group(4)}, \\1;"
    body = re.sub(r"st\.param\.\w+\s+\[func_retval0(?:\+0)?\], ([^;]+);", result, body)
    body = re.sub(r"\bret;", f"bra $L_return_{site};", body)  # not .uni: a ret may be predicated
    return f"\t{{{body.rstrip()}\n\t}}\n$L_return_{site}:"


# ---- values and instructions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Value:
    reg: str
    t: CType
    const: float | int | None = None  # the value of a constant


def _exactly(value: float | int, t: CType) -> float | None:
    """A constant as the float type ``t`` where the conversion is exact (no rounding to
    reproduce at run time), else None."""
    try:
        converted = struct.unpack(">f", struct.pack(">f", value))[0] if t == FLOAT else float(value)
    except OverflowError:
        return None
    return converted if converted == value or math.isnan(value) else None


def _immediate(value, t: CType) -> str:
    if t.kind == "f":
        if t.bits == 32:
            return f"0f{struct.unpack('>I', struct.pack('>f', value))[0]:08X}"
        return f"0d{struct.unpack('>Q', struct.pack('>d', value))[0]:016X}"
    bits = max(t.bits, 32)
    value = int(value) & ((1 << bits) - 1)
    if t.kind == "s" and value >= 1 << (bits - 1):
        value -= 1 << bits
    return str(value)


def _float32(exact: Fraction) -> float:
    """The float nearest ``exact`` (ties to even), as C rounds a float literal: rounding to a
    double first could round twice."""
    guess = struct.unpack(">f", struct.pack(">f", float(exact)))[0]
    bits = struct.unpack(">i", struct.pack(">f", guess))[0]
    candidates = [struct.unpack(">f", struct.pack(">i", b))[0] for b in (bits - 1, bits, bits + 1)
                  if -2**31 <= b < 2**31]
    finite = [c for c in candidates if math.isfinite(c)] or [guess]
    return min(finite, key=lambda c: (abs(Fraction(c) - exact),
                                      struct.unpack(">i", struct.pack(">f", c))[0] & 1))


class Emitter:
    """PTX instructions over typed virtual registers."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.counts = dict.fromkeys(REGISTERS, 0)
        self.labels = 0  # divisions so far: their labels

    def op(self, text: str) -> None:
        self.lines.append(f"\t{text};")

    def new(self, t: CType | str) -> Value | str:
        cls = t if isinstance(t, str) else t.reg
        self.counts[cls] += 1
        reg = f"%{cls}{self.counts[cls]}"
        return reg if isinstance(t, str) else Value(reg, t)

    def declarations(self) -> list[str]:
        return [f"\t.reg {kind} %{cls}<{n + 1}>;" for cls, kind in REGISTERS.items()
                if (n := self.counts[cls])]

    def const(self, value, t: CType) -> Value:
        d = Value(self.new(t).reg, t, value)
        if t == BOOL:
            self.op(f"setp.ne.u32 {d.reg}, {self.const(int(bool(value)), UINT).reg}, 0")
        else:
            self.op(f"mov.{t.ptx} {d.reg}, {_immediate(value, t)}")
        return d

    # ---- conversions -----------------------------------------------------------------------

    def convert(self, v: Value, t: CType) -> Value:
        """``(t)v`` as C++ converts arithmetic values."""
        s = v.t
        if s == t:
            return v
        if v.const is not None and t.kind == "f" and s != BOOL:  # 1 in 1 / x: 1.0f
            exact = _exactly(v.const, t)
            if exact is not None:
                if self.lines[-1].startswith(f"\tmov.{s.ptx} {v.reg},"):
                    self.lines.pop()  # v's own mov, just written: unused (else ptxas drops it)
                return self.const(exact, t)
        if t == BOOL:
            d = self.new(BOOL)
            cmp = "neu" if s.kind == "f" else "ne"
            self.op(f"setp.{cmp}.{s.ptx} {d.reg}, {v.reg}, {self.const(0, s).reg}")
            return d
        if s == BOOL:
            d = self.new(t)
            one, zero = _immediate(1, t), _immediate(0, t)
            self.op(f"selp.{t.ptx} {d.reg}, {one}, {zero}, {v.reg}")
            return d
        d = self.new(t)
        if t.kind == "f" and s.kind == "f":
            self.op(f"cvt{'.rn' if t.bits < s.bits else ''}.{t.ptx}.{s.ptx} {d.reg}, {v.reg}")
        elif t.kind == "f":
            self.op(f"cvt.rn.{t.ptx}.{s.ptx} {d.reg}, {v.reg}")
        elif s.kind == "f":  # truncation toward zero; narrow integers then wrap to their width
            wide = CType(t.kind, max(t.bits, 32))
            w = d if wide == t else self.new(wide)
            self.op(f"cvt.rzi.{wide.ptx}.{s.ptx} {w.reg}, {v.reg}")
            return self._narrow(w, t, d) if w is not d else d
        elif t.bits > 32 and s.bits <= 32:
            self.op(f"cvt.{t.kind}64.{s.ptx} {d.reg}, {v.reg}")
        elif t.bits <= 32 and s.bits > 32:
            w = self.new(UINT)
            self.op(f"cvt.u32.u64 {w.reg}, {v.reg}")
            return self._narrow(w, t, d)
        else:  # the same register width
            return self._narrow(v, t, d)
        return d

    def _narrow(self, v: Value, t: CType, d: Value) -> Value:
        """A 32- or 64-bit register's value as ``t``: wrapped to its width, extended back."""
        if t.bits >= 32:
            self.op(f"mov.{t.bitwise} {d.reg}, {v.reg}")
        elif t.kind == "s":
            self.op(f"bfe.s32 {d.reg}, {v.reg}, 0, {t.bits}")
        else:
            self.op(f"and.b32 {d.reg}, {v.reg}, {(1 << t.bits) - 1}")
        return d

    # ---- operators -------------------------------------------------------------------------

    _COMPARE = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
    _ARITH = {"+": "add", "-": "sub", "*": "mul", "/": "div", "%": "rem",
              "&": "and", "|": "or", "^": "xor"}

    def unary(self, op: str, v: Value) -> Value:
        if op == "!":
            v = self.convert(v, BOOL)
            d = self.new(BOOL)
            self.op(f"not.pred {d.reg}, {v.reg}")
            return d
        t = promote(v.t)
        v = self.convert(v, t)
        if op == "+":
            return v
        if op == "~" and t.kind == "f":
            raise Unsupported("~ of a floating-point value")
        d = self.new(t)
        if op == "-":
            self.op(f"neg.{t.ptx if t.kind == 'f' else 's' + t.ptx[1:]} {d.reg}, {v.reg}")
        else:
            self.op(f"not.{t.bitwise} {d.reg}, {v.reg}")
        return d

    def binary(self, op: str, a: Value, b: Value) -> Value:
        if op in ("&&", "||"):
            a, b = self.convert(a, BOOL), self.convert(b, BOOL)
            d = self.new(BOOL)
            self.op(f"{'and' if op == '&&' else 'or'}.pred {d.reg}, {a.reg}, {b.reg}")
            return d
        if op in ("<<", ">>"):
            a, b = self.convert(a, promote(a.t)), self.convert(b, UINT)
            if a.t.kind == "f":
                raise Unsupported("a shift of a floating-point value")
            d = self.new(a.t)
            kind = "shl." + a.t.bitwise if op == "<<" else "shr." + a.t.ptx
            self.op(f"{kind} {d.reg}, {a.reg}, {b.reg}")
            return d
        t = common(a.t, b.t)
        a, b = self.convert(a, t), self.convert(b, t)
        if op in self._COMPARE:
            cmp = self._COMPARE[op]
            d = self.new(BOOL)
            self.op(f"setp.{'neu' if cmp == 'ne' and t.kind == 'f' else cmp}.{t.ptx} "
                    f"{d.reg}, {a.reg}, {b.reg}")
            return d
        if op == "/" and t == FLOAT:
            return self.divide(a, b)
        name = self._ARITH[op]
        floating = t.kind == "f"
        if floating and op in "%&|^":
            raise Unsupported(f"{op} of floating-point values")
        if floating:
            kind = f"{name}.rn.{t.ptx}"  # rounded: ptxas must not contract it into an fma
        elif op in "&|^":
            kind = f"{name}.{t.bitwise}"
        else:
            kind = f"{name}{'.lo' if op == '*' else ''}.{t.ptx}"
        d = self.new(t)
        self.op(f"{kind} {d.reg}, {a.reg}, {b.reg}")
        return d

    # float operands in [2**-62, 2**62): biased exponents FAST_EXPONENT .. + FAST_EXPONENTS
    FAST_EXPONENT, FAST_EXPONENTS = 127 - 62, 123

    def divide(self, a: Value, b: Value) -> Value:
        """Float ``a / b`` rounded as ``div.rn.f32`` rounds it, without that instruction, whose
        out-of-line slow path costs ptxas 5-12 ms a kernel (a small kernel's whole assembly
        takes 10-15). Where both operands lie in [2**-62, 2**62), CUDA's own fast path (what
        its division runs once FCHK finds the operands safe): the reciprocal, one Newton step,
        the quotient, its remainder (exact: no intermediate can overflow, underflow or be
        subnormal there) and the correction. Elsewhere (zero, Inf, NaN, subnormal or extreme
        operands, rare in practice) in double: the reciprocal refined twice, the quotient and
        its correction are within an ulp of double of a / b, and rounding that to float gives
        float a / b (a quotient of floats lies 2**-49 or more, relatively, from every midpoint
        between floats that it is not equal to; equal, it is exact). Zero, Inf and NaN
        operands take a * (1 / b) instead, with 1 / b exact for b = ±0 and ±Inf."""
        self.labels += 1
        k = self.labels
        d = self.new(FLOAT)
        inside = []
        for v in (a, b):
            bits, p = self.new("r"), self.new(BOOL)
            self.op(f"mov.b32 {bits}, {v.reg}")
            self.op(f"bfe.u32 {bits}, {bits}, 23, 8")
            self.op(f"sub.u32 {bits}, {bits}, {self.FAST_EXPONENT}")
            self.op(f"setp.le.u32 {p.reg}, {bits}, {self.FAST_EXPONENTS}")
            inside.append(p.reg)
        fast = self.new(BOOL)
        self.op(f"and.pred {fast.reg}, {inside[0]}, {inside[1]}")
        self.op(f"@!{fast.reg} bra $L_div{k}_wide")
        r, e, q, m, nb = (self.new(FLOAT).reg for _ in range(5))
        self.op(f"neg.f32 {nb}, {b.reg}")
        self.op(f"rcp.approx.ftz.f32 {r}, {b.reg}")
        self.op(f"fma.rn.f32 {e}, {nb}, {r}, 0f3F800000")
        self.op(f"fma.rn.f32 {r}, {r}, {e}, {r}")
        self.op(f"mul.rn.f32 {q}, {a.reg}, {r}")
        self.op(f"fma.rn.f32 {m}, {nb}, {q}, {a.reg}")
        self.op(f"fma.rn.f32 {d.reg}, {m}, {r}, {q}")
        self.op(f"bra $L_div{k}_done")  # not .uni: the warp may have diverged above
        self.lines.append(f"$L_div{k}_wide:")
        wa, wb, nw, r0, rz, q0, rw, ew, qw, mw = (self.new(DOUBLE).reg for _ in range(10))
        self.op(f"cvt.f64.f32 {wa}, {a.reg}")
        self.op(f"cvt.f64.f32 {wb}, {b.reg}")
        self.op(f"neg.f64 {nw}, {wb}")
        self.op(f"rcp.approx.ftz.f64 {rw}, {wb}")
        size, zero, infinite, finite = self.new(FLOAT).reg, *(self.new(BOOL).reg for _ in range(3))
        self.op(f"abs.f32 {size}, {b.reg}")  # 1 / ±0 = ±Inf and 1 / ±Inf = ±0, exactly:
        self.op(f"setp.eq.f32 {zero}, {size}, 0f00000000")
        self.op(f"setp.eq.f32 {infinite}, {size}, 0f7F800000")
        self.op(f"copysign.f64 {r0}, {wb}, 0d7FF0000000000000")  # 1 / ±0
        self.op(f"selp.f64 {r0}, {r0}, {rw}, {zero}")
        self.op(f"copysign.f64 {rz}, {wb}, 0d0000000000000000")  # 1 / ±Inf
        self.op(f"selp.f64 {r0}, {rz}, {r0}, {infinite}")
        self.op(f"mul.rn.f64 {q0}, {wa}, {r0}")
        for _ in range(2):
            self.op(f"fma.rn.f64 {ew}, {nw}, {rw}, 0d3FF0000000000000")
            self.op(f"fma.rn.f64 {rw}, {rw}, {ew}, {rw}")
        self.op(f"mul.rn.f64 {qw}, {wa}, {rw}")
        self.op(f"fma.rn.f64 {mw}, {nw}, {qw}, {wa}")
        self.op(f"fma.rn.f64 {qw}, {mw}, {rw}, {qw}")
        both = self.new(BOOL).reg
        for v, p in ((a, finite), (b, both)):  # 0 < |v| < Inf (not testp.normal: true for 0)
            self.op(f"abs.f32 {size}, {v.reg}")
            self.op(f"setp.gt.f32 {p}, {size}, 0f00000000")
            self.op(f"setp.lt.and.f32 {p}, {size}, 0f7F800000, {p}")
        self.op(f"and.pred {both}, {both}, {finite}")
        self.op(f"selp.f64 {qw}, {qw}, {q0}, {both}")
        self.op(f"cvt.rn.f32.f64 {d.reg}, {qw}")
        self.lines.append(f"$L_div{k}_done:")
        return d

    def select(self, c: Value, a: Value, b: Value) -> Value:
        """``c ? a : b`` (both sides are pure: computing both is C's value)."""
        c = self.convert(c, BOOL)
        t = a.t if a.t == b.t else common(a.t, b.t)
        if t == BOOL:  # through integers: selp has no predicate form
            return self.convert(self.select(c, self.convert(a, INT), self.convert(b, INT)), BOOL)
        a, b = self.convert(a, t), self.convert(b, t)
        d = self.new(t)
        self.op(f"selp.{t.bitwise} {d.reg}, {a.reg}, {b.reg}, {c.reg}")
        return d

    def call(self, f: Function, args: list[Value]) -> Value:
        if len(args) != len(f.params):
            raise Unsupported(f"{f.symbol} takes {len(f.params)} arguments")
        lines = []
        for k, (arg, t) in enumerate(zip(args, f.params, strict=True)):
            arg = self.convert(arg, t)
            lines += [f".param .{t.bitwise} param{k}",
                      f"st.param.{_param(t)} [param{k}], {arg.reg}"]
        result = INT if f.result == BOOL else f.result
        d = self.new(result)
        params = ", ".join(f"param{k}" for k in range(len(args)))
        lines += [f".param .{result.bitwise} retval0",
                  f"call.uni (retval0), {f.symbol}, ({params})",
                  f"ld.param.{_param(result)} {d.reg}, [retval0]"]
        self.lines.append("\t{")
        for line in lines:
            self.op(line)
        self.lines.append("\t}")
        return self.convert(d, f.result)


def _param(t: CType) -> str:
    return t.ptx if t.kind == "f" else t.bitwise


# ---- the C expressions -------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<num>0[xX][0-9a-fA-F]+[uUlL]*|(?:\d+\.\d*|\.\d+|\d+)"
                    r"(?:[eE][-+]?\d+)?[fFuUlL]*)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op>\|\||&&|==|!=|<=|>=|<<|>>|[-+*/%<>!~&|^?:(),]))")
_BINARY = {"||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, "<=": 7,
           ">": 7, ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10}
_CONSTANTS = {"NAN": (math.nan, FLOAT), "INFINITY": (math.inf, FLOAT),
              "INT32_MIN": (-2**31, INT), "INT64_MIN": (-2**63, LONG)}
# float -> integer conversions that saturate (CUDA's intrinsics are these instructions)
_ROUND_TOWARD_ZERO = {"__float2int_rz": (FLOAT, INT), "__float2ll_rz": (FLOAT, LONG),
                      "__double2int_rz": (DOUBLE, INT), "__double2ll_rz": (DOUBLE, LONG)}


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise Unsupported(f"C the PTX translation does not read: {text[pos:pos + 20]!r}")
        tokens.append(match.group(match.lastgroup))
        pos = match.end()
    return tokens


def _number(token: str) -> tuple[float | int, CType]:
    lower = token.lower()
    if lower.startswith("0x"):
        digits = lower.rstrip("ul")
        value, suffix = int(digits, 16), lower[len(digits):]
    elif any(c in lower for c in ".e"):
        if lower.endswith("f"):
            return _float32(Fraction(lower[:-1])), FLOAT
        return float(lower), DOUBLE
    else:
        digits = lower.rstrip("ul")
        value, suffix = int(digits), lower[len(digits):]
    unsigned, long = "u" in suffix, "l" in suffix
    if not long and value < 2**31 and not unsigned:
        return value, INT
    if not long and unsigned and value < 2**32:
        return value, UINT
    return value, ULONG if unsigned or value >= 2**63 else LONG


class _Parser:
    """C expressions to instructions, emitted while parsing (every operand is pure)."""

    def __init__(self, emitter: Emitter, values: dict[str, Value]) -> None:
        self.e, self.values = emitter, values
        self.tokens: list[str] = []
        self.pos = 0

    def parse(self, text: str) -> Value:
        self.tokens, self.pos = _tokens(text), 0
        value = self.expression()
        if self.pos != len(self.tokens):
            raise Unsupported(f"C the PTX translation does not read: {text!r}")
        return value

    def peek(self, offset: int = 0) -> str | None:
        k = self.pos + offset
        return self.tokens[k] if k < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise Unsupported(f"expected {expected!r}, found {token!r}")
        self.pos += 1
        return token

    def expression(self) -> Value:
        condition = self.binary(1)
        if self.peek() != "?":
            return condition
        self.take("?")
        a = self.expression()
        self.take(":")
        return self.e.select(condition, a, self.expression())

    def binary(self, level: int) -> Value:
        left = self.unary()
        while (op := self.peek()) in _BINARY and _BINARY[op] >= level:
            self.take()
            left = self.e.binary(op, left, self.binary(_BINARY[op] + 1))
        return left

    def unary(self) -> Value:
        token = self.peek()
        if token in ("-", "+", "!", "~"):
            self.take()
            return self.e.unary(token, self.unary())
        if token == "(" and self.peek(1) in TYPES and self.peek(2) == ")":
            t = TYPES[self.peek(1)]
            self.pos += 3
            return self.e.convert(self.unary(), t)
        if token == "(":
            self.take()
            value = self.expression()
            self.take(")")
            return value
        return self.primary()

    def primary(self) -> Value:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return self.e.const(*_number(token))
        if token in self.values:
            return self.values[token]
        if token in _CONSTANTS:
            return self.e.const(*_CONSTANTS[token])
        if self.peek() != "(" or not (token[0].isalpha() or token[0] == "_"):
            raise Unsupported(f"{token!r} in C the PTX translation reads")
        self.take("(")
        args = []
        while self.peek() != ")":
            args.append(self.expression())
            if self.peek() == ",":
                self.take(",")
        self.take(")")
        return self.function(token, args)

    def function(self, name: str, args: list[Value]) -> Value:
        e = self.e
        if name in ("TF_MAX", "TF_MIN"):  # the macros: ((a) < (b) ? (b) : (a)), ((b) < (a) ? ...)
            a, b = args
            less = e.binary("<", a, b) if name == "TF_MAX" else e.binary("<", b, a)
            return e.select(less, b, a)
        if name in ("__fdiv_rn", "__ddiv_rn"):  # CUDA C's division intrinsics (ops._div_cuda)
            t = FLOAT if name == "__fdiv_rn" else DOUBLE
            return e.binary("/", e.convert(args[0], t), e.convert(args[1], t))
        if name in ("tf_round_f16", "tf_round_bf16"):
            return round_half(e, e.convert(args[0], FLOAT), name == "tf_round_bf16")
        if name in ("fmaf", "fma"):  # a * b + c rounded once
            t = FLOAT if name == "fmaf" else DOUBLE
            d = e.new(t)
            a, b, c = (e.convert(x, t).reg for x in args)
            e.op(f"fma.rn.{t.ptx} {d.reg}, {a}, {b}, {c}")
            return d
        if name in _ROUND_TOWARD_ZERO:
            source, result = _ROUND_TOWARD_ZERO[name]
            d = e.new(result)
            e.op(f"cvt.rzi.{result.ptx}.{source.ptx} {d.reg}, {e.convert(args[0], source).reg}")
            return d
        if name in _CLASSIFY and len(args) == 1 and args[0].t.kind == "f":
            name = f"{name}:{'double' if args[0].t == DOUBLE else 'float'}"
        function = FUNCTIONS.get(name)
        if function is None:
            raise Unsupported(f"{name}() has no PTX library function")
        return e.call(function, args)


def round_half(e: Emitter, v: Value, bf16: bool) -> Value:
    """A float rounded to float16 or bfloat16 and back, as the C helpers do it on sm_80+."""
    d = e.new(FLOAT)
    if bf16:  # the rounded value in the upper half, zero below: already the float's bits
        bits = e.new("r")
        e.op(f"cvt.rn.bf16x2.f32 {bits}, {v.reg}, {e.const(0.0, FLOAT).reg}")
        e.op(f"mov.b32 {d.reg}, {bits}")
    else:
        half = e.new("h")
        e.op(f"cvt.rn.f16.f32 {half}, {v.reg}")
        e.op(f"cvt.f32.f16 {d.reg}, {half}")
    return d


_STATEMENT = re.compile(r"^(\w+) (v\d+) = (.*);$")


def body(e: Emitter, statements: list[str], values: dict[str, Value]) -> None:
    """Translate the element body's statements (``T vN = EXPR;``), adding each vN to values."""
    parser = _Parser(e, values)
    for statement in statements:
        match = _STATEMENT.match(statement)
        if match is None or match.group(1) not in TYPES:
            raise Unsupported(f"a statement the PTX translation does not read: {statement}")
        ctype, name, expr = match.groups()
        values[name] = e.convert(parser.parse(expr), TYPES[ctype])


# ---- the scalar32 entry point ----------------------------------------------------------------

# C type of a dtype stored as itself (codegen/cstyle.C_TYPES) -> (load/store type, value type)
_STORAGE = {"float": ("f32", FLOAT), "double": ("f64", DOUBLE), "int8_t": ("s8", TYPES["int8_t"]),
            "uint8_t": ("u8", TYPES["uint8_t"]), "int16_t": ("s16", TYPES["int16_t"]),
            "int32_t": ("s32", INT), "int64_t": ("s64", LONG)}


def scalar_entry(kernel, block: int, name: str = "tf_scalar32") -> str:
    """The PTX of ``kernel``'s scalar32 entry (a codegen/cuda ``_Kernel``): its parameters as
    the C entry has them, one element per thread of a grid-stride loop, 32-bit indices."""
    if kernel.checked:
        raise Unsupported("kernels that report errors are compiled from C")
    e = Emitter()
    # the C entry's parameters: name -> PTX type (magic numbers and shifts are 32-bit)
    kinds = {p.split()[-1]: ".u32" if "uint32_t" in p else ".u64"
             for p in kernel.params().split(",")}
    header = [f".visible .entry {name}(",
              ",\n".join(f"\t.param {k} {p}" for p, k in kinds.items()),
              ")", f".maxntid {block}, 1, 1", "{"]

    def param(p: str, t: CType = UINT) -> Value:
        wide = e.new(ULONG if kinds[p] == ".u64" else UINT)
        e.op(f"ld.param.{wide.t.ptx} {wide.reg}, [{p}]")
        return e.convert(wide, t) if t != wide.t else wide

    rank, k, n_in = kernel.argspec.rank, len(kernel.dtypes), kernel.n_in
    if rank < 1:
        raise Unsupported("a kernel of rank 0")
    pointers = []
    for p in range(k):
        raw = param(f"in{p}" if p < n_in else f"out{p - n_in}", ULONG)
        pointers.append(e.new(ULONG))
        e.op(f"cvta.to.global.u64 {pointers[-1].reg}, {raw.reg}")
    n = param("n_")
    strided = range(0 if kernel.flat else rank)  # flat kernels index every operand by i
    sizes = [param(f"size{d}_") for d in strided]
    dividers = {d: (param(f"magic{d}_"), param(f"shift{d}_")) for d in strided if d}
    strides = [[param(f"stride{p}_{d}_") for d in strided] for p in range(k)]
    partial = {p: [param(f"stride{p}_{d}_", LONG) for d in range(rank)]  # the guards' strides
               for p in range(n_in, k) if kernel.argspec.partial_outputs[p - n_in]}
    i, step, block_id, threads, thread_id, blocks = (e.new(UINT) for _ in range(6))
    e.op(f"mov.u32 {block_id.reg}, %ctaid.x")
    e.op(f"mov.u32 {threads.reg}, %ntid.x")
    e.op(f"mov.u32 {thread_id.reg}, %tid.x")
    e.op(f"mad.lo.u32 {i.reg}, {block_id.reg}, {threads.reg}, {thread_id.reg}")
    e.op(f"mov.u32 {blocks.reg}, %nctaid.x")
    e.op(f"mul.lo.u32 {step.reg}, {blocks.reg}, {threads.reg}")
    done = e.new(BOOL)
    e.op(f"setp.ge.u32 {done.reg}, {i.reg}, {n.reg}")
    e.op(f"@{done.reg} bra $L_done")
    e.lines.append("$L_loop:")

    # offsets: i unravelled over the dimensions (tf_divide's multiply-high), then per operand
    index = [i] * rank
    if not kernel.flat and rank > 1:
        rem = i
        for d in range(rank - 1, 0, -1):
            magic, shift = dividers[d]
            q, t = e.new(UINT), e.new(UINT)
            e.op(f"mul.hi.u32 {t.reg}, {rem.reg}, {magic.reg}")
            e.op(f"add.u32 {t.reg}, {t.reg}, {rem.reg}")
            e.op(f"shr.b32 {q.reg}, {t.reg}, {shift.reg}")
            j = e.new(UINT)
            e.op(f"mul.lo.u32 {t.reg}, {q.reg}, {sizes[d].reg}")
            e.op(f"sub.u32 {j.reg}, {rem.reg}, {t.reg}")
            index[d], rem = j, q
        index[0] = rem
    offsets = []
    for p in range(k):
        code = kernel.codes[p]
        if kernel.flat:
            offsets.append(i)
            continue
        terms = [(index[d], strides[p][d]) for d in range(rank - 1)]
        if code not in (CONTIG, BROADCAST):
            terms.append((index[rank - 1], strides[p][rank - 1]))
        o = index[rank - 1] if code == CONTIG else e.const(0, UINT)
        for j, stride in terms:  # o = sum of j * stride (+ the inner index where contiguous)
            total = e.new(UINT)
            e.op(f"mad.lo.u32 {total.reg}, {j.reg}, {stride.reg}, {o.reg}")
            o = total
        offsets.append(o)

    def address(p: int) -> str:
        addr = e.new("rd")
        e.op(f"mul.wide.u32 {addr}, {offsets[p].reg}, {kernel.dtypes[p].itemsize}")
        e.op(f"add.s64 {addr}, {pointers[p].reg}, {addr}")
        return addr

    values = {}
    for p in range(n_in):
        values[f"v{p}"] = load(e, address(p), kernel.dtypes[p])
    body(e, kernel.body, values)
    for o, value in enumerate(kernel.typed.graph.outputs):
        p = n_in + o
        guard = _guard(e, kernel, p, index, partial[p]) if p in partial else None
        store(e, address(p), values[f"v{value}"], kernel.dtypes[p], guard)
    e.op(f"add.u32 {i.reg}, {i.reg}, {step.reg}")
    e.op(f"setp.lt.u32 {done.reg}, {i.reg}, {n.reg}")
    e.op(f"@{done.reg} bra $L_loop")
    e.lines.append("$L_done:")
    e.op("ret")
    return "\n".join([*header, *e.declarations(), *e.lines, "}"])


def _guard(e: Emitter, kernel, p: int, index: list[Value], strides: list[Value]) -> Value:
    """codegen/cuda's guard of a partial output: the first position along its broadcast dims."""
    rank = kernel.argspec.rank
    conditions = [e.binary("||", e.binary("==", index[d], e.const(0, UINT)),
                           e.binary("!=", strides[d], e.const(0, LONG)))
                  for d in range(rank - 1)]
    if kernel.codes[p] == BROADCAST:
        conditions.append(e.binary("==", index[rank - 1], e.const(0, UINT)))
    guard = e.const(1, BOOL)
    for condition in conditions:
        guard = e.binary("&&", guard, condition)
    return guard


def load(e: Emitter, addr: str, dtype: torch.dtype) -> Value:
    """One element as its compute type: halves widened to float, bytes of a bool tested."""
    if dtype in HALF_DTYPES:
        bits, d = e.new("h" if dtype == torch.float16 else "r"), e.new(FLOAT)
        if dtype == torch.float16:
            e.op(f"ld.global.nc.b16 {bits}, [{addr}]")
            e.op(f"cvt.f32.f16 {d.reg}, {bits}")
        else:
            e.op(f"ld.global.nc.u16 {bits}, [{addr}]")
            e.op(f"shl.b32 {bits}, {bits}, 16")
            e.op(f"mov.b32 {d.reg}, {bits}")
        return d
    if dtype == torch.bool:
        byte = e.new(UINT)
        e.op(f"ld.global.nc.u8 {byte.reg}, [{addr}]")
        return e.convert(byte, BOOL)
    kind, t = _STORAGE[C_TYPES[dtype]]
    d = e.new(t)
    e.op(f"ld.global.nc.{kind} {d.reg}, [{addr}]")
    return d


def store(e: Emitter, addr: str, v: Value, dtype: torch.dtype, guard: Value | None) -> None:
    at = f"@{guard.reg} " if guard is not None else ""
    if dtype == torch.float16:
        half = e.new("h")
        e.op(f"cvt.rn.f16.f32 {half}, {v.reg}")
        e.op(f"{at}st.global.b16 [{addr}], {half}")
    elif dtype == torch.bfloat16:  # tf_f2bf on sm_80+: the packed cvt, its lower half
        bits = e.new("r")
        e.op(f"cvt.rn.bf16x2.f32 {bits}, {e.const(0.0, FLOAT).reg}, {v.reg}")
        e.op(f"{at}st.global.u16 [{addr}], {bits}")
    elif dtype == torch.bool:
        byte = e.convert(v, UINT)
        e.op(f"{at}st.global.u8 [{addr}], {byte.reg}")
    else:
        kind, _ = _STORAGE[C_TYPES[dtype]]
        e.op(f"{at}st.global.{kind} [{addr}], {v.reg}")
