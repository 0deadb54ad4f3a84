"""Random pointwise programs against eager: the fuzzer's finds stay found.

Each seed makes a program of one to six ops (unary, binary, ternary, with Python numbers mixed
in) over one to three inputs of broadcastable shapes (empty and 0-d ones included), dtypes
(mostly one float type, sometimes mixed with integers and bools) and memory layouts
(transposed, strided, offset, expanded), with NaN, ±Inf and signed zeros among the values.
``run_fusion`` of its graph must give eager's results, or raise eager's exception type; one
program in ten runs through ``torch.compile`` with torchfuse instead (against ``aot_eager``:
Dynamo's own handling), with views, copies and a reduction mixed in. It found an output never
written beside an empty input, ops of dtypes eager refuses computed under torch.compile, a
group of ops on numbers alone that failed the compile, and CUDA half pairs in a vector one
element wide.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import torchfuse
from torchfuse.cache import SPECS

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FLOATS = (F32, F32, F32, F16, BF16, F64)
OTHERS = (torch.int32, torch.int64, torch.uint8, torch.int8, torch.int16, torch.bool)

UNARY = {
    "exp": torch.exp, "log": torch.log, "sin": torch.sin, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "log1p": torch.log1p,
    "expm1": torch.expm1, "erf": torch.erf, "abs": torch.abs, "neg": torch.neg,
    "relu": torch.relu, "floor": torch.floor, "round": torch.round, "trunc": torch.trunc,
    "sign": torch.sign, "reciprocal": torch.reciprocal, "frac": torch.frac, "silu": F.silu,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "hardswish": F.hardswish, "nan_to_num": torch.nan_to_num, "softplus": F.softplus,
    "elu": F.elu, "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "mish": F.mish,
    "atan": torch.atan, "isnan": torch.isnan,
    "logical_not": torch.logical_not, "bitwise_not": torch.bitwise_not, "logit": torch.logit,
    "exp2": torch.exp2, "clamp01": lambda x: torch.clamp(x, 0, 1), "hardtanh": F.hardtanh,
    "threshold": lambda x: F.threshold(x, 0.1, 20.0), "lgamma": torch.lgamma,
    "to_f16": lambda x: x.to(F16), "to_f32": lambda x: x.to(F32), "to_bf16": lambda x: x.to(BF16),
    "to_i32": lambda x: x.to(torch.int32), "to_bool": lambda x: x.to(torch.bool),
    "to_u8": lambda x: x.to(torch.uint8),
}
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "div_floor": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "div_trunc": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    "maximum": torch.maximum, "fmin": torch.fmin, "pow": torch.pow, "atan2": torch.atan2,
    "remainder": torch.remainder, "fmod": torch.fmod, "hypot": torch.hypot,
    "eq": torch.eq, "lt": torch.lt, "ge": torch.ge,
    "logical_and": torch.logical_and, "bitwise_and": torch.bitwise_and,
    "bitwise_xor": torch.bitwise_xor, "shift_left": torch.bitwise_left_shift,
    "shift_right": torch.bitwise_right_shift, "add_alpha": lambda a, b: torch.add(a, b, alpha=2),
    "sub_alpha": lambda a, b: torch.sub(a, b, alpha=0.5), "rsub": torch.rsub,
    "logaddexp": torch.logaddexp,
}
# Not signbit or copysign: they read the sign of a NaN, and eager's bfloat16 NaNs made on the
# CPU are 0xFFFF in its vector loops and 0x7FC0 in their tails (README)
TERNARY = {
    "where": lambda c, a, b: torch.where(c if c.dtype == torch.bool else c > 0, a, b),
    "clamp": torch.clamp,
    "lerp": lambda a, b, w: torch.lerp(a, b, w if w.is_floating_point() else 0.3),
    "addcmul": lambda a, b, c: torch.addcmul(a, b, c, value=0.5),
    "addcdiv": lambda a, b, c: torch.addcdiv(a, b, c, value=2),
    "masked_fill": lambda a, m, v: a.masked_fill(m if m.dtype == torch.bool else m > 0, 1.5),
}
# torch.compile only: views, copies and a reduction between the pointwise ops (groups end and
# start around them; chunk pieces enter groups as pointers into the wider tensor)
STRUCTURAL = {
    "transposed": lambda x: x.mT.contiguous().mT if x.dim() >= 2 else x + 0,
    "halves_swapped": lambda x: torch.cat(x.chunk(2, -1)[::-1], -1) if x.dim() else x + 0,
    "centered": lambda x: x - x.mean(-1, keepdim=True)
    if x.dim() and x.is_floating_point() else x + 0,
}
TABLES = {1: UNARY, 2: BINARY, 3: TERNARY, 0: STRUCTURAL}
COMPILED = 10  # one program in COMPILED runs through torch.compile
NUMBERS = (0.5, 2, -1, 3.0, 1e-3, 0, -0.0, float("inf"), 7, 1e4)
SPECIALS = (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 0.5)


class Program:
    """One random program: input shapes, dtypes and layouts, and its steps."""

    def __init__(self, seed: int) -> None:
        self.compiled = seed % COMPILED == 0
        rng = self.rng = random.Random(seed)
        rank = rng.choice((0, 1, 1, 2, 2, 3, 4))
        sizes = (0, 1, 2, 3, 5, 8, 17, 33) if rng.random() < 0.1 else (1, 2, 3, 5, 8, 17, 33, 130)
        shape = [rng.choice(sizes) for _ in range(rank)]
        n_in = rng.choice((1, 2, 2, 3))
        base = rng.choice(FLOATS) if rng.random() < 0.8 else rng.choice(OTHERS)
        self.dtypes = [base if rng.random() < 0.8 else rng.choice(FLOATS + OTHERS)
                       for _ in range(n_in)]
        self.shapes = [shape] + [self._broadcasting(shape) for _ in range(n_in - 1)]
        rng.shuffle(self.shapes)
        self.steps = []
        values = n_in
        for _ in range(rng.randint(1, 6)):
            arity = rng.choice((1, 1, 2, 2, 2, 3) + ((0,) if self.compiled else ()))
            name = rng.choice(sorted(TABLES[arity]))
            args = [("number", rng.choice(NUMBERS)) if arity > 1 and rng.random() < 0.2
                    else ("value", rng.randrange(values)) for _ in range(max(arity, 1))]
            if all(kind == "number" for kind, _ in args):
                args[0] = ("value", rng.randrange(values))
            self.steps.append((arity, name, args))
            values += 1
        extra = {rng.randrange(n_in, values)} if rng.random() < 0.3 else set()
        self.outputs = sorted({values - 1} | extra)

    def _broadcasting(self, shape: list[int]) -> list[int]:
        tail = shape[len(shape) - self.rng.randint(0, len(shape)):] if shape else []
        return [n if self.rng.random() < 0.75 else 1 for n in tail]

    def inputs(self, device: str) -> list[torch.Tensor]:
        return [self._layout(self._values(s, d).to(device))
                for s, d in zip(self.shapes, self.dtypes)]

    def _values(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=gen).bool()
        if not dtype.is_floating_point:
            low, high = (0, 40) if dtype == torch.uint8 else (-20, 20)
            return torch.randint(low, high, shape, generator=gen).to(dtype)
        values = torch.randn(shape, generator=gen, dtype=F64) * self.rng.choice((1, 3, 100, 1e-3))
        flat = values.view(-1)
        if flat.numel() and self.rng.random() < 0.7:
            where = torch.randint(0, flat.numel(), (min(flat.numel(), 6),), generator=gen)
            flat[where] = torch.tensor(SPECIALS, dtype=F64)[
                torch.randint(0, len(SPECIALS), (len(where),), generator=gen)]
        return values.to(dtype)

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        """The same values in another memory layout."""
        kind = self.rng.choice(("contiguous", "contiguous", "transposed", "strided", "offset",
                                "expanded", "channels_last"))
        if kind == "transposed" and t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if kind == "strided" and t.dim() >= 1:
            wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
            wide[..., ::2] = t
            return wide[..., ::2]
        if kind == "offset" and t.numel():
            wide = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
            wide[3:] = t.reshape(-1)
            return wide[3:].view(t.shape)
        if kind == "expanded" and t.dim() >= 1 and t.shape[0] > 1:
            return t[:1].expand(t.shape)
        if kind == "channels_last" and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = list(inputs)
        for arity, name, args in self.steps:
            operands = [values[a] if kind == "value" else a for kind, a in args]
            values.append(TABLES[arity][name](*operands))
        return tuple(values[o] for o in self.outputs)

    def __repr__(self) -> str:
        lines = [f"v{i}: {s} {d}" for i, (s, d) in enumerate(zip(self.shapes, self.dtypes))]
        k = len(self.shapes)
        for _, name, args in self.steps:
            operands = ", ".join(f"v{a}" if kind == "value" else repr(a) for kind, a in args)
            lines.append(f"v{k} = {name}({operands})")
            k += 1
        return "; ".join(lines) + f"; return {[f'v{o}' for o in self.outputs]}"


def _outcome(fn, *args):
    try:
        return fn(*args), None
    except Exception as error:  # noqa: BLE001 - eager's error is the expected outcome
        return None, error


def _run_fusion(program: Program, inputs: list[torch.Tensor]) -> list[tuple] | None:
    """run_fusion of the program's graph, twice (CUDA's vector entry builds after the first
    call): both results; None where nothing fuses."""
    try:
        graph = make_fx(program)(*inputs)
    except RuntimeError as error:
        if "_local_scalar_dense" in str(error):  # a tensor in a number's place: not a graph
            return None
        raise
    try:
        key = torchfuse.register_fusion(graph)
    except torchfuse.NotFusible:
        return None
    first = torchfuse.run_fusion(key, *inputs)
    SPECS[key].kernels.settle()
    return [first, torchfuse.run_fusion(key, *inputs)]


def _compiled(program: Program, inputs: list[torch.Tensor], backend: str) -> list[tuple]:
    torch._dynamo.reset()
    return [torch.compile(program, backend=backend)(*inputs)]


def _eager(program: Program, inputs: list[torch.Tensor]) -> tuple:
    """Eager's results; through torch.compile, Dynamo's own handling (aot_eager's)."""
    return _compiled(program, inputs, "aot_eager")[0] if program.compiled else program(*inputs)


def _ours(program: Program, inputs: list[torch.Tensor]) -> list[tuple] | None:
    if program.compiled:
        return _compiled(program, inputs, "torchfuse")
    return _run_fusion(program, inputs)


def _assert_matches(got, want, program) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.dtype, g.shape) == (w.dtype, w.shape), program
        if w.is_floating_point():
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{program}\n{m}")
        else:
            assert torch.equal(g, w), f"{program}: {int((g != w).sum())} of {w.numel()} differ"


def _atens_gelu(device: str, program: Program):
    """Eager's CPU gelu of a contiguous tensor is oneDNN's, NaN at +inf (README): ours is ATen's
    own kernel's +inf, which eager runs with oneDNN off."""
    if device == "cpu" and any(name == "gelu" for _, name, _ in program.steps):
        return torch.backends.mkldnn.flags(enabled=False)
    return contextlib.nullcontext()


BLOCKS, PER_BLOCK = 8, 25


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("block", range(BLOCKS))
def test_random_programs_match_eager(device, block):
    for seed in range(block * PER_BLOCK, (block + 1) * PER_BLOCK):
        program = Program(seed)
        inputs = program.inputs(device)
        with _atens_gelu(device, program):  # both sides: a lone gelu stays eager's in ours
            want, error = _outcome(_eager, program, inputs)
            results, our_error = _outcome(_ours, program, inputs)
        if results is None and our_error is None:
            continue  # no graph to fuse (it traces to ops outside the table, or not at all)
        if error is not None or our_error is not None:
            assert type(our_error) is type(error), f"{program}: eager {error!r}, ours {our_error!r}"
        else:
            for got in results:
                _assert_matches(got, want, program)
