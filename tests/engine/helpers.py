"""Test helpers: tiny random HF checkpoints and running our engine core to completion in-process."""
from __future__ import annotations

import time

import torch

from engine.config import EngineConfig
from engine.messages import AddRequest, TokenOutput
from engine.sampling_params import SamplingParams

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def tiny_hf_model(kind: str, seed: int = 0):
    """A randomly initialised transformers model of the given family, small enough for CI."""
    import transformers as tf
    torch.manual_seed(seed)
    if kind == "llama3":
        cfg = tf.LlamaConfig(**TINY, rope_theta=500000.0, tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = tf.Qwen2Config(**TINY, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = tf.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True), tf.Qwen3ForCausalLM
    elif kind == "mistral":
        cfg, cls = tf.MistralConfig(**TINY, sliding_window=None), tf.MistralForCausalLM
    else:
        raise ValueError(kind)
    cfg.eos_token_id = 2
    cfg.bos_token_id = 1
    model = cls(cfg).eval()
    # Random init gives near-uniform logits; scale the head so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def run_to_completion(core, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      max_steps: int = 100_000) -> dict[str, list[int]]:
    """Submit every prompt, step until all finish; returns request id -> output token ids."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    outputs: dict[str, list[int]] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        immediate = core.add_request(AddRequest(f"r{i}", prompt, p, time.monotonic()))
        assert not immediate, immediate
        outputs[f"r{i}"] = []
    for _ in range(max_steps):
        if not core.has_work():
            break
        for out in core.step():
            collect(outputs, out)
    assert not core.has_work()
    return outputs


def collect(outputs: dict[str, list[int]], out: TokenOutput) -> None:
    assert out.error is None, out.error
    outputs.setdefault(out.request_id, []).extend(out.new_token_ids)


def engine_config(path, **overrides) -> EngineConfig:
    """A small engine on the CPU in float32 (the HF references run there), on the exact path (float32
    activations for packed GGUF weights, named even where it is the default): GPU tests pass device/dtype."""
    base = dict(model=str(path), device="cpu", dtype="float32", kv_cache_gib=0.02, max_model_len=512,
                num_threads=None, cpu_quantized_activations=False)
    base.update(overrides)
    return EngineConfig(**base)
