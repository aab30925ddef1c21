"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)) over the engine process."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.engine_process import EngineProcess
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import (AbortRequests, AddRequest, EngineFatal, EngineInfo, PhaseUpdate, StepOutputs,
                             StopSample)
from engine.output_processor import GenerationError, OutputProcessor
from engine.sampling_params import SamplingParams
from engine.validation import check_request
from engine.weights import resolve_model


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None
    logprobs: list[float] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    """Load a model into an engine process and generate offline. Use as a context manager or call
    shutdown() to stop the process. Works from a plain script: the engine process never re-runs it."""

    def __init__(self, model: str = "HuggingFaceTB/SmolLM2-135M-Instruct", *, revision: str | None = None,
                 offline: bool = False, **engine_kwargs):
        path = resolve_model(model, revision=revision, offline=offline)
        self.config = EngineConfig(model=str(path), served_name=model, **engine_kwargs)
        self.tokenizer = load_tokenizer(ModelFiles.at(path))
        self._process: EngineProcess | None = EngineProcess(self.config)
        self._process.start()
        self.info: EngineInfo = self._wait_ready()
        self._ids = itertools.count()

    def _wait_ready(self) -> EngineInfo:
        while True:
            try:
                msg = self._process.recv()
            except EOFError:
                code = self._process.exit_code
                self.shutdown()
                raise RuntimeError(f"the engine process exited during startup (exit code {code}); what it "
                                   "printed above says why") from None
            match msg:
                case EngineInfo():
                    return msg
                case EngineFatal():
                    self.shutdown()
                    raise RuntimeError(msg.message)
                case PhaseUpdate():
                    continue

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); results in prompt order. A prompt the engine
        cannot take (empty, unknown ids, too long for max_model_len) raises InvalidRequest (a ValueError)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = sampling_params if isinstance(sampling_params, list) else \
            [sampling_params or SamplingParams()] * len(prompts)
        requests = []
        for prompt, params in zip(prompts, params_list):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            check_request(ids, params.max_tokens, self.info)
            requests.append((f"offline-{next(self._ids)}", prompt, ids, params))
        processor = OutputProcessor(self.tokenizer)
        for rid, _, ids, params in requests:
            processor.add_request(rid, ids, params)
            self._process.send(AddRequest(rid, ids, params, time.monotonic()))
        while not processor.all_finished:
            msg = self._process.recv()
            if not isinstance(msg, StepOutputs):
                continue
            for out in msg.outputs:
                result = processor.process(out)
                if isinstance(result, GenerationError):
                    self._process.send(AbortRequests([rid for rid, *_ in requests]))
                    raise RuntimeError(f"request {result.request_id}: {result.message}")
                if result is not None and result.stops_engine_sample:
                    self._process.send(StopSample(out.request_id, out.index))
        return [self._result(processor, rid, prompt, ids) for rid, prompt, ids, _ in requests]

    @staticmethod
    def _result(processor: OutputProcessor, rid: str, prompt, ids: list[int]) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.text, s.token_ids, s.finish_reason,
                                    s.cumulative_logprob if s.logprobs else 0.0,
                                    [e.logprob for e in s.logprobs] or None)
                   for s in processor.samples(rid)]
        return RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, outputs,
                             processor.num_cached_tokens(rid))

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, tools=tools),
                                         add_special_tokens=False) for c in conversations]
        return self.generate(prompts, sampling_params)

    def shutdown(self) -> None:
        if self._process is not None:
            self._process.shutdown()
            self._process = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
