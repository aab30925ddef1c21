"""StepPlan: one step's model inputs as plain int64 arrays, built from a scheduler Batch by the runner on
rank 0 and, with tensor parallel, sent as is to the other ranks (engine/tp_worker.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from engine.multimodal import ImageInput


class ImagePiece(NamedTuple):
    """Placeholder tokens of one image that this step computes (a prefill chunk may cover part of one)."""
    flat_start: int        # the step's flat token row of the first of them
    image: ImageInput
    image_start: int       # which of the image's embeddings goes there
    count: int


class PromptLogprobSpan(NamedTuple):
    """Positions of one batch row whose logits give its prompt logprobs."""
    row: int       # the batch row
    offset: int    # its first row in ModelOutput.prompt_logits
    count: int     # how many positions


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Tokens are packed decode rows first (one token each), then prefill/extend rows. Every array is int64.

    The first eight fields are what every rank needs to run the model; the rest say which hidden rows rank 0
    turns into logits, and are ignored elsewhere.
    """
    input_ids: np.ndarray                # [T]
    positions: np.ndarray                # [T]
    slot_mapping: np.ndarray             # [T] KV cache slot of each token
    decode_block_tables: np.ndarray      # [Bd, M] (rows padded with block 0)
    decode_context_lens: np.ndarray      # [Bd] including the current token
    prefill_block_tables: np.ndarray     # [Bp, M'] (rows padded with block 0; M' >= 1)
    prefill_query_lens: np.ndarray       # [Bp]
    prefill_context_lens: np.ndarray     # [Bp] including the new tokens
    logits_indices: np.ndarray           # [S] hidden rows to sample from, one per sampling row
    sample_rows: tuple[int, ...]         # the batch row of each sampling row
    prompt_logprob_spans: tuple[PromptLogprobSpan, ...]
    prompt_logprob_indices: np.ndarray   # [P] hidden rows of the spans, in span order
    image_pieces: tuple[ImagePiece, ...] = ()   # vision models: the image embeddings the step's tokens take
    mrope_positions: np.ndarray | None = None   # [3, T] Qwen2-VL's rotary positions (None: `positions`)

    def for_workers(self) -> "StepPlan":
        """The plan without rank 0's sampling parts (the other ranks compute no logits)."""
        empty = np.zeros(0, dtype=np.int64)
        return StepPlan(self.input_ids, self.positions, self.slot_mapping, self.decode_block_tables,
                        self.decode_context_lens, self.prefill_block_tables, self.prefill_query_lens,
                        self.prefill_context_lens, empty, (), (), empty)


def padded_table(tables: list[list[int]]) -> np.ndarray:
    """Block tables padded with block 0 to the widest row: [rows, max(1, width)] int64."""
    width = max((len(t) for t in tables), default=1) or 1
    out = np.zeros((len(tables), width), dtype=np.int64)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out
