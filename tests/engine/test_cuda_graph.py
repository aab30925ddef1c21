"""Decode graphs: bucket logic, static buffers, the padded path against eager decode, and the GPU bench script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.core import EngineCore
from engine.cuda_graph import DecodeBuffers, DecodeGraphs, bucket_for, graph_batch_sizes, table_width
from engine.sequence import Sequence
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, ScheduledSeq
from tests.engine.helpers import engine_config, run_to_completion, tiny_hf_model

REPO = Path(__file__).resolve().parents[2]


# -- pure logic ---------------------------------------------------------------------------------

def test_default_sizes_are_small_powers_then_steps_of_8_ending_at_the_cap():
    assert graph_batch_sizes(256) == (1, 2, 4, 8) + tuple(range(16, 257, 8))
    assert graph_batch_sizes(20) == (1, 2, 4, 8, 16, 20)       # the cap itself is always a bucket
    assert graph_batch_sizes(3) == (1, 2, 3)
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(256, max_batch=40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert graph_batch_sizes(30, max_batch=512) == (1, 2, 4, 8, 16, 24, 30)


def test_explicit_sizes_are_sorted_deduplicated_and_capped():
    assert graph_batch_sizes(256, sizes=(64, 3, 300, 3, 0)) == (3, 64)
    assert graph_batch_sizes(32, max_batch=8, sizes=(1, 8, 16)) == (1, 8)


@pytest.mark.parametrize("max_num_seqs", [1, 7, 20, 64, 256])
def test_every_batch_up_to_the_cap_gets_the_tightest_bucket(max_num_seqs):
    sizes = graph_batch_sizes(max_num_seqs)
    for n in range(1, max_num_seqs + 1):
        size = bucket_for(n, sizes)
        assert size is not None and size >= n
        assert not any(n <= s < size for s in sizes), (n, size)
        if n > 8:
            assert size - n < 8   # at most 7 padded rows past the small sizes
    assert bucket_for(max_num_seqs + 1, sizes) is None   # larger batches run eagerly


def test_table_width_covers_max_model_len():
    assert table_width(4096, 16) == 256
    assert table_width(4097, 16) == 257
    assert table_width(1, 16) == 1
    assert table_width(100, 32) == 4


def _decode_batch(specs: list[tuple[list[int], list[int]]]) -> Batch:
    """specs: (token ids, block table) per sequence; each decodes its last token."""
    rows = []
    for i, (tokens, table) in enumerate(specs):
        seq = Sequence(f"s{i}", tokens, SamplingParams())
        seq.block_table = table
        rows.append(ScheduledSeq(seq, len(tokens) - 1, 1, sample=True))
    return Batch(rows, len(rows), len(rows))


def test_buffers_are_sized_for_the_largest_bucket_and_pad_rows_to_slot_minus_one():
    buffers = DecodeBuffers(max_batch=8, width=table_width(100, 16), block_size=16, device=torch.device("cpu"))
    assert buffers.header.shape == (4, 8) and buffers.block_tables.shape == (8, 7)
    assert buffers.nbytes == (4 * 8 + 8 * 7) * 8
    batch = _decode_batch([(list(range(10, 30)), [5, 2]), (list(range(40, 41)), [6]),
                           (list(range(1, 98)), [0, 1, 2, 3, 4, 9, 8])])
    buffers.fill(batch, 4)
    ids, pos, slots, lens = buffers.header[:, :4].tolist()
    assert ids == [29, 40, 97, 0] and pos == [19, 0, 96, 0] and lens == [20, 1, 97, 0]
    assert slots == [2 * 16 + 3, 6 * 16, 8 * 16, -1]   # block_table[pos // 16] * 16 + pos % 16
    assert buffers.block_tables[0, :2].tolist() == [5, 2]
    assert buffers.block_tables[2].tolist() == [0, 1, 2, 3, 4, 9, 8]
    meta = buffers.meta(4)
    assert meta.num_decode_tokens == 4 and meta.decode_block_tables.shape == (4, 7)
    assert meta.max_decode_context_len == 7 * 16
    # a smaller batch into the same buffers: the rows it no longer uses become padding again
    buffers.fill(_decode_batch([(list(range(5)), [3])]), 2)
    ids, pos, slots, lens = buffers.header[:, :2].tolist()
    assert ids == [4, 0] and slots == [3 * 16 + 4, -1] and lens == [5, 0]


def test_only_decode_only_batches_within_the_largest_bucket_use_graphs():
    graphs = DecodeGraphs(None, [], (1, 2, 4), max_model_len=64, block_size=16, device=torch.device("cpu"))
    decode = _decode_batch([([1, 2, 3], [0])] * 4)
    assert graphs.can_run(decode)
    assert not graphs.can_run(_decode_batch([([1, 2, 3], [0])] * 5))
    seq = Sequence("p", [1, 2, 3, 4], SamplingParams())
    seq.block_table = [1]
    mixed = Batch(decode.seqs[:1] + [ScheduledSeq(seq, 0, 4, sample=True)], 5, 1)
    assert not mixed.is_decode_only and not graphs.can_run(mixed)
    assert graphs.bucket(_decode_batch([([1, 2, 3], [0])] * 3)) == 4


# -- the padded static path against eager decode ---------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    tiny_hf_model("llama3").save_pretrained(path)
    return path


def _spy_on_graph_steps(core) -> list[tuple[int, float, float]]:
    """Make every graph step also run eagerly on the same batch; records (rows, max |diff|, min top-2 gap)."""
    runner = core.runner
    execute = runner.execute
    records = []

    def spy_execute(batch):
        out = execute(batch)
        if runner.graphs.can_run(batch):
            assert out.sample_rows == list(range(batch.num_seqs))
            replayed = out.logits.clone()
            eager = runner.execute_eager(batch).logits
            top2 = eager.topk(2, dim=-1).values
            records.append((len(replayed), float((replayed - eager).abs().max()),
                            float((top2[:, 0] - top2[:, 1]).min())))
            assert torch.equal(replayed.argmax(-1), eager.argmax(-1)) or records[-1][1] * 3 > records[-1][2]
        return out

    runner.execute = spy_execute
    return records


def _compare_graph_and_eager_decode(checkpoint, device: str, dtype: str, capture: bool, atol: float):
    kwargs = dict(device=device, dtype=dtype, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
                  autotune=False, cuda_graph_sizes=(1, 2, 4, 8))
    eager_core = EngineCore(engine_config(checkpoint, cuda_graphs=False, **kwargs))
    graph_core = EngineCore(engine_config(checkpoint, **kwargs))
    if not capture:   # CPU: the same buffers and padding, run eagerly (capture needs CUDA)
        graph_core.runner.use_decode_graphs((1, 2, 4, 8), graph_core.max_model_len)
    assert graph_core.runner.graphs is not None and eager_core.runner.graphs is None
    records = _spy_on_graph_steps(graph_core)
    gen = torch.Generator().manual_seed(3)
    # 7 sequences with different prompt lengths and lengths: batches shrink 7 -> 5 -> 3 -> 1 over the steps
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 33, 9, 70, 2, 12)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (30, 8, 20, 3, 30, 12, 20)]
    ours = run_to_completion(graph_core, prompts, params)
    ref = run_to_completion(eager_core, prompts, params)
    rows = {n for n, _, _ in records}
    assert {bucket_for(n, (1, 2, 4, 8)) for n in rows} >= {1, 4, 8}, rows
    assert rows - {1, 2, 4, 8}, rows   # some replays ran with padded rows
    assert max(err for _, err, _ in records) <= atol
    return ours, ref


def test_padded_static_path_matches_eager_decode_on_cpu(checkpoint):
    ours, ref = _compare_graph_and_eager_decode(checkpoint, "cpu", "float32", capture=False, atol=1e-4)
    assert ours == ref


@pytest.mark.gpu
def test_graph_replay_matches_eager_decode_float32(checkpoint):
    ours, ref = _compare_graph_and_eager_decode(checkpoint, "cuda", "float32", capture=True, atol=1e-3)
    assert ours == ref


@pytest.mark.gpu
def test_graph_replay_matches_eager_decode_bfloat16(checkpoint):
    # bf16: per-step logits close, argmax equal wherever the top-2 gap exceeds 3x the difference (spy)
    _compare_graph_and_eager_decode(checkpoint, "cuda", "bfloat16", capture=True, atol=0.25)


@pytest.mark.gpu
def test_capture_reports_time_memory_and_every_bucket(checkpoint, tmp_path):
    core = EngineCore(engine_config(checkpoint, device="cuda", dtype="bfloat16", max_num_seqs=20,
                                    autotune_cache_dir=str(tmp_path)))
    stats = core.gpu_startup.graphs
    assert stats.batch_sizes == (1, 2, 4, 8, 16, 20)
    assert stats.capture_seconds > 0 and stats.memory_bytes > core.runner.graphs.buffers.nbytes
    assert core.runner.graphs.buffers.block_tables.shape == (20, table_width(core.max_model_len, 16))
    assert core.gpu_startup.num_configs_tuned > 0 and list(tmp_path.glob("*.json"))


# -- the bench script ---------------------------------------------------------------------------

def test_bench_gpu_smoke_runs_every_path_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["copy_gbps"] > 0
    llama, qwen = report["models"]["tiny-llama"], report["models"]["tiny-qwen2"]
    assert [d["batch"] for d in llama["decode"]] == [1, 4] and all(d["tok_s"] > 0 for d in llama["decode"])
    assert llama["prefill"]["tok_s"] > 0 and llama["hf_decode_b1"]["tok_s"] > 0
    assert llama["startup_warm"]["process_s"] >= llama["startup_warm"]["total_s"] > 0
    assert {k["kernel"] for k in llama["kernels"]} >= {"paged_decode_attention", "rms_norm (+residual)",
                                                        "store_kv", "sample_top_k_top_p"}
    # float32 on the CPU: our greedy tokens equal transformers' on every prompt
    for entry in (llama, qwen):
        assert entry["parity"]["identical"] == 1.0 and entry["parity"]["first_logprob_max_abs_diff"] < 1e-4
    assert "| tiny-llama |" in done.stdout and "paged_decode_attention" in done.stdout
