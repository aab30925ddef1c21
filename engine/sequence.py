"""Sequence: one sampled stream of token ids and the scheduling state that travels with it."""
from __future__ import annotations

import enum
import time

import numpy as np

from engine.multimodal import ImageInput
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"    # eos or a stop token id
    FINISHED_LENGTH = "finished_length"      # max_tokens, max_model_len or the KV cache's capacity
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason ('stop' | 'length' | 'abort'), None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One sampled sequence (a request with n > 1 becomes several, made by the engine core).

    Only the scheduler and the block manager mutate it; the model runner reads it.
    NOTE: `prompt_token_ids` and the list `all_token_ids` returns must never be mutated by callers;
    tokens are added only through `append_token`, which keeps the lists in step.
    """

    __slots__ = (
        "seq_id", "prompt_token_ids", "output_token_ids", "params", "status", "num_computed_tokens",
        "num_cached_tokens", "block_table", "block_hashes", "arrival_time", "finish_reason",
        "stop_token_id", "_token_ids", "images", "mrope_positions", "mrope_delta",
    )

    def __init__(self, seq_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None, images: tuple[ImageInput, ...] = ()):
        self.seq_id = seq_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0      # tokens whose KV is in the cache
        self.num_cached_tokens = 0        # tokens served from the prefix cache at the last allocation
        self.block_table: list[int] = []  # KV block ids, in token order
        # Chained hashes of this sequence's full blocks, filled lazily by the block manager; tokens
        # are append-only, so they stay valid across preemption.
        self.block_hashes: list[bytes] = []
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None  # the eos / stop token id that finished it, if any
        # prompt + output in one list, so the runner reads all ids without a copy per step
        self._token_ids: list[int] = list(prompt_token_ids)
        self.images = images              # the prompt's images, in prompt order (vision models)
        # Qwen2-VL's t/h/w rotary positions of the prompt [3, P] (set by the core); a token i past the
        # prompt has all three at i + mrope_delta
        self.mrope_positions: np.ndarray | None = None
        self.mrope_delta = 0

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output ids (the live list, not a copy: read only)."""
        return self._token_ids

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose KV is not in the cache yet (1 for a decoding sequence)."""
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def finish(self, status: SequenceStatus, stop_token_id: int | None = None) -> None:
        assert status.is_finished, status
        self.status = status
        self.finish_reason = status.finish_reason
        self.stop_token_id = stop_token_id

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)})")
