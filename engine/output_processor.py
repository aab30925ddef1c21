"""Engine outputs -> per-sample text: incremental detokenizing, stop strings, logprobs (the client side).

Both clients of the engine use it — the server's handlers (through launcher/server/generation.py) and
the offline `engine.LLM` — so text, stop strings and finish reasons come out the same either way. Errors
are returned as values; the caller decides what they mean to its user.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.messages import TokenLogprob, TokenOutput
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleDelta:
    """What one engine output adds to one sample: text safe to show, tokens, and the end if it came."""
    request_id: str
    index: int                          # the sample's choice index (see OutputProcessor.add_request)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # A stop string ended the sample before the engine did (it never sees text): the caller must send
    # the engine a StopSample, so that with n > 1 it does not generate on until the siblings finish.
    stops_engine_sample: bool = False


@dataclass(frozen=True, slots=True)
class GenerationError:
    """A request failed in the engine: 'engine_error' (a step failed) or 'aborted' (the engine stopped)."""
    request_id: str
    code: str
    message: str


class SampleState:
    """One sample's text as it streams: the detokenizer feeds the stop-string matcher."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams, index: int,
                 score_only: bool = False):
        # score_only: an echo request with max_tokens 0; the engine must sample one token, which is dropped.
        self.index = index
        self._score_only = score_only
        self._keep_logprobs = params.logprobs is not None
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._include_stop = params.include_stop_str_in_output
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []      # every token's, when the request asked for logprobs
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None   # vLLM's field: the stop string or stop token id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        return sum(e.logprob for e in self.logprobs) if self._keep_logprobs else None

    def push(self, out: TokenOutput) -> SampleDelta:
        delta = SampleDelta(out.request_id, self.index)
        if self.finished:  # already ended by a stop string; the engine is still producing (n > 1)
            return delta
        if self._score_only:
            self.finish_reason = delta.finish_reason = "length"
            return delta
        ids = list(out.new_token_ids)
        self.token_ids.extend(ids)
        delta.token_ids = ids
        if out.new_logprobs is not None:
            delta.logprobs = list(out.new_logprobs)
            self.logprobs.extend(out.new_logprobs)
        text_ids = ids
        # The eos / stop id ends the sample but is not text, unless the client asked for stops in the output.
        if out.stop_token_id is not None and ids and ids[-1] == out.stop_token_id and not self._include_stop:
            text_ids = ids[:-1]
        piece = self._detok.push(text_ids)
        if out.finished:
            piece += self._detok.flush()
        check = self._stops.push(piece)
        delta.text = check.text
        if check.stopped:
            self.finish_reason, self.stop_reason = "stop", check.stop_str
            delta.stops_engine_sample = not out.finished
        elif out.finished:
            delta.text += self._stops.flush()
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_token_id
        delta.finish_reason, delta.stop_reason = self.finish_reason, self.stop_reason
        self.text += delta.text
        return delta


class _RequestState:
    __slots__ = ("samples", "prompt_token_ids", "prompt_logprobs", "num_cached_tokens")

    def __init__(self, samples: list[SampleState], prompt_token_ids: list[int]):
        self.samples = samples
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.num_cached_tokens = 0


class OutputProcessor:
    """Per engine request, its samples' text as the outputs arrive."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    first_index: int = 0, score_only: bool = False) -> list[SampleState]:
        """Track a request's params.n samples; their deltas are numbered first_index, first_index + 1, ...
        (a completions request with several prompts numbers its choices across them)."""
        assert request_id not in self._requests, request_id
        samples = [SampleState(self._tokenizer, prompt_token_ids, params, first_index + i, score_only)
                   for i in range(params.n)]
        self._requests[request_id] = _RequestState(samples, list(prompt_token_ids))
        return samples

    def process(self, out: TokenOutput) -> SampleDelta | GenerationError | None:
        """Apply one engine output; None for a request this processor does not track (any more)."""
        state = self._requests.get(out.request_id)
        if state is None:
            return None
        sample = state.samples[out.index]
        if out.prompt_logprobs is not None:
            assert len(out.prompt_logprobs) == len(state.prompt_token_ids), out.request_id
            state.prompt_logprobs = out.prompt_logprobs
        if not sample.finished and out.finish_reason == "error":
            return GenerationError(out.request_id, "engine_error", f"generation failed: {out.error or 'engine error'}")
        if not sample.finished and out.finish_reason == "abort":
            return GenerationError(out.request_id, "aborted", "the request was aborted (the engine is shutting down)")
        if out.finished and out.index == 0:   # one count per request, not per sample
            state.num_cached_tokens = out.num_cached_tokens
        return sample.push(out)

    def samples(self, request_id: str) -> list[SampleState]:
        return self._requests[request_id].samples

    def prompt_logprobs(self, request_id: str) -> list[TokenLogprob] | None:
        """The prompt's token logprobs (the first has none), once the engine sent them."""
        return self._requests[request_id].prompt_logprobs

    def num_cached_tokens(self, request_id: str) -> int:
        return self._requests[request_id].num_cached_tokens

    def is_finished(self, request_id: str) -> bool:
        return all(s.finished for s in self._requests[request_id].samples)

    @property
    def all_finished(self) -> bool:
        return all(all(s.finished for s in r.samples) for r in self._requests.values())

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
