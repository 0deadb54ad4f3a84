"""The CUDA backend: NVRTC compiles CUDA C to machine code for the tensor's GPU; the driver loads
it, and it launches on the current torch stream of that GPU.

NVIDIA's ``cuda-core`` and ``cuda-bindings`` (``pip install 'torchfuse[cuda]'``) are imported on
first use, so a machine without them (or without a GPU) imports torchfuse fine, and
``can_fuse("cuda")`` is False with the reason. cuda.core (its Program) compiles, and launches
where the native launcher is not built; loading a binary, making a context current and reading a
GPU's attributes go through cuda-bindings' driver module, so that a process whose kernels all
come from the disk cache never imports cuda.core (an H100 host's warm start of bench's
``four_groups``: 0.56-0.60 -> 0.43-0.46 s).

Each call picks one of the source's entry points (codegen/cuda.py): vector loads (the source
names its elements per thread) where every pointer is 16-byte aligned and (strided kernels)
whole vectors tile the rows, else one element per thread; 32-bit index arithmetic while every
element offset stays under 2**31, else 64-bit (flat kernels instead launch chunks of 2**30
elements). A kernel is ready to run once its scalar entry is compiled; the vector entry, several
times slower to compile, follows on a background thread. The scalar entry is assembled from the
PTX the source carries (codegen/ptx.py) where it can be: ptxas alone, about twice as quick as
NVRTC, with math functions from a PTX library NVRTC compiles once per machine.
Launches go through the native launcher (devices/launch.c: cuLaunchKernelEx with the arguments
packed in C; on sm_90+ wide vector entries with programmatic dependent launch, see
_dependent_launch) where it is built, else through cuda.core; the executor's guarded calls go
through a launch prepared for their plan (``_Launcher.prepare``), which allocates the outputs in
C too. The grid has
a thread for every element (or vector), and the block scheduler keeps every multiprocessor fed to
the end: a grid of only as many blocks as the GPU holds at once, each thread looping over the
tensor, ran at 1.05-1.24x the copy floor at 2**26 elements where this one runs at 0.98-1.02x (its
threads waited on each iteration's loads). Kernels whose body can fail (integer division by zero)
get a device flag that is read back after the launch, which waits for the kernel: only those kernels
pay that synchronisation, the others return as soon as the launch is queued.
(CUDA eager does not raise there, so the fallback then gives eager's own values.) Inside a CUDA
graph capture the flag cannot be read: such kernels then run as eager's ops, which the graph
captures.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import os
import re
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch

from ... import diskcache, ops
from ...cache import count
from ...codegen import ptx
from ...codegen.cuda import BLOCK, PREAMBLE, PTX_MARK, CUDARenderer
from ...config import config, log
from .. import CompileError, EntryBuild, launcher, no_dispatch_modes

INDEX_LIMIT = 2**31  # 32-bit kernels serve every element offset below this
CHUNK = 2**30  # elements per launch of a flat kernel beyond INDEX_LIMIT (keeps 16-byte alignment)
LAUNCH_FAILED = 2  # error codes (spec.ERRORS), for which the executor runs the fallback:
UNCHECKED = 3  # a kernel that can fail, called while its stream captures a CUDA graph
GRID_MAX = 2**31 - 1  # blocks in a grid's x dimension; the kernels loop past it
ELF = b"\x7fELF"
LAYOUTS_MAX = 4096  # memoised entry choices per kernel, cleared when full
_quick = True  # the quick path of launches (tests turn it off to see every launch's entry)


@functools.lru_cache(maxsize=1)
def _core():
    """The cuda.core namespace: its top level, or cuda.core.experimental in older releases.
    Imported to compile, and to launch from Python."""
    import cuda.core as core

    if not hasattr(core, "Program"):
        from cuda.core import experimental as core
    return core


@functools.lru_cache(maxsize=1)
def _nvrtc() -> tuple[tuple[int, int], tuple[int, ...]]:
    """NVRTC's (major, minor) version and the sm architectures it compiles for."""
    from cuda.bindings import nvrtc

    error, major, minor = nvrtc.nvrtcVersion()
    _check(error, "nvrtcVersion")
    error, archs = nvrtc.nvrtcGetSupportedArchs()
    _check(error, "nvrtcGetSupportedArchs")
    return (major, minor), tuple(archs)


def _check(error, call: str) -> None:
    if int(error) != 0:
        raise RuntimeError(f"{call} failed: {error}")


def _cu(name: str, *args):
    """A driver call through cuda-bindings (which returns the error first): its value, or a
    tuple of its values; RuntimeError on an error."""
    from cuda.bindings import driver

    error, *values = getattr(driver, name)(*args)
    _check(error, name)
    return values[0] if len(values) == 1 else tuple(values)


@functools.cache
def _arch(index: int) -> tuple[str, str]:
    """(architecture flag, code kind): a cubin for the GPU's own sm, or, where NVRTC is older than
    the GPU, PTX for the newest architecture NVRTC knows, which the driver then compiles."""
    major, minor = torch.cuda.get_device_capability(index)
    cc = major * 10 + minor
    archs = _nvrtc()[1]
    if cc in archs:
        return f"sm_{cc}", "cubin"
    older = [a for a in archs if a <= cc]
    if not older:
        raise CompileError(f"NVRTC {_nvrtc()[0]} cannot compile for sm_{cc}")
    return f"compute_{max(older)}", "ptx"


@functools.cache
def _dependent_launch(index: int) -> bool:
    """Whether GPU ``index``'s kernels are compiled for sm_90 or newer, where an entry point
    rendered to wait for the kernel before it in the stream (codegen/cuda's TF_GRID_DEPENDENCY,
    ``_Kernel.waits``) does: such entries launch with programmatic stream serialisation (PDL),
    so that their blocks start while the kernel before finishes its last (back-to-back large
    kernels 0.3-1.3 % faster, bench/RESULTS.md session 9)."""
    return int(re.sub(r"\D", "", _arch(index)[0])) >= 90


@functools.cache
def _options(arch: str) -> object:
    """NVRTC's options for ``arch`` (cuda.core's ProgramOptions; their text in cache keys is
    OPTIONS).

    ``-fmad=false``: eager rounds every op's result, so a product feeding an add is rounded
    first; NVRTC's default would fuse the two into one multiply-add, rounding once (libdevice's
    own fused multiply-adds are explicit and stay). ``-minimal`` (NVRTC 12.4+) leaves out the
    runtime API's declarations, which no generated kernel uses; it saves about a tenth of a
    compile (measured: 51.6 -> 46.7 ms on an H100 host), and changes no code, so keys do not
    name it.
    """
    core = _core()
    if _nvrtc()[0] >= (12, 4):
        try:
            return core.ProgramOptions(arch=arch, fma=False, minimal=True)
        except TypeError:  # a cuda.core that does not know the option
            pass
    return core.ProgramOptions(arch=arch, fma=False)


OPTIONS = "-fmad=false"  # what _options gives NVRTC besides the architecture, for cache keys


@functools.lru_cache(maxsize=1)
def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    try:  # found, not imported: a warm start never imports it (the module's docstring)
        found = importlib.util.find_spec("cuda.core") is not None
    except ImportError:  # no "cuda" package at all
        found = False
    if not found:
        return "cuda-core is not installed (pip install 'torchfuse[cuda]')"
    try:
        _nvrtc()
    except Exception as error:  # the library is missing or cannot load
        return f"NVRTC cannot be loaded: {error}"
    return None


# ---- streams and contexts --------------------------------------------------------------------

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_empty_strided = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None),
                         "_empty_strided_cuda", None)  # Inductor's: on the current GPU
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_streams: dict[tuple[int, int], object] = {}
_threads = threading.local()


def _stream(index: int):
    """The cuda.core view of torch's current stream on GPU ``index`` (made once per stream)."""
    raw = _raw_stream(index) if _raw_stream else torch.cuda.current_stream(index).cuda_stream
    stream = _streams.get((index, raw))
    if stream is None:
        stream = _streams[(index, raw)] = _core().Stream.from_handle(raw)
    return stream


def _enter(index: int) -> None:
    """Make the GPU's primary context (torch's) current in this thread, once per thread.

    A thread that has not called the CUDA runtime yet has no current context, even when torch
    allocated its outputs from cache; the driver-level launch needs one.
    """
    ready = getattr(_threads, "ready", None)
    if ready is None:
        ready = _threads.ready = set()
    if index not in ready:
        _cu("cuCtxSetCurrent", _cu("cuDevicePrimaryCtxRetain", _cu("cuDeviceGet", index)))
        ready.add(index)


# ---- index width and alignment -----------------------------------------------------------------


def needs_64bit(numel: int, sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether an element index or offset of any operand can reach 2**31."""
    if numel >= INDEX_LIMIT:
        return True
    if max(strides) * numel < INDEX_LIMIT:  # a bound on every offset; exact check if it fails
        return False
    rank = len(sizes)
    return any(
        sum((n - 1) * s for n, s in zip(sizes, strides[p : p + rank], strict=True)) >= INDEX_LIMIT
        for p in range(0, len(strides), rank)
    )


@functools.lru_cache(maxsize=1024)
def dividers(sizes: tuple[int, ...]) -> list[int]:
    """(magic, shift) for each size but the first: the kernels' 32-bit ``tf_divide`` then divides
    by a multiply-high instead of a division (the scheme of PyTorch's IntDivider)."""
    out = []
    for size in sizes[1:]:
        if not 0 < size < 2**31:  # only the 64-bit entry point runs: it divides plainly
            out += [0, 0]
            continue
        shift = max(0, (size - 1).bit_length())
        out += [((1 << 32) * ((1 << shift) - size)) // size + 1, shift]
    return out


def aligned(pointers: Sequence[int]) -> bool:
    """Whether every pointer allows 16-byte loads and stores."""
    bits = 0
    for pointer in pointers:
        bits |= pointer
    return not bits & 15


# ---- the backend -------------------------------------------------------------------------------


FAST_MEMORY = 30e9  # peak memory bytes a second per multiprocessor (H100 SXM 25e9, H200 37e9)


@functools.cache
def _memory_scale(device_key: str) -> int:
    """The vector width's scale for a GPU (codegen/cuda.vector_width): 2 where its memory feeds
    each multiprocessor more than FAST_MEMORY bytes a second (an H200), whose threads then need
    twice the bytes in flight to keep it busy; else 1 (and where the driver does not tell: the
    H100's widths)."""
    per_multiprocessor = _memory_per_multiprocessor(device_key)
    return 2 if per_multiprocessor is not None and per_multiprocessor > FAST_MEMORY else 1


def _memory_per_multiprocessor(device_key: str) -> float | None:
    """Peak memory bytes a second per multiprocessor, from the driver's attributes (double data
    rate); None where it does not tell."""
    try:
        from cuda.bindings.driver import CUdevice_attribute as attribute

        device = _cu("cuDeviceGet", int(device_key.rpartition(":")[2]))
        clock, bus, multiprocessors = (
            _cu("cuDeviceGetAttribute", getattr(attribute, f"CU_DEVICE_ATTRIBUTE_{name}"), device)
            for name in ("MEMORY_CLOCK_RATE", "GLOBAL_MEMORY_BUS_WIDTH", "MULTIPROCESSOR_COUNT"))
    except Exception as error:
        log(2, f"no peak memory bandwidth for {device_key}: {error}")
        return None
    per_multiprocessor = clock * 1e3 * 2 * bus / 8 / multiprocessors
    log(2, f"{device_key}: {per_multiprocessor / 1e9:.1f} GB/s of memory per multiprocessor")
    return per_multiprocessor


def _tables_pay(device_key: str, name: str) -> bool:
    """Whether kernels for a GPU read table ``name`` of eager's results (ops.TABLES) where its
    pair form would compute dear math: on GPUs of memory scale 2, whose instruction issue bounds
    such kernels, and only where the table agrees with the pair form's own arithmetic (which
    copies CUDA 13's libdevice: eager's CUDA build may differ). Not while this thread captures a
    CUDA graph: making the table runs eager on the stream, which would break the capture (such
    a kernel keeps the formula; the answer is not remembered)."""
    return not torch.cuda.is_current_stream_capturing() and _tables_agree(device_key, name)


@functools.cache
def _tables_agree(device_key: str, name: str) -> bool:
    if _memory_scale(device_key) < 2:
        return False
    try:
        with no_dispatch_modes(), torch.no_grad():
            eager = _table(name, int(device_key.rpartition(":")[2])).cpu()
            agrees = ops.TABLES[name].agrees(eager)
    except Exception as error:  # no table: the formula
        log(1, f"no {name} for {device_key}: {error}")
        return False
    if not agrees:
        log(1, f"{name}: this GPU's eager disagrees with the pair form's own arithmetic; "
               "kernels keep the formula")
    return agrees


class CUDABackend:
    renderer = CUDARenderer(_memory_scale, _tables_pay)

    def __init__(self) -> None:
        self._keys: dict[int, str] = {}

    def unavailable(self) -> str | None:
        return _unavailable()

    def target(self, device: torch.device) -> str:
        (major, minor), _ = _nvrtc()
        arch, kind = _arch(_index(device))
        assembled = " | scalar32 from PTX" if config.ptx else ""
        return (f"NVRTC {major}.{minor} | -arch={arch} {OPTIONS} ({kind}) | cuda.core {_version()}"
                f"{assembled}")

    def device_key(self, device: torch.device) -> str:
        # Per GPU: a loaded kernel's launch is bound to its device's streams and size.
        key = self._keys.get(device.index)
        if key is None:
            if device.index is None:  # "cuda": whichever GPU is current now
                return f"cuda:{_index(device)}"
            key = self._keys[device.index] = f"cuda:{device.index}"
        return key

    def allocator(self, device: torch.device) -> Callable[..., torch.Tensor]:
        index, fast = _index(device), _empty_strided

        def empty(shape: tuple, strides: tuple, dtype: torch.dtype) -> torch.Tensor:
            if fast is not None and _current_device() == index:
                return fast(shape, strides, dtype)
            return torch.empty_strided(shape, strides, dtype=dtype, device=device)

        return empty

    def compile(self, source: str, device: torch.device) -> bytes:
        """The source's first entry point, which serves every call below 2**31 elements."""
        return self.compile_entry(source, device, entry_points(source)[0])

    def compile_entry(self, source: str, device: torch.device, entry: str) -> bytes:
        """One entry point of the source: NVRTC's time grows with each one compiled."""
        reason = self.unavailable()
        if reason:
            raise CompileError(reason)
        core = _core()
        arch, kind = _arch(_index(device))
        if entry == "scalar32" and config.ptx and PTX_MARK in source and kind == "cubin":
            binary = _assemble(source, device, arch)
            if binary is not None:
                return binary
        source = f"#define TF_ENTRY_{entry}\n{source}"
        logs = io.StringIO()
        try:
            program = core.Program(source, "c++", _options(arch))
            code = program.compile(kind, logs=logs)
        except Exception as error:
            report = _failure_report(source, arch, f"{error}\n{logs.getvalue()}")
            raise CompileError(report) from None
        if logs.getvalue().strip():
            log(4, f"NVRTC log:\n{logs.getvalue().strip()}")
        return _code_bytes(code)

    def load(self, binary: bytes, device: torch.device, source: str) -> Callable[..., int]:
        index = _index(device)
        with torch.cuda.device(index):
            _enter(index)
            return _Launcher(self, source, binary, device, index)


# ---- scalar32 from PTX -----------------------------------------------------------------------


REFUSALS_MAX = 3  # PTX modules refused in a process before its scalar entries stop trying
_refusals: dict[str, int] = {}  # per architecture


def _assemble(source: str, device: torch.device, arch: str) -> bytes | None:
    """The cubin of the source's scalar32 entry from its PTX (codegen/ptx.py) and the library
    functions it calls: ptxas alone, without NVRTC's front end and NVVM. None where that cannot
    be done here (the GPU is older than sm_80, the PTX is refused): NVRTC compiles the C. After
    REFUSALS_MAX refusals (a linker older than NVRTC's PTX, say) the process stops trying."""
    if int(arch.removeprefix("sm_")) < 80:  # the PTX rounds to bfloat16 with sm_80's cvt
        return None
    if _refusals.get(arch, 0) >= REFUSALS_MAX:
        return None
    library = _library(_index(device))
    if library is None:
        return None
    try:
        start = source.index("\n", source.index(PTX_MARK)) + 1
        module = ptx.link(source[start:source.rindex("#endif")], library)
        core = _core()
        options = core.ProgramOptions(arch=arch, fma=False)
        binary = _code_bytes(core.Program(module, "ptx", options).compile("cubin"))
    except Exception as error:  # logged: NVRTC compiles the C entry instead
        _refusals[arch] = _refusals.get(arch, 0) + 1
        log(1, f"scalar32 from PTX failed ({_refusals[arch]} of {REFUSALS_MAX}), "
               f"NVRTC compiles it: {error}")
        return None
    count(assembled=1)
    return binary


class _LibraryBuild:
    """The disk cache's view of the PTX library (codegen/ptx.py): compiled once per machine."""

    def __init__(self, arch: str) -> None:
        self.arch = f"compute_{arch.removeprefix('sm_')}"

    def target(self, device: torch.device) -> str:
        (major, minor), _ = _nvrtc()
        return f"NVRTC {major}.{minor} | PTX library | -arch={self.arch} -fmad=false -rdc=true"

    def compile(self, source: str, device: torch.device) -> bytes:
        core = _core()
        options = core.ProgramOptions(arch=self.arch, fma=False, relocatable_device_code=True)
        return _code_bytes(core.Program(source, "c++", options).compile("ptx"))


_libraries: dict[str, ptx.Library] = {}  # per architecture
_library_builds: dict[str, threading.Thread] = {}
_library_lock = threading.Lock()


def _library(index: int, wait: bool = False) -> ptx.Library | None:
    """The PTX library for GPU ``index``'s architecture, read from the disk cache once per
    process; None while NVRTC compiles it (~1 s, once per machine) on a background thread,
    where the first kernels' scalar32 entries compile from C meanwhile (``wait``: until then)."""
    arch = _arch(index)[0]
    library = _libraries.get(arch)
    if library is None:
        with _library_lock:
            if arch not in _libraries and arch not in _library_builds:
                device = torch.device("cuda", index)
                build, source = _LibraryBuild(arch), ptx.library_source(PREAMBLE)
                text = diskcache.load(build, source, device)
                if text is not None:
                    _libraries[arch] = ptx.Library.parse(text.decode())
                else:
                    thread = threading.Thread(target=_build_library, daemon=True,
                                              args=(arch, build, source, device),
                                              name="torchfuse-ptx-library")
                    _library_builds[arch] = thread
                    thread.start()
            thread = _library_builds.get(arch)
        if wait and thread is not None:
            thread.join()
        library = _libraries.get(arch)
    return library


def _build_library(arch: str, build: _LibraryBuild, source: str, device: torch.device) -> None:
    start = time.perf_counter()
    try:
        text, _ = diskcache.load_or_compile(build, source, device)
        _libraries[arch] = ptx.Library.parse(text.decode())
    except Exception as error:  # scalar32 entries keep compiling from C
        log(1, f"the PTX library failed to build: {error}")
        return
    log(2, f"PTX library compiled in {(time.perf_counter() - start) * 1000:.1f} ms")


def _wait_library() -> None:
    """Until a library build running now is done (for tests and benchmarks)."""
    for thread in list(_library_builds.values()):
        thread.join()


def _code_bytes(code) -> bytes:
    binary = code.code
    return binary.encode() if isinstance(binary, str) else bytes(binary)


def entry_points(source: str) -> list[str]:
    """The entry points a rendered source names (codegen/cuda.py), the first compiled first."""
    return _header(source, "entry points")


def _header(source: str, name: str) -> list[str]:
    match = re.search(rf"^// {name}: (.*)$", source, re.MULTILINE)
    if match is None:
        raise CompileError(f"the source names no {name}")
    return match.group(1).split()


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


@functools.lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import version

    return version("cuda-core")


class _Launcher:
    """``launch(numel, sizes, strides, tensors) -> error``: picks an entry point, launches it.

    The build compiled the source's first entry, ``scalar32``, which serves any call below 2**31
    elements and offsets; its vector entry, several times slower to compile, is compiled (or
    loaded from disk) on a background thread meanwhile (NVRTC releases the GIL), and calls use it
    once it is there. ``scalar64`` is compiled when a call first needs it.
    """

    def __init__(self, backend: CUDABackend, source: str, binary: bytes, device: torch.device,
                 index: int) -> None:
        self.backend, self.source, self.device, self.index = backend, source, device, index
        self.entries = entry_points(source)
        self.flat = self.entries == ["scalar32", "vector32"]
        self.checked = "tf_checked_" in source
        self.tables = [name for name in ops.TABLES if name in source]  # eager's, to fill
        self.native, self.cu_launch = launcher.get(), _driver("cuLaunchKernelEx")
        self.pdl = (_dependent_launch(index)  # the vector entry's launches
                    and "vector32" in _header(source, "waits for the kernel before"))
        self.kernels: dict[str, tuple[bytes, int]] = {}  # entry -> (binary, CUkernel handle)
        self.libraries: list[object] = []  # the loaded binaries, unloaded with the launcher
        weakref.finalize(self, _unload, self.libraries).atexit = False
        self.python_kernels: dict[str, object] = {}  # entry -> cuda.core kernel (_launch)
        self.lock = threading.Lock()
        self.vector = 0
        self._add(self.entries[0], binary)
        self.scalar = self.kernels["scalar32"][1]
        # Kernels that cannot fail, launched natively: __call__'s quick path.
        self.quick = (not self.checked and self.native is not None
                      and self.cu_launch is not None and _raw_stream is not None)
        self.itemsizes = [int(n) for n in _header(source, "operand bytes")]
        self.width = int(_header(source, "vector elements")[0])  # per thread, vector entry
        self.configs: dict[int, object] = {}
        self.layouts: dict[tuple[int, ...], tuple] = {}  # sizes, strides -> entry, dividers
        self.failed = False
        self.background = None
        if "vector32" in self.entries:
            self.background = threading.Thread(target=self._build_vector, daemon=True,
                                               name="torchfuse-nvrtc")
            self.background.start()

    def wait(self) -> None:
        """Until the vector entry point is ready (or failed), and the PTX library if it is being
        built: for tests and benchmarks."""
        if self.background is not None:
            self.background.join()
        _wait_library()

    def _build_vector(self) -> None:
        try:
            with torch.cuda.device(self.index):
                _enter(self.index)
                _load_now(self._kernel("vector32", background=True)[1])
        except Exception as error:  # the scalar entry keeps serving every call
            self._warn(f"torchfuse: a CUDA vector kernel failed to build: {error}")

    def _add(self, entry: str, binary: bytes) -> None:
        """Load an entry point's binary (a cubin, or PTX the driver compiles) as a library."""
        code = binary if binary.startswith(ELF) else binary + b"\0"  # PTX ends with a NUL
        library = _cu("cuLibraryLoadData", code, None, None, 0, None, None, 0)
        self.libraries.append(library)
        self._fill_tables(library)
        kernel = _cu("cuLibraryGetKernel", library, self._name(entry).encode())
        self.kernels[entry] = (binary, int(kernel))
        if entry == "vector32":  # the quick path's, 0 until then
            self.vector = self.kernels[entry][1]

    def _fill_tables(self, library) -> None:
        """Copy eager's results into the tables of them (ops.TABLES) that a loaded entry
        declares, before any launch of it can read them (the copy waited for: any stream may
        launch the entry next). The entry loads on the background thread, maybe while the
        caller captures a CUDA graph, where the driver refuses a copy on the legacy default
        stream and the capture fails with it: the copy goes on a stream of torchfuse's own, in
        relaxed capture mode (what PyTorch's own side work does)."""
        for name in self.tables:
            try:
                pointer, size = _cu("cuLibraryGetGlobal", library, name.encode())
            except RuntimeError:  # not in this entry point
                continue
            table = _table(name, self.index)  # made (and waited for) at the kernel's render
            if size != table.numel() * table.element_size():
                raise CompileError(f"{name} holds {size} bytes")
            with _relaxed_capture():
                stream = _own_stream(self.index)
                _cu("cuMemcpyDtoDAsync", pointer, table.data_ptr(), size, stream)
                _cu("cuStreamSynchronize", stream)

    def _name(self, entry: str) -> str:
        return ("tf_checked_" if self.checked else "tf_") + entry

    def _python_kernel(self, entry: str) -> object:
        """The entry point as cuda.core's kernel, for its launch (the Python path's)."""
        kernel = self.python_kernels.get(entry)
        if kernel is None:
            core, (binary, handle) = _core(), self.kernels[entry]
            if hasattr(core.Kernel, "from_handle"):  # the one loaded here, its tables filled
                kernel = core.Kernel.from_handle(handle)
            elif self.tables:
                raise CompileError("this cuda.core cannot launch a kernel loaded here")
            else:
                code = (core.ObjectCode.from_cubin(binary) if binary.startswith(ELF)
                        else core.ObjectCode.from_ptx(binary))
                kernel = code.get_kernel(self._name(entry))
            self.python_kernels[entry] = kernel
        return kernel

    def _kernel(self, entry: str, background: bool = False) -> tuple[bytes, int]:
        found = self.kernels.get(entry)
        if found is None:
            with self.lock:
                if entry not in self.kernels:
                    start = time.perf_counter()
                    binary, compiled = diskcache.load_or_compile(
                        EntryBuild(self.backend, entry), self.source, self.device)
                    self._add(entry, binary)
                    seconds = time.perf_counter() - start
                    if not compiled:
                        count(disk_hits=1)
                    elif background:
                        count(background_compiles=1, background_seconds=seconds)
                    else:
                        count(compiles=1, compile_seconds=seconds)
                    log(2, f"entry point {entry} ready in {seconds * 1000:.1f} ms")
                found = self.kernels[entry]
        return found

    def __call__(self, numel: int, sizes: list[int], strides: list[int], tensors: list) -> int:
        if _current_device() != self.index:  # CUDA is initialised: a kernel was loaded
            with torch.cuda.device(self.index):
                return self(numel, sizes, strides, tensors)
        _enter(self.index)
        if self.quick and _quick:  # the common call: the rest in C
            entry, magic = ("vector32", ()) if self.flat else self._layout(numel, sizes, strides)
            if entry != "scalar64" and numel < INDEX_LIMIT:  # else 64-bit or chunks: below
                vector = self.vector if entry == "vector32" else 0
                result = self.native.cuda_pick(self.cu_launch, self.pdl, self.scalar, vector,
                                               self.width, BLOCK, _raw_stream(self.index), numel,
                                               sizes, magic, strides, tensors)
                if result:
                    self._warn("torchfuse: a CUDA kernel launch failed, the fallback runs: "
                               f"cuLaunchKernelEx returned CUresult {result}")
                    return LAUNCH_FAILED
                return 0
        if self.checked and torch.cuda.is_current_stream_capturing():
            return UNCHECKED  # its flag cannot be read back there: eager's ops are captured
        pointers = [t if isinstance(t, int) else t.data_ptr() for t in tensors]
        flag = torch.zeros(1, dtype=torch.int32, device=self.device) if self.checked else None
        try:
            if not self.flat:
                entry = self._layout(numel, sizes, strides)[0]
                if entry == "vector32" and ("vector32" not in self.kernels
                                            or not aligned(pointers)):
                    entry = "scalar32"
                work = numel // self.width if entry == "vector32" else numel
                ok = self._launch(entry, numel, work, sizes, strides, pointers, flag)
            elif numel < INDEX_LIMIT:
                ok = self._flat(numel, strides, pointers, flag)
            else:  # flat kernels index in 32 bits: one launch per chunk of 2**30 elements
                ok = True
                for start in range(0, numel, CHUNK):
                    chunk = [p + start * n for p, n in zip(pointers, self.itemsizes, strict=True)]
                    ok = self._flat(min(CHUNK, numel - start), strides, chunk, flag) and ok
        except CompileError as error:  # an entry point compiled late failed
            self._warn(f"torchfuse: a CUDA kernel failed to compile, the fallback runs: {error}")
            return LAUNCH_FAILED
        if not ok:
            return LAUNCH_FAILED
        return int(flag.item()) if flag is not None else 0  # item() waits for the kernel

    def prepare(self, numel: int, sizes: list[int], strides: list[int], outs: tuple,
                n_operands: int):
        """The kernel bound to one plan (devices/launch.c's Call): ``call(*operands)`` allocates
        the outputs (``outs``: their shapes, strides and dtypes) and launches the quick path's
        entry on torch's current stream, from a thread where this GPU's context is current.
        None where the plan takes the general path, or while the vector entry is being built
        (a call prepared now would never use it)."""
        if not (self.quick and _quick) or numel >= INDEX_LIMIT or _empty_strided is None:
            return None
        if self.background is not None and self.background.is_alive():
            return None
        entry, magic = ("vector32", ()) if self.flat else self._layout(numel, sizes, strides)
        current = _driver("cuCtxGetCurrent")
        if entry == "scalar64" or current is None:
            return None
        vector = self.vector if entry == "vector32" else 0
        with torch.cuda.device(self.index):
            _enter(self.index)
            return self.native.prepare_cuda(
                self.cu_launch, self.pdl, current, self.scalar, vector, self.width, BLOCK,
                _raw_stream, self.index, [numel, *sizes, *magic, *strides], n_operands,
                _empty_strided, outs, self)

    def _layout(self, numel: int, sizes: list[int], strides: list[int]) -> tuple[str, list]:
        """A strided kernel's entry point for this layout and its dividers (memoised per layout:
        the executor's plans repeat)."""
        layout = (*sizes, *strides)
        found = self.layouts.get(layout)
        if found is None:
            if len(self.layouts) >= LAYOUTS_MAX:
                self.layouts.clear()
            found = self.layouts[layout] = (self._entry(numel, sizes, strides),
                                            dividers(tuple(sizes)))
        return found

    def _entry(self, numel: int, sizes: list[int], strides: list[int]) -> str:
        """A strided kernel's entry point for this layout, before the pointers' alignment is
        known. Vectors need whole vectors to tile every row: the inner size, and each
        contiguous operand's other strides, multiples of the vector width."""
        if needs_64bit(numel, sizes, strides):
            return "scalar64"
        rank, width = len(sizes), self.width
        if "vector32" not in self.entries or sizes[-1] % width:
            return "scalar32"
        for p in range(0, len(strides), rank):
            if strides[p + rank - 1] == 1 and any(s % width for s in strides[p:p + rank - 1]):
                return "scalar32"
        return "vector32"

    def _flat(self, numel: int, strides: list[int], pointers: list[int], flag) -> bool:
        if "vector32" not in self.kernels or not aligned(pointers):
            return self._launch("scalar32", numel, numel, [numel], strides, pointers, flag)
        work = -(-numel // self.width)
        return self._launch("vector32", numel, work, [numel], strides, pointers, flag)

    def _launch(self, entry: str, numel: int, work: int, sizes, strides, pointers, flag) -> bool:
        """Queue one launch on torch's current stream; False (and a warning once) if it fails."""
        handle = self._kernel(entry)[1]
        blocks = min(-(-work // BLOCK), GRID_MAX)
        if flag is not None:
            pointers = [*pointers, flag.data_ptr()]
        try:
            if self.native is not None and self.cu_launch is not None:
                stream = _raw_stream(self.index) if _raw_stream else int(_stream(self.index).handle)
                # the caller checked the pointers for a vector entry: cuda_pick launches it
                vector = handle if entry == "vector32" else 0
                scalar = self.scalar if vector else handle
                result = self.native.cuda_pick(self.cu_launch, self.pdl, scalar, vector,
                                               self.width, BLOCK, stream, numel, sizes,
                                               dividers(tuple(sizes)), strides, pointers)
                if result:
                    raise RuntimeError(f"cuLaunchKernelEx returned CUresult {result}")
            else:
                core = _core()
                config = self.configs.get(blocks)
                if config is None:
                    config = self.configs[blocks] = core.LaunchConfig(grid=blocks, block=BLOCK)
                args = [numel, *sizes, *dividers(tuple(sizes)), *strides, *pointers]
                core.launch(_stream(self.index), config, self._python_kernel(entry), *args)
        except Exception as error:  # the fallback still gives eager's result
            self._warn(f"torchfuse: a CUDA kernel launch failed, the fallback runs: {error}")
            return False
        return True

    def _warn(self, message: str) -> None:
        log(1, message)
        if not self.failed:
            self.failed = True
            warnings.warn(message, RuntimeWarning, stacklevel=5)


@functools.cache
def _own_stream(index: int) -> object:
    """A stream of torchfuse's own on GPU ``index`` (its context current), non-blocking: it
    never waits for the legacy default stream, nor that for it."""
    from cuda.bindings import driver

    _enter(index)
    return _cu("cuStreamCreate", driver.CUstream_flags.CU_STREAM_NON_BLOCKING)


@contextlib.contextmanager
def _relaxed_capture():
    """This thread in relaxed stream-capture mode for the block: while any thread captures a
    CUDA graph in the default (global) mode, the driver refuses 'potentially unsafe' calls in
    every other thread, and the capture fails."""
    from cuda.bindings import driver

    before = _cu("cuThreadExchangeStreamCaptureMode",
                 driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
    try:
        yield
    finally:
        _cu("cuThreadExchangeStreamCaptureMode", before)


_tables: dict[tuple[str, int], torch.Tensor] = {}


def _table(name: str, index: int) -> torch.Tensor:
    """ops.TABLES[name] on GPU ``index``: eager's results for every input, in the order of their
    bit patterns (made once per GPU)."""
    table = _tables.get((name, index))
    if table is None:
        entry = ops.TABLES[name]
        with no_dispatch_modes(), torch.no_grad():  # real tensors, under torch.compile too
            inputs = ops.every_value(entry.dtype, torch.device("cuda", index))
            table = entry.eager(inputs).contiguous()
            torch.cuda.current_stream(index).synchronize()
        table = _tables.setdefault((name, index), table)
    return table


@functools.cache
def _driver(name: str) -> int | None:
    """The address of a driver function (cuLaunchKernelEx, cuCtxGetCurrent), for the native
    launcher; None if not found."""
    try:
        return ctypes.cast(getattr(ctypes.CDLL("libcuda.so.1"), name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _load_now(handle: int) -> None:
    """Load a kernel into the current context now. CUDA loads a kernel lazily, at its first
    launch, and loading may wait for work queued on the device: on the background thread that
    costs nothing, in a caller's launch it would stall the caller (once)."""
    try:
        from cuda.bindings import driver

        _cu("cuKernelGetFunction", driver.CUkernel(handle))
    except Exception as error:  # the first launch loads it instead
        log(2, f"could not load a kernel ahead of its first launch: {error}")


def _unload(libraries: list) -> None:
    """Unload a dropped launcher's binaries (what cuda.core's modules did when collected)."""
    for library in libraries:
        try:
            _cu("cuLibraryUnload", library)
        except Exception as error:  # a driver shutting down: nothing left to free
            log(2, f"could not unload a kernel's library: {error}")


def _failure_report(source: str, arch: str, error: str) -> str:
    """NVRTC's log and a command that reproduces the failure from a saved copy of the source."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"torchfuse-failed-{digest}.cu")
    with open(path, "w") as f:
        f.write(source)
    return (f"NVRTC failed for {arch}:\n{error.strip()}\n"
            f"reproduce with: nvcc -cubin -arch={arch.replace('compute', 'sm')} {path}")


BACKEND = CUDABackend()
