"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)) over the engine process."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.core_process import EngineProcess
from engine.loader import ModelFiles, load_tokenizer
from engine.messages import EngineInfo, EngineRequest, TokenOutput
from engine.sampling_params import SamplingParams


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
    shutdown() to stop the process."""

    def __init__(self, model: str = "HuggingFaceTB/SmolLM2-135M-Instruct", *, revision: str | None = None,
                 offline: bool = False, **engine_kwargs):
        from engine.weights import resolve_model
        path = resolve_model(model, revision=revision, offline=offline)
        self.config = EngineConfig(model=str(path), served_name=model, **engine_kwargs)
        self.tokenizer = load_tokenizer(ModelFiles.at(path))
        self._process = EngineProcess(self.config)
        self._process.start()
        self.info: EngineInfo = self._wait_ready()
        self._ids = itertools.count()

    def _wait_ready(self) -> EngineInfo:
        while True:
            try:
                msg = self._process.recv()
            except EOFError:
                raise RuntimeError("the engine process exited during startup") from None
            if msg[0] == "ready":
                return msg[1]
            if msg[0] == "fatal":
                self._process.shutdown()
                raise RuntimeError(msg[1])

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = sampling_params if isinstance(sampling_params, list) else \
            [sampling_params or SamplingParams()] * len(prompts)
        results: dict[str, RequestOutput] = {}
        pending: dict[str, int] = {}
        for prompt, params in zip(prompts, params_list):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{next(self._ids)}"
            results[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                                         [CompletionOutput(i, "", [], None, 0.0) for i in range(params.n)])
            pending[rid] = params.n
            self._process.send(EngineRequest(rid, ids, params, time.monotonic()))
        while pending:
            msg = self._process.recv()
            if msg[0] != "outputs":
                continue
            for out in msg[1]:
                self._apply(results[out.request_id], out)
                if out.finished:
                    pending[out.request_id] -= 1
                    if not pending[out.request_id]:
                        del pending[out.request_id]
        for result in results.values():
            for completion in result.outputs:
                completion.text = self.tokenizer.decode(completion.token_ids)
        return list(results.values())

    def _apply(self, result: RequestOutput, out: TokenOutput) -> None:
        if out.error:
            raise RuntimeError(f"request {out.request_id}: {out.error}")
        completion = result.outputs[out.index]
        completion.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            completion.logprobs = (completion.logprobs or []) + out.new_logprobs
            completion.cumulative_logprob += sum(out.new_logprobs)
        if out.finished:
            completion.finish_reason = out.finish_reason
            result.num_cached_tokens = out.num_cached_tokens

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
