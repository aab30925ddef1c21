"""Test helpers: tiny random Qwen2-VL / Qwen2.5-VL checkpoints (with their image processor) and test images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.engine.helpers import TINY

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503
KINDS = ["qwen2_vl", "qwen2_5_vl"]
# Few patches per image (4 .. 16 tokens after merging) keep the encoder and the prompts small.
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16
# (width, height): odd sizes and aspect ratios, resized up, down and across
IMAGE_SIZES = [(37, 53), (120, 80), (64, 64), (200, 31), (90, 150)]


def tiny_hf_vl_model(kind: str, seed: int = 0):
    """A randomly initialised transformers Qwen2-VL (or Qwen2.5-VL) with real structure at tiny widths."""
    import transformers as tf
    torch.manual_seed(seed)
    # head_dim 16: 8 rotary frequencies, split 2 / 3 / 3 over t / h / w
    text = dict(**TINY, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2)
    tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END, tie_word_embeddings=False)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=TINY["hidden_size"])
        cfg, cls = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens), tf.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        # window_size 56 px = 2 x 2 merge blocks per window: the test images cut into several, some partial;
        # block 0 attends within windows, block 1 over the whole image
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=TINY["hidden_size"],
                      window_size=56, fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(kind)
    model = cls(cfg).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits; scale the head so greedy choices are well separated.
        model.lm_head.weight.mul_(8.0)
        # and make the images matter: the random merger's output is tiny next to token embeddings
        model.model.visual.merger.mlp[2].weight.mul_(8.0)
        # and sharpen attention (random q.k is near zero, so a wrong rotary would hardly show)
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(6.0)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def hf_image_processor():
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def save_checkpoint(model, path: Path) -> Path:
    model.save_pretrained(path)
    hf_image_processor().save_pretrained(path)
    return path


def sample_images(seed: int = 0) -> list[Image.Image]:
    """Deterministic RGB images: smooth gradients plus noise (so resizing has structure to get wrong)."""
    rng = np.random.default_rng(seed)
    images = []
    for w, h in IMAGE_SIZES:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images
