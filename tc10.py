"""Device experiment (not committed): evict-first (.cs) vector loads/stores vs plain, every
bench workload at the large size, kernel only into preallocated outputs, interleaved."""
import sys, torch
sys.path.insert(0, "tests")
from conftest import trace
import torchfuse
from torchfuse import bench, compiler, interface, executor
import torchfuse.codegen.cuda as C
from torchfuse.devices import cuda as B
dev = torch.device("cuda")
def per_call(fn, n=20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn(); torch.cuda.synchronize(); s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n
for w in bench.workloads_for(dev, ()):
    inputs = w.inputs(1 << 26, dev)
    args = list(w.views(*inputs)) if w.views else inputs
    want = w.body(*args); want = want if isinstance(want, tuple) else (want,)
    outs = [torch.empty_like(t) for t in want]
    spec = compiler.register(trace(w.body, *args))
    argspec, _ = interface.argspec_of(spec, args)
    _, _, numel, sizes, strides, _ = executor.plan(spec, args)
    launches, results = {}, {}
    for streaming in (False, True):
        C.STREAMING = streaming
        src, _ = compiler.render(spec, argspec, dev)
        launch = B.BACKEND.load(B.BACKEND.compile_entry(src, dev, "scalar32"), dev, src)
        launch.wait()
        assert "vector32" in launch.kernels
        got = [torch.empty_like(t) for t in want]
        launch(numel, sizes, strides, [*args, *got]); torch.cuda.synchronize()
        results[streaming] = got
        launches[streaming] = launch
    for g, r in zip(results[False], results[True]):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)
    C.STREAMING = True
    ind = torch.compile(w.program())
    times = {False: [], True: [], "ind": []}
    for _ in range(7):
        for k, launch in launches.items():
            times[k].append(per_call(lambda: launch(numel, sizes, strides, [*args, *outs])))
        times["ind"].append(per_call(lambda: ind(*inputs)))
    b, c, i = (min(times[k]) for k in (False, True, "ind"))
    print(f"{w.label:26s} plain {b:.4f}  .cs {c:.4f}  cs/plain {c/b:.4f}   inductor {i:.4f}  cs/ind {c/i:.4f} plain/ind {b/i:.4f}", flush=True)
