"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (config.attention_bias)."""
from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Layers read config.attention_bias; nothing else differs from Llama."""
