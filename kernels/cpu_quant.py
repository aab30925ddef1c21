"""Quantized-weight matrix products on the CPU: pack GGUF 4/8-bit weights, build the C kernel, call it.

Decode on the CPU is bound by reading the weights: float32 weights of the default model are ~540 MB a
step, its Q4_1 weights ~80 MB. kernels/cpu_quant.c multiplies float32 activations by the packed
weights directly (float32 sums), so a step reads the small weights. The C file is compiled once per
(source, compiler, CPU) with the system C compiler into $LLM_HOME/kernels and loaded with ctypes;
without a compiler the engine keeps float32 weights (see `load_library`). Twin: reference.quant_matmul.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TILE = 16     # outputs per packed tile (one 16-lane vector)
GROUP = 32    # inputs per scale/zero group
SOURCE = Path(__file__).with_name("cpu_quant.c")


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """A weight [N, K] as integers and per-32-input-group affine terms: w = scale * q (+ zero)."""
    q: torch.Tensor               # [N, K] uint8 in 0..15 (bits=4) or int8 (bits=8)
    scale: torch.Tensor           # [N, K/32] float32
    zero: torch.Tensor | None     # [N, K/32] float32 (4-bit only; None means 0)
    bits: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.float().view(n, k // GROUP, GROUP) * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.view(n, k)


def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack weights along the output dimension (fused q/k/v, gate/up)."""
    bits = {p.bits for p in parts}
    assert len(bits) == 1, "fused shards must share one quantization width"
    zeros = [p.zero if p.zero is not None else torch.zeros_like(p.scale) for p in parts]
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat(zeros) if parts[0].bits == 4 else None, bits.pop())


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight in the kernel's tiled layout (see the header of kernels/cpu_quant.c)."""
    data: torch.Tensor            # q4: [tiles, G, 16, 16] uint8 (two inputs per byte); q8: [tiles, G, 32, 16] int8
    scale: torch.Tensor           # [tiles, G, 16] float32
    zero: torch.Tensor | None     # [tiles, G, 16] float32, q4 only
    bits: int
    out_features: int            # N (rows past N in the last tile are padding)
    in_features: int             # K

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


def _tiles(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, ...] -> [tiles, 16, ...], zero rows appended up to a whole tile."""
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    return t.view(-1, TILE, *t.shape[1:])


def pack(w: QuantizedTensor) -> PackedWeight:
    n, k = w.q.shape
    assert k % GROUP == 0, f"input size {k} is not a multiple of {GROUP}"
    g = k // GROUP
    scale = _tiles(w.scale.float(), n).transpose(1, 2).contiguous()           # [tiles, G, 16]
    zero = None
    if w.bits == 4:
        q = _tiles(w.q, n).view(-1, TILE, g, GROUP // 2, 2)                    # [tiles, 16, G, 16, 2]
        data = (q[..., 0] | (q[..., 1] << 4)).permute(0, 2, 3, 1).contiguous()  # [tiles, G, 16, 16]
        z = w.zero if w.zero is not None else torch.zeros_like(w.scale)
        zero = _tiles(z.float(), n).transpose(1, 2).contiguous()
    else:
        assert w.bits == 8 and w.q.dtype == torch.int8
        data = _tiles(w.q, n).view(-1, TILE, g, GROUP).permute(0, 2, 3, 1).contiguous()  # [tiles, G, 32, 16]
    return PackedWeight(data, scale, zero, w.bits, n, k)


def unpack(w: PackedWeight) -> QuantizedTensor:
    """The inverse of `pack` (the twin and the tests read weights back through it)."""
    n, k = w.out_features, w.in_features
    scale = w.scale.transpose(1, 2).reshape(-1, k // GROUP)[:n]
    if w.bits == 4:
        d = w.data.permute(0, 3, 1, 2)                                          # [tiles, 16, G, 16]
        q = torch.stack([d & 15, d >> 4], dim=-1).reshape(-1, k)[:n]
        zero = w.zero.transpose(1, 2).reshape(-1, k // GROUP)[:n]
        return QuantizedTensor(q, scale, zero, 4)
    q = w.data.permute(0, 3, 1, 2).reshape(-1, k)[:n]
    return QuantizedTensor(q, scale, None, 8)


# -- the compiled kernel ---------------------------------------------------------------------------

def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def build(cache_dir: Path, compiler: str | None = None, arch_flags: tuple[str, ...] = ("-march=native",)) -> Path:
    """Compile cpu_quant.c into cache_dir (once per source, compiler, flags and CPU); returns the .so."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found")
    flags = ["-O3", *arch_flags, "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"cpu_quant-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {result.stderr.strip()[:500]}")
        os.replace(tmp, target)   # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    # NOTE: torch must be loaded first: the kernel's OpenMP symbols then bind to torch's libgomp
    # (same soname), so both share one thread pool and torch.set_num_threads governs the kernel too.
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.llm_q4_matmul.argtypes = [p, i64, i64, p, p, p, i64, p, p]
    lib.llm_q4_matmul.restype = None
    lib.llm_q8_matmul.argtypes = [p, i64, i64, p, p, i64, p]
    lib.llm_q8_matmul.restype = None
    return lib


def default_cache_dir() -> Path:
    from launcher.weights import llm_home   # lazy: kernels import nothing from the launcher at load time
    return llm_home() / "kernels"


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (no compiler, not x86/ARM Linux ...)."""
    if os.environ.get("LLM_CPU_QUANT", "1") == "0":
        return None
    try:
        return _bind(build(default_cache_dir()))
    except (OSError, RuntimeError) as e:
        global load_error
        load_error = str(e)
        return None


load_error: str | None = None   # why load_library returned None, for the startup log


def quant_matmul(x: torch.Tensor, w: PackedWeight, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W^T -> [M, N] float32, reading W packed. lib: a bound library (tests)."""
    lib = lib or load_library()
    assert lib is not None, "quant_matmul needs the compiled kernel (check load_library() first)"
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == w.in_features
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, w.out_features), dtype=torch.float32)
    if m == 0:
        return out
    if w.bits == 4:
        xsum = torch.empty((m, w.in_features // GROUP), dtype=torch.float32)
        lib.llm_q4_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(),
                          w.zero.data_ptr(), w.out_features, out.data_ptr(), xsum.data_ptr())
    else:
        lib.llm_q8_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(),
                          w.out_features, out.data_ptr())
    return out
