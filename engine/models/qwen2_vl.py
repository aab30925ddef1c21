"""Qwen2-VL / Qwen2.5-VL: the Qwen2 decoder with multimodal rotary positions, beside a vision transformer.

The decoder is LlamaForCausalLM's (q/k/v with biases); its rotary takes three positions per token (t, h,
w: engine/mrope.py) and each frequency reads the one its mrope_section names, so the runner hands it a
per-token cos/sin table (rotary_table) and the one rotary kernel applies it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType

import numpy as np
import torch

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.parallel import SINGLE, TensorParallel
from engine.models.qwen2_vl_vision import VisionConfig, VisionTransformer
from engine.mrope import mrope_positions
from engine.multimodal import ImageInput

# Checkpoint name prefixes -> ours. transformers >= 4.52 modules are model.language_model.* and
# model.visual.* (its save_pretrained still writes the hub names, but other tools keep the module names);
# the hub files are model.layers.*, model.embed_tokens, model.norm and visual.*.
PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# Qwen2.5-VL's vision MLP, renamed so the decoder's loader does not fuse it (qwen2_vl_vision.VisionGatedMLP).
VISION_MLP_NAMES = ((".mlp.gate_proj.", ".mlp.gate."), (".mlp.up_proj.", ".mlp.up."),
                    (".mlp.down_proj.", ".mlp.down."))


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    uses_mrope = True

    def __init__(self, config: ModelConfig, ops: ModuleType, max_positions: int, tp: TensorParallel = SINGLE):
        if tp.size > 1:
            raise ValueError("Qwen2-VL does not run tensor parallel")
        section = config.mrope_section
        if not section or sum(section) != config.head_dim // 2:
            raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {config.head_dim // 2}")
        # q/k/v carry biases: ModelConfig's attention_bias defaults to True for the family
        super().__init__(config, ops, max_positions, tp)
        self.vision_config = VisionConfig.from_model_config(config)
        self.visual = VisionTransformer(self.vision_config)
        self.register_buffer("mrope_axis", torch.empty(config.head_dim // 2, dtype=torch.int64), persistent=False)
        if not self.mrope_axis.is_meta:
            self.init_buffers(self.mrope_axis.device)

    def init_buffers(self, device: torch.device) -> None:
        """Computed buffers (the loader builds on meta): the vision rotary, and which of t/h/w each decoder
        rotary frequency reads: section k takes axis k % 3 (HF's layout)."""
        self.visual.init_buffers(device)
        section = self.config.mrope_section
        axes = [k % 3 for k, n in enumerate(section) for _ in range(n)]
        self.mrope_axis = torch.tensor(axes, dtype=torch.int64, device=device)

    def rotary_table(self, mrope_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[3, T] t/h/w positions -> (cos/sin [T, head_dim] in cos_sin_cache's layout, arange(T))."""
        half = self.config.head_dim // 2
        index = mrope_positions.index_select(0, self.mrope_axis).t()   # [T, half]: each frequency's position
        cache = self.cos_sin_cache
        table = torch.cat((cache[:, :half].gather(0, index), cache[:, half:].gather(0, index)), dim=1)
        return table, torch.arange(table.shape[0], device=table.device)

    def prompt_rope_positions(self, token_ids: list[int], images: tuple[ImageInput, ...]) -> tuple[np.ndarray, int]:
        """The prompt's [3, len] t/h/w positions, and the delta that puts generated token i at i + delta."""
        for image in images:
            assert token_ids[image.offset] == self.config.image_token_id, "an image must start on its placeholders"
        return mrope_positions(len(token_ids), images, self.vision_config.merge_size)

    @torch.inference_mode()
    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """[num_tokens, hidden] per image in the model's dtype; all of them in one vision forward."""
        dev = self.embed_tokens.weight.device
        pixels = torch.from_numpy(np.concatenate([np.asarray(i.pixel_values, dtype=np.float32) for i in images]))
        grids = [i.grid_thw for i in images]
        for image in images:
            t, h, w = image.grid_thw
            assert image.pixel_values.shape[0] == t * h * w, (image.pixel_values.shape, image.grid_thw)
            assert image.num_tokens == t * h * w // self.vision_config.merge_size ** 2
        out = self.visual(pixels.to(dev), grids).to(self.embed_tokens.weight.dtype)
        return list(out.split([i.num_tokens for i in images]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Either naming scheme (PREFIXES) onto ours; the decoder's loader copies everything (the vision
        tensors by their own names) and names any parameter the checkpoint lacks."""
        super().load_weights(_our_names(weights), source)


def _our_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        for theirs, ours in PREFIXES:
            if name.startswith(theirs):
                name = ours + name[len(theirs):]
                break
        if name.startswith("visual."):
            for theirs, ours in VISION_MLP_NAMES:
                name = name.replace(theirs, ours)
        yield name, tensor
