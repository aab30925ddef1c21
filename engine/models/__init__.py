"""Model registry: our family name -> causal LM class."""
from __future__ import annotations

from torch import nn


def model_class(family: str) -> type[nn.Module]:
    if family == "llama":
        from engine.models.llama import LlamaForCausalLM as cls
    elif family == "qwen2":
        from engine.models.qwen2 import Qwen2ForCausalLM as cls
    elif family == "qwen3":
        from engine.models.qwen3 import Qwen3ForCausalLM as cls
    elif family == "llava":
        from engine.models.llava import LlavaForConditionalGeneration as cls
    elif family == "qwen2_vl":
        from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration as cls
    else:
        raise ValueError(f"no decoder model for family {family!r}")
    return cls
