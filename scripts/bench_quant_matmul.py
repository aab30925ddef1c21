"""Benchmark (not a test): the float32-activation quantized CPU kernel against float32 sgemm, per projection shape
of the default model (SmolLM2-135M) and batch size M.

    .venv/bin/python scripts/bench_quant_matmul.py [--baseline OLD_cpu_kernels.c] [--threads 2] [--repeats 15]

Columns, in ms a call (medians): `before` (the kernel built from --baseline, e.g. `git show HEAD~1:kernels/
cpu_kernels.c > /tmp/old.c`), `after` (kernels/cpu_kernels.c as it is), `sgemm` (torch.nn.functional.linear on
the float32 weight stored column-major, as the loader keeps its float copies: w.t().contiguous().t()).
Random weights of the model's shapes, Q4_1 (4-bit with a zero) and Q8_0 (8-bit, no zero): the kernels' speed does
not depend on the values. The runs of one (shape, M) are interleaved round by round, so a noisy neighbour slows
every column alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import cpu_build  # noqa: E402
from kernels.cpu_quant import QuantizedTensor, pack, quant_matmul  # noqa: E402

# (name, K, N) of the default model's projections: fused q/k/v, o_proj, fused gate/up, down_proj
SHAPES = [("qkv", 576, 960), ("o_proj", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]
ROWS = [1, 8, 32, 64, 128, 256, 512]


def build_from(source: Path, cache_dir: Path):
    """Bind a build of another version of cpu_kernels.c (same compiler and flags as the engine's)."""
    saved = cpu_build.SOURCE
    try:
        cpu_build.SOURCE = source
        return cpu_build.bind(cpu_build.build(cache_dir))
    finally:
        cpu_build.SOURCE = saved


def random_weight(kind: str, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    scale = torch.rand(n, k // 32, generator=gen) * 0.02 + 0.001
    if kind == "Q4_1":
        zero = (torch.rand(n, k // 32, generator=gen) - 0.5) * 0.1
        return QuantizedTensor(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8), scale, zero, 4)
    return QuantizedTensor(torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8), scale, None, 8)


def time_call(fn, min_seconds: float = 0.02) -> float:
    """ms a call: as many calls as fill min_seconds (at least one), averaged."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 1e3 * elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="an older cpu_kernels.c to compare against")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per (shape, M)")
    parser.add_argument("--kinds", default="Q4_1,Q8_0")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            libs["before"] = build_from(args.baseline, Path(tmp))
        libs["after"] = cpu_build.bind(cpu_build.build(cpu_build.default_cache_dir()))
    gen = torch.Generator().manual_seed(0)
    cols = [*libs, "sgemm"]
    print(f"threads={args.threads}, medians of {args.repeats} interleaved rounds, ms a call")
    print(f"{'kind':6} {'shape':8} {'K->N':>10} {'M':>4} " + " ".join(f"{c:>8}" for c in cols)
          + ("   after/sgemm" if "sgemm" in cols else ""))
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    for kind in args.kinds.split(","):
        for name, k, n in shapes:
            qw = random_weight(kind, n, k, gen)
            packed = pack(qw)
            w_float = qw.dequantize().t().contiguous().t()   # column-major, as the loader's float copies
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k, generator=gen)
                fns = {c: (lambda lib=lib: quant_matmul(x, packed, lib)) for c, lib in libs.items()}
                fns["sgemm"] = lambda: F.linear(x, w_float)
                samples = {c: [] for c in cols}
                for _ in range(args.repeats):
                    for c in cols:
                        samples[c].append(time_call(fns[c]))
                med = {c: statistics.median(v) for c, v in samples.items()}
                print(f"{kind:6} {name:8} {f'{k}->{n}':>10} {m:>4} " + " ".join(f"{med[c]:8.3f}" for c in cols)
                      + f"   {med['after'] / med['sgemm']:.2f}", flush=True)


if __name__ == "__main__":
    main()
