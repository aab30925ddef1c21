"""On the CPU a decode step of one sequence runs on all threads but one (engine/core.py, SMALL_DECODE_ROWS),
leaving a core to the process it streams to; prompts and larger batches get every thread, and the tokens are
the same either way."""
import torch

from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from tests.engine.helpers import engine_config, run_to_completion


def test_one_sequence_decodes_on_all_threads_but_one(default_gguf_path, monkeypatch):
    core = EngineCore(engine_config(default_gguf_path, num_threads=2, kv_cache_gib=0.05, max_model_len=256,
                                    cpu_quantized_activations=True))
    seen = []   # (decode-only rows, threads) of each step
    execute = core.runner.execute

    def recording(batch):
        seen.append((batch.num_seqs if batch.is_decode_only else 0, torch.get_num_threads()))
        return execute(batch)
    monkeypatch.setattr(core.runner, "execute", recording)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    try:
        alone = run_to_completion(core, [[504, 3575, 282, 4990]], params)
        assert {threads for rows, threads in seen if rows == 1} == {1}
        assert {threads for rows, threads in seen if rows != 1} == {2}   # the prompt's step
        seen.clear()
        together = run_to_completion(core, [[504, 3575, 282, 4990], [17, 42, 99]], params)
        assert {threads for rows, threads in seen if rows == 2} == {2}
        assert list(together.values())[0] == list(alone.values())[0]   # the same tokens on 1 or 2 threads
    finally:
        torch.set_num_threads(2)
