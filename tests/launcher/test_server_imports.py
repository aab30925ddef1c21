"""The server process starts without torch: only the engine process needs it, and importing it (~1.5 s of
CPU) there too slowed every start on a 2-core host by as much. Nor numpy (~15 MB resident) for a text model:
only audio, embeddings and pooling use it, on their first request. Checked in a fresh interpreter."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import launcher.server.__main__, launcher.server.app
from launcher.server.served_model import load_server_tokenizer
from engine.vision import load_image_processor
tokenizer = load_server_tokenizer(sys.argv[1])          # the default model: a GGUF header's vocabulary
assert tokenizer.encode("hello", add_special_tokens=False)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sympy", "numpy"))
assert not heavy, heavy[:5]
"""


def test_the_server_process_imports_no_torch(default_gguf_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, default_gguf_path], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_engine_handle_imports_little_before_the_spawn():
    """The server spawns its engines first thing; what the handle imports delays the engine's torch import."""
    script = ("import sys, engine.engine_process\n"
              "late = [m for m in ('engine.messages', 'engine.core_process', 'hashlib') if m in sys.modules]\n"
              "assert not late, late\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
