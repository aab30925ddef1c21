"""Eager decode rows get block tables of one fixed width (max_model_len's), so the Triton decode kernel's split
count (a constexpr) and its tuned config's key do not change from step to step (each change is a JIT compile)."""
from types import SimpleNamespace

import pytest
import torch

from engine.attention import PagedAttention
from engine.core import EngineCore
from engine.cuda_graph import table_width
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from tests.engine.helpers import engine_config, run_to_completion, tiny_hf_model

KWARGS = dict(block_size=8, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, cuda_graphs=False,
              cpu_kernels=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    tiny_hf_model("llama3").save_pretrained(path)
    return path


def _spy_decode_widths(core) -> list[tuple[int, int]]:
    """Every decode-attention call's (rows, table width), through the model's own op set."""
    calls = []
    for module in core.model.modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, PagedAttention):
            ops = attn.ops

            def decode(q, k_cache, v_cache, block_tables, *args, ops=ops):
                calls.append((block_tables.shape[0], block_tables.shape[1]))
                return ops.paged_decode_attention(q, k_cache, v_cache, block_tables, *args)
            attn.ops = SimpleNamespace(store_kv=ops.store_kv, paged_prefill_attention=ops.paged_prefill_attention,
                                       paged_decode_attention=decode)
    return calls


def _workload():
    gen = torch.Generator().manual_seed(5)
    # prompts long and short, arriving together: chunked prefill runs beside decodes of growing contexts
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 90, 17, 150, 40, 9)]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=m) for m in (40, 12, 30, 8, 25, 60)]
    return prompts, params


def test_eager_decode_tables_have_one_width_and_the_same_results(checkpoint):
    decode_attention = pytest.importorskip("kernels.decode_attention")
    core = EngineCore(engine_config(checkpoint, device="cpu", dtype="float32", **KWARGS))
    calls = _spy_decode_widths(core)
    ours = run_to_completion(core, *_workload())
    width = table_width(512, 8)
    assert {rows for rows, _ in calls} >= {1, 2, 5}, calls          # mixed steps of many sizes ran eagerly
    assert {w for _, w in calls} == {width}, sorted({w for _, w in calls})
    # what the Triton wrapper derives from the width: one split count, one tuning key, for every step
    config = decode_attention.CANDIDATES[0]
    assert len({decode_attention.num_splits(w * 8, config) for _, w in calls}) == 1
    assert len({decode_attention._key(16, 2, 8, w * 8, torch.float32) for _, w in calls}) == 1

    # the tables as wide as each batch's longest (the old behaviour): the same tokens
    legacy = EngineCore(engine_config(checkpoint, device="cpu", dtype="float32", **KWARGS))
    r = legacy.runner
    legacy.runner = ModelRunner(legacy.model, legacy.model_config, r.num_blocks, r.block_size, legacy.kv_dtype,
                                legacy.device)
    legacy_calls = _spy_decode_widths(legacy)
    assert run_to_completion(legacy, *_workload()) == ours
    assert len({w for _, w in legacy_calls}) > 1   # the defect this guards against: widths followed the batch
