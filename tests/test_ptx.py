"""codegen/ptx.py without a GPU: the C it reads, the PTX it writes for it, the library linking.

The GPU suite checks the values: test_ops' ``*_scalar_ptx`` tests run every op case, dtype and
layout through the assembled scalar32 entry and through NVRTC's, and compare them bit for bit.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from conftest import trace
from test_ops import CASES, _inputs
from torchfuse import bench, compiler, interface, ops
from torchfuse.codegen import ptx
from torchfuse.codegen.cuda import BLOCK, PTX_MARK, CUDARenderer
from torchfuse.codegen.ptx import BOOL, DOUBLE, FLOAT, INT, LONG, TYPES, UINT, ULONG, common


def _translate(expr: str, **types: str) -> tuple[ptx.Value, list[str]]:
    """``expr`` over values named by ``types`` (name -> C type): its value and instructions."""
    e = ptx.Emitter()
    values = {name: e.new(TYPES[t]) for name, t in types.items()}
    value = ptx._Parser(e, values).parse(expr)
    return value, [line.strip().rstrip(";") for line in e.lines]


def _source(fn, *inputs) -> str:
    spec = compiler.register(trace(fn, *inputs))
    argspec, _ = interface.argspec_of(spec, inputs)
    return CUDARenderer().render(compiler.infer_types(spec.graph, argspec, cuda=True), argspec)


def test_usual_arithmetic_conversions():
    s8, u8, s16 = TYPES["int8_t"], TYPES["uint8_t"], TYPES["int16_t"]
    assert common(s8, u8) == INT and common(BOOL, BOOL) == INT and common(s16, s8) == INT
    assert common(INT, UINT) == UINT and common(UINT, LONG) == LONG
    assert common(LONG, ULONG) == ULONG and common(INT, FLOAT) == FLOAT
    assert common(FLOAT, DOUBLE) == DOUBLE and common(ULONG, FLOAT) == FLOAT


def test_float_comparisons_are_cs_nan_included():
    value, lines = _translate("v0 != v0 || v0 < v1", v0="float", v1="float")
    assert value.t == BOOL
    assert any(line.startswith("setp.neu.f32") for line in lines)  # NaN != NaN is true
    assert any(line.startswith("setp.lt.f32") for line in lines)  # ordered: NaN < x is false
    assert any(line.startswith("or.pred") for line in lines)


def test_integer_constants_become_float_constants_and_products_are_rounded():
    value, lines = _translate("1 / (1 + expf(-v0)) * v1", v0="float", v1="float")
    assert value.t == FLOAT
    assert any(line.startswith("mov.f32") and "0f3F800000" in line for line in lines)
    assert not any(line.startswith(("cvt.rn.f32.s", "cvt.rn.f32.u")) for line in lines)  # 1.0f
    assert not any(line.startswith("div.") for line in lines)  # IEEE division, by hand:
    assert any(line.startswith("rcp.approx.ftz.f32") for line in lines)  # fast path
    assert any(line.startswith("rcp.approx.ftz.f64") for line in lines)  # the rest in double
    assert any(line.startswith("add.rn.f32") for line in lines)  # no contraction into an fma
    assert any(line.startswith("mul.rn.f32") for line in lines)
    assert any("call.uni (retval0), tf_lib_expf" in line for line in lines)


def test_narrow_integers_wrap_and_extend():
    value, lines = _translate("(int8_t)((uint32_t)v0 + (uint32_t)v1)", v0="int8_t", v1="int8_t")
    assert value.t == TYPES["int8_t"]
    assert any(line.startswith("add.u32") for line in lines)
    assert lines[-1].startswith("bfe.s32") and lines[-1].endswith(", 0, 8")
    value, lines = _translate("(uint8_t)(v0 * 3)", v0="int32_t")
    assert lines[-1].startswith("and.b32") and lines[-1].endswith(", 255")


def test_conversions_from_float():
    value, lines = _translate("__float2int_rz(v0)", v0="float")
    assert value.t == INT and lines == [f"cvt.rzi.s32.f32 {value.reg}, %f1"]
    value, lines = _translate("(v0) != 0", v0="double")
    assert any(line.startswith("setp.neu.f64") for line in lines)
    value, lines = _translate("tf_round_bf16((float)(v0))", v0="double")
    assert lines[0].startswith("cvt.rn.f32.f64")
    assert any(line.startswith("cvt.rn.bf16x2.f32") for line in lines)


def test_bools_select_and_promote():
    value, lines = _translate("(v0 > 0) - (v0 < 0)", v0="float")  # sign: bools as ints
    assert value.t == INT and any(line.startswith("sub.s32") for line in lines)
    value, lines = _translate("v2 ? v0 : v1", v0="float", v1="int32_t", v2="bool")
    assert value.t == FLOAT and any(line.startswith("selp.b32") for line in lines)
    value, lines = _translate("TF_MAX(v0, v1)", v0="int64_t", v1="int32_t")
    assert value.t == LONG and any(line.startswith("setp.lt.s64") for line in lines)


def test_float_literals_round_once():
    # Just above the midpoint between 1 and the next float: rounding it to a double first
    # lands exactly on the midpoint, which then rounds to even (1.0); C rounds it up.
    exact = Fraction("1.0000000596046447753906251")
    assert ptx._float32(exact) == 1.0000001192092896
    assert ptx._number("0.1f") == (ptx._float32(Fraction("0.1")), FLOAT)
    assert ptx._number("2147483648LL") == (2**31, LONG)
    assert ptx._number("5") == (5, INT) and ptx._number("1e-05") == (1e-05, DOUBLE)


@pytest.mark.parametrize("expr", ["v0[1]", "v0 = 1", "err", "foo(v0)", "v0 ? v0", "&v0"])
def test_c_it_does_not_read_is_unsupported(expr):
    with pytest.raises(ops.Unsupported):
        _translate(expr, v0="float")


LIBRARY = """//
// Generated by NVIDIA NVVM Compiler
.version 9.0
.target sm_90
.address_size 64

.func  (.param .b32 func_retval0) __internal_helper(
\t.param .b32 __internal_helper_param_0
)
;
.global .align 4 .b8 __table[8] = {1, 2, 3, 4, 5, 6, 7, 8};
.visible .func  (.param .b32 func_retval0) tf_lib_a(
\t.param .b32 tf_lib_a_param_0
)
{
\tmov.u64 %rd1, __table;
\tcall.uni (retval0), __internal_helper, (param0);
\tret;
}
.visible .func  (.param .b32 func_retval0) tf_lib_b(
\t.param .b32 tf_lib_b_param_0
)
{
\tret;
}
.func  (.param .b32 func_retval0) __internal_helper(
\t.param .b32 __internal_helper_param_0
)
{
\tret;
}
"""


def test_link_takes_what_an_entry_calls_in_the_librarys_order():
    library = ptx.Library.parse(LIBRARY)
    assert [name for name, _ in library.items] == [
        "__internal_helper", "__table", "tf_lib_a", "tf_lib_b", "__internal_helper"]
    module = ptx.link(".entry k() { call.uni (retval0), tf_lib_a, (param0); }", library)
    assert module.startswith(".version 9.0\n.target sm_90\n.address_size 64")
    assert "tf_lib_b" not in module and ".visible .func" not in module
    order = [module.index(text) for text in (") __internal_helper(\n\t.param .b32 "
                                             "__internal_helper_param_0\n)\n;", "__table[8]",
                                             ") tf_lib_a(", ".entry k")]
    assert order == sorted(order)
    assert module.count("__internal_helper(") == 2  # its prototype and its definition


def test_library_source_exports_every_function():
    source = ptx.library_source("/* preamble */")
    for function in ptx.FUNCTIONS.values():
        assert f" {function.symbol}(" in source
    assert "TF_INT_HELPERS(i8," in source and "#define TF_FLOAT_HELPERS" in source


def test_bench_workloads_have_a_ptx_entry():
    for workload in bench.workloads_for(torch.device("cuda"), ()):
        inputs = workload.inputs(1 << 10, torch.device("cpu"))
        if workload.views:
            inputs = list(workload.views(*inputs))
        source = _source(workload.body, *inputs)
        assert PTX_MARK in source, workload.label
        entry = source[source.index(PTX_MARK):]
        assert ".visible .entry tf_scalar32(" in entry and f".maxntid {BLOCK}, 1, 1" in entry


def test_every_op_case_has_a_ptx_entry_unless_it_reports_errors():
    missing = []
    for name, (fn, arity, dtypes) in CASES.items():
        for dtype in dtypes:
            inputs = _inputs(name, arity, dtype)
            try:
                source = _source(fn, *inputs)
            except Exception:  # not fusible for this dtype: nothing is rendered
                continue
            if PTX_MARK not in source and "tf_checked_" not in source:
                missing.append(f"{name} {dtype}")
    assert not missing


def test_entry_parameters_match_the_c_entry():
    x = torch.randn(6, 10)
    source = _source(lambda a, b: torch.sigmoid(a) * b, x.t(), x[:1, :].t())
    c_params = source.split('tf_scalar32(\n')[1].split(")")[0]
    names = [p.split()[-1] for p in c_params.split(",")]
    entry = source[source.index(PTX_MARK):]
    ptx_params = entry.split(".visible .entry tf_scalar32(\n")[1].split("\n)")[0]
    assert [p.split()[-1] for p in ptx_params.split(",\n")] == names
    assert "mul.hi.u32" in entry  # the index unravelled with tf_divide's multiply-high


LEAF = """.version 9.0
.target sm_90
.address_size 64

.visible .func  (.param .b32 func_retval0) tf_lib_twice(
\t.param .b32 tf_lib_twice_param_0
)
{
\t.reg .pred \t%p<2>;
\t.reg .f32 \t%f<3>;

\tld.param.f32 \t%f1, [tf_lib_twice_param_0];
\tsetp.eq.f32 \t%p1, %f1, 0f00000000;
\t@%p1 bra \t$L__BB0_2;
\tadd.rn.f32 \t%f1, %f1, %f1;
$L__BB0_2:
\tst.param.f32 \t[func_retval0+0], %f1;
\tret;

}
.visible .func  (.param .b32 func_retval0) tf_lib_zero(
\t.param .b32 tf_lib_zero_param_0
)
{
\tst.param.b32 \t[func_retval0+0], 0;
\tret;
}
"""


def test_link_writes_leaf_functions_out_in_place():
    e = ptx.Emitter()
    x = e.new(FLOAT)
    first = e.call(ptx.Function("tf_lib_twice", FLOAT, (FLOAT,), ""), [x])
    e.call(ptx.Function("tf_lib_twice", FLOAT, (FLOAT,), ""), [first])
    module = ptx.link("\n".join(e.lines), ptx.Library.parse(LEAF))
    assert "call.uni" not in module and ".func" not in module
    for site in (1, 2):  # each copy's registers and labels apart, its result moved out
        assert f".reg .f32 \t%f_i{site}_<3>;" in module
        assert f"@%p_i{site}_1 bra \t$L__BB0_2_i{site};" in module
        assert f"bra $L_return_{site};" in module and f"$L_return_{site}:" in module
    assert "mov.b32 %f_i1_1, %f1;" in module and f"mov.b32 {first.reg}, %f_i1_1;" in module
    assert f"mov.b32 %f_i2_1, {first.reg};" in module
    zero = ptx.Emitter()
    value = zero.call(ptx.Function("tf_lib_zero", INT, (INT,), ""), [zero.new(INT)])
    module = ptx.link("\n".join(zero.lines), ptx.Library.parse(LEAF))
    assert f"mov.b32 {value.reg}, 0;" in module and "func_retval0" not in module
