"""The supervisor on its own: a server that cannot start makes it exit non-zero with the server's reason."""
from __future__ import annotations

import subprocess
import sys

from tests.launcher.server.conftest import REPO, _free_port


def test_engine_startup_error_exits_nonzero_with_reason(default_gguf_path, tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text(f"""
[model]
source = "{default_gguf_path}"
max_model_len = 99999999

[engine]
device = "cpu"
kv_cache_gib = 0.1

[server]
port = {_free_port()}
""")
    r = subprocess.run([sys.executable, "-m", "launcher.supervise", str(profile)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("llm serve: the server exited with status 1") and "max_model_len" in last, r.stderr
    assert "serving" not in r.stdout


def test_missing_model_fails_before_spawning(tmp_path):
    profile = tmp_path / "missing.toml"
    profile.write_text(f'[model]\nsource = "{tmp_path}/nope.gguf"\n')
    r = subprocess.run([sys.executable, "-m", "launcher.supervise", str(profile)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"llm serve: {tmp_path}/nope.gguf: no such file or directory"
