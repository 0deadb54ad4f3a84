"""The on-disk tier of the kernel cache: compiled binaries kept between processes.

(Placeholder: compiles every time. The persistent cache replaces the body of load_or_compile.)
"""

from __future__ import annotations

import torch


def load_or_compile(backend, source: str, device: torch.device) -> tuple[bytes, bool]:
    """The binary for ``source`` on ``device``, and whether it was compiled (False: from disk).

    A verified entry on disk is used when there is one; else ``backend`` compiles it.
    """
    return backend.compile(source, device), True
