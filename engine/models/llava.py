"""LLaVA: a CLIP or SigLIP vision tower, a two-layer projector, and our Llama decoder over text + image tokens."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType

import numpy as np
import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.clip import ACTIVATIONS, VisionTower, VisionTowerConfig, fuse_qkv
from engine.models.layers import linear
from engine.models.llama import LlamaForCausalLM
from engine.models.parallel import SINGLE, TensorParallel
from engine.multimodal import ImageInput

# Checkpoint prefixes -> ours. transformers 5.x writes (and hub files hold) language_model.model.* and
# language_model.lm_head; files saved by 4.5x hold model.language_model.* and lm_head; the tower is under
# vision_tower.vision_model.* in hub files and vision_tower.* in 5.x saves; either may carry a "model." prefix.
_LANGUAGE_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                      ("language_model.", "model."))
_TOWER_PREFIXES = ("vision_tower.vision_model.", "vision_tower.")


class MultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, bias: bool, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.act(linear(x, self.linear_1)), self.linear_2)


class LlavaForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, ops: ModuleType, max_positions: int, tp: TensorParallel = SINGLE):
        if tp.size > 1:
            raise ValueError("LLaVA models do not support tensor parallel yet (tensor_parallel_size must be 1)")
        super().__init__(config, ops, max_positions, tp)
        raw = config.vision
        assert raw is not None, "a LLaVA config carries its config.json as ModelConfig.vision"
        source = f"{config.architecture} config"
        tower = VisionTowerConfig.from_hf_dict(raw["vision_config"], source)
        self.hidden_state_ids = feature_hidden_state_ids(raw.get("vision_feature_layer", -2), tower, source)
        self.select_strategy = raw.get("vision_feature_select_strategy", "default")
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"{source}: unsupported vision_feature_select_strategy {self.select_strategy!r}")
        act = raw.get("projector_hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: unsupported projector_hidden_act {act!r}")
        self.vision_tower = VisionTower(tower, num_layers=max(self.hidden_state_ids))
        self.multi_modal_projector = MultiModalProjector(
            tower.hidden_size * len(self.hidden_state_ids), config.hidden_size,
            bool(raw.get("multimodal_projector_bias", True)), act)
        # NOTE: HF's "default" drops the first position whatever the tower, as we do (a SigLIP tower
        # then loses a patch; such checkpoints set "full").
        self.num_image_tokens = tower.num_positions - int(self.select_strategy == "default")

    @torch.no_grad()
    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Each image -> [num_tokens, hidden] in the model's dtype; the images go through the tower as one
        batch per pixel shape (LLaVA resizes all to one, so one batch)."""
        device, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            assert image.num_tokens == self.num_image_tokens, (image.num_tokens, self.num_image_tokens)
            groups.setdefault(tuple(image.pixel_values.shape), []).append(i)
        for ids in groups.values():
            pixels = torch.from_numpy(np.stack([images[i].pixel_values for i in ids])).to(device, dtype)
            states = self.vision_tower(pixels, self.hidden_state_ids)
            if self.select_strategy == "default":
                states = [s[:, 1:] for s in states]
            features = self.multi_modal_projector(torch.cat(states, dim=-1))
            for row, i in enumerate(ids):
                # a copy: the encoder cache keeps each image's rows, and a view would keep the whole batch
                out[i] = features[row].clone() if len(ids) > 1 else features[0]
        return out   # type: ignore[return-value]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """HF tensors under any of the LLaVA naming schemes; the decoder's loader does the copying (it fuses
        the language model's projections and names any parameter left unfilled)."""
        super().load_weights(self._renamed(weights, source), source)

    def _renamed(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint names -> the names LlamaForCausalLM.load_weights maps onto our parameters; the tower's
        q/k/v are held back until a layer has all six, then yielded fused."""
        pending: dict[str, dict[str, torch.Tensor]] = {}   # '...self_attn.' -> its q/k/v tensors so far
        for name, tensor in weights:
            name = ours(name)
            if name.startswith("vision_tower.") and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
                prefix = name[:name.index(".self_attn.") + len(".self_attn.")]
                parts = pending.setdefault(prefix, {})
                parts[name] = tensor
                fused = fuse_qkv(parts, prefix)
                if fused:
                    del pending[prefix]
                    yield from fused.items()
                continue
            yield name, tensor
        params = dict(self.named_parameters())
        for prefix, parts in pending.items():
            if f"{prefix}qkv.weight" in params:
                lacking = [f"{prefix}{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")
                           if f"{prefix}{p}_proj.{k}" not in parts]
                raise ValueError(f"{source}: checkpoint lacks weights for {', '.join(lacking)}")


def ours(name: str) -> str:
    """One LLaVA checkpoint tensor name -> ours: model.* / lm_head.weight for the decoder,
    vision_tower.* (HF CLIPVisionModel names), multi_modal_projector.*."""
    if name.startswith("model.") and name.split(".", 2)[1] in ("language_model", "vision_tower",
                                                               "multi_modal_projector"):
        name = name.removeprefix("model.")
    for old, new in _LANGUAGE_PREFIXES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    for old in _TOWER_PREFIXES:
        if name.startswith(old):
            return "vision_tower." + name.removeprefix(old)
    return name


def feature_hidden_state_ids(layer: int | list[int], tower: VisionTowerConfig, source: str) -> tuple[int, ...]:
    """vision_feature_layer (an index into HF's hidden_states tuple, negative from the end, or a list of
    them) -> non-negative indices: 0 the embeddings, i the output of encoder layer i."""
    num_states = tower.num_hidden_layers + 1
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers or not all(isinstance(i, int) and -num_states <= i < num_states for i in layers):
        raise ValueError(f"{source}: vision_feature_layer {layer!r} is out of range for a "
                         f"{tower.num_hidden_layers}-layer vision tower")
    return tuple(i % num_states for i in layers)
