"""Qwen2-VL's multimodal rotary positions (M-RoPE): a (t, h, w) position triple per prompt token, in numpy.

Text tokens get the same running index on all three axes. An image's placeholders get a grid: its merged
patches in row-major order take t = start, h = start + row, w = start + column, where start is the index
the image begins at; the text after it resumes at start + max(rows, columns), so an image advances the
index by its longer side, not by its token count. A generated token i past the prompt then sits at
i + delta on all three axes, with delta = (largest prompt position + 1) - prompt length.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.multimodal import ImageInput


def mrope_positions(num_tokens: int, images: Sequence[ImageInput], spatial_merge_size: int,
                    ) -> tuple[np.ndarray, int]:
    """[3, num_tokens] int64 t/h/w positions of a prompt and its delta for the tokens after it.

    images: in prompt order, each placeholder run [offset, offset + num_tokens) inside the prompt and not
    overlapping the next; an image's grid_thw is in patches before merging (its t is 1: still images)."""
    positions = np.empty((3, num_tokens), dtype=np.int64)
    index = 0      # the running position: the next text token's
    cursor = 0     # prompt tokens placed so far
    for image in images:
        if image.grid_thw is None:
            raise ValueError("a Qwen2-VL image needs its grid_thw")
        if image.offset < cursor or image.end > num_tokens:
            raise ValueError(f"image placeholders [{image.offset}, {image.end}) overlap another image or "
                             f"pass the prompt's {num_tokens} tokens")
        num_text = image.offset - cursor
        positions[:, cursor:image.offset] = np.arange(index, index + num_text, dtype=np.int64)
        index += num_text
        grid_t, grid_h, grid_w = image.grid_thw
        rows, cols = grid_h // spatial_merge_size, grid_w // spatial_merge_size
        if grid_t * rows * cols != image.num_tokens:
            raise ValueError(f"image grid {image.grid_thw} merges to {grid_t * rows * cols} tokens, "
                             f"its placeholders are {image.num_tokens}")
        t, h, w = np.meshgrid(np.arange(grid_t), np.arange(rows), np.arange(cols), indexing="ij")
        positions[:, image.offset:image.end] = np.stack([t.ravel(), h.ravel(), w.ravel()]) + index
        # NOTE: HF's get_rope_index advances by the longer side only (not by grid_t): right for images
        index += max(rows, cols)
        cursor = image.end
    positions[:, cursor:] = np.arange(index, index + num_tokens - cursor, dtype=np.int64)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
