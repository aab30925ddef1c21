"""A CPU decode step of one sequence runs on all threads or all but one, whichever has been giving the shorter
time from one such step to the next (engine/step_threads.py); prompts and larger batches get every thread, and
the tokens are the same either way."""
import torch

from engine import step_threads
from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from engine.step_threads import SmallStepThreads
from tests.engine.helpers import engine_config, run_to_completion


def drive(chooser: SmallStepThreads, step_s: dict[int, float], steps: int, now: float = 0.0) -> tuple[list[int], float]:
    """`steps` small steps, each taking step_s[its threads]: the threads each got, and the clock after."""
    got = []
    for _ in range(steps):
        threads = chooser.next(now)
        got.append(threads)
        now += step_s[threads]
    return got, now


def test_the_faster_count_is_kept_until_the_next_measurement():
    trials = 2 * step_threads.TRIALS * step_threads.TRIAL_STEPS
    for faster in (1, 2):
        chooser = SmallStepThreads(2)
        times = {faster: 0.005, 3 - faster: 0.006}
        got, now = drive(chooser, times, trials)
        assert sorted(set(got)) == [1, 2] and got.count(1) == got.count(2)   # both measured alike
        got, now = drive(chooser, times, step_threads.KEEP_STEPS, now)
        assert chooser.chosen == faster and set(got) == {faster}
        # the host changes: the next measurement finds it and switches
        times = {faster: 0.007, 3 - faster: 0.006}
        drive(chooser, times, trials + 1, now)
        assert chooser.chosen == 3 - faster


def test_ties_and_intervals_broken_by_other_steps_keep_all_threads():
    chooser = SmallStepThreads(4)
    assert chooser.options == (3, 4)
    trials = 2 * step_threads.TRIALS * step_threads.TRIAL_STEPS
    drive(chooser, {3: 0.005, 4: 0.005}, trials + 1)
    assert chooser.chosen == 4
    chooser = SmallStepThreads(2)
    now = 0.0
    for _ in range(trials + 1):   # every interval spans another step: nothing measured, nothing changes
        now += 0.001 if chooser.next(now) == 1 else 0.009
        chooser.interrupt()
    assert chooser.chosen == 2


def test_one_sequence_decodes_on_the_chosen_threads_with_the_same_tokens(default_gguf_path, monkeypatch):
    core = EngineCore(engine_config(default_gguf_path, num_threads=2, kv_cache_gib=0.05, max_model_len=256,
                                    cpu_quantized_activations=True))
    seen = []   # (decode-only rows, threads) of each step
    execute = core.runner.execute

    def recording(batch):
        seen.append((batch.num_seqs if batch.is_decode_only else 0, torch.get_num_threads()))
        return execute(batch)
    monkeypatch.setattr(core.runner, "execute", recording)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    try:
        alone = run_to_completion(core, [[504, 3575, 282, 4990]], params)
        assert {threads for rows, threads in seen if rows == 1} == {1, 2}   # both tried
        assert {threads for rows, threads in seen if rows != 1} == {2}      # the prompt's step
        assert torch.get_num_threads() == 2   # a step's count is the step's only
        seen.clear()
        together = run_to_completion(core, [[504, 3575, 282, 4990], [17, 42, 99]], params)
        assert {threads for rows, threads in seen if rows == 2} == {2}
        assert list(together.values())[0] == list(alone.values())[0]   # the same tokens on 1 or 2 threads
    finally:
        torch.set_num_threads(2)
