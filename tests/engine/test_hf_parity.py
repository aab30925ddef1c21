"""Our Llama-family models against HF transformers on random checkpoints saved as sharded safetensors."""
import pytest
import torch

from engine.core import EngineCore
from engine.loader import ModelFiles, load_config, load_model
from engine.model_runner import ModelRunner
from engine.sequence import Sequence
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, ScheduledSeq
from tests.engine.helpers import engine_config, run_to_completion, tiny_hf_model

KINDS = ["llama3", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    model = tiny_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="100KB")  # force several shards + an index
    assert (path / "model.safetensors.index.json").exists()
    return request.param, model, path


def test_logits_match_transformers(checkpoint):
    kind, hf, path = checkpoint
    files = ModelFiles.at(path)
    config = load_config(files)
    ours = load_model(files, config, torch.float32, torch.device("cpu"), max_positions=512)
    runner = ModelRunner(ours, config, num_blocks=16, block_size=16, kv_dtype=torch.float32,
                         device=torch.device("cpu"))
    prompt = torch.randint(3, 512, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = Sequence("s", prompt, SamplingParams())
    seq.block_table = [3, 7, 1]  # deliberately out of order: attention must follow the table
    # Prefill in two chunks (the second attends to the first through the paged cache).
    for start, n in ((0, 20), (20, 25)):
        batch = Batch([ScheduledSeq(seq, start, n, sample=start + n == len(prompt))], n, 0)
        logits = runner.execute(batch).logits
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].float()
    assert config.architecture == hf.config.architectures[0]
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers(checkpoint):
    kind, hf, path = checkpoint
    core = EngineCore(engine_config(path, block_size=8, max_num_batched_tokens=64, max_num_seqs=16))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 33, 70)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = run_to_completion(core, prompts, params)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert ours[f"r{i}"] == ref[0, len(prompt):].tolist(), f"{kind} prompt {i}"


def test_prompt_logprobs_match_transformers(checkpoint):
    kind, hf, path = checkpoint
    core = EngineCore(engine_config(path, block_size=8, max_num_batched_tokens=32, max_num_seqs=8))
    prompt = torch.randint(3, 512, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    import time

    from engine.messages import AddRequest
    # Twice: the second run's prefix would be cached, but prompt logprobs must still cover every position.
    for rid in ("first", "second"):
        core.add_request(AddRequest(rid, prompt, SamplingParams(max_tokens=2, prompt_logprobs=3), time.monotonic()))
        got = None
        while core.has_work():
            for out in core.step():
                got = out.prompt_logprobs if out.prompt_logprobs is not None else got
        assert got is not None and len(got) == len(prompt) and got[0].logprob is None
        assert [e.token_id for e in got] == prompt
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        for t in range(1, len(prompt)):
            assert abs(got[t].logprob - ref[t - 1, prompt[t]].item()) < 1e-4
            assert [i for i, _ in got[t].top] == ref[t - 1].topk(3).indices.tolist()
