"""torchfuse: a just-in-time fuser for PyTorch.

Pointwise parts of a program become fusion groups; each group becomes one generated kernel (C on
the CPU, CUDA C on NVIDIA GPUs), compiled at run time, cached, and run; whatever cannot be fused
or compiled runs through a fallback with eager PyTorch's exact results and errors.
"""

from . import capture
from .capture import backend, jit
from .config import config
from .explain import Report, explain
from .interface import (
    cache_info,
    can_fuse,
    clear_cache,
    get_fused_kernel_code,
    register_fusion,
    run_fusion,
    set_fusion_enabled,
)
from .ir import FusionGraph, NotFusible

capture._register()

__version__ = "0.1.0"

__all__ = [
    "FusionGraph",
    "Report",
    "backend",
    "explain",
    "jit",
    "NotFusible",
    "cache_info",
    "can_fuse",
    "clear_cache",
    "config",
    "get_fused_kernel_code",
    "register_fusion",
    "run_fusion",
    "set_fusion_enabled",
]
