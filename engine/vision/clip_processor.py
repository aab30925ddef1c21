"""CLIP / SigLIP / LLaVA image preprocessing (HF's PIL-backend processors) on Pillow and numpy: one image in,
float32 [3, S, S] pixels out, S the vision tower's image size."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from engine.config import ModelConfig
from engine.multimodal import ProcessedImage
from engine.vision.pixels import to_rgb

# The processors' class defaults (HF image_utils), for preprocessor configs that leave a key out.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# The tower geometry HF assumes when a (sparse, hub) vision_config leaves it out; engine/models/clip.py
# holds the same numbers for the model (which imports torch, so this module cannot read them from it).
_TOWER_DEFAULTS = {"clip_vision_model": (224, 32), "siglip_vision_model": (224, 16)}   # image_size, patch_size


class ClipImageProcessor:
    """CLIPImageProcessor (shortest edge resize + center crop), SiglipImageProcessor (resize to a fixed
    height x width) and LlavaImageProcessor (CLIP's, after an optional pad to a square of the mean color)."""

    def __init__(self, preprocessor_config: dict[str, Any], config: ModelConfig, kind: str = "CLIPImageProcessor",
                 source: str = "preprocessor_config.json"):
        """kind: image_processor_type without Fast/Pil; source: the file, for error messages."""
        pre = preprocessor_config
        if config.image_token_id is None or config.vision is None:
            raise ValueError(f"{config.architecture}: a vision model config needs an image token id")
        self.image_token_id: int = config.image_token_id
        is_siglip = kind == "SiglipImageProcessor"
        # HF's per-class defaults: SigLIP resizes to a square and does not crop.
        self.do_convert_rgb = bool(pre.get("do_convert_rgb", True))
        self.pad_color = (tuple(int(x * 255) for x in pre.get("image_mean") or OPENAI_CLIP_MEAN)
                          if kind == "LlavaImageProcessor" and pre.get("do_pad", False) else None)
        self.size = _size_dict(pre.get("size"), {"height": 224, "width": 224} if is_siglip else {"shortest_edge": 224},
                               source) if pre.get("do_resize", True) else None
        # absent: the class default (bicubic); an explicit null: HF's resize falls back on bilinear
        resample = pre.get("resample", Image.Resampling.BICUBIC)
        self.resample = Image.Resampling(Image.Resampling.BILINEAR if resample is None else int(resample))
        crop = pre.get("crop_size") or {"height": 224, "width": 224}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.crop = (int(crop["height"]), int(crop["width"])) if pre.get("do_center_crop", not is_siglip) else None
        self.rescale_factor = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else None
        mean = pre.get("image_mean") or (IMAGENET_STANDARD_MEAN if is_siglip else OPENAI_CLIP_MEAN)
        std = pre.get("image_std") or (IMAGENET_STANDARD_STD if is_siglip else OPENAI_CLIP_STD)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1) if pre.get("do_normalize", True) else None
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.image_size, self.num_tokens = llava_image_geometry(config.vision)
        if self.crop is not None:
            out = self.crop
        elif self.size is not None and "height" in self.size:
            out = (self.size["height"], self.size["width"])
        else:
            out = None   # shortest-edge resize without a crop, or no resize: each image its own size
        if out != (self.image_size, self.image_size):
            raise ValueError(f"{source}: images come out {f'{out[0]}x{out[1]}' if out else 'of varying size'}, "
                             f"the vision tower takes {self.image_size}x{self.image_size}")

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        # NOTE: always three channels (do_convert_rgb false would hand a gray image to a 3-channel tower)
        image = to_rgb(image) if self.do_convert_rgb or image.mode != "RGB" else image
        if self.pad_color is not None:
            image = _pad_to_square(image, self.pad_color)
        if self.size is not None:
            height, width = self._resized(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image).transpose(2, 0, 1)   # [C, H, W] uint8
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        if self.rescale_factor is not None:
            # NOTE: float64 product then float32, then float32 normalization: HF's roundings exactly
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.mean is not None:
            pixels = (pixels - self.mean) / self.std
        assert pixels.shape == (3, self.image_size, self.image_size), pixels.shape
        return ProcessedImage(np.ascontiguousarray(pixels), None, self.num_tokens)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        size = self.size
        if "shortest_edge" in size:
            # as HF (torchvision's rule): the short side to the size, the long one scaled and truncated
            short, long = min(height, width), max(height, width)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return size["height"], size["width"]


def llava_image_geometry(vision: dict[str, Any]) -> tuple[int, int]:
    """A LLaVA config.json -> (the tower's input side in pixels, embeddings per image): the tower's
    positions (patches, + CLIP's CLS), less one for vision_feature_select_strategy 'default' (as HF)."""
    tower = vision.get("vision_config") or {}
    model_type = tower.get("model_type", "clip_vision_model")
    if model_type not in _TOWER_DEFAULTS:
        raise ValueError(f"config.json: unsupported vision tower {model_type!r}")
    default_size, default_patch = _TOWER_DEFAULTS[model_type]
    image_size, patch_size = tower.get("image_size", default_size), tower.get("patch_size", default_patch)
    positions = (image_size // patch_size) ** 2 + int(model_type == "clip_vision_model")
    return image_size, positions - int(vision.get("vision_feature_select_strategy", "default") == "default")



def _size_dict(size: Any, default: dict[str, int], source: str) -> dict[str, int]:
    if size is None:
        return default
    if isinstance(size, int):   # old configs: an int is the shortest edge (these processors do not default to square)
        return {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and set(size) in ({"shortest_edge"}, {"height", "width"}):
        return {k: int(v) for k, v in size.items()}
    raise ValueError(f"{source}: unsupported size {size!r} (expected shortest_edge, or height and width)")


def _pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """LLaVA's do_pad: centered on a square of the longest side, filled with the (0-255) mean color."""
    if image.width == image.height:
        return image
    side = max(image.width, image.height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] -> [C, height, width] around the center; an image smaller than the crop is first centered
    on zeros (HF's rule: the pad rounds up, the crop offset down)."""
    _, h, w = pixels.shape
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        padded = np.zeros(pixels.shape[:1] + (new_h, new_w), dtype=pixels.dtype)
        top, left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded[:, top:top + h, left:left + w] = pixels
        pixels, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top:top + height, left:left + width]
