"""Image preprocessing for vision-language models, chosen by the model's preprocessor_config.json.

NOTE: no torch here or below: the server process imports this to preprocess images before they reach the engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from PIL import Image

from engine.config import ModelConfig
from engine.multimodal import ProcessedImage

PREPROCESSOR_CONFIG = "preprocessor_config.json"
_CLIP_KINDS = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor")


class ImageProcessor(Protocol):
    image_token_id: int                  # the placeholder token the chat template writes once per image

    def preprocess(self, image: Image.Image) -> ProcessedImage: ...


def load_image_processor(model_dir: Path, config: ModelConfig) -> ImageProcessor:
    """The processor named by model_dir/preprocessor_config.json's image_processor_type (its Fast and Pil
    variants alike); ValueError naming the file when it is missing, unreadable or names another processor."""
    path = Path(model_dir) / PREPROCESSOR_CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found (a vision model needs its image preprocessor config)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    kind = str(raw.get("image_processor_type") or "")
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    if kind in _CLIP_KINDS:
        from engine.vision.clip_processor import ClipImageProcessor
        return ClipImageProcessor(raw, config, kind, source=str(path))
    if kind == "Qwen2VLImageProcessor":
        from engine.vision.qwen2_vl_processor import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor(raw, config)
    raise ValueError(f"{path}: unsupported image_processor_type {raw.get('image_processor_type')!r}; "
                     f"supported: {', '.join(_CLIP_KINDS + ('Qwen2VLImageProcessor',))}")
