"""Code generation: a TypedGraph and an ArgSpec become kernel source, one renderer per device."""

from .cstyle import CStyleRenderer, TypedGraph

__all__ = ["CStyleRenderer", "TypedGraph"]
