"""Images in prompts: what crosses from the server to the engine, and what the runner hands the model.

The server decodes and preprocesses each image for the model (engine/vision/), expands the image's one
placeholder token in the rendered prompt to as many placeholders as the model makes embeddings of it
(so usage counts them), and sends an ImageInput per image with the request. The engine encodes an image
when a prefill chunk first reaches its placeholders (all images of a step in one batch, engine/encoder_cache.py),
and the model writes the embeddings over those placeholders' token embeddings.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # NOTE: numpy too: engine.messages imports this module, and the server imports it before
    import numpy as np   # it spawns the engine process (~90 ms of numpy on the critical path of startup)
    import torch


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    """One image preprocessed for one model, before it has a place in a prompt."""
    pixel_values: np.ndarray             # float32 in the model's layout: LLaVA [3, H, W]; Qwen2-VL [patches, C*T*P*P]
    grid_thw: tuple[int, int, int] | None   # Qwen2-VL: patches along time, height, width (before merging)
    num_tokens: int                      # embeddings the model makes of it (= its placeholder tokens)

    @property
    def content_hash(self) -> bytes:
        """sha256 over the pixel values and their grid: the same image, resized the same, hashes the same."""
        import numpy as np
        h = hashlib.sha256(np.ascontiguousarray(self.pixel_values, dtype=np.float32).tobytes())
        h.update(repr((self.pixel_values.shape, self.grid_thw)).encode())
        return h.digest()


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One image of a prompt: its preprocessed pixels and where its placeholder tokens are."""
    content_hash: bytes                  # names the image in the prefix cache and in the encoder cache
    pixel_values: np.ndarray             # ProcessedImage.pixel_values
    grid_thw: tuple[int, int, int] | None
    offset: int                          # index in the prompt of its first placeholder token
    num_tokens: int                      # its placeholder tokens, contiguous from offset

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass(frozen=True, slots=True)
class MultimodalInputs:
    """One step's image embeddings and rotary positions, as the model's forward takes them."""
    embed_indices: "torch.Tensor"        # [N] int64: rows of the step's flat token list that take an image embedding
    embeds: "torch.Tensor"               # [N, hidden] in the model's dtype, row k for embed_indices[k]
    mrope_positions: "torch.Tensor | None" = None   # [3, T] int64 (Qwen2-VL's t/h/w positions); None: positions


def expand_image_tokens(token_ids: list[int], images: list[ProcessedImage], image_token_id: int,
                        ) -> tuple[list[int], list[ImageInput]]:
    """Replace the k-th placeholder token of the rendered prompt by images[k].num_tokens of them.

    The prompt must hold exactly one placeholder per image (the chat template writes one per image part);
    ValueError otherwise, naming both counts."""
    found = sum(1 for t in token_ids if t == image_token_id)
    if found != len(images):
        raise ValueError(f"the prompt holds {found} image placeholder token(s) for {len(images)} image(s)")
    out: list[int] = []
    placed: list[ImageInput] = []
    k = 0
    for t in token_ids:
        if t != image_token_id:
            out.append(t)
            continue
        image = images[k]
        placed.append(ImageInput(image.content_hash, image.pixel_values, image.grid_thw, len(out), image.num_tokens))
        out.extend([image_token_id] * image.num_tokens)
        k += 1
    return out, placed


def block_image_keys(images: tuple[ImageInput, ...], start: int, end: int) -> bytes:
    """The content hashes of the images whose placeholders overlap tokens [start, end), for the block's
    prefix-cache hash: two prompts with the same tokens but other images must not share KV."""
    return b"".join(i.content_hash for i in images if i.offset < end and i.end > start)
