"""The autotune cache: one JSON file per (GPU, Triton version), reused on the next start, skip switch, progress."""
import json

import pytest
import torch

from kernels import autotune
from kernels.autotune import Autotuner, TuneJob, TuneKey

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_table():
    autotune.clear()
    yield
    autotune.clear()


class FakeTimer:
    """Milliseconds from the config itself (BLOCK 64 is fastest), counting calls: tests the cache logic only."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        fn()
        return self.current["cost"]


def _jobs(timer: FakeTimer, launched: list) -> list[TuneJob]:
    def launch(config):
        launched.append(dict(config))
        if config["BLOCK"] == 512:   # a candidate that cannot run is skipped
            raise OutOfResources(262144, 232448, "shared memory")
        timer.current = {"cost": abs(config["BLOCK"] - 64) + 1}

    candidates = [{"BLOCK": b, "num_warps": 4} for b in (128, 512, 64, 32)]
    return [TuneJob(TuneKey("decode_attention", f"b{b}", "bfloat16"), candidates, launch) for b in (1, 64)]


def test_tunes_once_then_reuses_the_file(tmp_path):
    timer, launched, progress = FakeTimer(), [], []
    tuner = Autotuner(tmp_path, timer=timer, gpu_name="NVIDIA H100 80GB HBM3", triton_version="3.9.0",
                      progress=lambda done, total, label: progress.append((done, total)))
    result = tuner.run(_jobs(timer, launched))
    assert all(config == {"BLOCK": 64, "num_warps": 4} for config in result.values())
    assert tuner.num_tuned == 2 and tuner.num_loaded == 0
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert tuner.path == tmp_path / "NVIDIA_H100_80GB_HBM3__triton-3.9.0.json"
    stored = json.loads(tuner.path.read_text())["configs"]
    assert stored == {"decode_attention|b1|bfloat16": {"BLOCK": 64, "num_warps": 4},
                      "decode_attention|b64|bfloat16": {"BLOCK": 64, "num_warps": 4}}
    key = TuneKey("decode_attention", "b64", "bfloat16")
    assert autotune.chosen(key, {"BLOCK": 1}) == {"BLOCK": 64, "num_warps": 4}

    # the next start: same GPU and Triton version -> nothing timed, nothing launched, same table
    autotune.clear()
    timer2, launched2 = FakeTimer(), []
    warm = Autotuner(tmp_path, timer=timer2, gpu_name="NVIDIA H100 80GB HBM3", triton_version="3.9.0")
    warm.run(_jobs(timer2, launched2))
    assert timer2.calls == 0 and launched2 == [] and warm.num_loaded == 2 and warm.num_tuned == 0
    assert autotune.chosen(key, {"BLOCK": 1}) == {"BLOCK": 64, "num_warps": 4}


def _one_ms(fn) -> float:
    fn()
    return 1.0


def test_a_failing_launch_that_is_not_a_resource_error_is_raised(tmp_path):
    """An illegal address (a RuntimeError from CUDA) is a bug, not a config to skip."""
    def launch(config):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    job = TuneJob(TuneKey("decode_attention", "b1", "bfloat16"), [{"BLOCK": 64}], launch)
    tuner = Autotuner(tmp_path, timer=_one_ms, gpu_name="G", triton_version="1")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuner.run([job])


def test_warm_cache_builds_no_tuning_inputs(tmp_path):
    built = []
    inputs = autotune.lazy(lambda: built.append(1) or torch.zeros(4))
    job = TuneJob(TuneKey("rms_norm", "h4", "float32"), [{"BLOCK": 8}, {"BLOCK": 16}],
                  lambda config: inputs().add_(1))
    Autotuner(tmp_path, timer=_one_ms, gpu_name="G", triton_version="1").run([job])
    assert built == [1]                  # cold: built once, shared by both candidates
    built.clear()
    Autotuner(tmp_path, timer=_one_ms, gpu_name="G", triton_version="1").run([job])
    assert built == []


def test_new_gpu_or_triton_version_retunes(tmp_path):
    timer = FakeTimer()
    Autotuner(tmp_path, timer=timer, gpu_name="A", triton_version="3.9.0").run(_jobs(timer, []))
    for gpu, version in (("B", "3.9.0"), ("A", "3.10.0")):
        other = FakeTimer()
        tuner = Autotuner(tmp_path, timer=other, gpu_name=gpu, triton_version=version)
        tuner.run(_jobs(other, []))
        assert tuner.num_tuned == 2 and other.calls > 0
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_only_missing_entries_are_tuned(tmp_path):
    timer = FakeTimer()
    Autotuner(tmp_path, timer=timer, gpu_name="A", triton_version="1").run(_jobs(timer, [])[:1])
    tuner = Autotuner(tmp_path, timer=timer, gpu_name="A", triton_version="1")
    tuner.run(_jobs(timer, []))
    assert (tuner.num_loaded, tuner.num_tuned) == (1, 1)
    assert len(json.loads(tuner.path.read_text())["configs"]) == 2


def test_skip_tuning_uses_heuristics_and_writes_nothing(tmp_path):
    timer, launched = FakeTimer(), []
    tuner = Autotuner(tmp_path, timer=timer, skip_tuning=True, gpu_name="A", triton_version="1")
    result = tuner.run(_jobs(timer, launched))
    assert timer.calls == 0 and launched == [] and not tuner.path.exists()
    assert all(config == {"BLOCK": 128, "num_warps": 4} for config in result.values())


def test_torn_cache_file_is_retuned(tmp_path):
    timer = FakeTimer()
    tuner = Autotuner(tmp_path, timer=timer, gpu_name="A", triton_version="1")
    tuner.path.parent.mkdir(parents=True, exist_ok=True)
    tuner.path.write_text('{"format": 1, "configs": {"decode_att')
    tuner.run(_jobs(timer, []))
    assert tuner.num_tuned == 2
    assert len(json.loads(tuner.path.read_text())["configs"]) == 2


def test_default_cache_dir_is_under_llm_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_HOME", str(tmp_path))
    tuner = Autotuner(gpu_name="A", triton_version="1")
    assert tuner.path.parent == tmp_path / "autotune"


@pytest.mark.gpu
def test_warmup_tunes_then_loads_on_real_kernels(tmp_path):
    """Cold: every kernel config is timed on the GPU; warm: all come from the file, and the ops still agree."""
    import time

    from kernels import reference as ref
    from kernels import triton_ops

    shapes = triton_ops.ModelShapes(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                                    head_dim=64, block_size=16, max_model_len=2048,
                                    decode_batch_sizes=(1, 8, 64), prefill_query_lens=(512,),
                                    dtype=torch.bfloat16)
    cold = triton_ops.warmup(shapes, torch.device("cuda"), cache_dir=str(tmp_path))
    assert cold.num_tuned == len(triton_ops.tune_jobs(shapes, torch.device("cuda"))) and cold.num_loaded == 0
    autotune.clear()
    start = time.perf_counter()
    warm = triton_ops.warmup(shapes, torch.device("cuda"), cache_dir=str(tmp_path))
    assert warm.num_tuned == 0 and warm.num_loaded == cold.num_tuned
    assert time.perf_counter() - start < 10
    q = torch.randn(8, 9, 64, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(256, 16, 3, 64, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(256, device="cuda")[:8 * 32].view(8, 32)
    lens = torch.randint(1, 513, (8,), device="cuda")
    torch.testing.assert_close(triton_ops.paged_decode_attention(q, k_cache, k_cache, tables, lens, 0.125),
                               ref.paged_decode_attention(q, k_cache, k_cache, tables, lens, 0.125),
                               rtol=1.6e-2, atol=1.6e-2)
