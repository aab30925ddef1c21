"""scripts/gpu_check --smoke: every phase of the device check runs on the CPU and reports ok in its own JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("01_versions", "02_kernels", "03_engine_gpu", "04_probe", "05_bench_8b", "06_parity_smollm")


def test_gpu_check_smoke_writes_every_phase(tmp_path):
    out = tmp_path / "gpu_out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)   # the kernel phase's own conftest decides
    done = subprocess.run([str(REPO / "scripts" / "gpu_check"), "--smoke"], capture_output=True, text=True,
                          timeout=880, cwd=REPO, env=env)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else done.stdout
    assert done.returncode == 0, log[-4000:]
    for name in PHASES:
        phase = json.loads((out / f"{name}.json").read_text())
        assert phase["ok"] is True and phase["rc"] == 0 and not phase["timed_out"], phase
        assert phase["detail"] and (out / phase["detail"]).exists(), phase
    probe = json.loads((out / "04_probe.detail.json").read_text())
    assert probe["ok"] and probe["load"]["param_dtypes"] == ["float32"]
    assert len(probe["decode_variants"]["decode_table_widths"]) == 1   # one table width for every eager step
    assert [(h["batch"], h["path"]) for h in probe["host_ms_per_step"]] == [
        (1, "graph buffers"), (1, "eager"), (64, "graph buffers"), (64, "eager")]
    bench = json.loads((out / "05_bench_8b.detail.json").read_text())
    assert bench["done"] and [d["batch"] for d in bench["models"]["tiny-llama"]["decode"]] == [1, 4]
    parity = json.loads((out / "06_parity_smollm.detail.json").read_text())
    assert list(parity["models"]) == ["tiny-qwen2"] and parity["models"]["tiny-qwen2"]["parity"]["identical"] == 1.0
    assert "=== done" in log
