"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k before rotary (config.qk_norm)."""
from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Layers read config.qk_norm (q_norm/k_norm weights); nothing else differs from Llama."""
