"""The messages between the API process and the engine core process: one frozen dataclass each.

To the core:   AddRequest | AbortRequests | StopSample | EmbedRequest | TranscribeRequest | StatsRequest | Shutdown
From the core: PhaseUpdate | EngineInfo (ready) | EngineFatal | StepOutputs | EngineStats | EmbedOutput
(a speech model's TranscriptionOutputs travel in StepOutputs beside TokenOutputs)
Both loops dispatch on the type; nothing else crosses the pipe. What crosses it every step pickles as a tuple of
its fields (engine/fast_pickle.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.fast_pickle import pickled_by_fields
from engine.multimodal import ImageInput
from engine.sampling_params import SamplingParams
from engine.stats import SchedulerStats

# -- to the core --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Generate for one prompt: params.n samples (best_of of them run when it is larger)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    images: tuple[ImageInput, ...] = ()  # the prompt's images, placeholders expanded (vision models)


@dataclass(frozen=True, slots=True)
class AbortRequests:
    """Finish these requests now and free their blocks (unknown ids are ignored)."""
    request_ids: list[str]


@dataclass(frozen=True, slots=True)
class StopSample:
    """One sample of a running request is done (the client saw a stop string in its text): finish it
    with reason 'stop' and free its blocks; the request's other samples go on."""
    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Run a pooling model (or pool a decoder's hidden states) over token id lists, all in one call."""
    request_id: str
    inputs: list[list[int]]              # token ids per input (special tokens included)
    pooling: str | None = None           # decoder models: 'last' | 'mean' (None: 'last')
    normalize: bool = True               # decoder models only; encoders follow their own config
    task: str = "embed"                  # 'embed' (pooled vectors) | 'classify' (a classifier's probabilities)
                                         # | 'token_embed' (every token's last hidden state; encoders)
    token_type_ids: list[list[int]] | None = None   # per input, for a cross-encoder's pairs (None: all 0)


@dataclass(frozen=True, slots=True)
class TranscribeRequest:
    """Transcribe one clip with a speech model (Whisper), or translate its speech to English text.
    AbortRequests([request_id]) stops it."""
    request_id: str
    audio: object                        # numpy float32 [num_samples]: mono, 16 kHz, in [-1, 1]
    task: str = "transcribe"             # 'transcribe' | 'translate' (to English)
    language: str | None = None          # ISO 639-1 code ('en', 'de', ...); None: detected from the first window
    prompt_token_ids: list[int] = field(default_factory=list)   # the user's prompt, as text tokens (no specials)
    temperature: float = 0.0             # 0: greedy
    timestamps: bool = False             # decode timestamp tokens, so segments get their own start/end
    seed: int | None = None
    arrival_time: float = 0.0


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Answered with an EngineStats between two steps."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Abort what runs (each sample gets an 'abort' output), then leave the loop."""


# -- from the core ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseUpdate:
    """A startup phase began ('loading weights', 'allocating KV cache', ...)."""
    phase: str


@dataclass(frozen=True, slots=True)
class EngineFatal:
    """The core could not start, or stopped for good (FatalStepError); the message is one line for the user."""
    message: str


class FatalStepError(RuntimeError):
    """A step failed in a way the core cannot recover from (a tensor-parallel rank died or fell out of
    step): the loop fails every request, reports EngineFatal and exits."""


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
    labels: tuple[str, ...] = ()          # a sequence classifier's labels in id order (empty: not one)
    is_speech_model: bool = False         # a speech-to-text model (Whisper): serves TranscribeRequests only
    languages: tuple[str, ...] = ()       # a speech model's input languages (ISO 639-1), ('en',) for English-only
    can_translate: bool = False           # a speech model that translates speech to English (multilingual ones)
    is_vision_model: bool = False         # takes images in prompts (AddRequest.images)
    limit_images_per_prompt: int = 0      # the most images one prompt may hold (vision models)


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position."""
    token_id: int
    logprob: float | None                  # None only for a prompt's first token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), most likely first


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class TokenOutput:
    """New tokens of one sample (index) of one request, produced by one engine step.

    For best_of > n the engine holds a request's samples back and sends them all when it finishes,
    keeping only the n best by cumulative logprob.
    """
    request_id: str
    index: int                                   # which of the request's n samples
    new_token_ids: list[int]                     # the eos / stop id that ended a sample is the last one
    new_logprobs: list[TokenLogprob] | None = None   # one per new token, when params.logprobs is set
    finish_reason: str | None = None             # 'stop' | 'length' | 'abort' | 'error'; None = more
    stop_token_id: int | None = None             # the eos / stop id that ended it, if one did
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0                   # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob] | None = None   # one per prompt token, with a request's first output
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class TranscriptionSegment:
    """A stretch of the clip and its text tokens (Whisper's segment, as verbose_json reports it)."""
    id: int                                      # 0, 1, ... over the whole request
    start: float                                 # seconds from the clip's start
    end: float
    token_ids: list[int]                         # text tokens only (no special or timestamp tokens)
    avg_logprob: float                           # mean logprob of the segment's window's sampled tokens
    no_speech_prob: float                        # P(<|nospeech|>) at the window's start-of-transcript
    temperature: float


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class TranscriptionOutput:
    """Progress of one TranscribeRequest: text tokens the client may show now, and segments now final.

    Every new_token_ids of a request, concatenated, equals its segments' token_ids concatenated: tokens
    are sent only once they are final (a segment closed, or a window without timestamps finished).
    """
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    segments: list[TranscriptionSegment] = field(default_factory=list)   # segments closed since the last one
    language: str | None = None                  # the language given or detected (set from the first output)
    duration: float = 0.0                        # seconds of audio in the request
    finished: bool = False
    finish_reason: str | None = None             # 'stop' | 'abort' | 'error' once finished
    num_tokens: int = 0                          # decoder tokens produced so far, over every window
    error: str | None = None


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for /metrics: the scheduler's figures and what the core counts itself."""
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)
    num_requests_finished: int = 0
    num_images_encoded: int = 0          # vision models: images run through the vision encoder
    num_image_cache_hits: int = 0        # images whose embeddings the encoder cache already held


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class StepOutputs:
    """What one pass of the core's loop produced (immediate outputs of messages, then the step's)."""
    outputs: list[TokenOutput | TranscriptionOutput]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class EmbedOutput:
    """One EmbedRequest's result: the field of its task is set (or error)."""
    request_id: str
    embeddings: object | None = None     # 'embed': numpy float32 [len(inputs), dimensions]
    probs: object | None = None          # 'classify': numpy float32 [len(inputs), num_labels], activated
    token_embeddings: list | None = None   # 'token_embed': numpy float32 [len(ids), hidden] per input
    num_tokens: int = 0
    error: str | None = None
    error_code: str | None = None        # 'context_length_exceeded' for an over-long input


ToCore = AddRequest | AbortRequests | StopSample | EmbedRequest | TranscribeRequest | StatsRequest | Shutdown
FromCore = PhaseUpdate | EngineFatal | EngineInfo | StepOutputs | EngineStats | EmbedOutput
