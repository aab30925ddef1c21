"""Test helpers for LLaVA: tiny random HF checkpoints (CLIP or SigLIP tower) with their image processor
config, and deterministic test images of odd sizes and modes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.engine.helpers import TINY

IMAGE_TOKEN_ID = 500    # inside the tiny vocab (512), above the ids the tests draw text from
IMAGE_SIZE = 56         # 4 x 4 patches of 14


def save_tiny_llava(path: Path, tower: str = "clip", seed: int = 0):
    """A random LlavaForConditionalGeneration saved with save_pretrained (+ preprocessor_config.json).

    clip:      3-layer CLIP tower, feature layer -2 (the last layer unused), 'default' (CLS dropped): 16 tokens.
    siglip:    2-layer SigLIP tower, feature layers [-2, -1] concatenated, 'full': 16 tokens.
    clip-full: 2-layer CLIP tower, feature layer -1, 'full' (CLS kept): 17 tokens; a projector without
               biases; LlavaImageProcessor padding each image to a square first."""
    import transformers as tf
    torch.manual_seed(seed)
    text = tf.LlamaConfig(**TINY, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    common = dict(image_size=IMAGE_SIZE, patch_size=14, hidden_size=48, intermediate_size=96, num_attention_heads=4)
    if tower == "clip":
        vision = tf.CLIPVisionConfig(**common, num_hidden_layers=3)
        extra = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
        processor = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif tower == "siglip":
        vision = tf.SiglipVisionConfig(**common, num_hidden_layers=2)
        extra = dict(vision_feature_layer=[-2, -1], vision_feature_select_strategy="full")
        processor = tf.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif tower == "clip-full":
        vision = tf.CLIPVisionConfig(**common, num_hidden_layers=2)
        extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="full", multimodal_projector_bias=False)
        processor = tf.LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, do_pad=True,
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    else:
        raise ValueError(tower)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, **extra)
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits; scale the head so greedy choices are well separated, and
        # the projector so images move the text's hidden states visibly.
        model.lm_head.weight.mul_(8.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(4.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def sample_images() -> list[Image.Image]:
    """Deterministic images: odd sizes and aspect ratios (tall, wide, square, very wide), RGB, RGBA, gray."""
    rng = np.random.RandomState(0)
    images = []
    for (w, h), mode in zip([(37, 53), (120, 80), (64, 64), (200, 31), (45, 90), (70, 70)],
                            ["RGB", "RGB", "RGB", "RGB", "RGBA", "L"]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
        pixels = np.clip(base + rng.randint(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        if mode == "RGBA":
            alpha = rng.randint(0, 256, size=(h, w, 1)).astype(np.uint8)
            image = Image.fromarray(np.concatenate([pixels, alpha], axis=-1), "RGBA")
        elif mode == "L":
            image = image.convert("L")
        images.append(image)
    return images
