"""Kernels: Triton on CUDA, their pure-torch twins (kernels.reference) everywhere else."""
from __future__ import annotations

from types import ModuleType


def get_ops(device_type: str) -> ModuleType:
    """The op set for a device: same function names and signatures either way."""
    if device_type == "cuda":
        try:
            from kernels import triton_ops  # noqa: F401  (present once the GPU path lands)
            return triton_ops
        except ImportError:
            pass
    from kernels import reference
    return reference
