"""EncoderCache: image embeddings by content hash, so an image is encoded once however many chunks,
turns or requests it is in (the prefix cache holds its KV; this holds what the KV was computed from)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from engine.multimodal import ImageInput

# Embedding rows kept (least recently used out first): an image a later chunk of the same prefill, a
# preempted sequence's recompute or the next turn needs is usually still here. 8192 rows of a 4096-wide
# bfloat16 model are 64 MiB.
ENCODER_CACHE_TOKENS = 8192


class EncoderCache:
    def __init__(self, encode: Callable[[list[ImageInput]], list[torch.Tensor]],
                 capacity_tokens: int = ENCODER_CACHE_TOKENS):
        self._encode = encode
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._num_tokens = 0
        self.num_encoded = 0     # images run through the vision encoder
        self.num_hits = 0        # images a step needed that were already encoded

    def embeddings(self, images: list[ImageInput]) -> dict[bytes, torch.Tensor]:
        """[num_tokens, hidden] per content hash for these images; the missing ones encoded in one batch."""
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, ImageInput] = {}   # by hash: an image twice in a step is encoded once
        for image in images:
            h = image.content_hash
            if h in found or h in missing:
                continue
            cached = self._entries.get(h)
            if cached is None:
                missing[h] = image
            else:
                self._entries.move_to_end(h)
                found[h] = cached
                self.num_hits += 1
        if missing:
            batch = list(missing.values())
            for image, embeds in zip(batch, self._encode(batch), strict=True):
                assert embeds.shape[0] == image.num_tokens, (embeds.shape, image.num_tokens)
                found[image.content_hash] = embeds
                self._put(image.content_hash, embeds)
            self.num_encoded += len(missing)
        self._evict(keep=found)
        return found

    def _put(self, h: bytes, embeds: torch.Tensor) -> None:
        self._entries[h] = embeds
        self._num_tokens += embeds.shape[0]

    def _evict(self, keep: dict[bytes, torch.Tensor]) -> None:
        """Drop least recently used entries past the capacity, never one this step uses."""
        for h in list(self._entries):
            if self._num_tokens <= self.capacity_tokens:
                break
            if h not in keep:
                self._num_tokens -= self._entries.pop(h).shape[0]
