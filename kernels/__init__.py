"""Kernels: Triton on CUDA; on the CPU the torch twins (kernels.reference) with C kernels where built."""
from __future__ import annotations

from types import ModuleType


def get_ops(device_type: str, cpu_kernels: bool = True) -> ModuleType:
    """The op set for a device: same function names and signatures either way.
    cpu_kernels: on the CPU, the C kernels where they are built (else only the torch twins)."""
    if device_type == "cuda":
        try:
            from kernels import triton_ops
            return triton_ops
        except ImportError:   # no triton installed (it ships for Linux only): the torch twins
            pass
    if device_type == "cpu" and cpu_kernels:
        from kernels.cpu_build import load_library
        if load_library() is not None:
            from kernels import cpu_ops
            return cpu_ops
    from kernels import reference
    return reference
