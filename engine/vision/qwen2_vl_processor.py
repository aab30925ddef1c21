"""Qwen2-VL / Qwen2.5-VL image preprocessing on Pillow and numpy: the same pixels as HF's Qwen2VLImageProcessor.

An image is resized (keeping its aspect ratio) to sides that are multiples of patch_size * merge_size with
an area inside [min_pixels, max_pixels], normalized, and cut into patch_size squares listed merge block by
merge block (the merger then joins each run of merge_size**2 consecutive rows); a still image is repeated
temporal_patch_size times along time, as the 3-D patch embedding expects.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from engine.config import ModelConfig
from engine.multimodal import ProcessedImage
from engine.vision.pixels import to_rgb

# HF's defaults where preprocessor_config.json is silent (CLIP's normalization, 56*56 .. 28*28*1280 pixels).
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of factor, area in [min_pixels, max_pixels].

    NOTE: round() is Python's (half to even) and the floor/ceil branches are HF's: a pixel of difference
    changes the grid, hence the placeholder count and every position after the image."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over "
                         f"{MAX_ASPECT_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def _pixel_bounds(pre: dict) -> tuple[int, int]:
    """min/max pixels: the top-level keys (hub files) win over size{shortest_edge, longest_edge} (what
    transformers 5 saves), as in HF's constructor."""
    size = pre.get("size") or {}
    lo = pre.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or DEFAULT_MIN_PIXELS
    hi = pre.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_MAX_PIXELS
    return int(lo), int(hi)



class Qwen2VLImageProcessor:
    def __init__(self, preprocessor_config: dict, config: ModelConfig):
        pre = preprocessor_config
        vision = (config.vision or {}).get("vision_config") or {}
        if config.image_token_id is None:
            raise ValueError("a Qwen2-VL model config needs image_token_id")
        self.image_token_id: int = config.image_token_id
        self.patch_size = int(pre.get("patch_size") or vision.get("patch_size", 14))
        self.merge_size = int(pre.get("merge_size") or vision.get("spatial_merge_size", 2))
        self.temporal_patch_size = int(pre.get("temporal_patch_size") or vision.get("temporal_patch_size", 2))
        self.min_pixels, self.max_pixels = _pixel_bounds(pre)
        self.resample = Image.Resampling(int(pre.get("resample", Image.Resampling.BICUBIC)))
        self.do_resize = bool(pre.get("do_resize", True))
        self.rescale_factor = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else None
        self.do_normalize = bool(pre.get("do_normalize", True))
        self.mean = np.asarray(pre.get("image_mean") or DEFAULT_MEAN, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(pre.get("image_std") or DEFAULT_STD, dtype=np.float32).reshape(-1, 1, 1)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        image = to_rgb(image)
        factor = self.patch_size * self.merge_size
        if self.do_resize:
            height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
            image = image.resize((width, height), resample=self.resample)
        elif image.height % factor or image.width % factor:
            raise ValueError(f"image {image.width}x{image.height} is not in whole {factor}-pixel blocks "
                             "and the preprocessor config turns resizing off")
        pixels = np.asarray(image).transpose(2, 0, 1)   # [C, H, W] uint8
        if self.rescale_factor is not None:
            # NOTE: float64 product then float32, then float32 normalization: HF's roundings exactly
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            pixels = (pixels - self.mean) / self.std
        patches, grid_h, grid_w = self._patchify(pixels)
        return ProcessedImage(patches, (1, grid_h, grid_w), grid_h * grid_w // self.merge_size ** 2)

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[C, H, W] -> [grid_h * grid_w, C * T * P * P]: rows merge block by merge block (row-major over
        blocks, row-major inside one), each row (channel, time, y, x)."""
        c, height, width = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = pixels.reshape(c, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)   # [block_row, block_col, m_row, m_col, C, P, P]
        frames = np.repeat(blocks[:, :, :, :, :, None], t, axis=5)   # a still image: the same frame t times
        return np.ascontiguousarray(frames.reshape(grid_h * grid_w, c * t * p * p), dtype=np.float32), grid_h, grid_w
