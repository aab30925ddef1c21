"""Find and load a Whisper checkpoint: a Hugging Face directory (config.json + safetensors) or CTranslate2's
model.bin (faster-whisper's layout)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.loader import materialize
from engine.model_kinds import is_whisper_model  # noqa: F401 (callers import it from here too)
from engine.models.whisper import WhisperModel
from engine.models.whisper_config import WhisperConfig


def read_checkpoint(path: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """The model's shape and its HF-named tensors."""
    from engine.ctranslate2_format import is_ctranslate2_whisper, read_ctranslate2_whisper
    if is_ctranslate2_whisper(path):
        raw, tensors = read_ctranslate2_whisper(path)
        return WhisperConfig.from_hf(raw), tensors
    from safetensors.torch import load_file

    from engine.loader import safetensors_files
    raw = json.loads((path / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(path):
        tensors.update(load_file(shard))
    return WhisperConfig.from_hf(raw), tensors


def load_whisper(path: str | Path, device: torch.device, dtype: torch.dtype, ops) -> WhisperModel:
    path = Path(path)
    config, tensors = read_checkpoint(path)
    with torch.device("meta"):
        model = WhisperModel(config, ops)
    model = materialize(model, dtype, device)
    model.load_weights(tensors.items(), str(path))
    return model.eval().requires_grad_(False)
