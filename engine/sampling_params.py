"""SamplingParams: what a request asks of the sampler, validated once at the API seam."""
from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names the field (for OpenAI-shaped errors)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """Constrained decoding: exactly one of these is set (vLLM's `structured_outputs`, OpenAI's
    `response_format`)."""
    json: str | None = None              # a JSON schema, as JSON text
    json_object: bool = False            # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None           # a Lark grammar

    def __post_init__(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None,
                 self.choice is not None, self.grammar is not None]
        if sum(given) != 1:
            raise SamplingParamsError("structured_outputs", "give exactly one of json, json_object, regex, "
                                      "choice or grammar")
        if self.choice is not None and not self.choice:
            raise SamplingParamsError("structured_outputs", "choice must be a non-empty list of strings")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    best_of: int | None = None          # sample best_of, return the n with highest cumulative logprob
    temperature: float = 1.0            # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 (or -1) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0     # HF semantics: applies to prompt and output tokens
    presence_penalty: float = 0.0       # OpenAI semantics: output tokens only
    frequency_penalty: float = 0.0      # OpenAI semantics: output tokens only
    logit_bias: dict[int, float] | None = None
    seed: int | None = None             # per-request generator: reproducible whatever the batch mates
    max_tokens: int | None = 16         # None: up to max_model_len
    min_tokens: int = 0                 # stop ids (and eos) are masked until this many are generated
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None         # None: none; k: chosen token's logprob + top-k alternatives
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputs | None = None
    # Text-level options, handled by the server's detokenizer, not the engine:
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_token_logprobs(self) -> bool:
        """Whether the engine must compute each sampled token's logprob: returned (logprobs), or summed to
        rank best_of samples."""
        return self.logprobs is not None or self.num_samples > self.n

    @property
    def num_samples(self) -> int:
        """How many sequences the engine runs for this request (best_of >= n)."""
        return self.best_of or self.n

    def validate(self) -> None:
        def bad(param: str, message: str):
            raise SamplingParamsError(param, message)

        if self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}")
        if self.best_of is not None and self.best_of < self.n:
            bad("best_of", f"best_of must be >= n ({self.n}), got {self.best_of}")
        if self.temperature < 0:
            bad("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"top_k must be -1 (off) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                bad(name, f"{name} must be in [-2, 2], got {value}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                bad(name, f"{name} must be between 0 and 20, got {value}")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not -100.0 <= bias <= 100.0:
                    bad("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for {token_id}")
