"""EngineCore: schedule -> run the model -> sample -> update, one step at a time (in-process)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.loader import ModelFiles, load_config, load_model
from engine.messages import EngineInfo, EngineRequest, EngineStats, TokenOutput
from engine.model_runner import ModelRunner
from engine.sequence import Sequence
from engine.sampler import Sampler, SamplingRow, compute_prompt_logprobs
from engine.scheduler import PromptTooLongError, Scheduler, SchedulerConfig

from engine.startup import (StartupError, generation_defaults, initial_max_model_len, num_kv_blocks, pick_device,
                            pick_dtype)

log = logging.getLogger("llm.engine")


@dataclass
class _RequestState:
    request: EngineRequest
    seqs: list[Sequence]
    generators: list[torch.Generator | None]
    cumulative_logprobs: list[float]
    matchers: list | None = None   # per-sample grammar state for structured outputs
    prompt_logprobs: list = field(default_factory=list)   # (logprob, top-k) per prompt token after the first
    prompt_logprobs_sent: bool = False
    # best_of > n: every sample's tokens are held until all finish, then the n best are sent.
    held: list[list[int]] = field(default_factory=list)
    num_finished: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, on_phase: Callable[[str], None] = lambda phase: None):
        start = time.monotonic()
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        on_phase("loading weights")
        files = self._files = ModelFiles.at(config.model)
        self.model_config = model_config = load_config(files)
        self.dtype = pick_dtype(config.dtype, self.device)
        max_model_len = initial_max_model_len(config, model_config)
        self.model = load_model(files, model_config, self.dtype, self.device, max_positions=max_model_len,
                                cpu_kernels=config.cpu_kernels,
                                float_copies=config.cpu_float_copies)
        on_phase("allocating KV cache")
        num_blocks = num_kv_blocks(
            config, ModelRunner.kv_bytes_per_block(model_config, config.block_size, self.dtype), self.device)
        capacity = num_blocks * config.block_size
        if config.max_model_len == "auto":
            max_model_len = min(max_model_len, capacity)
        elif capacity < max_model_len:
            raise StartupError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {config.block_size}), "
                f"less than one sequence of max_model_len={max_model_len}: set max_model_len <= "
                f"{capacity} (or 'auto'), or give the cache more memory")
        self.max_model_len = max_model_len
        self.runner = ModelRunner(self.model, model_config, num_blocks, config.block_size, self.dtype, self.device)
        self.gpu_startup = None  # engine.cuda_graph.GpuStartup: autotune and graph capture figures
        if self.device.type == "cuda":
            from engine.cuda_graph import prepare_gpu
            self.gpu_startup = prepare_gpu(self.runner, config, max_model_len, on_phase)
        self.eos_token_ids, self.default_sampling = generation_defaults(files, model_config)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=max(config.max_num_batched_tokens, config.block_size),
                            max_model_len=max_model_len, block_size=config.block_size,
                            enable_prefix_caching=config.enable_prefix_caching,
                            enable_chunked_prefill=config.enable_chunked_prefill),
            self.block_manager, self.eos_token_ids)
        self.sampler = Sampler()
        self._structured = None  # StructuredBackend, built on the first constrained request
        self.requests: dict[str, _RequestState] = {}
        self._seq_owner: dict[str, tuple[str, int]] = {}
        self.num_requests_finished = 0
        self.info = EngineInfo(
            model_name=config.served_name or config.model, max_model_len=max_model_len,
            num_blocks=num_blocks, block_size=config.block_size, kv_capacity_tokens=capacity,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            eos_token_ids=tuple(sorted(self.eos_token_ids)), vocab_size=model_config.vocab_size,
            is_embedding_model=False, load_seconds=time.monotonic() - start,
            default_sampling=self.default_sampling)

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> list[TokenOutput]:
        """Queue a request; returns an immediate error output when it cannot ever run."""
        rid = request.request_id
        error = self._check_request(request)
        if error:
            return [TokenOutput(rid, i, [], finish_reason="error", error=error,
                                num_prompt_tokens=len(request.prompt_token_ids))
                    for i in range(request.params.n)]
        params = request.params
        state = _RequestState(request=request, seqs=[], generators=[], cumulative_logprobs=[])
        if params.structured_outputs is not None:
            try:
                backend = self._structured_backend()
                state.matchers = [backend.matcher(params.structured_outputs)
                                  for _ in range(params.num_samples)]
            except (ValueError, ImportError) as e:
                return [TokenOutput(rid, i, [], finish_reason="error", error=f"structured outputs: {e}",
                                    num_prompt_tokens=len(request.prompt_token_ids))
                        for i in range(params.n)]
        for i in range(params.num_samples):
            seq = Sequence(f"{rid}#{i}", request.prompt_token_ids, params, request.arrival_time)
            state.seqs.append(seq)
            state.generators.append(None if params.seed is None else
                                    torch.Generator().manual_seed(params.seed + i))
            state.cumulative_logprobs.append(0.0)
            state.held.append([])
            self._seq_owner[seq.seq_id] = (rid, i)
        try:
            for seq in state.seqs:
                self.scheduler.add(seq)
        except PromptTooLongError as e:
            for seq in state.seqs:
                self.scheduler.abort(seq.seq_id)
                self._seq_owner.pop(seq.seq_id, None)
            return [TokenOutput(rid, i, [], finish_reason="error", error=str(e),
                                num_prompt_tokens=len(request.prompt_token_ids)) for i in range(params.n)]
        self.requests[rid] = state
        return []

    def _structured_backend(self):
        if self._structured is None:
            from engine.loader import load_tokenizer
            from engine.structured import StructuredBackend
            tokenizer = load_tokenizer(self._files)
            self._structured = StructuredBackend(tokenizer.backend.to_str(), self.model_config.vocab_size,
                                                 self.eos_token_ids)
        return self._structured

    def abort(self, request_ids: list[str]) -> list[TokenOutput]:
        outputs = []
        for rid in request_ids:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            for i, seq in enumerate(state.seqs):
                self.scheduler.abort(seq.seq_id)
                self._seq_owner.pop(seq.seq_id, None)
                if i < state.request.params.n:
                    outputs.append(TokenOutput(rid, i, [], finish_reason="abort"))
        return outputs

    def stop_sample(self, request_id: str, index: int) -> list[TokenOutput]:
        """Finish one sample early with reason 'stop' (its text hit a stop string, which only the server
        sees) and free its blocks. Ignored for unknown or finished samples, and under best_of > n, where
        samples are ranked only once all have finished."""
        state = self.requests.get(request_id)
        if state is None or index >= len(state.seqs):
            return []
        params = state.request.params
        seq = state.seqs[index]
        if (params.best_of and params.best_of > params.n) or seq.seq_id not in self._seq_owner:
            return []
        self.scheduler.abort(seq.seq_id)
        self._sample_done(request_id, state, seq)
        return [TokenOutput(request_id, index, [], finish_reason="stop", num_prompt_tokens=seq.num_prompt_tokens,
                            num_cached_tokens=seq.num_cached_tokens)]

    def fail_all(self, message: str) -> list[TokenOutput]:
        """After an internal error: end every request with an error and free its blocks."""
        outputs = []
        for rid in list(self.requests):
            for out in self.abort([rid]):
                outputs.append(TokenOutput(rid, out.index, [], finish_reason="error", error=message))
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def _check_request(self, request: EngineRequest) -> str | None:
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            return "the prompt is empty"
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_token_ids):
            return f"prompt token ids must be in [0, {vocab})"
        max_tokens = request.params.max_tokens or 1
        if n_prompt + max_tokens > self.max_model_len:
            return (f"this model's maximum context length is {self.max_model_len} tokens; the request "
                    f"has {n_prompt} prompt tokens and asks for {max_tokens} more")
        if request.request_id in self.requests:
            return f"request id {request.request_id!r} is already running"
        return None

    # -- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        prepared = self.runner.prepare(batch)
        logits, prompt_logits = self.runner.forward(prepared)
        if prompt_logits is not None:
            self._record_prompt_logprobs(batch, prepared, prompt_logits)
        sampled: list[int | None] = [None] * len(batch.seqs)
        sampled_logprob: dict[int, tuple[float, list]] = {}
        if prepared.sample_rows:
            rows, constrained, matchers = [], [], []
            for k, r in enumerate(prepared.sample_rows):
                seq = batch.seqs[r].seq
                rid, index = self._seq_owner[seq.seq_id]
                state = self.requests[rid]
                rows.append(SamplingRow(params=seq.params, prompt_token_ids=seq.prompt_token_ids,
                                        output_token_ids=seq.output_token_ids,
                                        generator=state.generators[index]))
                if state.matchers is not None:
                    constrained.append(k)
                    matchers.append(state.matchers[index])
            if constrained:
                self._structured.apply(logits, constrained, matchers)
            out = self.sampler(logits, rows, self.eos_token_ids)
            for k, m in zip(constrained, matchers):
                m.consume_token(out.token_ids[k])
            for k, r in enumerate(prepared.sample_rows):
                sampled[r] = out.token_ids[k]
                top = out.top_logprobs[k] if out.top_logprobs is not None else []
                sampled_logprob[r] = (out.logprobs[k], top)
        self.scheduler.update(batch, sampled)
        return self._outputs(batch, sampled, sampled_logprob)

    def _record_prompt_logprobs(self, batch, prepared, prompt_logits) -> None:
        for row, offset, count in prepared.prompt_logprob_spans:
            s = batch.seqs[row]
            rid, index = self._seq_owner[s.seq.seq_id]
            state = self.requests[rid]
            done = len(state.prompt_logprobs)
            if index != 0 or s.start + count <= done:
                continue  # one sample records them; a recompute after preemption adds nothing new
            skip = done - s.start if done > s.start else 0
            targets = s.seq.prompt_token_ids[s.start + 1 + skip: s.start + 1 + count]
            state.prompt_logprobs.extend(compute_prompt_logprobs(
                prompt_logits[offset + skip: offset + count], targets, s.seq.params.prompt_logprobs))

    def _outputs(self, batch, sampled, sampled_logprob) -> list[TokenOutput]:
        outputs = []
        for r, s in enumerate(batch.seqs):
            seq = s.seq
            if sampled[r] is None:
                continue
            rid, index = self._seq_owner[seq.seq_id]
            state = self.requests[rid]
            params = seq.params
            logprob, top = sampled_logprob[r]
            state.cumulative_logprobs[index] += logprob
            token = sampled[r]
            finished = seq.is_finished
            if params.best_of and params.best_of > params.n:
                if finished:
                    state.num_finished += 1
                    if state.num_finished == len(state.seqs):
                        outputs.extend(self._finish_best_of(rid, state))
                continue
            prompt_logprobs = None
            if params.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                prompt_logprobs = [None] + state.prompt_logprobs
                state.prompt_logprobs_sent = True
            outputs.append(TokenOutput(
                rid, index, [token], prompt_logprobs=prompt_logprobs,
                new_logprobs=[logprob] if params.logprobs is not None else None,
                new_top_logprobs=[top] if params.logprobs else None,
                finish_reason=seq.finish_reason if finished else None,
                stop_token_id=seq.stop_token_id,
                num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens))
            if finished:
                self._sample_done(rid, state, seq)
        return outputs

    def _sample_done(self, rid: str, state: _RequestState, seq: Sequence) -> None:
        """One sample finished (its last output is sent): forget it, and the request once all are done."""
        self._seq_owner.pop(seq.seq_id, None)
        state.num_finished += 1
        if state.num_finished == len(state.seqs):
            del self.requests[rid]
            self.num_requests_finished += 1

    def _finish_best_of(self, rid: str, state: _RequestState) -> list[TokenOutput]:
        order = sorted(range(len(state.seqs)), key=lambda i: -state.cumulative_logprobs[i])
        outputs = []
        for index, i in enumerate(order[: state.request.params.n]):
            seq = state.seqs[i]
            outputs.append(TokenOutput(rid, index, list(seq.output_token_ids), finish_reason=seq.finish_reason,
                                       stop_token_id=seq.stop_token_id, num_prompt_tokens=seq.num_prompt_tokens,
                                       num_cached_tokens=seq.num_cached_tokens))
        for seq in state.seqs:
            self._seq_owner.pop(seq.seq_id, None)
        del self.requests[rid]
        self.num_requests_finished += 1
        return outputs

    def embed(self, request):
        """Pool this decoder's hidden states for /v1/embeddings (between steps, on a scratch cache)."""
        from engine.embedding import decoder_embed_request
        return decoder_embed_request(self, request)

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_blocks_total=s.num_blocks_total,
            num_blocks_used=s.num_blocks_used, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions,
            num_prompt_tokens=s.num_prompt_tokens, num_generation_tokens=s.num_generation_tokens,
            num_requests_finished=self.num_requests_finished)
