#!/usr/bin/env bash
# Where a batch-1 decode step goes: `llm serve` of the default profile, `llm bench serve` at concurrency 1
# (128 in / 256 out) as load, py-spy on the engine process for 10 s, and both processes' CPU seconds over the same 10 s.
#   scripts/profile_decode.sh [OUT_DIR]   -> OUT_DIR/engine.raw (py-spy raw stacks), a summary on stdout
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
cd "$ROOT"
OUT="${1:-$(mktemp -d)}"; mkdir -p "$OUT"
[ -x "$VENV/bin/py-spy" ] || "$VENV/bin/pip" install -q py-spy
PORT=$("$VENV/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$VENV/bin/llm" serve profiles/default.toml --port "$PORT" > "$OUT/serve.log" 2>&1 &
SUP=$!
trap 'kill -INT $SUP 2>/dev/null; wait $SUP 2>/dev/null || true' EXIT
for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && break; sleep 0.5; done
ENGINE=$(pgrep -P "$(pgrep -P $SUP -f launcher.server | head -1)" -f engine.core_process | head -1)
SERVER=$(pgrep -P $SUP -f launcher.server | head -1)
"$VENV/bin/llm" bench serve --url "http://127.0.0.1:$PORT" --num-prompts 4 --max-concurrency 1 --input-len 128 \
    --output-len 256 --ignore-eos > "$OUT/bench.txt" 2>&1 &
BENCH=$!
sleep 4
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
E0=$(cpu "$ENGINE"); S0=$(cpu "$SERVER")
"$VENV/bin/py-spy" record --pid "$ENGINE" --duration 10 --rate 50 --idle --format raw -o "$OUT/engine.raw" >/dev/null 2>&1
E1=$(cpu "$ENGINE"); S1=$(cpu "$SERVER")
echo "over 10 s: engine $(( E1 - E0 ))/100 CPU-s, server $(( S1 - S0 ))/100 CPU-s"
kill $BENCH 2>/dev/null || true   # it only kept the engine decoding while py-spy looked
"$VENV/bin/python" - "$OUT/engine.raw" <<'PY'
import collections, sys
shares, total = collections.Counter(), 0
rules = [("quant_matmul", "quantized matmuls (C)"), ("paged_decode_attention", "attention"),
         ("paged_prefill_attention", "attention"), ("compute_logits", "LM head"),
         ("rms_norm", "norm/rotary/silu/kv store"), ("rotary_embedding", "norm/rotary/silu/kv store"),
         ("silu_and_mul", "norm/rotary/silu/kv store"), ("store_kv", "norm/rotary/silu/kv store"),
         ("engine/models", "python in the model"), ("sampler", "sampler"), ("scheduler", "scheduler"),
         ("model_runner", "runner prepare"), ("connection", "IPC / waiting")]
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    if not stack:
        continue
    total += int(n)
    shares[next((name for key, name in rules if key in stack), "other")] += int(n)
for name, n in shares.most_common():
    print(f"{name:32s} {100 * n / total:5.1f}%")
PY
