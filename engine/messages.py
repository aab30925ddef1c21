"""Plain dataclass messages between the API process and the engine core process."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_ids: list[str]


@dataclass(frozen=True, slots=True)
class StopSample:
    """One sample of a running request is done (the server saw a stop string in its text): finish it
    with reason 'stop' and free its blocks; the request's other samples go on."""
    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """New tokens of one sample (index) of one request, produced by one engine step.

    For best_of > n the engine holds a request's samples back and sends them all when it finishes,
    keeping only the n best by cumulative logprob.
    """
    request_id: str
    index: int                                   # which of the request's n samples
    new_token_ids: list[int]
    new_logprobs: list[float] | None = None      # chosen tokens' logprobs (when asked)
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None             # 'stop' | 'length' | 'abort' | 'error'; None = more
    stop_token_id: int | None = None             # the eos/stop id that ended it (not in new_token_ids)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0                   # prompt tokens served from the prefix cache
    prompt_logprobs: list | None = None          # [(logprob, [(id, logprob)...]) or None per prompt token]
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_blocks_total: int = 0
    num_blocks_used: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_requests_finished: int = 0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Sent once by the core when it is ready to serve."""
    model_name: str
    max_model_len: int
    num_blocks: int
    block_size: int
    kv_capacity_tokens: int
    device: str
    dtype: str
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    is_embedding_model: bool
    load_seconds: float
    default_sampling: dict = field(default_factory=dict)   # from generation_config.json


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    request_id: str
    inputs: list[list[int]]              # token ids per input (special tokens included)
    pooling: str | None = None           # decoder models: 'last' | 'mean' (None: 'last')
    normalize: bool = True               # decoder models only; encoders follow their own config


@dataclass(frozen=True, slots=True)
class EmbedOutput:
    request_id: str
    embeddings: object | None = None     # numpy float32 [len(inputs), dimensions]
    num_tokens: int = 0
    error: str | None = None
    error_code: str | None = None        # 'context_length_exceeded' for an over-long input
