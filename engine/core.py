"""EngineCore: schedule -> run the model -> sample -> update, one step at a time (in-process)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.loader import ModelFiles, load_config, load_model
from engine.messages import (AddRequest, EmbedOutput, EmbedRequest, EngineInfo, EngineStats, TokenLogprob, TokenOutput,
                             TranscribeRequest, TranscriptionOutput)
from engine.model_runner import ModelOutput, ModelRunner
from engine.models.parallel import SINGLE
from engine.sampler import Sampler, SamplingRow, compute_prompt_logprobs, make_generator
from engine.request_state import RequestState, Sample
from engine.scheduler import Batch, Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.step_threads import SmallStepThreads
from engine.startup import (StartupError, generation_defaults, initial_max_model_len, num_kv_blocks, pick_device,
                            pick_dtype, pick_kv_dtype)
from engine.validation import InvalidRequest, check_request

log = logging.getLogger("llm.engine")

# a CPU decode step of this many sequences or fewer runs on all threads or all but one, whichever has been
# faster (engine/step_threads.py); larger batches and prompts get every thread
SMALL_DECODE_ROWS = 1


class EngineCore:
    def __init__(self, config: EngineConfig, on_phase: Callable[[str], None] = lambda phase: None):
        start = time.monotonic()
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        self._threads = torch.get_num_threads()   # what a step gets, but small decode steps (SMALL_DECODE_ROWS)
        self._small_step_threads = SmallStepThreads(self._threads) \
            if self.device.type == "cpu" and self._threads >= 2 else None
        on_phase("loading weights")
        files = self._files = ModelFiles.at(config.model)
        self.model_config = model_config = load_config(files)
        self.dtype = pick_dtype(config.dtype, self.device)
        max_model_len = initial_max_model_len(config, model_config)
        self.tp = None   # engine.tp_worker.TensorParallelGroup: the other ranks, with tensor_parallel_size > 1
        if config.tensor_parallel_size > 1:
            if model_config.is_vision_model:
                raise StartupError("vision-language models are not served with tensor_parallel_size > 1 yet")
            from engine.tp_worker import TensorParallelGroup
            self.tp = TensorParallelGroup.start(config, model_config, self.device)
        try:
            self._build_runner(config, files, max_model_len, on_phase)
        except BaseException:
            self.close()
            raise
        self.eos_token_ids, self.default_sampling = generation_defaults(files, model_config)
        num_blocks, max_model_len = self.runner.num_blocks, self.max_model_len
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
        self.requests: dict[str, RequestState] = {}
        self._samples: dict[str, Sample] = {}   # seq_id -> its sample, while the engine runs it
        self.num_requests_finished = 0
        self.info = EngineInfo(
            model_name=config.served_name or config.model, max_model_len=max_model_len,
            num_blocks=num_blocks, block_size=config.block_size, kv_capacity_tokens=num_blocks * config.block_size,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            eos_token_ids=tuple(sorted(self.eos_token_ids)), vocab_size=model_config.vocab_size,
            is_embedding_model=False, load_seconds=time.monotonic() - start,
            default_sampling=self.default_sampling, is_vision_model=model_config.is_vision_model,
            limit_images_per_prompt=config.limit_images_per_prompt if model_config.is_vision_model else 0)

    def _build_runner(self, config: EngineConfig, files: ModelFiles, max_model_len: int,
                      on_phase: Callable[[str], None]) -> None:
        """Load this rank's weights and size the KV cache (the workers do the same, engine/tp_worker.py)."""
        model_config, shard = self.model_config, self.tp.shard if self.tp else SINGLE
        self.model = load_model(files, model_config, self.dtype, self.device, max_positions=max_model_len,
                                cpu_kernels=config.cpu_kernels, float_copies=config.cpu_float_copies,
                                quantized_activations=config.cpu_quantized_activations,
                                weight_cache=config.cpu_weight_cache, tp=shard if self.tp else None)
        on_phase("allocating KV cache")
        self.kv_dtype = pick_kv_dtype(config.kv_cache_dtype, self.dtype, self.device, self.model)
        num_blocks = num_kv_blocks(
            config, ModelRunner.kv_bytes_per_block(model_config, config.block_size, self.kv_dtype, shard),
            self.device)
        if self.tp:
            num_blocks = self.tp.agree_num_blocks(num_blocks)
        capacity = num_blocks * config.block_size
        if config.max_model_len == "auto":
            max_model_len = min(max_model_len, capacity)
        elif capacity < max_model_len:
            raise StartupError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {config.block_size}), "
                f"less than one sequence of max_model_len={max_model_len}: set max_model_len <= "
                f"{capacity} (or 'auto'), or give the cache more memory")
        self.max_model_len = max_model_len
        self.runner = ModelRunner(self.model, model_config, num_blocks, config.block_size, self.kv_dtype,
                                  self.device, max_model_len, shard)
        self.gpu_startup = None  # engine.model_runner.GpuStartup: autotune and graph capture figures
        if self.device.type == "cuda":
            self.gpu_startup = self.runner.warm_up(config, max_model_len, on_phase)
        if self.tp:
            from engine.tp_worker import TensorParallelRunner
            self.runner = TensorParallelRunner(self.runner, self.tp)

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do in one process)."""
        if self.tp is not None:
            self.tp.close()
            self.tp = None

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request: AddRequest) -> list[TokenOutput]:
        """Queue a request its client has validated (engine/validation.py). Returns error outputs at once
        only for what just the engine can find wrong: a structured-output grammar that does not compile."""
        rid, params = request.request_id, request.params
        assert rid not in self.requests, f"request id {rid!r} is already running"
        assert _accepts(request, self.info), f"{rid}: clients check requests with engine.validation.check_request"
        matchers: list = [None] * params.num_samples
        if params.structured_outputs is not None:
            try:
                backend = self._structured_backend()
                matchers = [backend.matcher(params.structured_outputs) for _ in range(params.num_samples)]
            except (ValueError, ImportError) as e:
                return [TokenOutput(rid, i, [], finish_reason="error", error=f"structured outputs: {e}",
                                    num_prompt_tokens=len(request.prompt_token_ids))
                        for i in range(params.n)]
        # Qwen2-VL's rotary positions of the prompt: computed once, shared (read only) by every sample
        rope = self.model.prompt_rope_positions(request.prompt_token_ids, request.images) \
            if getattr(self.model, "uses_mrope", False) else None
        samples = [Sample(rid, i, self._sequence(f"{rid}#{i}", request, rope),
                           None if params.seed is None else make_generator(params.seed + i, self.device), matchers[i])
                   for i in range(params.num_samples)]
        for sample in samples:
            self.scheduler.add(sample.seq)
            self._samples[sample.seq.seq_id] = sample
        self.requests[rid] = RequestState(request, samples)
        return []

    @staticmethod
    def _sequence(seq_id: str, request: AddRequest, rope: tuple | None) -> Sequence:
        seq = Sequence(seq_id, request.prompt_token_ids, request.params, request.arrival_time, request.images)
        if rope is not None:
            seq.mrope_positions, seq.mrope_delta = rope
        return seq

    def _structured_backend(self):
        if self._structured is None:
            from engine.loader import load_tokenizer
            from engine.structured import StructuredBackend
            tokenizer = load_tokenizer(self._files)
            self._structured = StructuredBackend(tokenizer.backend.to_str(), self.model_config.vocab_size,
                                                 self.eos_token_ids)
        return self._structured

    def abort(self, request_ids: list[str]) -> list[TokenOutput]:
        """Finish these requests now: an 'abort' output for each of their samples still running."""
        outputs = []
        for rid in request_ids:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            for sample in state.samples:
                self.scheduler.abort(sample.seq.seq_id)
                if self._samples.pop(sample.seq.seq_id, None) is not None and sample.index < state.request.params.n:
                    outputs.append(TokenOutput(rid, sample.index, [], finish_reason="abort"))
        return outputs

    def stop_sample(self, request_id: str, index: int) -> list[TokenOutput]:
        """Finish one sample early with reason 'stop' (its text hit a stop string, which only the client
        sees) and free its blocks. Ignored for unknown or finished samples, and under best_of > n, where
        samples are ranked only once all have finished."""
        state = self.requests.get(request_id)
        if state is None or index >= len(state.samples) or state.holds_back:
            return []
        sample = state.samples[index]
        if sample.seq.seq_id not in self._samples:
            return []
        self.scheduler.abort(sample.seq.seq_id)
        self._sample_done(state, sample)
        seq = sample.seq
        return [TokenOutput(request_id, index, [], finish_reason="stop", num_prompt_tokens=seq.num_prompt_tokens,
                            num_cached_tokens=seq.num_cached_tokens)]

    def fail_all(self, message: str) -> list[TokenOutput]:
        """After an internal error: end every request with an error and free its blocks."""
        return [TokenOutput(out.request_id, out.index, [], finish_reason="error", error=message)
                for out in self.abort(list(self.requests))]

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        threads = self._threads_for(batch)
        if threads == self._threads:
            return self._step(batch)
        torch.set_num_threads(threads)   # for this step only (~1 us a call)
        try:
            return self._step(batch)
        finally:
            torch.set_num_threads(self._threads)

    def _step(self, batch: Batch) -> list[TokenOutput]:
        result = self.runner.execute(batch)
        if result.prompt_logits is not None:
            self._record_prompt_logprobs(batch, result)
        sampled: list[int | None] = [None] * len(batch.seqs)
        chosen: dict[int, TokenLogprob] = {}
        if result.sample_rows:
            samples = [self._samples[batch.seqs[r].seq.seq_id] for r in result.sample_rows]
            rows = [SamplingRow(params=s.seq.params, prompt_token_ids=s.seq.prompt_token_ids,
                                output_token_ids=s.seq.output_token_ids, generator=s.generator) for s in samples]
            constrained = [k for k, s in enumerate(samples) if s.matcher is not None]
            if constrained:
                self._structured.apply(result.logits, constrained, [samples[k].matcher for k in constrained])
            out = self.sampler(result.logits, rows, self.eos_token_ids)
            for k in constrained:
                samples[k].matcher.consume_token(out.token_ids[k])
            for k, r in enumerate(result.sample_rows):
                sampled[r] = out.token_ids[k]
                top = out.top_logprobs[k] if out.top_logprobs is not None else []
                chosen[r] = TokenLogprob(out.token_ids[k], out.logprobs[k], top)
        self.scheduler.update(batch, sampled)
        return self._outputs(batch, chosen)

    def _threads_for(self, batch: Batch) -> int:
        """A small decode step's threads on the CPU (SMALL_DECODE_ROWS), all for the others. The kernels' sums
        do not depend on how many threads share them."""
        if self._small_step_threads is None:
            return self._threads
        if batch.is_decode_only and batch.num_seqs <= SMALL_DECODE_ROWS:
            return self._small_step_threads.next(time.perf_counter())
        self._small_step_threads.interrupt()
        return self._threads

    def _record_prompt_logprobs(self, batch: Batch, result: ModelOutput) -> None:
        for row, offset, count in result.prompt_logprob_spans:
            s = batch.seqs[row]
            sample = self._samples[s.seq.seq_id]
            state = self.requests[sample.request_id]
            done = len(state.prompt_logprobs)
            if sample.index != 0 or s.start + count <= done:
                continue  # one sample records them; a recompute after preemption adds nothing new
            skip = done - s.start if done > s.start else 0
            targets = s.seq.prompt_token_ids[s.start + 1 + skip: s.start + 1 + count]
            computed = compute_prompt_logprobs(result.prompt_logits[offset + skip: offset + count], targets,
                                               s.seq.params.prompt_logprobs)
            state.prompt_logprobs.extend(TokenLogprob(t, lp, top) for t, (lp, top) in zip(targets, computed))

    def _outputs(self, batch: Batch, chosen: dict[int, TokenLogprob]) -> list[TokenOutput]:
        outputs = []
        for r, s in enumerate(batch.seqs):
            if r not in chosen:
                continue
            seq = s.seq
            sample = self._samples[seq.seq_id]
            state = self.requests[sample.request_id]
            params = seq.params
            entry = chosen[r]
            sample.cumulative_logprob += entry.logprob
            finished = seq.is_finished
            if state.holds_back:
                if finished:
                    state.num_finished += 1
                    if state.num_finished == len(state.samples):
                        outputs.extend(self._finish_best_of(state))
                continue
            prompt_logprobs = None
            if params.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                prompt_logprobs = [TokenLogprob(seq.prompt_token_ids[0], None)] + state.prompt_logprobs
                state.prompt_logprobs_sent = True
            outputs.append(TokenOutput(
                sample.request_id, sample.index, [entry.token_id], [entry] if params.logprobs is not None else None,
                finish_reason=seq.finish_reason if finished else None, stop_token_id=seq.stop_token_id,
                num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
                prompt_logprobs=prompt_logprobs))
            if finished:
                self._sample_done(state, sample)
        return outputs

    def _sample_done(self, state: RequestState, sample: Sample) -> None:
        """One sample finished (its last output is sent): forget it, and the request once all are done."""
        self._samples.pop(sample.seq.seq_id, None)
        state.num_finished += 1
        if state.num_finished == len(state.samples):
            self._request_done(state)

    def _request_done(self, state: RequestState) -> None:
        del self.requests[state.request.request_id]
        self.num_requests_finished += 1

    def _finish_best_of(self, state: RequestState) -> list[TokenOutput]:
        best = sorted(state.samples, key=lambda s: -s.cumulative_logprob)[: state.request.params.n]
        outputs = [TokenOutput(state.request.request_id, index, list(s.seq.output_token_ids),
                               finish_reason=s.seq.finish_reason, stop_token_id=s.seq.stop_token_id,
                               num_prompt_tokens=s.seq.num_prompt_tokens, num_cached_tokens=s.seq.num_cached_tokens)
                   for index, s in enumerate(best)]
        for sample in state.samples:
            self._samples.pop(sample.seq.seq_id, None)
        self._request_done(state)
        return outputs

    def transcribe(self, request: TranscribeRequest) -> list[TranscriptionOutput]:
        # the server sends audio only to speech models (its capability checks): this is a client bug
        return [TranscriptionOutput(request.request_id, finished=True, finish_reason="error",
                                    error="this model does not transcribe audio")]

    def embed(self, request: EmbedRequest) -> EmbedOutput:
        """Pool this decoder's hidden states for /v1/embeddings (between steps, on a scratch cache)."""
        if self.tp is not None:   # the scratch forward would run on rank 0 alone: its all-reduces need the others
            return EmbedOutput(request.request_id, error="embeddings are not served with tensor_parallel_size > 1",
                               error_code="not_supported")
        from engine.embedding import decoder_embed_request
        return decoder_embed_request(self, request)

    def stats(self) -> EngineStats:
        images = getattr(self.runner, "encoder_cache", None)
        return EngineStats(self.scheduler.stats(), self.num_requests_finished,
                           images.num_encoded if images else 0, images.num_hits if images else 0)


def _accepts(request: AddRequest, info: EngineInfo) -> bool:
    try:
        check_request(request.prompt_token_ids, request.params.max_tokens, info, images=request.images)
    except InvalidRequest:
        return False
    return True
