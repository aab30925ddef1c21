"""Request parsing: JSON bodies -> plain dataclasses with to_sampling_params() (hand-written validation)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs
from launcher.server.errors import bad_request
from launcher.server.fields import Fields
from launcher.server.structured import read_constraint

MAX_N = 64                      # samples per prompt: more is a mistake, not a workload
MAX_LOGPROBS = 20
MAX_PROMPTS = 256               # prompts in one completions request
_SEED_RANGE = (-(2**63), 2**63 - 1 - MAX_N)   # the engine seeds sample i with seed + i
# Sampling keys a model's generation_config.json or a profile's [defaults] may preset.
DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "max_tokens")
# OpenAI parameters we recognize and refuse, rather than silently ignore.
UNSUPPORTED = {"suffix": "the 'suffix' parameter (insertion) is not supported by this server",
               "functions": "'functions' is deprecated by OpenAI and not supported: use 'tools'",
               "function_call": "'function_call' is deprecated by OpenAI and not supported: use 'tool_choice'",
               "audio": "audio output is not supported", "prediction": "predicted outputs are not supported"}


@dataclass(frozen=True, slots=True)
class SamplingFields:
    """The sampling part of a request; None means 'not given' (profile / model / OpenAI defaults apply)."""
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None            # number of alternatives; 0: only the chosen token's logprob
    prompt_logprobs: int | None = None     # the same for each prompt token (completions' echo + logprobs)
    structured: StructuredOutputs | None = None   # constrained decoding (response_format & co.)

    def to_sampling_params(self, defaults: dict[str, Any], max_tokens: int | None) -> SamplingParams:
        """SamplingParams with request values over `defaults` (profile, then model); `max_tokens` is final."""
        def pick(name: str) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name)

        kwargs = {k: pick(k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                       "presence_penalty", "frequency_penalty")}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return SamplingParams(
                n=self.n, best_of=self.best_of, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                logit_bias=self.logit_bias, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids),
                ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens, logprobs=self.logprobs,
                prompt_logprobs=self.prompt_logprobs, structured_outputs=self.structured, **kwargs)
        except SamplingParamsError as e:
            raise bad_request(str(e), e.param) from None


def read_sampling(f: Fields, vocab_size: int, logprobs: int | None, min_max_tokens: int = 1) -> SamplingFields:
    """The sampling fields OpenAI and vLLM's extra body share between completions and chat
    (`min_max_tokens` 0 lets an echo request score its prompt without generating)."""
    max_tokens = f.int("max_completion_tokens", lo=min_max_tokens) if f.has("max_completion_tokens") else None
    if max_tokens is None:
        max_tokens = f.int("max_tokens", lo=min_max_tokens)
    else:
        f.read.add("max_tokens")
    n = f.int("n", 1, lo=1, hi=MAX_N)
    best_of = f.int("best_of", lo=1, hi=MAX_N)
    if best_of is not None and best_of < n:
        raise bad_request(f"'best_of' ({best_of}) must be >= n ({n})", "best_of")
    min_tokens = f.int("min_tokens", 0, lo=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    top_k = f.int("top_k", lo=-1)
    return SamplingFields(
        n=n, best_of=best_of,
        temperature=f.float("temperature", lo=0.0, hi=100.0),
        top_p=f.float("top_p", lo=0.0, hi=1.0),
        top_k=top_k,
        min_p=f.float("min_p", lo=0.0, hi=1.0),
        repetition_penalty=f.float("repetition_penalty", lo=0.0),
        presence_penalty=f.float("presence_penalty", lo=-2.0, hi=2.0),
        frequency_penalty=f.float("frequency_penalty", lo=-2.0, hi=2.0),
        max_tokens=max_tokens, min_tokens=min_tokens,
        seed=f.int("seed", lo=_SEED_RANGE[0], hi=_SEED_RANGE[1]),
        logit_bias=_logit_bias(f, vocab_size),
        stop=f.str_or_str_list("stop"),
        stop_token_ids=f.int_list("stop_token_ids", 0, vocab_size - 1),
        ignore_eos=f.bool("ignore_eos", False),
        include_stop_str_in_output=f.bool("include_stop_str_in_output", False),
        skip_special_tokens=f.bool("skip_special_tokens", True),
        spaces_between_special_tokens=f.bool("spaces_between_special_tokens", True),
        logprobs=logprobs)


def _logit_bias(f: Fields, vocab_size: int) -> dict[int, float] | None:
    raw = f.dict("logit_bias")
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"'logit_bias' token id {token_id} is outside [0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        bias[token_id] = float(value)
    return bias


def read_stream_options(f: Fields, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); stream_options without stream is a 400, as OpenAI has it."""
    options = f.dict("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    sub = Fields(options, "stream_options.")
    return bool(sub.bool("include_usage", False)), bool(sub.bool("continuous_usage_stats", False))


def refuse_unsupported(f: Fields, keys: tuple[str, ...]) -> None:
    for key in keys:
        if f.has(key):
            raise bad_request(UNSUPPORTED[key], key)


# ---------------------------------------------------------------------------------------- completions


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]         # each a text or token ids
    sampling: SamplingFields
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    echo: bool = False
    add_special_tokens: bool = True


def parse_completion_request(body: dict, vocab_size: int) -> CompletionRequest:
    f = Fields(body)
    model = model_field(f)
    refuse_unsupported(f, ("suffix",))
    prompts = read_prompts(f.raw("prompt"), vocab_size)
    logprobs = f.int("logprobs", lo=0, hi=MAX_LOGPROBS)
    stream = bool(f.bool("stream", False))
    include_usage, continuous = read_stream_options(f, stream)
    echo = bool(f.bool("echo", False))
    sampling = read_sampling(f, vocab_size, logprobs, min_max_tokens=0 if echo else 1)
    if stream and sampling.best_of is not None and sampling.best_of > sampling.n:
        raise bad_request("'best_of' > n cannot be streamed", "best_of")
    if echo and logprobs is not None:
        # NOTE: the engine sends prompt logprobs with a request's first output; best_of > n holds outputs back
        # and sends only the chosen samples, without them.
        if sampling.best_of is not None and sampling.best_of > sampling.n:
            raise bad_request("'echo' with 'logprobs' (prompt logprobs) cannot be combined with best_of > n",
                              "best_of")
        sampling = dataclasses.replace(sampling, prompt_logprobs=logprobs)
    sampling = dataclasses.replace(sampling, structured=read_constraint(f))
    f.str("user")
    return CompletionRequest(model=model, prompts=prompts, sampling=sampling, stream=stream,
                             include_usage=include_usage, continuous_usage_stats=continuous, echo=echo,
                             add_special_tokens=bool(f.bool("add_special_tokens", True)))


def requested_model(body: dict) -> str:
    """The body's `model` (a 400 when it is missing or not a string): which model the registry serves it with."""
    return model_field(Fields(body))


def model_field(f: Fields) -> str:
    model = f.raw("model")
    if model is None:
        raise bad_request("'model' is required", "model")
    if not isinstance(model, str):
        f.fail("model", "a string", model)
    return model


def read_prompts(prompt: Any, vocab_size: int, param: str = "prompt") -> list[str | list[int]]:
    """OpenAI's four prompt shapes: a string, strings, token ids, or lists of token ids."""
    if prompt is None:
        raise bad_request(f"'{param}' is required", param)
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
        prompts = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise bad_request(f"'{param}' must not be empty", param)
    else:
        raise bad_request(f"'{param}' must be a string, an array of strings, an array of token ids, or an "
                          "array of token-id arrays", param)
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} inputs per request, got {len(prompts)}", param)
    for p in prompts:
        if isinstance(p, list) and any(not 0 <= t < vocab_size for t in p):
            raise bad_request(f"{param} token ids must be in [0, {vocab_size})", param)
    return prompts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
