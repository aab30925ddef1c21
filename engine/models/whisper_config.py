"""WhisperConfig: the shape of a Whisper model, from a Hugging Face config.json or a CTranslate2 model.bin."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class WhisperConfig:
    vocab_size: int                 # 51864 English-only, 51865 multilingual (51866 for large-v3's 128 bins)
    num_mel_bins: int               # 80, or 128 (large-v3)
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int = 1500    # encoder frames per 30 s window (after the stride-2 conv)
    max_target_positions: int = 448     # decoder context

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @property
    def is_multilingual(self) -> bool:
        return self.vocab_size >= 51865

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "WhisperConfig":
        """From config.json's fields (HF names); a missing or wrong field is a ValueError naming it."""
        def need(key: str, default: int | None = None) -> int:
            value = raw.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Whisper config.json: {key!r} must be a positive integer, got {value!r}")
            return value
        config = cls(vocab_size=need("vocab_size"), num_mel_bins=need("num_mel_bins", 80), d_model=need("d_model"),
                     encoder_layers=need("encoder_layers"), encoder_attention_heads=need("encoder_attention_heads"),
                     encoder_ffn_dim=need("encoder_ffn_dim"), decoder_layers=need("decoder_layers"),
                     decoder_attention_heads=need("decoder_attention_heads"),
                     decoder_ffn_dim=need("decoder_ffn_dim"),
                     max_source_positions=need("max_source_positions", 1500),
                     max_target_positions=need("max_target_positions", 448))
        if config.d_model % config.decoder_attention_heads or config.d_model % config.encoder_attention_heads:
            raise ValueError(f"Whisper config.json: d_model {config.d_model} is not a multiple of the head count")
        act = raw.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"Whisper config.json: activation_function {act!r} is not supported (only 'gelu')")
        return config
