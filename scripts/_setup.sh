# Sourced by scripts/serve and scripts/test: create .venv and install the project once.
# Idempotent: a second run with an unchanged pyproject.toml installs nothing and prints nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

has_cuda_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV ..."
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.llm-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-$(has_cuda_gpu && echo cuda || echo cpu)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "Installing the project into $VENV (once) ..."
    if has_cuda_gpu; then
        TORCH_SPEC=torch
    else
        TORCH_SPEC="torch==2.13.0"  # the CPU build; any other torch spec pulls a multi-GB CUDA build
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$VENV/bin/python" -c "import torch, engine, launcher" >/dev/null
    echo "$WANT" > "$STAMP"
fi
# Our sources are installed editable, so nothing compiled them; where PYTHONDONTWRITEBYTECODE is set no
# run ever would, and every start would compile ~100 modules again (~0.6 s of `llm serve`'s startup here).
# Up-to-date files are only stat'ed: cheap on every run.
"$VENV/bin/python" -m compileall -q -j 0 "$ROOT/engine" "$ROOT/launcher" "$ROOT/kernels" >/dev/null || true
