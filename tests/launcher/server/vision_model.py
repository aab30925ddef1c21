"""Tiny random checkpoints served for real, with the default model's tokenizer and a ChatML template: a LLaVA
(CLIP tower, Llama decoder, an <image> token added; the template writes one <image> per image part) and a
plain Llama."""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE, PATCH = 56, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2      # 16 per image ("default" drops CLS)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# The test model's shapes; scripts/bench_vision.py passes real ones (a ViT-B/16 tower, SmolLM2-135M's decoder).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False)


def save_tiny_llama(gguf_path: str, path: Path, **text) -> Path:
    """A random Llama with the default model's tokenizer (4 heads, 2 KV heads unless `text` says otherwise),
    for serving checks that need a model whose heads split (SmolLM2's 9 do not split in two)."""
    import transformers as tf

    from engine.loader import ModelFiles, load_tokenizer
    backend = load_tokenizer(ModelFiles.at(gguf_path)).backend
    eos_id = backend.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=backend.get_vocab_size(), max_position_embeddings=2048, bos_token_id=1,
                            eos_token_id=eos_id, **{**TINY_TEXT, **text})
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    _save_tokenizer(backend, path)
    return path


def _save_tokenizer(backend, path: Path) -> None:
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 2048}))


def save_tiny_llava(gguf_path: str, path: Path, vision: dict = TINY_VISION, text: dict = TINY_TEXT) -> Path:
    """A random LLaVA in `path` (HF files, image processor, tokenizer); its images are vision['image_size']
    pixels square, (image_size / patch_size)^2 tokens each."""
    import transformers as tf
    from tokenizers import AddedToken

    from engine.loader import ModelFiles, load_tokenizer
    tokenizer = load_tokenizer(ModelFiles.at(gguf_path))
    backend = tokenizer.backend
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    image_id = backend.token_to_id("<image>")
    eos_id = backend.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    size = vision["image_size"]
    vision_config = tf.CLIPVisionConfig(**vision)
    text_config = tf.LlamaConfig(vocab_size=image_id + 1, max_position_embeddings=2048, bos_token_id=1,
                                 eos_token_id=eos_id, **text)
    config = tf.LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_id,
                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    config.eos_token_id = eos_id
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    _save_tokenizer(backend, path)
    return path
