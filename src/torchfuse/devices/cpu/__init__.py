"""The CPU backend: the system C compiler builds a shared library; ctypes loads and calls it."""

from __future__ import annotations

import array
import ctypes
import functools
import glob
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from ... import diskcache, ops
from ...cache import count
from ...codegen.c import SLEEF_NAMES, VML, VML_MODE, CRenderer, streamed_from
from ...config import config, log
from .. import CompileError, EntryBuild, launcher, no_dispatch_modes

# -ffp-contract=off: eager rounds every op's result, so a product feeding an add is rounded
# first; gcc's default (fast) would fuse the two into one multiply-add, rounding once.
# -fno-tree-sink: gcc would sink a math call whose result only one side of a select reads
# into that side (where(x > 0, log1p(x) * y, ...)), and a loop with a branch does not
# vectorise: SLEEF's log1p then ran in each lane, where_mix 17x slower.
# -fno-trapping-math: no kernel reads the floating-point exception flags, and with them gcc
# vectorises no floor, ceil or trunc (nor speculates a comparison or an operation out of a
# branch): a float16 floor ran at 25x eager's time, floor division 7-16x. It also folds
# (float)(int)x into trunc(x), which keeps the sign of x in (-1, 0) (cstyle's tf_f2i32).
# -fno-thread-jumps: gcc 13 threaded softplus's log1p call through the selects of the inline
# expf before it, into a branch for each: the loop stayed scalar (gcc 12 did not).
BASE_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fwrapv",
              "-fno-math-errno", "-ffp-contract=off", "-fno-tree-sink", "-fno-trapping-math",
              "-fno-thread-jumps")
OPENMP_FLAGS = ("-fopenmp",)
# glibc's vector math (see codegen.c.VECTOR_MATH). -z defs: a vector variant this libmvec lacks
# fails the compile (and the fallback runs) instead of the load.
VECTOR_MATH_FLAGS = ("-DTF_VECTOR_MATH",)
VECTOR_MATH_LIBS = ("-lmvec", "-Wl,-z,defs")
PROBES = {
    OPENMP_FLAGS: "int probe(int n) { int s = 0;\n#pragma omp parallel for reduction(+:s)\n"
    "for (int i = 0; i < n; i++) s += i; return s; }\n",
    VECTOR_MATH_FLAGS: '__attribute__((simd("notinbranch"))) float expf(float);\n'
    "void probe_vector(const float* restrict a, float* restrict b, int n) {\n"
    "for (int i = 0; i < n; i++) b[i] = expf(a[i]); }\n",
}
_PRIVATE_DIR = None


def _private_dir() -> str:
    global _PRIVATE_DIR
    if _PRIVATE_DIR is None:
        _PRIVATE_DIR = tempfile.mkdtemp(prefix="torchfuse-")
    return _PRIVATE_DIR


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


@functools.lru_cache(maxsize=8)
def _compiler_identity(cc: str) -> str | None:
    """The compiler's version line, or None when it cannot be run."""
    path = shutil.which(cc)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _optional_flags() -> list[tuple[str, ...]]:
    """The optional features worth probing for here, most wanted first."""
    return [OPENMP_FLAGS, VECTOR_MATH_FLAGS] if _has_vector_math() else [OPENMP_FLAGS]


def _libc() -> str:
    """The C library and its version, e.g. "glibc 2.36"; empty where it cannot be told."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return ""


@functools.lru_cache(maxsize=1)
def _has_vector_math() -> bool:
    """Whether this C library has every function of codegen.c.VECTOR_MATH in libmvec."""
    name, _, version = _libc().partition(" ")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and (major, minor) >= (2, 35) and platform.machine() == "x86_64"


@functools.lru_cache(maxsize=8)
def _flags(cc: str, extra: str) -> tuple[str, ...]:
    """The flags to build with: each optional feature only where the toolchain has it.

    One probe tries every feature at once (the usual answer, for one compiler run); only if
    it fails is each feature tried alone.
    """
    flags = BASE_FLAGS + tuple(shlex.split(extra))
    wanted = _optional_flags()
    if _probe(cc, flags, wanted):
        return flags + sum(wanted, ())
    return flags + sum((f for f in wanted if _probe(cc, flags, [f])), ())


def _probe(cc: str, flags: tuple[str, ...], features: list[tuple[str, ...]]) -> bool:
    """Whether a library using ``features`` compiles and links."""
    with tempfile.TemporaryDirectory(dir=_private_dir()) as work:
        with open(os.path.join(work, "probe.c"), "w") as f:
            f.write("".join(PROBES[feature] for feature in features))
        flags += sum(features, ())
        cmd = [cc, *flags, "-o", "probe.so", "probe.c", *_libs(flags)]
        return _run(cmd, work).returncode == 0


def _libs(flags: tuple[str, ...]) -> tuple[str, ...]:
    """The libraries (and link options) that go after the source."""
    return (*(VECTOR_MATH_LIBS if VECTOR_MATH_FLAGS[0] in flags else ()), "-lm")


@functools.lru_cache(maxsize=1)
def last_level_cache() -> int | None:
    """Bytes of the largest cache the CPU reports (Linux sysfs), or None."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def stream_bytes() -> int | None:
    """From what footprint a call's kernels stream their outputs (codegen.c.STREAM); None where
    they do not: the cache's size unknown, or a CPU without the x86 non-temporal stores (a copy
    through a block array would only cost there)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    return config.stream_bytes if config.stream_bytes >= 0 else last_level_cache()


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """What -march=native compiles for: the machine and its instruction-set flags."""
    features = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    features = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()} {hashlib.sha256(features.encode()).hexdigest()[:16]}"


def _torch_functions(names: list[str]) -> list | None:
    """libtorch_cpu's functions of these names (torch has loaded it); None where one is not
    there."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        library = ctypes.CDLL(os.path.join(lib_dir, "libtorch_cpu.so"))
        return [getattr(library, name) for name in names]
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def vml_functions() -> tuple[int, ...] | None:
    """The addresses of the VML functions eager's CPU kernels call (vms<f>, vmd<f> for each of
    codegen.c.VML), from libtorch_cpu; None where this torch has no MKL, or its ops do not give
    those functions' results (checked on a few values)."""
    functions = _torch_functions([prefix + name for name in VML for prefix in ("vms", "vmd")])
    if functions is None:
        return None
    op_of = {op.vml: getattr(torch, op.name) for op in ops.OPS
             if op.vml and op.vml_argument is None}
    # real tensors even where the first kernel is built under torch.compile's fake tensors
    with no_dispatch_modes(), torch.no_grad():
        x = torch.linspace(-3, 3, 67, dtype=torch.float64) ** 3
        for k, function in enumerate(functions):
            a = x.to(torch.float64 if k % 2 else torch.float32)
            r = torch.empty_like(a)
            function(ctypes.c_int64(a.numel()), ctypes.c_void_p(a.data_ptr()),
                     ctypes.c_void_p(r.data_ptr()), ctypes.c_int64(VML_MODE))
            want = op_of[VML[k // 2]](a)
            if not ((r == want) | (r.isnan() & want.isnan())).all():
                return None
    return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in functions)



@functools.lru_cache(maxsize=1)
def sleef_functions() -> tuple[int, ...] | None:
    """The addresses of the SLEEF functions eager's vectorised CPU kernels call
    (codegen/c.SLEEF_NAMES), from libtorch_cpu; None where its kernels here are not the AVX2 or
    AVX512 ones (which call them; the others call the C library's), or it lacks one."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    functions = _torch_functions(list(SLEEF_NAMES))
    return None if functions is None else tuple(
        ctypes.cast(f, ctypes.c_void_p).value for f in functions)


class CPUBackend:
    renderer = CRenderer(vml=lambda: config.vml and vml_functions() is not None,
                         sleef=lambda: "" if not config.sleef or sleef_functions() is None
                         else "all" if config.sleef_all else "cheap",
                         stream_bytes=stream_bytes)

    def unavailable(self) -> str | None:
        if _compiler_identity(config.cc) is None:
            return f"C compiler {config.cc!r} not found or not runnable (TORCHFUSE_CC)"
        return None

    def target(self, device: torch.device) -> str:
        # The flags asked for, not _flags' probed ones: probing runs the compiler, which a warm
        # start must not; the probe's answer follows from the compiler and the machine.
        flags = (*BASE_FLAGS, *shlex.split(config.cflags), *sum(_optional_flags(), ()))
        identity = _compiler_identity(config.cc)
        return f"{identity} | {' '.join(flags)} | {_libc()} | {_cpu_identity()}"

    def device_key(self, device: torch.device) -> str:
        return "cpu"

    def allocator(self, device: torch.device) -> Callable[..., torch.Tensor]:
        return _empty

    def compile(self, source: str, device: torch.device) -> bytes:
        return self.compile_entry(source, device, "plain")

    def compile_entry(self, source: str, device: torch.device, entry: str) -> bytes:
        """The source's plain entry, or its ``streamed`` one (codegen/c.STREAMED_ENTRY)."""
        reason = self.unavailable()
        if reason:
            raise CompileError(reason)
        cc = config.cc
        flags = _flags(cc, config.cflags) + (("-DTF_STREAMED",) if entry == "streamed" else ())
        cmd = [cc, *flags, "-o", "kernel.so", "kernel.c", *_libs(flags)]
        with tempfile.TemporaryDirectory(dir=_private_dir()) as work:
            with open(os.path.join(work, "kernel.c"), "w") as f:
                f.write(source)
            result = _run(cmd, work)
            if result.returncode != 0:
                raise CompileError(_failure_report(source, cmd, result.stderr))
            with open(os.path.join(work, "kernel.so"), "rb") as f:
                return f.read()

    def load(self, binary: bytes, device: torch.device, source: str) -> Callable[..., int]:
        plain = _launch(binary, source)
        stream_from = streamed_from(source)
        if stream_from is None:
            return plain
        return _Streaming(self, source, device, plain, stream_from)


def _launch(binary: bytes, source: str) -> Callable[..., int]:
    """The launch of a library's tf_kernel (through the native launcher where it is built)."""
    # dlopen needs a file; it may go as soon as the library is mapped.
    fd, path = tempfile.mkstemp(suffix=".so", dir=_private_dir())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        library = ctypes.CDLL(path)
    finally:
        os.unlink(path)
    # the kernel calls eager's VML or SLEEF functions (codegen/c.VML, SLEEF): tell it where
    for name, functions in (("tf_vml", vml_functions), ("tf_sleef", sleef_functions)):
        if name + "[" in source:
            addresses = functions()
            (ctypes.c_void_p * len(addresses)).in_dll(library, name)[:] = addresses
    function = library.tf_kernel
    native = launcher.get()
    if native is not None:
        address = ctypes.cast(function, ctypes.c_void_p).value
        launch = functools.partial(native.cpu, address)
        launch.prepare = functools.partial(_prepare, native, address, library)
    else:
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p]

        def launch(numel: int, sizes: list[int], strides: list[int], tensors: list) -> int:
            # array.array packs the int64 arguments ~4x faster than a ctypes array does.
            args = array.array("q", [numel, *sizes, *strides, *[
                t if isinstance(t, int) else t.data_ptr() for t in tensors]])
            return function(args.buffer_info()[0])

    launch.library = library  # keeps the library mapped while the kernel lives
    return launch


class _Streaming:
    """The launch of a kernel with a streamed entry (codegen/c.STREAMED_ENTRY): calls from
    ``stream_from`` elements go to that entry, which the first such call has built on a thread
    (the plain entry serves meanwhile, as it serves smaller calls)."""

    def __init__(self, backend: CPUBackend, source: str, device: torch.device,
                 plain: Callable[..., int], stream_from: int) -> None:
        self.backend, self.source, self.device = backend, source, device
        self.plain, self.streamed, self.stream_from = plain, None, stream_from
        self.lock = threading.Lock()
        self.background: threading.Thread | None = None

    def __call__(self, numel: int, sizes: list[int], strides: list[int], tensors: list) -> int:
        return self._pick(numel)(numel, sizes, strides, tensors)

    def prepare(self, numel: int, sizes: list[int], strides: list[int], outs: tuple,
                n_operands: int):
        """The call of the entry that serves ``numel`` elements, bound to a plan (see _prepare);
        None while that entry is being built (a call prepared now would never use it)."""
        launch = self._pick(numel)
        if launch is self.plain and numel >= self.stream_from:
            return None
        prepare = getattr(launch, "prepare", None)
        return None if prepare is None else prepare(numel, sizes, strides, outs, n_operands)

    def _pick(self, numel: int) -> Callable[..., int]:
        if numel < self.stream_from:
            return self.plain
        if self.streamed is None:
            with self.lock:
                if self.background is None:
                    self.background = threading.Thread(target=self._build, daemon=True,
                                                       name="torchfuse-cc")
                    self.background.start()
            return self.streamed or self.plain
        return self.streamed

    def _build(self) -> None:
        start = time.perf_counter()
        try:
            binary, compiled = diskcache.load_or_compile(
                EntryBuild(self.backend, "streamed"), self.source, self.device)
            self.streamed = _launch(binary, self.source)
        except Exception as error:  # the plain entry serves every call
            self.stream_from = sys.maxsize
            log(1, f"torchfuse: a C kernel's streamed entry failed to build: {error}")
            return
        seconds = time.perf_counter() - start
        count(**({"background_compiles": 1, "background_seconds": seconds} if compiled
                 else {"disk_hits": 1}))
        log(2, f"streamed entry ready in {seconds * 1000:.1f} ms")

    def wait(self) -> None:
        """Until the streamed entry is built (or failed), where a call started it."""
        if self.background is not None:
            self.background.join()


# What Inductor's CPU wrappers allocate with: half the cost of torch.empty_strided.
_empty = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None),
                 "_empty_strided_cpu", None) or (
    lambda shape, strides, dtype: torch.empty_strided(shape, strides, dtype=dtype))


def _prepare(native, address: int, library, numel: int, sizes: list[int], strides: list[int],
             outs: tuple, n_operands: int):
    """The kernel bound to one plan (devices/launch.c's Call): ``call(*operands)`` allocates the
    outputs (``outs``: their shapes, strides and dtypes) and runs it."""
    return native.prepare_cpu(address, [numel, *sizes, *strides], n_operands, _empty, outs,
                              library)


def _failure_report(source: str, cmd: list[str], log: str) -> str:
    """What the compiler said, and a command that reproduces it from a saved copy of the source."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"torchfuse-failed-{digest}.c")
    with open(path, "w") as f:
        f.write(source)
    repro = " ".join(shlex.quote(c) for c in cmd).replace("kernel.c", shlex.quote(path))
    return f"C compiler failed:\n{log.strip()}\nreproduce with: {repro}"


BACKEND = CPUBackend()
