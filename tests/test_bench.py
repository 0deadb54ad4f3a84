"""The benchmark's parts that need no timing: a group's build timed alone, the report of a
result file (earlier sessions' too, without the newer columns), the CPU bench's heap setting.
The bench itself is a benchmark, not a test: nothing here runs or judges its measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchfuse
from torchfuse import bench
from torchfuse.config import override

RESULTS = Path(__file__).resolve().parent.parent / "bench"
needs_cc = pytest.mark.skipif(not torchfuse.can_fuse("cpu"), reason="no C compiler")


@needs_cc
def test_build_seconds_compiles_every_round_on_a_cache_of_its_own(tmp_path):
    gated = next(w for w in bench.WORKLOADS if w.name == "gated")
    args = (torch.randn(64), torch.randn(64))
    key = bench.register(gated, args)
    with override(cache_dir=str(tmp_path)):
        before = torchfuse.cache_info()["compiles"]
        seconds = bench.build_seconds(key, args)
        assert torchfuse.cache_info()["compiles"] - before == bench.BUILD_ROUNDS  # cold each time
    assert seconds > 0
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # the configured cache: untouched


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("results-*.json")))
def test_report_reads_every_result_file(name):
    with open(RESULTS / name) as f:
        result = json.load(f)
    text = bench.report(result)
    assert "| workload | dtype |" in text and "tf build s" in text
    builds = [r.get("torchfuse_build_s") for r in result["rows"] if r["n"] == result["large"]]
    if all(b is None for b in builds):  # written before the column: a dash in its place
        first = next(r for r in result["rows"] if r["n"] == result["large"])
        dtype = first["dtype"].removeprefix("torch.")
        assert f"| {first['workload']} | {dtype} | — |" in text


def test_16_bit_variants_on_the_gpu_and_on_the_cpu_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    labels = lambda workloads: {w.label for w in workloads}  # noqa: E731
    assert all(w.dtype == torch.float32 for w in bench.workloads_for(cpu, []))
    halves = {f"{name} {dtype}" for name in bench.HALF_VARIANTS
              for dtype in ("float16", "bfloat16")}
    assert halves <= labels(bench.workloads_for(cpu, [], half=True))
    assert halves <= labels(bench.workloads_for(cuda, []))
    assert labels(bench.workloads_for(cpu, ["gated bfloat16"], half=True)) == {"gated bfloat16"}


def test_steady_heap_leaves_allocation_working():
    code = ("from torchfuse import bench; bench.steady_heap(); import torch; "
            "x = torch.ones(1 << 22); y = x * 2; del x; print(float(y.sum()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == 2.0 * (1 << 22)


@needs_cc
def test_a_second_process_finds_the_kernels_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    found = bench.process_start(torch.device("cpu"), str(tmp_path), backends=("torchfuse",))
    assert found["torchfuse"]["cold"] > 0 and found["torchfuse"]["warm"] > 0
    assert found["torchfuse"]["warm_compiles"] == 0
    assert bench.process_start(torch.device("cpu"), str(tmp_path), backends=("no_such",)) == {}
    assert "not measured" in bench.start_line(found)  # Inductor's processes did not run
    both = {**found, "inductor": {"cold": 9.0, "warm": 2.0, "warm_compiles": 0}}
    assert "torchfuse" in bench.start_line(both) and "Inductor 2.000 s." in bench.start_line(both)


def test_a_small_rows_second_pass_keeps_each_columns_best_and_every_check():
    row = {"eager_s": 2e-5, "inductor_s": 4e-5, "torchfuse_s": 1e-5, "run_fusion_s": 9e-6,
           "torchfuse_compile_s": 0.1, "torchfuse_ok": True, "run_fusion_ok": True}
    again = {"eager_s": 3e-5, "inductor_s": 3e-5, "torchfuse_s": 2e-5, "run_fusion_s": 7e-6,
             "torchfuse_compile_s": 0.05, "torchfuse_ok": True, "run_fusion_ok": False}
    bench.merge_pass(row, again)
    assert (row["eager_s"], row["inductor_s"], row["torchfuse_s"], row["run_fusion_s"]) == (
        2e-5, 3e-5, 1e-5, 7e-6)
    assert row["torchfuse_compile_s"] == 0.1  # compile columns are the first pass's
    assert row["torchfuse_ok"] and not row["run_fusion_ok"] and row["passes"] == 2
