"""Build and load kernels/cpu_kernels.c and kernels/cpu_layers.c as one library: compiled once per (sources,
compiler, flags, CPU) with the system C compiler into $LLM_HOME/kernels, loaded with ctypes. Without a compiler
the CPU path stays pure torch."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from kernels.user_dir import llm_home

SOURCE = Path(__file__).with_name("cpu_kernels.c")
LAYERS_SOURCE = Path(__file__).with_name("cpu_layers.c")   # the fused decoder stack, over SOURCE's kernels
DISABLE_ENV = "LLM_CPU_KERNELS"   # "0": never build or load (pure torch twins on the CPU)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def build(cache_dir: Path, compiler: str | None = None, arch_flags: tuple[str, ...] = ("-march=native",)) -> Path:
    """Compile the kernels into cache_dir unless this exact build is there; returns the .so path.
    Raises OSError (no compiler) or RuntimeError (it failed, with its message)."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found")
    # NOTE: no implicit FMA contraction: scalar loops round like their torch twins (explicit vector
    # FMAs are written as such).
    flags = ["-O3", *arch_flags, "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    sources = [SOURCE, LAYERS_SOURCE]   # NOTE: read here, not at import: scripts swap SOURCE for other versions
    key = hashlib.sha256("\0".join([*(s.read_text() for s in sources), cc, *flags, _cpu_signature()]).encode()
                         ).hexdigest()[:16]
    target = Path(cache_dir) / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, *map(str, sources), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed on {' + '.join(s.name for s in sources)}: {result.stderr.strip()[:500]}")
        os.replace(tmp, target)   # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def bind(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' C signatures."""
    import torch  # noqa: F401  NOTE: loaded first, so the kernels' OpenMP binds to torch's libgomp (same
    # soname): one thread pool, sized by torch.set_num_threads, serves torch ops and these kernels alike.
    lib = ctypes.CDLL(str(path))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "llm_q4_matmul": [p, i64, i64, p, p, p, i64, p, p],
        "llm_q8_matmul": [p, i64, i64, p, p, p, i64, i64, p, p],
        "llm_int8_matmul": [p, i64, i64, p, p, p, i64, i64, i64, i64, i64, p],
        "llm_quantize_activations": [p, i64, i64, i64, p, p, p],
        "llm_paged_decode_attention": [p, p, p, p, i64, p, i64, i64, i64, i64, i64, f32, i64, p],
        "llm_paged_prefill_attention": [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, i64, p],
        "llm_float_to_half": [p, i64, p],
        "llm_store_kv": [p, i64, p, i64, i64, i64, p, p, p, i64],
        "llm_rms_norm": [p, p, p, f32, i64, i64, p, p],
        "llm_rotary_embedding": [p, i64, p, i64, p, p, i64, i64, i64, i64, p, p],
        "llm_silu_and_mul": [p, i64, i64, p],
        "llm_decode_stack": [p, i64, i64, i64, i64, i64, i64, i64, f32, f32, p, p, p, p, p, i64, p, p, p, i64, i64,
                             p, p, p, p, f32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.llm_packed_rows.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, i64, p, i64, p]
    lib.llm_packed_rows.restype = i64
    lib.llm_decode_stack_scratch_floats.argtypes = [i64] * 7
    lib.llm_decode_stack_scratch_floats.restype = i64
    return lib


def default_cache_dir() -> Path:
    return llm_home() / "kernels"


load_error: str | None = None   # why load_library() returned None, for the startup log


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The built kernels, or None where they cannot be built (no compiler, disabled by LLM_CPU_KERNELS=0)."""
    global load_error
    if os.environ.get(DISABLE_ENV, "1") == "0":
        load_error = f"{DISABLE_ENV}=0"
        return None
    try:
        return bind(build(default_cache_dir()))
    except (OSError, RuntimeError) as e:
        load_error = str(e)
        return None
