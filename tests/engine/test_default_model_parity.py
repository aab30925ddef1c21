"""SmolLM2-135M-Instruct (the default model, GGUF Q4_1): our greedy tokens equal HF transformers'."""
import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.loader import ModelFiles, load_tokenizer
from engine.sampling_params import SamplingParams
from tests.engine.helpers import run_to_completion

NEW_TOKENS = 64
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Who wrote Pride and Prejudice?",
    "Describe the color blue to someone who cannot see.",
    "List the planets of the solar system.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
]
RAW_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village by the mountains,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "In 1969, Neil Armstrong",
    "Ingredients for pancakes:\n1.",
    "import numpy as np\n\nx = np.",
    "Paris is the capital of",
    "Les mathématiques sont",
    "Q: What is the boiling point of water?\nA:",
]


@pytest.fixture(scope="module")
def prompts(default_gguf_path):
    tok = load_tokenizer(ModelFiles.at(default_gguf_path))
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
            for q in CHAT_QUESTIONS]
    raw = [tok.encode(p) for p in RAW_PROMPTS]
    return chat + raw


@pytest.fixture(scope="module")
def hf_outputs(default_gguf_path, prompts):
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    path = Path(default_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


@pytest.mark.parametrize("cpu_kernels,float_copies", [(True, True), (True, False), (False, None)],
                         ids=["c-kernels-float-copies", "c-kernels-packed-only", "torch-float32-weights"])
def test_greedy_matches_transformers_token_for_token(default_gguf_path, prompts, hf_outputs, cpu_kernels,
                                                     float_copies):
    """Both exact CPU paths: the C kernels reading the GGUF's own 4/8-bit weights times float32 activations
    (packed only, as by default; with float copies prefill chunks of more than QUANT_MAX_ROWS tokens use
    float32 sgemm), and torch ops on float32 weights. The int8-activation option is not exact: its
    agreement with this path is test_quantized_activations.py's."""
    assert len(prompts) >= 20
    core = EngineCore(EngineConfig(model=default_gguf_path, kv_cache_gib=0.5, max_model_len=2048,
                                   cpu_kernels=cpu_kernels, cpu_float_copies=float_copies,
                                   cpu_quantized_activations=False))
    packed = [getattr(m, "packed", None) for m in (core.model.layers[0].mlp.gate_up_proj, core.model.embed_tokens)]
    assert all(p is not None for p in packed) if cpu_kernels else packed == [None, None]
    # packed-only: prompts (prefill chunks over 64 tokens) run the quantized kernel too
    assert (core.model.layers[0].mlp.gate_up_proj.weight is None) == (float_copies is False)
    # packed-only: the token embedding is looked up in the packed table, the tied LM head reads it too
    assert (core.model.embed_tokens.weight is None) == (float_copies is False)
    ours = run_to_completion(core, prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    mismatches = [i for i, ref in enumerate(hf_outputs) if ours[f"r{i}"] != ref]
    assert not mismatches, f"prompts {mismatches} differ from transformers"
    assert any(len(o) == NEW_TOKENS for o in hf_outputs), "some outputs must run the full 64 tokens"
    assert core.stats().scheduler.num_blocks_used == 0
